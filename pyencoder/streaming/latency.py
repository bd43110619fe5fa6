"""Algorithmic latency of a streaming model (DESIGN.md, "Lookahead compounds").

Every streamable module reports ``hop`` (its input frames per output frame) and ``lookahead``
(input frames past the end of an output frame's own hop that the frame needs; worst case over
frames, e.g. chunk_size - 1 + lookahead for chunked attention). Along a chain, module i's frames
are H_i = hop_0 * ... * hop_{i-1} input samples long, so

    lookahead_samples = sum_i lookahead_i * H_i        total hop H = prod_i hop_i
    latency_samples   = H + lookahead_samples

i.e. the time from the first input sample of an output frame's hop to the arrival of the last
sample its output needs (a causal conv stack alone has latency = its hop; L attention layers with r
frames of lookahead each add L * r * H samples). Modules that cannot stream raise
``NotStreamableError`` with the reason: GroupNorm (normalises over time), a padded ("same")
nn.Conv1d (looks `padding` samples into the future; use pyencoder.nn.CausalConv1d), BatchNorm in
training mode, recurrent layers run bidirectionally, and unknown leaf modules.
"""
import dataclasses
import math
from typing import List, Tuple

from torch import nn

__all__ = ["latency", "Latency", "NotStreamableError"]


class NotStreamableError(ValueError):
    pass


@dataclasses.dataclass
class Latency:
    samples: int                 # hop + lookahead_samples
    ms: float
    hop: int                     # input samples per output frame
    lookahead_samples: int
    sample_rate: int
    breakdown: List[Tuple[str, str, int, int, int]]  # (name, type, hop, lookahead frames, samples)

    def __str__(self):
        rows = "\n".join(f"  {n or '<root>'} ({t}): hop {h}, lookahead {la} frames = {s} samples"
                         for n, t, h, la, s in self.breakdown if la or h != 1)
        return (f"latency {self.samples} samples = {self.ms:.3f} ms at {self.sample_rate} Hz "
                f"(hop {self.hop} + lookahead {self.lookahead_samples})\n{rows}")


_ZERO = (nn.Linear, nn.LayerNorm, nn.Dropout, nn.Identity, nn.GELU, nn.ReLU, nn.SiLU, nn.Tanh,
         nn.Sigmoid, nn.LeakyReLU, nn.ELU, nn.Softplus, nn.Mish, nn.Hardtanh, nn.PReLU,
         nn.Softmax, nn.Embedding)


def _leaf(name, m):
    """(hop, lookahead) of a module without streaming attributes, or raise."""
    where = f"{name or '<root>'} ({type(m).__name__})"
    if isinstance(m, (nn.GroupNorm, nn.InstanceNorm1d)):
        raise NotStreamableError(
            f"{where} normalises over time: its output at frame t depends on the whole sequence. "
            f"Replace it (running statistics, LayerNorm over channels) or drop it.")
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        if m.training:
            raise NotStreamableError(f"{where} in training mode uses batch statistics over time; "
                                     f"call .eval() (running statistics are per-frame)")
        return 1, 0
    if isinstance(m, nn.Conv1d):
        k, s, d = m.kernel_size[0], m.stride[0], m.dilation[0]
        pad = m.padding if isinstance(m.padding, str) else m.padding[0]
        if pad == "valid" or pad == 0:
            return s, d * (k - 1) + 1 - s
        raise NotStreamableError(
            f"{where} is a padded (non-causal) conv, padding={m.padding}: output t looks "
            f"{pad if isinstance(pad, int) else 'half the kernel'} samples ahead and the padded "
            f"end is not available in a stream. Use pyencoder.nn.CausalConv1d.")
    if isinstance(m, (nn.RNNBase,)) and m.bidirectional:
        raise NotStreamableError(f"{where} is bidirectional: it reads the whole sequence backwards")
    if isinstance(m, _ZERO) or isinstance(m, nn.RNNBase):
        return 1, 0
    if isinstance(m, nn.MultiheadAttention):
        raise NotStreamableError(f"{where} is full-context attention (no bounded lookahead); use "
                                 f"pyencoder.nn.BandedSelfAttention or ChunkedSelfAttention")
    raise NotStreamableError(f"{where}: unknown module without `hop` / `lookahead`; give it those "
                             f"attributes to declare its streaming behaviour")


def _walk(name, m, rows):
    la = getattr(m, "lookahead", None)
    hop = getattr(m, "hop", None)
    if la is not None and hop is not None:
        rows.append((name, type(m).__name__, int(hop), int(la)))
        return
    children = list(m.named_children())
    if children:
        for cn, c in children:
            _walk(f"{name}.{cn}" if name else cn, c, rows)
        return
    h, l = _leaf(name, m)
    rows.append((name, type(m).__name__, h, l))


def latency(model, sample_rate=16000):
    """Exact algorithmic latency of ``model`` (a module, or a list of modules in order) as a
    ``Latency`` (samples, ms, hop, lookahead_samples, per-module breakdown). Containers without
    their own ``hop``/``lookahead`` are taken to run their children in registration order."""
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, float)):
        raise TypeError(f"sample_rate must be a positive number; got {type(sample_rate).__name__} "
                        f"{sample_rate!r}")
    if not math.isfinite(sample_rate) or sample_rate <= 0:
        raise ValueError(f"sample_rate must be a positive finite number; got {sample_rate!r}")
    rows = []
    mods = model if isinstance(model, (list, tuple)) else [model]
    if not mods:
        raise ValueError("latency: model must be an nn.Module or a non-empty list of them; got "
                         "an empty list")
    for i, m in enumerate(mods):
        if not isinstance(m, nn.Module):
            where = "model" if mods is not model else f"model[{i}]"
            raise TypeError(f"latency: {where} must be an nn.Module; got {type(m).__name__}")
        _walk("" if len(mods) == 1 else str(i), m, rows)
    H = 1
    total = 0
    breakdown = []
    for name, typ, hop, la in rows:
        s = la * H
        breakdown.append((name, typ, hop, la, s))
        total += s
        H *= hop
    samples = H + total
    return Latency(samples=samples, ms=1000.0 * samples / sample_rate, hop=H,
                   lookahead_samples=total, sample_rate=int(sample_rate), breakdown=breakdown)
