// Host-side interface of the depthwise causal conv1d CUDA kernels (no torch headers).
//
// Conventions (pyencoder.reference.conv, stride 1, groups == C_in == C_out): the input is
// left-padded by K - 1 samples taken from `state` (B, C, K-1) or zeros;
// y[b, c, t] = act(bias[c] + sum_j w[c, j] * xp[b, c, t + j]).
// All tensors are addressed through element strides, so channel-first (B, C, L) and
// channel-last (B, L, C) memory both work; 16-byte vector paths are taken when the contiguous
// dimension has stride 1 and the pointers and other strides are 16-byte aligned.
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

namespace pyencoder {
namespace conv {

enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };
enum Act : int { kActNone = 0, kActSilu = 1, kActGelu = 2 };

struct Strided3 {
  const void* ptr = nullptr;
  int64_t sb = 0, sc = 0, sl = 0;
};

struct MutStrided3 {
  void* ptr = nullptr;
  int64_t sb = 0, sc = 0, sl = 0;
};

struct DwConvParams {
  int B = 0, C = 0, L = 0, K = 1;
  int act = kActNone;
  Strided3 in;        // x (forward, grad-pre) or grad wrt pre-activation (dx)
  Strided3 state;     // initial state (B, C, K-1); ptr == nullptr: zeros
  const void* weight = nullptr;
  int64_t swc = 0, swk = 0;  // weight (C, 1, K) strides along C and K
  const void* bias = nullptr;
  Strided3 grad_y;        // grad-pre mode: incoming gradient (B, C, L)
  Strided3 grad_final;    // dx mode: gradient of final_state (B, C, K-1), may be null
  MutStrided3 out;        // y (forward), g' fp32 (grad-pre), dx (dx mode)
  MutStrided3 out_state;  // dx mode: d initial_state (B, C, K-1), may be null
  int in_dtype = kFloat32, out_dtype = kFloat32, grad_dtype = kFloat32;
};

// y = act(conv(x) + bias).
void launch_dw_fwd(const DwConvParams& p, cudaStream_t stream);
// out (fp32) = grad_y * act'(conv(x) + bias).
void launch_dw_grad_pre(const DwConvParams& p, cudaStream_t stream);
// Transposed conv of `in` (the gradient wrt the pre-activation) plus grad_final, split into
// dx (B, C, L) and d initial_state (B, C, K-1).
void launch_dw_bwd_dx(const DwConvParams& p, cudaStream_t stream);
// final_state[b, c, i] = xp[b, c, L + i], i < K - 1.
void launch_dw_final_state(const DwConvParams& p, cudaStream_t stream);

struct DwWeightGradParams {
  int B = 0, C = 0, L = 0, K = 1, nsplit = 1;
  Strided3 x, state, g;   // g: gradient wrt the pre-activation
  float* partial = nullptr;  // (B * nsplit, C, K + 1): taps then bias, fp32
  int x_dtype = kFloat32, g_dtype = kFloat32;
};
// Per-(batch, split) partial weight and bias gradients; the host sums them in a fixed order.
void launch_dw_bwd_dweight(const DwWeightGradParams& p, cudaStream_t stream);

struct DwUpdateParams {
  int B = 0, C = 0, T = 0, K = 1, act = kActNone;
  Strided3 x;
  void* state = nullptr;  // (S, C, K-1) or (B, C, K-1), updated in place
  int64_t ssb = 0, ssc = 0, ssl = 0;
  const int32_t* state_indices = nullptr;  // (B,), -1 = padding slot; nullptr: row b
  const void* weight = nullptr;
  int64_t swc = 0, swk = 0;
  const void* bias = nullptr;
  MutStrided3 out;
  int dtype = kFloat32;
};
void launch_dw_update(const DwUpdateParams& p, cudaStream_t stream);

// Tile geometry shared by the launchers and the kernels.
constexpr int kThreads = 128;
constexpr int kTileC = 32;
constexpr int kPosGroups = kThreads / kTileC;
constexpr int kRowsPerThread = 16;
constexpr int kTileL = kPosGroups * kRowsPerThread;

}  // namespace conv
}  // namespace pyencoder
