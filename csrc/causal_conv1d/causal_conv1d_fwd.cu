// Depthwise causal conv1d forward (y = act(conv + bias)) and final-state extraction.
// Kernel and algorithm: causal_conv1d_tile.cuh. Instantiated for fp32/fp16/bf16 and tap chunks
// 4/8/16/32 (K > 32 loops over 32-tap chunks).
#include <cstdlib>
#include <cstring>

#include "causal_conv1d/causal_conv1d_tile.cuh"

namespace pyencoder {
namespace conv {

template <typename T>
__global__ void dw_final_state_kernel(DwConvParams p) {
  const int Km1 = p.K - 1;
  const int64_t n = (int64_t)p.B * p.C * Km1;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
       i += (int64_t)gridDim.x * blockDim.x) {
    const int j = i % Km1;
    const int c = (i / Km1) % p.C;
    const int64_t b = i / ((int64_t)Km1 * p.C);
    const float v = load_elem<T>(p.in, p.state, b, c, p.L - Km1 + j, p.L, p.K);
    reinterpret_cast<T*>(p.out_state.ptr)[b * p.out_state.sb + (int64_t)c * p.out_state.sc +
                                          (int64_t)j * p.out_state.sl] = from_f<T>(v);
  }
}

// ---- Row kernel (opt-in A/B: PYENCODER_CONV_ROW=1; forward, channel-first, K <= 32) --------
//
// The tile kernel stages 32 channels x 64 positions through shared memory with three barriers
// per block (40 % of the copy bandwidth at B=8 C=768 L=2048 on an H100, k=4). This one keeps
// everything in registers: each thread owns kN = 16 / sizeof(T) consecutive positions of one
// (b, c) row (one 16-byte load, one 16-byte store per run), a block of 128 threads covers
// kRowIter runs of 128 * kN consecutive positions of one row (all loads issued first), and the
// inputs before a thread's run (its halo) come from the kS = ceil((KMAX - 1) / kN) lanes below it
// by warp shuffles; lanes < s read theirs from memory (the neighbouring warp's data, an L1/L2
// hit; the initial state or zeros before position 0, through load_elem). The taps are
// right-aligned in KMAX registers (w'[KMAX - K + j] = w[j]; the KMAX - K before are skipped, not
// multiplied by zero, so a non-finite input only reaches the outputs whose taps read it), so
// every window index is a compile-time constant:
// output t0 + e = sum_{i >= KMAX - K} w'[i] * x[t0 + e + i - (KMAX - 1)].
// KMAX is the instantiated tap bound (4, 8, 16 or 32).
constexpr int kRowIter = 4;

template <typename T>
__device__ __forceinline__ void row_load(float (&v)[16 / sizeof(T)], const DwConvParams& p,
                                         int64_t b, int c, int pos) {
  constexpr int kN = 16 / sizeof(T);
  if (pos >= 0 && pos + kN <= p.L) {
    uint4 raw = *reinterpret_cast<const uint4*>(reinterpret_cast<const T*>(p.in.ptr) +
                                                b * p.in.sb + (int64_t)c * p.in.sc + pos);
    const T* e8 = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int e = 0; e < kN; ++e) v[e] = to_f(e8[e]);
  } else {
#pragma unroll
    for (int e = 0; e < kN; ++e) v[e] = load_elem<T>(p.in, p.state, b, c, pos + e, p.L, p.K);
  }
}

template <typename T, int KMAX>
__global__ void __launch_bounds__(kThreads) dw_conv_row_kernel(DwConvParams p) {
  constexpr int kN = 16 / sizeof(T);
  constexpr int kS = (KMAX - 1 + kN - 1) / kN;   // lanes below that hold a thread's halo
  constexpr int kW = kS * kN + kN;               // window: halo vectors, then the own vector
  const int64_t row = blockIdx.x;                // b * C + c
  const int c = (int)(row % p.C);
  const int64_t b = row / p.C;
  const int lane = threadIdx.x & 31;
  const int shift = KMAX - p.K;                  // right-aligned taps
  float w[KMAX];
#pragma unroll
  for (int i = 0; i < KMAX; ++i)
    w[i] = i >= shift ? to_f(reinterpret_cast<const T*>(p.weight)[(int64_t)c * p.swc +
                                                                 (int64_t)(i - shift) * p.swk])
                      : 0.f;
  const float bias = p.bias != nullptr ? to_f(reinterpret_cast<const T*>(p.bias)[c]) : 0.f;
  constexpr int kSpan = kThreads * kN;           // positions per run of the block
  const int base = blockIdx.y * kSpan * kRowIter;
  float x[kRowIter][kN];
#pragma unroll
  for (int it = 0; it < kRowIter; ++it)          // every load first (bytes in flight)
    row_load<T>(x[it], p, b, c, base + it * kSpan + (int)threadIdx.x * kN);
#pragma unroll
  for (int it = 0; it < kRowIter; ++it) {
    if (base + it * kSpan >= p.L) break;         // uniform over the block: shuffles stay whole
    const int t0 = base + it * kSpan + (int)threadIdx.x * kN;
    float win[kW];
#pragma unroll
    for (int e = 0; e < kN; ++e) win[kS * kN + e] = x[it][e];
#pragma unroll
    for (int s = 1; s <= kS; ++s) {
      float h[kN];
#pragma unroll
      for (int e = 0; e < kN; ++e) h[e] = __shfl_up_sync(0xffffffffu, x[it][e], s);
      if (lane < s) row_load<T>(h, p, b, c, t0 - s * kN);
#pragma unroll
      for (int e = 0; e < kN; ++e) win[(kS - s) * kN + e] = h[e];
    }
    float acc[kN];
#pragma unroll
    for (int e = 0; e < kN; ++e) acc[e] = bias;
#pragma unroll
    for (int i = 0; i < KMAX; ++i) {
      if (i < shift) continue;   // no padding tap: 0 * inf would put a NaN where no tap reads
#pragma unroll
      for (int e = 0; e < kN; ++e) acc[e] = fmaf(w[i], win[kS * kN + e + i - (KMAX - 1)], acc[e]);
    }
    if (t0 >= p.L) continue;
    float v[kN];
#pragma unroll
    for (int e = 0; e < kN; ++e) v[e] = act_fwd(acc[e], p.act);
    T* dst = reinterpret_cast<T*>(p.out.ptr) + b * p.out.sb + (int64_t)c * p.out.sc + t0;
    store_vec_or_elem<T>(dst, 1, kN, min(kN, p.L - t0), v, true);
  }
}

// PYENCODER_CONV_ROW=1 (read per call) and a layout the row kernel takes: channel-first input and
// output contiguous along L, 16-byte aligned rows, K <= 32, rows and L chunks within the grid.
template <typename T>
bool try_launch_row(const DwConvParams& p, cudaStream_t stream) {
  const char* env = std::getenv("PYENCODER_CONV_ROW");
  if (env == nullptr || std::strcmp(env, "1") != 0) return false;
  constexpr int kN = 16 / sizeof(T);
  const bool layout = p.in.sl == 1 && p.out.sl == 1 && p.in.sb % kN == 0 &&
                      p.in.sc % kN == 0 && p.out.sb % kN == 0 && p.out.sc % kN == 0 &&
                      (reinterpret_cast<uintptr_t>(p.in.ptr) & 15) == 0 &&
                      (reinterpret_cast<uintptr_t>(p.out.ptr) & 15) == 0;
  const int64_t rows = (int64_t)p.B * p.C;
  const int64_t chunks = (p.L + (int64_t)kThreads * kN * kRowIter - 1) /
                         ((int64_t)kThreads * kN * kRowIter);
  if (!layout || p.K > 32 || rows >= (1LL << 31) || chunks > 65535) return false;
  if (rows == 0 || p.L <= 0) return true;
  dim3 grid((unsigned)rows, (unsigned)chunks);
  if (p.K <= 4) dw_conv_row_kernel<T, 4><<<grid, kThreads, 0, stream>>>(p);
  else if (p.K <= 8) dw_conv_row_kernel<T, 8><<<grid, kThreads, 0, stream>>>(p);
  else if (p.K <= 16) dw_conv_row_kernel<T, 16><<<grid, kThreads, 0, stream>>>(p);
  else dw_conv_row_kernel<T, 32><<<grid, kThreads, 0, stream>>>(p);
  return true;
}

void launch_dw_fwd(const DwConvParams& p, cudaStream_t stream) {
  switch (p.in_dtype) {
    case kFloat32:
      if (try_launch_row<float>(p, stream)) return;
      break;
    case kFloat16:
      if (try_launch_row<__half>(p, stream)) return;
      break;
    case kBFloat16:
      if (try_launch_row<__nv_bfloat16>(p, stream)) return;
      break;
  }
  switch (p.in_dtype) {
    case kFloat32: launch_tile_k<float, float, float, kModeFwd>(p, stream); break;
    case kFloat16: launch_tile_k<__half, __half, __half, kModeFwd>(p, stream); break;
    case kBFloat16:
      launch_tile_k<__nv_bfloat16, __nv_bfloat16, __nv_bfloat16, kModeFwd>(p, stream);
      break;
  }
}

void launch_dw_final_state(const DwConvParams& p, cudaStream_t stream) {
  const int64_t n = (int64_t)p.B * p.C * (p.K - 1);
  if (n == 0) return;
  const int blocks = (int)((n + 255) / 256 < 65535 ? (n + 255) / 256 : 65535);
  switch (p.in_dtype) {
    case kFloat32: dw_final_state_kernel<float><<<blocks, 256, 0, stream>>>(p); break;
    case kFloat16: dw_final_state_kernel<__half><<<blocks, 256, 0, stream>>>(p); break;
    case kBFloat16: dw_final_state_kernel<__nv_bfloat16><<<blocks, 256, 0, stream>>>(p); break;
  }
}

}  // namespace conv
}  // namespace pyencoder
