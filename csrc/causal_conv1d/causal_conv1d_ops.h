// Torch-facing entry points of the depthwise causal conv1d CUDA kernels (registered in
// csrc/registration.cpp). activation: 0 none, 1 silu, 2 gelu.
#pragma once
#include <ATen/Tensor.h>
#include <c10/util/Optional.h>

#include <tuple>

namespace pyencoder {

std::tuple<at::Tensor, at::Tensor> causal_conv1d_fwd_cuda(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& initial_state, int64_t activation);

at::Tensor causal_conv1d_fwd_y_cuda(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& initial_state, int64_t activation);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> causal_conv1d_bwd_cuda(
    const at::Tensor& grad_y, const std::optional<at::Tensor>& grad_final_state,
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& initial_state, int64_t activation);

at::Tensor causal_conv1d_update_cuda(const at::Tensor& x, const at::Tensor& state,
                                     const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                     const std::optional<at::Tensor>& state_indices,
                                     int64_t activation);

}  // namespace pyencoder
