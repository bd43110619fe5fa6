"""Plain-torch fused ConvNeXt front half (``backend="reference"`` of
pyencoder.ops.convnext_dwconv_ln, and the oracle of its Triton kernel): depthwise causal conv
(pyencoder.reference.conv) + LayerNorm over channels, written channel-last.

``convnext_dwconv_ln_reference(x, conv_weight, conv_bias, ln_weight, ln_bias, eps,
initial_state)`` -> (y (B, L, C), final_state (B, C, k - 1)) in x's dtype, computed in fp32 (float64
for float64 inputs) and rounded once.
"""
import torch
import torch.nn.functional as F

from . import conv as _conv

__all__ = ["convnext_dwconv_ln_reference", "supports_forward", "forward"]


def _cdtype(dt):
    return torch.float64 if dt == torch.float64 else torch.float32


def convnext_dwconv_ln_reference(x, conv_weight, conv_bias=None, ln_weight=None, ln_bias=None,
                                 eps=1e-6, initial_state=None):
    """Plain torch: (y (B, L, C), final_state (B, C, k - 1)) in x's dtype, computed in fp32
    (float64 for float64) and rounded once."""
    cdt = _cdtype(x.dtype)
    C = x.shape[1]
    up = lambda t: None if t is None else t.to(cdt)  # noqa: E731
    h, final = _conv.forward(x.to(cdt), conv_weight.to(cdt), up(conv_bias), up(initial_state), 1,
                             C, None)
    y = F.layer_norm(h.transpose(1, 2), (C,), up(ln_weight), up(ln_bias), eps)
    return y.to(x.dtype), final.to(x.dtype)


def supports_forward(**_):
    return None


def forward(x, conv_weight, conv_bias, ln_weight, ln_bias, initial_state, eps):
    return convnext_dwconv_ln_reference(x, conv_weight, conv_bias, ln_weight, ln_bias, eps,
                                        initial_state)
