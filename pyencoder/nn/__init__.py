"""Drop-in modules, usable offline as ordinary nn.Modules and online through
init_state / step / flush (see pyencoder.streaming)."""
from .rotary import RotaryEmbedding
from .attention import (AttentionState, BandedSelfAttention, ChunkedSelfAttention, pack_qkv_,
                        unpack_qkv_)
from .relpos import RelPosAttentionState, WavLMSelfAttention
from .cross_attention import CrossAttentionState, FrameCrossAttention
from .conv import CausalConv1d, ConvState
from .refiner import Refiner, RefinerState
from .layer import AttentionAdapter, FeedForward, LayerState, TransformerLayer
from .misc import Transpose
from .linear import Linear, LinearView
from .norm import LayerNorm, RunningGroupNorm, RunningNormState
from ..streaming.sequential import StreamingSequential

__all__ = ["RotaryEmbedding", "BandedSelfAttention", "ChunkedSelfAttention", "AttentionState",
           "WavLMSelfAttention", "RelPosAttentionState", "FrameCrossAttention",
           "CrossAttentionState",
           "CausalConv1d", "ConvState", "Refiner", "RefinerState", "TransformerLayer",
           "FeedForward", "LayerState", "Linear", "LinearView", "Transpose", "RunningGroupNorm",
           "RunningNormState", "LayerNorm",
           "StreamingSequential", "AttentionAdapter", "pack_qkv_", "unpack_qkv_"]
