"""Functional API: registered torch ops with autograd, fake kernels and backend choice (one file per
op family; its backends registered with pyencoder._backend)."""
from .attention import banded_attention, chunked_attention, interval_attention
from .attention_dropout import interval_attention_dropout
from .conv import causal_conv1d, causal_conv1d_update
from .convnext import convnext_dwconv_ln
from .decode_attention import decode_attention

__all__ = ["banded_attention", "chunked_attention", "interval_attention",
           "interval_attention_dropout", "causal_conv1d",
           "causal_conv1d_update", "convnext_dwconv_ln", "decode_attention"]
