"""Hugging Face transformers integration: make a wav2vec2 / HuBERT / WavLM model a causal,
streamable encoder in one call.

    import pyencoder.hf
    model = Wav2Vec2Model.from_pretrained(name, attn_implementation="pyencoder")  # optional
    pyencoder.hf.apply_pyencoder_to_wav2vec2(model, lookahead_frames=3, left_frames=250)
    enc = pyencoder.hf.StreamingEncoder(model.eval())
    state = enc.init_state(batch_size=1)
    y, state = enc.step(audio_chunk, state)   # any number of 16 kHz samples
    y, state = enc.flush(state)

Tested with transformers >=5.23,<5.25 (see pyencoder.hf._compat); the patches check what they rely
on when applied and raise PatchError naming the installed version if something is missing.
Importing this module registers the "pyencoder" attention implementation with transformers.
"""
from ._compat import TESTED_SPEC, PatchError

try:
    import transformers  # noqa: F401
except ImportError as e:       # a bare "No module named 'transformers'" from deep in register()
    raise ImportError(f"pyencoder.hf needs transformers{TESTED_SPEC} (the tested range): pip "
                      f"install 'pyencoder[hf]' ({e})") from e
from .attention import LayerSpec
from .registry import register
from .patch import (apply_pyencoder_to_wav2vec2, from_pretrained, latency, patch_record,
                    reapply_pyencoder, revert_pyencoder)
from .streaming import EncoderStreamState, StreamingEncoder

__all__ = ["apply_pyencoder_to_wav2vec2", "revert_pyencoder", "reapply_pyencoder",
           "from_pretrained", "StreamingEncoder", "latency", "register", "patch_record",
           "LayerSpec", "PatchError", "TESTED_SPEC"]

register()
