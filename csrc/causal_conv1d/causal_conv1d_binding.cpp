// Torch glue for the depthwise causal conv1d CUDA kernels: argument checks, dtype mapping,
// output allocation, stream, and the fixed-order reduction of the weight-gradient partials.
// Kernels: causal_conv1d_{fwd,bwd_dx,bwd_dw,update}.cu. Depthwise, stride 1, K in [1, 256].
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <algorithm>

#include "causal_conv1d/causal_conv1d.h"
#include "causal_conv1d/causal_conv1d_ops.h"

#define CHECK_CUDA(x) TORCH_CHECK((x).is_cuda(), #x " must be a CUDA tensor")
#define CHECK_SHAPE(x, ...)                                                                   \
  TORCH_CHECK((x).sizes() == at::IntArrayRef({__VA_ARGS__}), #x " must have shape (" #__VA_ARGS__ \
              "); got ", (x).sizes())
#define CHECK_SAME_DTYPE(x, ref) \
  TORCH_CHECK((x).scalar_type() == (ref).scalar_type(), #x " must have dtype ", (ref).scalar_type(), "; got ", (x).scalar_type())
#define CHECK_SAME_DEVICE(x, ref) \
  TORCH_CHECK((x).device() == (ref).device(), #x " must be on ", (ref).device(), "; got ", (x).device())

namespace pyencoder {
namespace {

using conv::MutStrided3;
using conv::Strided3;

constexpr int kMaxWidth = 256;

int dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return conv::kFloat32;
    case at::kHalf: return conv::kFloat16;
    case at::kBFloat16: return conv::kBFloat16;
    default: TORCH_CHECK(false, "pyencoder causal_conv1d (cuda): dtype must be float32, float16 or bfloat16; got ", t);
  }
  return 0;
}

Strided3 view3(const at::Tensor& t) {
  Strided3 s;
  s.ptr = t.data_ptr();
  s.sb = t.stride(0);
  s.sc = t.stride(1);
  s.sl = t.stride(2);
  return s;
}

MutStrided3 mview3(at::Tensor& t) {
  MutStrided3 s;
  s.ptr = t.data_ptr();
  s.sb = t.stride(0);
  s.sc = t.stride(1);
  s.sl = t.stride(2);
  return s;
}

// Output in x's memory format (channel-last x gives a channel-last y).
at::Tensor empty_like_layout(const at::Tensor& x, int64_t C, int64_t L, at::ScalarType dt) {
  auto opts = x.options().dtype(dt);
  if (x.stride(1) == 1 && x.size(2) > 1 && x.size(1) > 1)
    return at::empty({x.size(0), L, C}, opts).transpose(1, 2);
  return at::empty({x.size(0), C, L}, opts);
}

int check_common(const at::Tensor& x, const at::Tensor& weight,
                 const std::optional<at::Tensor>& bias, int64_t activation) {
  CHECK_CUDA(x);
  TORCH_CHECK(x.dim() == 3, "x must be (B, C, L); got ", x.sizes());
  CHECK_SAME_DTYPE(weight, x);
  CHECK_SAME_DEVICE(weight, x);
  const int64_t C = x.size(1);
  TORCH_CHECK(weight.dim() == 3 && weight.size(0) == C && weight.size(1) == 1,
              "weight must be depthwise (C, 1, K) with C = ", C, "; got ", weight.sizes());
  const int64_t K = weight.size(2);
  TORCH_CHECK(K >= 1 && K <= kMaxWidth, "kernel width must be in [1, ", kMaxWidth, "]; got ", K);
  if (bias.has_value()) {
    CHECK_SAME_DTYPE(*bias, x);
    CHECK_SAME_DEVICE(*bias, x);
    CHECK_SHAPE(*bias, C);
    TORCH_CHECK(bias->stride(0) == 1, "bias must be contiguous");
  }
  TORCH_CHECK(activation >= 0 && activation <= 2, "activation code must be 0, 1 or 2; got ", activation);
  TORCH_CHECK(x.size(0) <= 65535, "batch must be <= 65535; got ", x.size(0));
  return (int)K;
}

void fill_common(conv::DwConvParams& p, const at::Tensor& x, const at::Tensor& weight,
                 const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& state,
                 int64_t activation) {
  p.B = (int)x.size(0);
  p.C = (int)x.size(1);
  p.L = (int)x.size(2);
  p.K = (int)weight.size(2);
  p.act = (int)activation;
  p.weight = weight.data_ptr();
  p.swc = weight.stride(0);
  p.swk = weight.stride(2);
  p.bias = bias.has_value() ? bias->data_ptr() : nullptr;
  if (state.has_value() && p.K > 1) p.state = view3(*state);
  p.in_dtype = p.out_dtype = p.grad_dtype = dtype_code(x.scalar_type());
}

void check_state(const std::optional<at::Tensor>& s, const at::Tensor& x, int64_t K, const char* name) {
  if (!s.has_value()) return;
  CHECK_SAME_DTYPE(*s, x);
  CHECK_SAME_DEVICE(*s, x);
  TORCH_CHECK(s->dim() == 3 && s->size(0) == x.size(0) && s->size(1) == x.size(1) && s->size(2) == K - 1,
              name, " must have shape (B, C, K - 1) = (", x.size(0), ", ", x.size(1), ", ", K - 1,
              "); got ", s->sizes());
}

// y of the depthwise forward, and the final state (B, C, K - 1) into *final_state when it is
// not null (a second kernel).
at::Tensor dw_forward(const at::Tensor& x, const at::Tensor& weight,
                      const std::optional<at::Tensor>& bias,
                      const std::optional<at::Tensor>& initial_state, int64_t activation,
                      at::Tensor* final_state) {
  const int K = check_common(x, weight, bias, activation);
  check_state(initial_state, x, K, "initial_state");
  const c10::cuda::CUDAGuard guard(x.device());
  auto stream = c10::cuda::getCurrentCUDAStream().stream();
  at::Tensor y = empty_like_layout(x, x.size(1), x.size(2), x.scalar_type());
  conv::DwConvParams p;
  fill_common(p, x, weight, bias, initial_state, activation);
  p.in = view3(x);
  p.out = mview3(y);
  if (final_state != nullptr) {
    *final_state = at::empty({x.size(0), x.size(1), K - 1}, x.options());
    p.out_state = mview3(*final_state);
  }
  conv::launch_dw_fwd(p, stream);
  if (final_state != nullptr) conv::launch_dw_final_state(p, stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return y;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> causal_conv1d_fwd_cuda(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& initial_state, int64_t activation) {
  at::Tensor final_state;
  at::Tensor y = dw_forward(x, weight, bias, initial_state, activation, &final_state);
  return {y, final_state};
}

// The forward's y alone (the caller does not want the final state): the final-state kernel is
// not launched.
at::Tensor causal_conv1d_fwd_y_cuda(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& initial_state, int64_t activation) {
  return dw_forward(x, weight, bias, initial_state, activation, nullptr);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> causal_conv1d_bwd_cuda(
    const at::Tensor& grad_y, const std::optional<at::Tensor>& grad_final_state,
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& initial_state, int64_t activation) {
  const int K = check_common(x, weight, bias, activation);
  check_state(initial_state, x, K, "initial_state");
  check_state(grad_final_state, x, K, "grad_final_state");
  CHECK_SAME_DTYPE(grad_y, x);
  CHECK_SHAPE(grad_y, x.size(0), x.size(1), x.size(2));
  const c10::cuda::CUDAGuard guard(x.device());
  auto stream = c10::cuda::getCurrentCUDAStream().stream();
  const int64_t B = x.size(0), C = x.size(1), L = x.size(2);

  conv::DwConvParams p;
  fill_common(p, x, weight, bias, initial_state, activation);
  at::Tensor g = grad_y;
  if (activation != conv::kActNone && L > 0) {
    g = at::empty({B, C, L}, x.options().dtype(at::kFloat));
    p.in = view3(x);
    p.grad_y = view3(grad_y);
    p.out = mview3(g);
    p.out_dtype = conv::kFloat32;
    conv::launch_dw_grad_pre(p, stream);
  }

  at::Tensor dx = at::empty({B, C, L}, x.options());
  at::Tensor dstate = initial_state.has_value() ? at::empty({B, C, K - 1}, x.options()) : at::empty({0}, x.options());
  conv::DwConvParams q;
  fill_common(q, x, weight, bias, std::nullopt, activation);
  q.in = view3(g);
  q.in_dtype = dtype_code(g.scalar_type());
  q.out_dtype = dtype_code(x.scalar_type());
  q.out = mview3(dx);
  if (initial_state.has_value() && K > 1) q.out_state = mview3(dstate);
  if (grad_final_state.has_value() && K > 1) q.grad_final = view3(*grad_final_state);
  conv::launch_dw_bwd_dx(q, stream);

  int sms = 132;
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, x.device().index());
  const int64_t ctiles = (C + conv::kTileC - 1) / conv::kTileC;
  const int64_t ntiles = std::max<int64_t>(1, (L + conv::kTileL - 1) / conv::kTileL);
  int64_t nsplit = std::max<int64_t>(1, (2 * sms + ctiles * B - 1) / std::max<int64_t>(1, ctiles * B));
  nsplit = std::min<int64_t>(std::min<int64_t>(nsplit, ntiles), 65535);
  at::Tensor partial = at::empty({B * nsplit, C, K + 1}, x.options().dtype(at::kFloat));
  conv::DwWeightGradParams w;
  w.B = (int)B;
  w.C = (int)C;
  w.L = (int)L;
  w.K = K;
  w.nsplit = (int)nsplit;
  w.x = view3(x);
  if (initial_state.has_value() && K > 1) w.state = view3(*initial_state);
  w.g = view3(g);
  w.partial = partial.data_ptr<float>();
  w.x_dtype = dtype_code(x.scalar_type());
  w.g_dtype = dtype_code(g.scalar_type());
  conv::launch_dw_bwd_dweight(w, stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  at::Tensor red = B * nsplit > 0 ? partial.sum(0) : at::zeros({C, K + 1}, partial.options());
  at::Tensor dweight = red.narrow(1, 0, K).reshape({C, 1, K}).to(weight.scalar_type());
  at::Tensor dbias = bias.has_value() ? red.select(1, K).to(bias->scalar_type()) : at::empty({0}, x.options());
  return {dx, dweight, dbias, dstate};
}

at::Tensor causal_conv1d_update_cuda(const at::Tensor& x, const at::Tensor& state,
                                     const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                     const std::optional<at::Tensor>& state_indices,
                                     int64_t activation) {
  const int K = check_common(x, weight, bias, activation);
  CHECK_SAME_DTYPE(state, x);
  CHECK_SAME_DEVICE(state, x);
  TORCH_CHECK(state.dim() == 3 && state.size(1) == x.size(1) && state.size(2) == K - 1,
              "state must have shape (S, C, K - 1) with C = ", x.size(1), ", K - 1 = ", K - 1,
              "; got ", state.sizes());
  at::Tensor idx;
  if (state_indices.has_value()) {
    CHECK_SAME_DEVICE(*state_indices, x);
    TORCH_CHECK(state_indices->dim() == 1 && state_indices->size(0) == x.size(0),
                "state_indices must have shape (B,) = (", x.size(0), ",); got ", state_indices->sizes());
    idx = state_indices->to(at::kInt).contiguous();
  } else {
    TORCH_CHECK(state.size(0) == x.size(0), "state must have B = ", x.size(0), " rows; got ", state.size(0));
  }
  const c10::cuda::CUDAGuard guard(x.device());
  auto stream = c10::cuda::getCurrentCUDAStream().stream();
  at::Tensor y = empty_like_layout(x, x.size(1), x.size(2), x.scalar_type());
  conv::DwUpdateParams p;
  p.B = (int)x.size(0);
  p.C = (int)x.size(1);
  p.T = (int)x.size(2);
  p.K = K;
  p.act = (int)activation;
  p.x = view3(x);
  p.state = state.data_ptr();
  p.ssb = state.stride(0);
  p.ssc = state.stride(1);
  p.ssl = state.stride(2);
  p.state_indices = idx.defined() ? idx.data_ptr<int32_t>() : nullptr;
  p.weight = weight.data_ptr();
  p.swc = weight.stride(0);
  p.swk = weight.stride(2);
  p.bias = bias.has_value() ? bias->data_ptr() : nullptr;
  p.out = mview3(y);
  p.dtype = dtype_code(x.scalar_type());
  conv::launch_dw_update(p, stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return y;
}

}  // namespace pyencoder
