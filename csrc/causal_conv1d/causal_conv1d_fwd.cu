// Depthwise causal conv1d forward (y = act(conv + bias)) and final-state extraction.
// Kernel and algorithm: causal_conv1d_tile.cuh. Instantiated for fp32/fp16/bf16 and tap chunks
// 4/8/16/32 (K > 32 loops over 32-tap chunks).
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

void launch_dw_fwd(const DwConvParams& p, cudaStream_t stream) {
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
