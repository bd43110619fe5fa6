// Depthwise causal conv1d streaming update (stride 1), state updated in place.
//
// One thread per (row b, channel c): it computes the T new outputs
// y[b, c, t] = act(bias[c] + sum_j w[c, j] * xp[t + j]) over xp = [state[slot, c, :], x[b, c, :]]
// reading the state row and the taps from global memory (L1-resident), and only then shifts the
// state row in place (ascending copy state[i] = xp[T + i]: each source index is above its
// destination, so no value is overwritten before it is read). Rows are owned by one thread, so
// there is no cross-thread hazard. slot = state_indices[b] (or b); slot -1 writes zeros and
// leaves the pool untouched. Limits: meant for T of a few frames (the per-thread loop is
// O(T * K)); duplicate slots in state_indices race (as in causal-conv1d).
#include "causal_conv1d/causal_conv1d_tile.cuh"

namespace pyencoder {
namespace conv {

template <typename T>
__global__ void dw_update_kernel(DwUpdateParams p) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  const int64_t b = blockIdx.y;
  if (c >= p.C) return;
  const int K = p.K, Km1 = K - 1, TT = p.T;
  const T* x = reinterpret_cast<const T*>(p.x.ptr) + b * p.x.sb + (int64_t)c * p.x.sc;
  T* out = reinterpret_cast<T*>(p.out.ptr) + b * p.out.sb + (int64_t)c * p.out.sc;
  int64_t slot = b;
  if (p.state_indices != nullptr) slot = p.state_indices[b];
  if (slot < 0) {
    for (int t = 0; t < TT; ++t) out[t * p.out.sl] = from_f<T>(0.f);
    return;
  }
  T* st = reinterpret_cast<T*>(p.state) + slot * p.ssb + (int64_t)c * p.ssc;
  const T* w = reinterpret_cast<const T*>(p.weight) + (int64_t)c * p.swc;
  const float bias = p.bias != nullptr ? to_f(reinterpret_cast<const T*>(p.bias)[c]) : 0.f;
  for (int t = 0; t < TT; ++t) {
    float acc = bias;
    for (int j = 0; j < K; ++j) {
      const int q = t + j;
      const float v = q < Km1 ? to_f(st[q * p.ssl]) : to_f(x[(int64_t)(q - Km1) * p.x.sl]);
      acc = fmaf(to_f(w[j * p.swk]), v, acc);
    }
    out[t * p.out.sl] = from_f<T>(act_fwd(acc, p.act));
  }
  for (int i = 0; i < Km1; ++i) {
    const int q = TT + i;
    st[i * p.ssl] = q < Km1 ? st[q * p.ssl] : x[(int64_t)(q - Km1) * p.x.sl];
  }
}

void launch_dw_update(const DwUpdateParams& p, cudaStream_t stream) {
  if (p.B == 0 || p.C == 0) return;
  dim3 grid((p.C + 127) / 128, p.B);
  switch (p.dtype) {
    case kFloat32: dw_update_kernel<float><<<grid, 128, 0, stream>>>(p); break;
    case kFloat16: dw_update_kernel<__half><<<grid, 128, 0, stream>>>(p); break;
    case kBFloat16: dw_update_kernel<__nv_bfloat16><<<grid, 128, 0, stream>>>(p); break;
  }
}

}  // namespace conv
}  // namespace pyencoder
