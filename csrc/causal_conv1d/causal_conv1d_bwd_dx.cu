// Depthwise causal conv1d backward, data side: grad-pre (g' = grad_y * act'(conv + bias), fp32)
// and dx / d initial_state (transposed conv of g' with reversed taps, plus grad_final).
// Kernel and algorithm: causal_conv1d_tile.cuh.
#include "causal_conv1d/causal_conv1d_tile.cuh"

namespace pyencoder {
namespace conv {

void launch_dw_grad_pre(const DwConvParams& p, cudaStream_t stream) {
  switch (p.in_dtype) {
    case kFloat32: launch_tile_k<float, float, float, kModeGradPre>(p, stream); break;
    case kFloat16: launch_tile_k<__half, float, __half, kModeGradPre>(p, stream); break;
    case kBFloat16:
      launch_tile_k<__nv_bfloat16, float, __nv_bfloat16, kModeGradPre>(p, stream);
      break;
  }
}

template <typename T>
void launch_dx_out(const DwConvParams& p, cudaStream_t stream) {
  if (p.in_dtype == kFloat32) launch_tile_k<float, T, T, kModeDx>(p, stream);
  else launch_tile_k<T, T, T, kModeDx>(p, stream);
}

void launch_dw_bwd_dx(const DwConvParams& p, cudaStream_t stream) {
  switch (p.out_dtype) {
    case kFloat32: launch_dx_out<float>(p, stream); break;
    case kFloat16: launch_dx_out<__half>(p, stream); break;
    case kBFloat16: launch_dx_out<__nv_bfloat16>(p, stream); break;
  }
}

}  // namespace conv
}  // namespace pyencoder
