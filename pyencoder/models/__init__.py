"""The package's own streaming models: ``CausalEncoder`` (wav2vec2-style encoder, causal with
per-layer lookahead) and ``StreamingDecoder`` (Vocos-style causal ConvNeXt decoder)."""
from .encoder import CausalEncoder, EncoderConfig, EncoderOutput, EncoderState
from .decoder import ConvNeXtBlock, DecoderConfig, DecoderState, StreamingDecoder
from .frontend import ConvFeatureExtractor, FeatureConv1d, RunningGroupNorm
from .adapter import ConvAdapter, PaddedConv1d

__all__ = ["CausalEncoder", "EncoderConfig", "EncoderOutput", "EncoderState",
           "StreamingDecoder", "DecoderConfig", "DecoderState", "ConvNeXtBlock",
           "ConvFeatureExtractor", "FeatureConv1d", "RunningGroupNorm", "ConvAdapter",
           "PaddedConv1d"]
