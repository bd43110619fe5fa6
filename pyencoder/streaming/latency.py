"""Algorithmic latency of a streaming model (DESIGN.md, "Lookahead compounds").

Every streamable module reports ``hop`` (its input frames per output frame) and ``lookahead``
(input frames past the end of an output frame's own hop that the frame needs; worst case over
frames, e.g. chunk_size - 1 + lookahead for chunked attention). Along a chain, module i's frames
are H_i = hop_0 * ... * hop_{i-1} input samples long, so

    lookahead_samples = sum_i lookahead_i * H_i        total hop H = prod_i hop_i
    latency_samples   = H + lookahead_samples

i.e. the time from the first input sample of an output frame's hop to the arrival of the last
sample its output needs (a causal conv stack alone has latency = its hop; L attention layers with r
frames of lookahead each add L * r * H samples). That sum is exact when every module's dependency is
the same for each of its output frames. A module whose dependency varies periodically (chunked
attention: a chunk's first frame waits chunk - 1 frames longer than its last) also declares
``last_input(t)``, the last input frame its output frame t needs, and ``period``; the chain is then
composed frame by frame (``compose``) and the worst frame counts, which can be less than the sum of
the per-module worst cases (two chunked layers: the second layer's worst frame is not always the
first layer's). ``pyencoder.hf.latency`` composes a patched transformers model with the same code. Modules that cannot stream raise
``NotStreamableError`` with the reason: GroupNorm (normalises over time), a padded ("same")
nn.Conv1d (looks `padding` samples into the future; use pyencoder.nn.CausalConv1d), BatchNorm in
training mode, recurrent layers run bidirectionally, and unknown leaf modules.
"""
import dataclasses
import math
import operator
import warnings
from typing import List, Optional, Tuple

from torch import nn

from .protocol import ZERO_LATENCY, is_pointwise

__all__ = ["latency", "Latency", "NotStreamableError"]


class NotStreamableError(ValueError):
    """A module cannot run chunk by chunk with outputs equal to offline; the message says why and
    what to replace it with."""
    pass


# Keys of the dict pyencoder.hf.latency returned before it returned a Latency: where the name is a
# field here with another meaning ("samples", "ms": the total, hop included), the old meaning (the
# lookahead only) is kept for dict-style access, with a DeprecationWarning naming the attribute.
_LEGACY_KEYS = {"samples": "lookahead_samples", "ms": "lookahead_ms", "hop_samples": "hop",
                "samples_per_frame": "hop"}   # the last: StreamingDecoder.latency's old dict


@dataclasses.dataclass
class Latency:
    """Exact algorithmic latency of a streaming model: what ``pyencoder.streaming.latency``,
    ``pyencoder.hf.latency`` and ``CausalEncoder.latency`` return.

    ``samples`` = ``hop`` + ``lookahead_samples``: from the first input sample of an output frame's
    hop to the arrival of the last sample that frame needs (``ms`` the same at ``sample_rate``).
    ``lookahead_samples`` / ``lookahead_ms``: the part past the frame's own hop (what a lookahead
    budget such as DyStream's 60 ms counts). ``breakdown``: per module (name, type, hop, lookahead
    frames, lookahead samples). For a patched HF model the attention / feature-extractor split is
    filled in too (``lookahead_frames``, ``per_layer_lookahead``, ``frontend_lookahead_samples``,
    ``attention_ms``, ``frontend_ms``; None elsewhere).

    Dict-style access ``lat["key"]`` reads the same fields (kept for code written against the
    dict that ``pyencoder.hf.latency`` used to return; there ``"samples"``/``"ms"`` meant the
    lookahead only, and on such an object they still do, with a DeprecationWarning)."""
    samples: int                 # hop + lookahead_samples
    ms: float
    hop: int                     # input samples per output frame
    lookahead_samples: int
    sample_rate: int
    breakdown: List[Tuple[str, str, int, int, int]]  # (name, type, hop, lookahead frames, samples)
    lookahead_frames: Optional[int] = None           # HF: attention lookahead through all layers
    per_layer_lookahead: Optional[List[int]] = None  # HF: per layer
    frontend_lookahead_samples: Optional[int] = None  # HF: feature extractor (receptive field - hop)
    encoder_hop: Optional[int] = None                # HF: input samples per encoder frame
    adapter_stride: Optional[int] = None             # HF conv adapter: output frames per encoder frame
    adapter_lookahead_frames: Optional[int] = None   # HF conv adapter: encoder frames it adds
    _legacy_dict: bool = dataclasses.field(default=False, repr=False, compare=False)

    @property
    def lookahead_ms(self):
        return 1000.0 * self.lookahead_samples / self.sample_rate

    @property
    def attention_ms(self):
        if self.lookahead_frames is None:
            return None
        frames = self.lookahead_frames - (self.adapter_lookahead_frames or 0)
        return 1000.0 * frames * (self.encoder_hop or self.hop) / self.sample_rate

    @property
    def adapter_ms(self):
        if self.adapter_lookahead_frames is None:
            return None
        return 1000.0 * self.adapter_lookahead_frames * (self.encoder_hop or self.hop) / \
            self.sample_rate

    @property
    def frontend_ms(self):
        if self.frontend_lookahead_samples is None:
            return None
        return 1000.0 * self.frontend_lookahead_samples / self.sample_rate

    def __getitem__(self, key):
        if not isinstance(key, str):
            raise TypeError(f"Latency keys are field names (str); got {type(key).__name__}")
        if key in _LEGACY_KEYS and (self._legacy_dict or key in ("hop_samples",
                                                                  "samples_per_frame")):
            attr = _LEGACY_KEYS[key]
            if key in ("samples", "ms"):
                warnings.warn(f'Latency["{key}"] is the lookahead only (as in the dict '
                              f'pyencoder.hf.latency used to return); use .{attr}, or .{key} for '
                              f'the total latency including the frame\'s own hop',
                              DeprecationWarning, stacklevel=2)
            return getattr(self, attr)
        if key.startswith("_") or not hasattr(self, key):
            raise KeyError(key)
        return getattr(self, key)

    def __contains__(self, key):
        """``"samples" in lat``, as on the dicts it replaced: a field name or an old key."""
        return isinstance(key, str) and (key in _LEGACY_KEYS or key in self.keys())

    def keys(self):
        return [f.name for f in dataclasses.fields(self) if not f.name.startswith("_")] + [
            "lookahead_ms", "attention_ms", "frontend_ms", "adapter_ms"]

    def __str__(self):
        rows = "\n".join(f"  {n or '<root>'} ({t}): hop {h}, lookahead {la} frames = {s} samples"
                         for n, t, h, la, s in self.breakdown if la or h != 1)
        head = (f"latency {self.samples} samples = {self.ms:.3f} ms at {self.sample_rate} Hz "
                f"(a frame's own hop of {self.hop} samples + its lookahead: lookahead "
                f"{self.lookahead_samples} samples = {self.lookahead_ms:.3f} ms)")
        if self.lookahead_frames is not None and self.frontend_lookahead_samples is None:
            head += f"\n  lookahead = {self.lookahead_frames} input frames of {self.hop} samples"
        elif self.lookahead_frames is not None:
            head += (f"\n  lookahead = attention {self.lookahead_frames} frames "
                     f"({self.attention_ms:.1f} ms) + feature extractor "
                     f"{self.frontend_lookahead_samples} samples ({self.frontend_ms:.1f} ms)")
        return head + ("\n" + rows if rows else "")


def _leaf(name, m):
    """(hop, lookahead) of a module without streaming attributes, or raise."""
    where = f"{name or '<root>'} ({type(m).__name__})"
    if is_pointwise(m):         # a per-frame module declared so (streaming_pointwise = True)
        return 1, 0
    running = isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.InstanceNorm1d)) and \
        m.track_running_stats and not m.training
    if isinstance(m, nn.GroupNorm) or isinstance(m, nn.InstanceNorm1d) and not running:
        raise NotStreamableError(
            f"{where} normalises over time: its output at frame t depends on the whole sequence. "
            f"Replace it (running statistics, LayerNorm over channels) or drop it.")
    if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.InstanceNorm1d)):
        if not running:       # training mode, or no running statistics: batch statistics
            raise NotStreamableError(
                f"{where} " + ("in training mode" if m.training else
                               "without running statistics (track_running_stats=False)")
                + " normalises with the batch's statistics over time; "
                + ("call .eval() (running statistics are per-frame)" if m.training else
                   "use one that tracks running statistics, in eval mode"))
        return 1, 0
    if isinstance(m, nn.Conv1d):
        k, s, d = m.kernel_size[0], m.stride[0], m.dilation[0]
        pad = m.padding if isinstance(m.padding, str) else m.padding[0]
        if pad == "valid" or pad == 0 or (pad == "same" and d * (k - 1) == 0):
            return s, d * (k - 1) + 1 - s
        if pad == "same":
            ahead, end = d * (k - 1) - d * (k - 1) // 2, "its padded end"
        else:
            ahead, end = max(0, d * (k - 1) - pad), f"its {pad} padded samples past the end"
        raise NotStreamableError(
            f"{where} is a padded (non-causal) conv, padding={m.padding}: output t reads input "
            f"t + {ahead}, and {end} are not available in a stream. Use "
            f"pyencoder.nn.CausalConv1d.")
    if isinstance(m, (nn.RNNBase,)) and m.bidirectional:
        raise NotStreamableError(f"{where} is bidirectional: it reads the whole sequence backwards")
    if isinstance(m, ZERO_LATENCY) or isinstance(m, nn.RNNBase):
        return 1, 0
    raise NotStreamableError(f"{where}: unknown module without `hop` / `lookahead`; give it those "
                             f"attributes to declare its streaming behaviour")


_FULL_CONTEXT = (nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer,
                 nn.TransformerEncoder, nn.TransformerDecoder, nn.Transformer)


def _declared(where, name, value, lo):
    """A module's declared ``hop`` (lo=1) or ``lookahead`` (lo=0; None: any int, for a module
    that also declares ``last_input``): an int >= lo."""
    try:
        v = operator.index(value)
    except TypeError:
        v = None
    if v is None or isinstance(value, bool) or (lo is not None and v < lo):
        raise ValueError(f"{where} declares {name}={value!r}; a streaming module's {name} must be "
                         f"an int" + ("" if lo is None else f" >= {lo}"))
    return v


def _walk(name, m, rows):
    where = f"{name or '<root>'} ({type(m).__name__})"
    why = getattr(m, "not_streamable", None)
    if isinstance(why, str):       # a module that knows it cannot stream says why
        raise NotStreamableError(f"{name or type(m).__name__}: {why}")
    la = getattr(m, "lookahead", None)
    hop = getattr(m, "hop", None)
    if la is not None and hop is not None:
        last = getattr(m, "last_input", None)
        # a module composed frame by frame (last_input) may need nothing past its own hop: a
        # padded strided conv's window can end before its hop does (negative lookahead)
        rows.append((name, type(m).__name__, _declared(where, "hop", hop, 1),
                     _declared(where, "lookahead", la, None if callable(last) else 0), last,
                     _declared(where, "period", getattr(m, "period", 1), 1)))
        return
    # attention without a declared lookahead sees the whole sequence; its children (projections)
    # are per-frame, so the walk below would add up 0 for it
    if isinstance(m, _FULL_CONTEXT) or "Attention" in type(m).__name__:
        raise NotStreamableError(f"{where} is attention without a declared lookahead (full "
                                 f"context: no bounded latency); use pyencoder.nn."
                                 f"BandedSelfAttention or ChunkedSelfAttention, or give it `hop` "
                                 f"and `lookahead` attributes if it is causal")
    if la is not None:
        raise ValueError(f"{where} declares lookahead={la!r} but no hop; a streaming module "
                         f"declares both (hop: input frames per output frame)")
    # a container runs every registration in order (a module registered twice, tied weights,
    # runs twice); in another module a second name for a child is taken as an alias
    children = [(cn, c) for cn, c in m._modules.items() if c is not None] \
        if isinstance(m, (nn.Sequential, nn.ModuleList)) else list(m.named_children())
    if children:
        first = len(rows)
        for cn, c in children:
            _walk(f"{name}.{cn}" if name else cn, c, rows)
        if hop is not None:         # a declared hop alone: its children's composition
            got = math.prod(r[2] for r in rows[first:])
            if got != _declared(where, "hop", hop, 1):
                raise ValueError(f"{where} declares hop={hop!r} but its children compose hop "
                                 f"{got}; declare lookahead too, or the children's hops")
        return
    h, l = _leaf(name, m)
    rows.append((name, type(m).__name__, h, l, None, 1))


def _lcm(a, b):
    return a * b // math.gcd(a, b)


def exact_lookahead(rows):
    """Lookahead in input samples (frames of the chain's input) of a chain of ``rows``
    ``(hop, lookahead, last_input or None, period)`` in order: the worst output frame u of
    (last input frame it needs) - (last input frame of its own hop). Rows without ``last_input``
    need (t + 1) * hop - 1 + lookahead for their frame t. The difference is periodic in u with a
    period dividing the lcm of the rows' periods and hops, so two periods are enough."""
    if all(r[2] is None for r in rows):
        total, H = 0, 1
        for hop, la, _, _ in rows:
            total += la * H
            H *= hop
        return total
    period, H = 1, 1
    for hop, _, _, per in rows:
        period = _lcm(_lcm(period, max(1, per)), hop)
        H *= hop
    worst = None
    for u in range(min(2 * period + 2, 100000)):
        t = u
        for hop, la, last, _ in reversed(rows):
            t = last(t) if last is not None else (t + 1) * hop - 1 + la
        d = t - ((u + 1) * H - 1)
        worst = d if worst is None else max(worst, d)
    return worst


def compose(rows, sample_rate, **extra):
    """A ``Latency`` from a chain's rows ``(name, type, hop, lookahead, last_input, period)``
    (``extra``: the HF fields of ``Latency``). The one place where a chain's latency is added up:
    ``latency`` (a module tree) and ``pyencoder.hf.latency`` (a patched transformers model) both
    end here."""
    H = 1
    breakdown = []
    for name, typ, hop, la, _, _ in rows:
        breakdown.append((name, typ, hop, la, la * H))
        H *= hop
    total = exact_lookahead([r[2:] for r in rows])
    samples = H + total
    return Latency(samples=samples, ms=1000.0 * samples / sample_rate, hop=H,
                   lookahead_samples=total, sample_rate=int(sample_rate), breakdown=breakdown,
                   **extra)


def check_sample_rate(sample_rate):
    """A positive whole number of Hz (an int or an integral float): Latency keeps it as an int,
    so 0.5 became 0 (a division by zero) and 22050.5 two different rates."""
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, float)):
        raise TypeError(f"sample_rate must be a positive number; got {type(sample_rate).__name__} "
                        f"{sample_rate!r}")
    if not math.isfinite(sample_rate) or sample_rate < 1 or sample_rate != int(sample_rate):
        raise ValueError(f"sample_rate must be a positive whole number of Hz; got "
                         f"{sample_rate!r}")


def _own(model):
    """The module with its own accounting (``own_latency``) that ``model`` is, or holds as its
    only part (a list of one, an nn.Sequential / ModuleList of one); else None."""
    while True:
        if isinstance(model, (list, tuple)) and len(model) == 1:
            model = model[0]
        elif isinstance(model, (nn.Sequential, nn.ModuleList)) and len(model) == 1 and \
                not callable(getattr(model, "own_latency", None)):
            model = model[0]
        else:
            break
    if isinstance(model, nn.Module) and callable(getattr(model, "own_latency", None)):
        return model
    return None


def latency(model, sample_rate=16000):
    """Exact algorithmic latency of ``model`` (a module, or a list of modules in order) as a
    ``Latency`` (samples, ms, hop, lookahead_samples, per-module breakdown). Containers without
    their own ``hop``/``lookahead`` are taken to run their children in registration order.

    The unit is the model's input step: "samples" at ``sample_rate`` for a model fed waveform
    samples; for one fed frames (a bare attention layer, a stack on features) pass the frame rate
    (e.g. 50 for 20 ms frames) and read ``samples`` as frames. A model with its own accounting
    (``own_latency(sample_rate)``: pyencoder.models.StreamingDecoder, frames in and waveform out)
    returns that."""
    check_sample_rate(sample_rate)
    own = _own(model)
    if own is not None:
        return own.own_latency(sample_rate)
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
    return compose(rows, sample_rate)
