"""``register()``: the "pyencoder" attention implementation for transformers.

Adds pyencoder.hf.attention's ``pyencoder_attention_forward`` and ``pyencoder_mask`` to
transformers' attention and mask registries and installs pyencoder.hf.wavlm's class-level WavLM
dispatch (WavLM does not call the registry). Run when ``pyencoder.hf`` is imported and again by
``apply_pyencoder_to_wav2vec2`` if the registry entries were replaced.
"""
from .attention import NAME, pyencoder_attention_forward, pyencoder_mask
from .wavlm import install_registry_dispatch

__all__ = ["register", "is_registered"]


def register():
    """Register "pyencoder" with transformers' attention and mask registries (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface
    AttentionInterface.register(NAME, pyencoder_attention_forward)
    AttentionMaskInterface.register(NAME, pyencoder_mask)
    install_registry_dispatch()


def is_registered():
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    return (ALL_ATTENTION_FUNCTIONS._global_mapping.get(NAME) is pyencoder_attention_forward
            and ALL_MASK_ATTENTION_FUNCTIONS._global_mapping.get(NAME) is pyencoder_mask)
