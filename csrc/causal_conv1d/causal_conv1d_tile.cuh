// Depthwise causal conv1d tile kernel (stride 1), shared by the forward, grad-pre and dx passes.
//
// A block of 128 threads owns a tile of 32 channels x 64 output positions. The input rows the
// tile needs (64 + K - 1, rounded up to whole tap chunks) are staged in shared memory as fp32,
// [row][channel] with a padded pitch, read from global memory in 16-byte vectors where the
// layout allows it (pairs of threads per 32-byte sector along L for channel-first input, runs of
// channels for channel-last input), element by element at the edges and from the state for
// negative positions. Thread (c, g) computes 16 consecutive outputs of channel c: taps are taken
// KC at a time into registers, and a sliding loop over 16 + KC - 1 shared rows does 16 * KC FMAs
// with one shared load per row (about 2 / KC shared loads per FMA once KC >= 16).
// Outputs are staged back through shared memory and stored in 16-byte vectors where possible.
//
// Modes: kModeFwd (y = act(conv + bias)), kModeGradPre (out fp32 = grad_y * act'(conv + bias)),
// kModeDx (transposed conv of the gradient with reversed taps over padded positions
// [0, L + K - 1), plus grad_final on the last K - 1, routed to d initial_state / dx).
// Limits: K <= 256 is what the launchers instantiate (shared memory grows with K), any L, any C.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <type_traits>

#include "causal_conv1d/causal_conv1d.h"

namespace pyencoder {
namespace conv {

constexpr int kModeFwd = 0;
constexpr int kModeGradPre = 1;
constexpr int kModeDx = 2;
constexpr int kPitch = kTileC + 1;

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

__device__ __forceinline__ float act_fwd(float v, int act) {
  if (act == kActSilu) return v / (1.f + __expf(-v));
  if (act == kActGelu) return 0.5f * v * (1.f + erff(v * 0.70710678118654752f));
  return v;
}

__device__ __forceinline__ float act_grad(float v, int act) {
  if (act == kActSilu) {
    float s = 1.f / (1.f + __expf(-v));
    return s * (1.f + v * (1.f - s));
  }
  if (act == kActGelu) {
    float cdf = 0.5f * (1.f + erff(v * 0.70710678118654752f));
    float pdf = __expf(-0.5f * v * v) * 0.39894228040143268f;
    return cdf + v * pdf;
  }
  return 1.f;
}

template <typename T>
__device__ __forceinline__ bool aligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15) == 0;
}

// Element of the padded input: position `pos` of `src` (negative: state[K - 1 + pos] or 0).
template <typename T>
__device__ __forceinline__ float load_elem(const Strided3& src, const Strided3& state, int64_t b,
                                           int c, int pos, int L, int K) {
  if (pos >= 0) {
    if (pos >= L) return 0.f;
    return to_f(reinterpret_cast<const T*>(src.ptr)[b * src.sb + c * src.sc + (int64_t)pos * src.sl]);
  }
  if (state.ptr == nullptr || pos < -(K - 1)) return 0.f;
  return to_f(reinterpret_cast<const T*>(state.ptr)[b * state.sb + c * state.sc +
                                                    (int64_t)(K - 1 + pos) * state.sl]);
}

// Stage rows [p0, p0 + nrows) x channels [c0, c0 + kTileC) of the padded input into smem
// (rows >= nvalid are zero).
template <typename T>
__device__ void load_tile(float* s, const Strided3& src, const Strided3& state, int64_t b, int c0,
                          int p0, int nrows, int nvalid, int C, int L, int K) {
  constexpr int kN = 16 / sizeof(T);
  const int tid = threadIdx.x;
  const bool chan_last = src.sc == 1 && src.sl != 1;
  bool vec = false;
  if (chan_last) {
    vec = aligned16<T>(src.ptr) && src.sb % kN == 0 && src.sl % kN == 0 && c0 % kN == 0;
  } else if (src.sl == 1) {
    vec = aligned16<T>(src.ptr) && src.sb % kN == 0 && src.sc % kN == 0;
  }
  if (chan_last) {
    constexpr int kVPR = kTileC / kN;
    for (int i = tid; i < nrows * kVPR; i += kThreads) {
      const int r = i / kVPR, cv = (i % kVPR) * kN;
      const int pos = p0 + r, c = c0 + cv;
      float v[kN];
      if (r >= nvalid) {
#pragma unroll
        for (int e = 0; e < kN; ++e) v[e] = 0.f;
      } else if (vec && pos >= 0 && pos < L && c + kN <= C) {
        uint4 raw = *reinterpret_cast<const uint4*>(reinterpret_cast<const T*>(src.ptr) + b * src.sb +
                                                    (int64_t)pos * src.sl + c);
        const T* e8 = reinterpret_cast<const T*>(&raw);
#pragma unroll
        for (int e = 0; e < kN; ++e) v[e] = to_f(e8[e]);
      } else {
#pragma unroll
        for (int e = 0; e < kN; ++e)
          v[e] = (c + e < C) ? load_elem<T>(src, state, b, c + e, pos, L, K) : 0.f;
      }
#pragma unroll
      for (int e = 0; e < kN; ++e) s[r * kPitch + cv + e] = v[e];
    }
  } else {
    const int a0 = (p0 >= 0 ? p0 / kN : -((-p0 + kN - 1) / kN)) * kN;
    const int nch = (p0 + nrows - a0 + kN - 1) / kN;
    const int nitems = kTileC * ((nch + 1) / 2) * 2;
    for (int i = tid; i < nitems; i += kThreads) {
      const int cc = (i >> 1) % kTileC;
      const int ch = 2 * ((i >> 1) / kTileC) + (i & 1);
      if (ch >= nch) continue;
      const int ga = a0 + ch * kN, c = c0 + cc;
      float v[kN];
      if (c >= C) {
#pragma unroll
        for (int e = 0; e < kN; ++e) v[e] = 0.f;
      } else if (vec && ga >= 0 && ga + kN <= L) {
        uint4 raw = *reinterpret_cast<const uint4*>(reinterpret_cast<const T*>(src.ptr) + b * src.sb +
                                                    (int64_t)c * src.sc + ga);
        const T* e8 = reinterpret_cast<const T*>(&raw);
#pragma unroll
        for (int e = 0; e < kN; ++e) v[e] = to_f(e8[e]);
      } else {
#pragma unroll
        for (int e = 0; e < kN; ++e) v[e] = load_elem<T>(src, state, b, c, ga + e, L, K);
      }
#pragma unroll
      for (int e = 0; e < kN; ++e) {
        const int r = ga + e - p0;
        if (r >= 0 && r < nrows) s[r * kPitch + cc] = r < nvalid ? v[e] : 0.f;
      }
    }
  }
}

// Thread (cc, g): acc[e] = sum_j w[j] * s[(row0 + e + j)][cc], j < K (reversed taps in dx mode).
template <typename TW, int KC, bool kReverse>
__device__ __forceinline__ void tile_conv(const float* s, const TW* w, int64_t swc, int64_t swk,
                                          int c, bool c_ok, int K, int cc, int row0,
                                          float (&acc)[kRowsPerThread]) {
  constexpr int E = kRowsPerThread;
#pragma unroll
  for (int e = 0; e < E; ++e) acc[e] = 0.f;
  const int nchunks = (K + KC - 1) / KC;
  for (int ck = 0; ck < nchunks; ++ck) {
    const int jc = ck * KC;
    float wr[KC];
#pragma unroll
    for (int jj = 0; jj < KC; ++jj) {
      const int j = jc + jj;
      const int jw = kReverse ? K - 1 - j : j;
      wr[jj] = (c_ok && j < K) ? to_f(w[(int64_t)c * swc + (int64_t)jw * swk]) : 0.f;
    }
    const float* sp = s + (row0 + jc) * kPitch + cc;
#pragma unroll
    for (int q = 0; q < E + KC - 1; ++q) {
      const float v = sp[q * kPitch];
#pragma unroll
      for (int e = 0; e < E; ++e) {
        const int jj = q - e;
        // taps past K (the last chunk's padding) are skipped, not multiplied by their zero
        // weight: the row they would read is a real input of a later output, and 0 * inf would
        // put a NaN into an output that no tap of it reads
        if (jj >= 0 && jj < KC && jc + jj < K) acc[e] = fmaf(wr[jj], v, acc[e]);
      }
    }
  }
}

template <typename T>
__device__ __forceinline__ void store_vec_or_elem(T* base, int64_t stride, int n, int valid,
                                                  const float* v, bool vec) {
  constexpr int kN = 16 / sizeof(T);
  if (vec && valid == kN) {
    T tmp[kN];
#pragma unroll
    for (int e = 0; e < kN; ++e) tmp[e] = from_f<T>(v[e]);
    *reinterpret_cast<uint4*>(base) = *reinterpret_cast<const uint4*>(tmp);
  } else {
#pragma unroll
    for (int e = 0; e < kN; ++e)
      if (e < valid) base[e * stride] = from_f<T>(v[e]);
  }
}

// Shared rows needed by a tile: 64 outputs + K - 1 halo, rounded up to whole tap chunks.
template <int KC>
__host__ __device__ constexpr int tile_rows_for(int K) {
  return kTileL + ((K + KC - 1) / KC) * KC - 1;
}

template <typename TIn, typename TOut, typename TG, int KC, int MODE>
__global__ void __launch_bounds__(kThreads) dw_conv_tile_kernel(DwConvParams p) {
  extern __shared__ float smem[];
  const int K = p.K, L = p.L, C = p.C;
  const int n_out = MODE == kModeDx ? L + K - 1 : L;
  const int t0 = blockIdx.x * kTileL;
  const int c0 = blockIdx.y * kTileC;
  const int64_t b = blockIdx.z;
  const int nrows = tile_rows_for<KC>(K);
  const int p0 = t0 - (K - 1);
  Strided3 state = MODE == kModeDx ? Strided3{} : p.state;
  load_tile<TIn>(smem, p.in, state, b, c0, p0, nrows, kTileL + K - 1, C, L, K);
  __syncthreads();

  const int cc = threadIdx.x % kTileC, g = threadIdx.x / kTileC;
  const int c = c0 + cc;
  const int row0 = g * kRowsPerThread;
  float acc[kRowsPerThread];
  using TW = typename std::conditional<MODE == kModeDx, TOut, TIn>::type;
  tile_conv<TW, KC, MODE == kModeDx>(smem, reinterpret_cast<const TW*>(p.weight), p.swc, p.swk,
                                      c, c < C, K, cc, row0, acc);
  __syncthreads();
  const float bias = (MODE != kModeDx && p.bias != nullptr && c < C)
                         ? to_f(reinterpret_cast<const TIn*>(p.bias)[c]) : 0.f;
#pragma unroll
  for (int e = 0; e < kRowsPerThread; ++e) smem[(row0 + e) * kPitch + cc] = acc[e] + bias;
  __syncthreads();

  // Cooperative epilogue over the (kTileL x kTileC) output tile.
  constexpr int kN = 16 / sizeof(TOut);
  const MutStrided3& out = p.out;
  const bool chan_last = out.sc == 1 && out.sl != 1;
  if (MODE != kModeDx && chan_last) {
    const bool vec = aligned16<TOut>(out.ptr) && out.sb % kN == 0 && out.sl % kN == 0;
    constexpr int kVPR = kTileC / kN;
    for (int i = threadIdx.x; i < kTileL * kVPR; i += kThreads) {
      const int r = i / kVPR, cv = (i % kVPR) * kN;
      const int pos = t0 + r, cbase = c0 + cv;
      if (pos >= n_out || cbase >= C) continue;
      float v[kN];
#pragma unroll
      for (int e = 0; e < kN; ++e) {
        float pre = smem[r * kPitch + cv + e];
        if (MODE == kModeFwd) {
          v[e] = act_fwd(pre, p.act);
        } else {
          const float gy = cbase + e < C ? to_f(reinterpret_cast<const TG*>(p.grad_y.ptr)[
              b * p.grad_y.sb + (int64_t)(cbase + e) * p.grad_y.sc + (int64_t)pos * p.grad_y.sl]) : 0.f;
          v[e] = gy * act_grad(pre, p.act);
        }
      }
      TOut* dst = reinterpret_cast<TOut*>(out.ptr) + b * out.sb + (int64_t)pos * out.sl + cbase;
      store_vec_or_elem<TOut>(dst, 1, kN, min(kN, C - cbase), v, vec && cbase % kN == 0);
    }
  } else {
    const bool vec = MODE != kModeDx && out.sl == 1 && aligned16<TOut>(out.ptr) &&
                     out.sb % kN == 0 && out.sc % kN == 0;
    constexpr int kCPR = kTileL / kN;
    static_assert(kCPR % 2 == 0, "pairs of vectors per channel");
    for (int i = threadIdx.x; i < kTileC * kCPR; i += kThreads) {
      const int cc2 = (i >> 1) % kTileC;
      const int ch = 2 * ((i >> 1) / kTileC) + (i & 1);
      const int c2 = c0 + cc2, r0 = ch * kN, pos0 = t0 + r0;
      if (c2 >= C || pos0 >= n_out) continue;
      const int valid = min(kN, n_out - pos0);
      float v[kN];
#pragma unroll
      for (int e = 0; e < kN; ++e) {
        float pre = smem[(r0 + e) * kPitch + cc2];
        const int pos = pos0 + e;
        if (MODE == kModeFwd) {
          v[e] = act_fwd(pre, p.act);
        } else if (MODE == kModeGradPre) {
          const float gy = pos < n_out ? to_f(reinterpret_cast<const TG*>(p.grad_y.ptr)[
              b * p.grad_y.sb + (int64_t)c2 * p.grad_y.sc + (int64_t)pos * p.grad_y.sl]) : 0.f;
          v[e] = gy * act_grad(pre, p.act);
        } else {
          if (p.grad_final.ptr != nullptr && pos >= L && pos < n_out)
            pre += to_f(reinterpret_cast<const TOut*>(p.grad_final.ptr)[
                b * p.grad_final.sb + (int64_t)c2 * p.grad_final.sc + (int64_t)(pos - L) * p.grad_final.sl]);
          v[e] = pre;
        }
      }
      if (MODE != kModeDx) {
        TOut* dst = reinterpret_cast<TOut*>(out.ptr) + b * out.sb + (int64_t)c2 * out.sc +
                    (int64_t)pos0 * out.sl;
        store_vec_or_elem<TOut>(dst, out.sl, kN, valid, v, vec);
      } else {
#pragma unroll
        for (int e = 0; e < kN; ++e) {
          if (e >= valid) break;
          const int pos = pos0 + e;
          if (pos < K - 1) {
            if (p.out_state.ptr != nullptr)
              reinterpret_cast<TOut*>(p.out_state.ptr)[b * p.out_state.sb + (int64_t)c2 * p.out_state.sc +
                                                       (int64_t)pos * p.out_state.sl] = from_f<TOut>(v[e]);
          } else {
            reinterpret_cast<TOut*>(out.ptr)[b * out.sb + (int64_t)c2 * out.sc +
                                             (int64_t)(pos - (K - 1)) * out.sl] = from_f<TOut>(v[e]);
          }
        }
      }
    }
  }
}

template <typename TIn, typename TOut, typename TG, int KC, int MODE>
void launch_tile(const DwConvParams& p, cudaStream_t stream) {
  const int n_out = MODE == kModeDx ? p.L + p.K - 1 : p.L;
  if (p.B == 0 || p.C == 0 || n_out <= 0) return;
  dim3 grid((n_out + kTileL - 1) / kTileL, (p.C + kTileC - 1) / kTileC, p.B);
  const size_t smem = sizeof(float) * (size_t)tile_rows_for<KC>(p.K) * kPitch;
  auto kernel = dw_conv_tile_kernel<TIn, TOut, TG, KC, MODE>;
  if (smem > 48 * 1024)
    cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
  kernel<<<grid, kThreads, smem, stream>>>(p);
}

// Tap-chunk width: the next power of two of K, capped at 32 (larger K loops over chunks).
template <typename TIn, typename TOut, typename TG, int MODE>
void launch_tile_k(const DwConvParams& p, cudaStream_t stream) {
  if (p.K <= 4) launch_tile<TIn, TOut, TG, 4, MODE>(p, stream);
  else if (p.K <= 8) launch_tile<TIn, TOut, TG, 8, MODE>(p, stream);
  else if (p.K <= 16) launch_tile<TIn, TOut, TG, 16, MODE>(p, stream);
  else launch_tile<TIn, TOut, TG, 32, MODE>(p, stream);
}

}  // namespace conv
}  // namespace pyencoder
