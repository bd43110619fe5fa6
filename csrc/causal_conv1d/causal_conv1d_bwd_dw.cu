// Depthwise causal conv1d backward, weight side: deterministic dweight and dbias.
//
// partial[(b * nsplit + s), c, j] = sum_{t in split s} g[b, c, t] * xp[b, c, t + j] (j < K) and
// partial[..., K] = sum_t g[b, c, t], in fp32. A block owns 32 channels, one batch row and one
// contiguous range of 64-position tiles; it stages the x rows (64 + K - 1) and the g rows (64)
// of each tile in shared memory and thread (c, g) accumulates taps j = g, g + 4, ... of channel c
// into a shared [K + 1][32] accumulator that only it writes. No atomics: the host sums the
// partials over (b, s) in a fixed order, so the result is bitwise reproducible.
// Limits: shared memory grows with K (K = 256: about 84 KB, opted in on sm_80+).
#include "causal_conv1d/causal_conv1d_tile.cuh"

namespace pyencoder {
namespace conv {

template <typename TX, typename TG>
__global__ void __launch_bounds__(kThreads) dw_dweight_kernel(DwWeightGradParams p) {
  extern __shared__ float smem[];
  const int K = p.K, L = p.L, C = p.C;
  const int xrows = kTileL + K - 1;
  float* sx = smem;
  float* sg = sx + xrows * kPitch;
  float* sw = sg + kTileL * kPitch;
  const int c0 = blockIdx.x * kTileC;
  const int split = blockIdx.y;
  const int64_t b = blockIdx.z;
  const int ntiles = (L + kTileL - 1) / kTileL;
  const int per = (ntiles + p.nsplit - 1) / p.nsplit;
  const int tile_lo = split * per, tile_hi = min(ntiles, tile_lo + per);
  for (int i = threadIdx.x; i < (K + 1) * kTileC; i += kThreads) sw[i] = 0.f;
  const int cc = threadIdx.x % kTileC, g = threadIdx.x / kTileC;
  Strided3 nostate;
  for (int tile = tile_lo; tile < tile_hi; ++tile) {
    const int t0 = tile * kTileL;
    __syncthreads();
    load_tile<TX>(sx, p.x, p.state, b, c0, t0 - (K - 1), xrows, xrows, C, L, K);
    load_tile<TG>(sg, p.g, nostate, b, c0, t0, kTileL, kTileL, C, L, K);
    __syncthreads();
    for (int j = g; j <= K; j += kPosGroups) {
      float acc = 0.f;
      if (j < K) {
#pragma unroll 8
        for (int r = 0; r < kTileL; ++r) acc = fmaf(sg[r * kPitch + cc], sx[(r + j) * kPitch + cc], acc);
      } else {
#pragma unroll 8
        for (int r = 0; r < kTileL; ++r) acc += sg[r * kPitch + cc];
      }
      sw[j * kTileC + cc] += acc;
    }
  }
  __syncthreads();
  const int c = c0 + cc;
  if (c < C) {
    float* dst = p.partial + ((b * p.nsplit + split) * C + c) * (int64_t)(K + 1);
    for (int j = g; j <= K; j += kPosGroups) dst[j] = sw[j * kTileC + cc];
  }
}

template <typename TX, typename TG>
void launch_dweight_t(const DwWeightGradParams& p, cudaStream_t stream) {
  if (p.B == 0 || p.C == 0) return;
  dim3 grid((p.C + kTileC - 1) / kTileC, p.nsplit, p.B);
  const size_t smem = sizeof(float) *
      ((size_t)(kTileL + p.K - 1) * kPitch + (size_t)kTileL * kPitch + (size_t)(p.K + 1) * kTileC);
  auto kernel = dw_dweight_kernel<TX, TG>;
  if (smem > 48 * 1024)
    cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
  kernel<<<grid, kThreads, smem, stream>>>(p);
}

template <typename TX>
void launch_dweight_x(const DwWeightGradParams& p, cudaStream_t stream) {
  if (p.g_dtype == kFloat32) launch_dweight_t<TX, float>(p, stream);
  else launch_dweight_t<TX, TX>(p, stream);
}

void launch_dw_bwd_dweight(const DwWeightGradParams& p, cudaStream_t stream) {
  switch (p.x_dtype) {
    case kFloat32: launch_dweight_t<float, float>(p, stream); break;
    case kFloat16: launch_dweight_x<__half>(p, stream); break;
    case kBFloat16: launch_dweight_x<__nv_bfloat16>(p, stream); break;
  }
}

}  // namespace conv
}  // namespace pyencoder
