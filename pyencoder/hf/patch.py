"""apply_pyencoder_to_wav2vec2 / revert_pyencoder: make a transformers wav2vec2-family model a
causal (banded or chunked) encoder with a few frames of lookahead, in place.

What is patched (and restored exactly by revert_pyencoder):
- attention: Wav2Vec2 and HuBERT go through transformers' attention registry: every
  attention module gets a ``_pyencoder_attn`` LayerSpec and ``config._attn_implementation`` becomes
  "pyencoder" (see pyencoder.hf.attention). WavLM bypasses the registry: each WavLMAttention gets
  an instance ``forward`` computing the gated relative position bias inside a blocked interval
  attention (pyencoder.hf.wavlm).
- positional conv (``encoder.pos_conv_embed``): "drop" (its output becomes 0), "causal" (same
  weights, causal padding) or "keep"; patched by an instance ``forward``, so parameters and
  state_dict keys are unchanged and a patched model's checkpoint loads into an unpatched one.
- GroupNorm of conv layer 0 (``feat_extract_norm == "group"``): "running" (causal cumulative
  statistics, pyencoder.hf.frontend) or "keep".
- ``config.pyencoder``: the patch's options (JSON), so that ``save_pretrained`` records them;
  ``from_pretrained(cls, path)`` / ``reapply_pyencoder(model)`` patch a loaded model with them.

Adapters are left as they are: the attention adapters of MMS-style checkpoints
(``config.adapter_attn_dim``, swapped by ``load_adapter``) are per-frame, and the conv adapter
after the encoder (``config.add_adapter``) runs on the patched encoder's output; ``latency()``
counts the conv adapter's stride (output hop) and right context, and StreamingEncoder streams it.

Patching a patched model raises (call revert_pyencoder first); the patch is not idempotent by
design, so a second call with other settings can never be silently ignored.

Switching attention on a patched model is refused: ``model.set_attn_implementation(name)`` with
any implementation other than "pyencoder" (or the one the config already has) raises ValueError
naming ``revert_pyencoder`` and changes nothing — eager/SDPA/flash would drop the band/chunk mask
and RoPE, i.e. compute another function. Names transformers does not know still get
transformers' own ValueError; unpatched models switch exactly as in transformers (the check sits
on the Wav2Vec2/HuBERT/WavLM PreTrainedModel classes, installed by the first patch, and only acts
on patched models). Setting ``config._attn_implementation`` directly bypasses that method; a
forward pre-hook then refuses to run a patched Wav2Vec2/HuBERT whose implementation is no longer
"pyencoder" (its attention would silently become full again).

Instance forwards and the pre-hook are module-level callables, so a patched model pickles (and
deep-copies) as far as the HF model itself does.
"""
import copy
import functools
import gc
import warnings
from dataclasses import dataclass, field
from typing import List, Optional

from torch import nn

from ..mask import IntervalMask
from ..nn.relpos import check_bucket_args
from .._checks import check_int
from ..rope import Rope, as_rope
from ..models.encoder import find_hf_base, hf_adapter_config
from ..streaming.latency import NotStreamableError, check_sample_rate, compose
from . import _compat
from .attention import NAME, LayerSpec
from .registry import is_registered, register
from .frontend import causal_pos_conv, running_group_norm
from .wavlm import wavlm_forward

CONFIG_KEY = "pyencoder"
CONFIG_FORMAT = 1
_OPTION_NAMES = ("lookahead_frames", "left_frames", "lookahead_layers", "rope", "pos_conv",
                 "group_norm", "chunk_size", "left_chunks", "sink_frames")
POS_CONV_MODES = ("drop", "causal", "keep")
GROUP_NORM_MODES = ("running", "keep")
SAMPLE_RATE = 16000


@dataclass
class PatchRecord:
    family: str
    specs: List[LayerSpec]
    options: dict
    pos_conv: str
    group_norm: Optional[str]
    orig_attn_impl: Optional[str] = None
    instance_forwards: list = field(default_factory=list)
    hook: object = None
    config_entry_set: bool = False
    orig_config_entry: object = None

    @property
    def per_layer_lookahead(self):
        return [s.mask.lookahead for s in self.specs]


def base_model(model, caller="apply_pyencoder_to_wav2vec2"):
    """(The Wav2Vec2Model / HubertModel / WavLMModel inside ``model`` (itself, or a head's base),
    its family) (pyencoder.models.encoder.find_hf_base; errors name ``caller``)."""
    return find_hf_base(model, caller)


def _check_model(base, family):
    _compat.require_attrs(base, ["feature_extractor", "encoder", "config"], f"{family} base model")
    enc = base.encoder
    _compat.require_attrs(enc, ["layers", "pos_conv_embed"], f"{family} encoder")
    pc = enc.pos_conv_embed
    _compat.require_attrs(pc, ["conv", "activation"], f"{family} positional conv embedding")
    if not isinstance(pc.conv, nn.Conv1d):
        _compat.fail(f"{family} pos_conv_embed.conv is {type(pc.conv).__name__}, not nn.Conv1d")
    _compat.require_attrs(base.feature_extractor, ["conv_layers"], f"{family} feature extractor")
    for i, layer in enumerate(enc.layers):
        _compat.require_attrs(layer, ["attention"], f"{family} encoder layer {i}")
        att = layer.attention
        _compat.require_attrs(att, ["q_proj", "k_proj", "v_proj", "out_proj", "num_heads",
                                    "head_dim", "scaling", "dropout"],
                              f"{family} attention (layer {i})")
    if family == "wavlm":
        for i, layer in enumerate(enc.layers):
            att = layer.attention
            _compat.require_attrs(att, ["gru_rel_pos_linear", "gru_rel_pos_const",
                                        "_relative_positions_bucket", "num_buckets"],
                                  f"WavLM attention (layer {i})")
            _compat.require_params(type(att).forward, ["attention_mask", "position_bias"],
                                   "WavLMAttention.forward")
        if getattr(enc.layers[0].attention, "rel_attn_embed", None) is None:
            _compat.fail("WavLM layer 0 has no rel_attn_embed")
        # transformers' own forward indexes outside the bucket table with such a config (at
        # distances past num_buckets // 4): refused here by its fields, not in the first forward
        cfg = base.config
        check_bucket_args(getattr(cfg, "num_buckets", 320),
                          getattr(cfg, "max_bucket_distance", 800),
                          ("config.num_buckets", "config.max_bucket_distance"))
    else:
        cls = type(enc.layers[0].attention)
        _compat.require_source(cls, "ALL_ATTENTION_FUNCTIONS.get_interface(",
                               f"{cls.__name__} (attention registry dispatch)")
        _compat.require_source(type(enc), "create_bidirectional_mask(",
                               f"{type(enc).__name__} (padding mask through the mask registry)")
        _compat.require_attrs(base.config, ["_attn_implementation_internal"], "model config")
    if base.config.feat_extract_norm == "group":
        gn = getattr(base.feature_extractor.conv_layers[0], "layer_norm", None)
        if not isinstance(gn, nn.GroupNorm) or gn.num_groups != gn.num_channels:
            _compat.fail("conv layer 0 of a feat_extract_norm='group' model has no per-channel "
                         "nn.GroupNorm named layer_norm")
    for name in ("hop", "lookahead"):
        if hasattr(base, name):
            _compat.fail(f"{type(base).__name__} already has an attribute {name!r}, which the "
                         f"patch uses for pyencoder.streaming.latency")
    if getattr(base, "adapter", None) is not None:   # the model's, as its forward decides (a
        _check_adapter(base, family)                   # HuBERT config may say add_adapter)


def _check_adapter(base, family):
    """The conv adapter after the encoder (config.add_adapter): optional proj + LayerNorm, then
    layers of Conv1d (zero padding on both sides) + GLU. It is left as is offline; latency() and
    the stream need its kernel, stride and padding."""
    ad = base.adapter
    _compat.require_attrs(ad, ["layers", "proj", "proj_layer_norm"], f"{family} adapter")
    try:
        hf_adapter_config(base)
    except NotImplementedError as e:
        _compat.fail(f"{family}: {e}")
    for layer in ad.layers:
        _compat.require_source(type(layer), "glu(", f"{type(layer).__name__} (conv + GLU)")


def _layer_lookaheads(lookahead_frames, lookahead_layers, n_layers):
    if isinstance(lookahead_layers, str):
        if lookahead_layers == "first":
            return [lookahead_frames] + [0] * (n_layers - 1)
        if lookahead_layers == "all":
            return [lookahead_frames] * n_layers
        raise ValueError(f"lookahead_layers must be 'first', 'all' or a list of {n_layers} ints; "
                         f"got {lookahead_layers!r}")
    if not isinstance(lookahead_layers, (list, tuple)) or len(lookahead_layers) != n_layers:
        raise ValueError(f"lookahead_layers must be 'first', 'all' or a list of {n_layers} ints "
                         f"(one per layer); got {lookahead_layers!r}")
    for i, r in enumerate(lookahead_layers):
        check_int(f"lookahead_layers[{i}]", r, min_value=0)
    return list(lookahead_layers)


def build_specs(n_layers, head_dim, lookahead_frames, left_frames, lookahead_layers, rope,
                chunk_size, left_chunks, sink=0):
    check_int("lookahead_frames", lookahead_frames, min_value=0)
    check_int("sink_frames", sink, min_value=0)
    check_int("left_frames", left_frames, min_value=0, allow_none=True)
    check_int("chunk_size", chunk_size, min_value=1, allow_none=True)
    check_int("left_chunks", left_chunks, min_value=0, allow_none=True)
    if chunk_size is None and left_chunks is not None:
        raise ValueError("left_chunks needs chunk_size (chunked attention); got chunk_size=None")
    if chunk_size is not None and left_frames is not None:
        raise ValueError("left_frames is for the band mask; with chunk_size give left_chunks "
                         f"instead (got left_frames={left_frames})")
    r_list = _layer_lookaheads(lookahead_frames, lookahead_layers, n_layers)
    rp = as_rope(rope, head_dim)
    specs = []
    for r in r_list:
        mask = (IntervalMask.band(left_frames, r, sink=sink) if chunk_size is None else
                IntervalMask.chunked(chunk_size, left_chunks, r, sink=sink))
        specs.append(LayerSpec(mask, rp))
    return specs


class _InstanceForward:
    """``fn`` bound to ``module`` as its instance ``forward``. Unlike a bound method (which pickles
    as ``getattr(module, fn.__name__)``) it pickles and deep-copies with the module: a
    module-level function and a reference that copy/pickle memos rebind to the copied module."""

    def __init__(self, fn, module):
        self.fn = fn
        self.module = module

    def __call__(self, *args, **kwargs):
        return self.fn(self.module, *args, **kwargs)

    def __repr__(self):
        return f"<pyencoder forward {self.fn.__name__} of {type(self.module).__name__}>"


def _set_forward(record, module, fn):
    module.forward = _InstanceForward(fn, module)
    record.instance_forwards.append(module)


def _pos_conv_drop(self, hidden_states):
    return hidden_states.new_zeros(())


def _pos_conv_causal(self, hidden_states):
    return causal_pos_conv(self, hidden_states)


def _running_norm_forward(self, x):
    return running_group_norm(x, self.weight, self.bias, self.eps)[0]


def _impl_guard(module, args, kwargs):
    impl = module.config._attn_implementation
    if impl != NAME:
        raise RuntimeError(f"this model was patched by pyencoder (banded/chunked attention) but "
                           f"config._attn_implementation is now {impl!r}; call "
                           f"pyencoder.hf.revert_pyencoder(model) first, or "
                           f"model.set_attn_implementation({NAME!r})")


def _switch_refusal(model, attn_implementation):
    """Why ``model.set_attn_implementation(attn_implementation)`` is refused, or None."""
    try:
        base, _ = base_model(model)
    except TypeError:
        return None
    if getattr(base, "_pyencoder_patch", None) is None:
        return None
    current = model.config._attn_implementation
    requested = attn_implementation
    if isinstance(requested, dict):
        requested = requested.get("", current)
    if not isinstance(requested, str) or requested in (NAME, current):
        return None
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    known = (requested == "eager" or requested in ALL_ATTENTION_FUNCTIONS.valid_keys()
             or "|" in requested or "/" in requested)
    if not known:
        return None          # transformers raises its own "not supported" ValueError
    return (f"set_attn_implementation({requested!r}) on a model patched by pyencoder: its "
            f"attention is pyencoder's banded/chunked interval attention (with RoPE), which "
            f"{requested!r} would replace by full attention, silently changing the model. Call "
            f"pyencoder.hf.revert_pyencoder(model) first to get the original model back, then "
            f"switch (config._attn_implementation is unchanged: {current!r})")


def _guarded_set_attn_implementation(orig):
    @functools.wraps(orig)
    def set_attn_implementation(self, attn_implementation, *args, **kwargs):
        why = _switch_refusal(self, attn_implementation)
        if why is not None:
            raise ValueError(why)
        return orig(self, attn_implementation, *args, **kwargs)
    set_attn_implementation._pyencoder_guard = True
    return set_attn_implementation


def install_switch_guard():
    """Put the set_attn_implementation check (module docstring) on the PreTrainedModel classes of
    the three families, once. It acts only on models carrying a pyencoder patch."""
    import transformers
    for name in ("Wav2Vec2PreTrainedModel", "HubertPreTrainedModel", "WavLMPreTrainedModel"):
        cls = getattr(transformers, name, None)
        fn = getattr(cls, "set_attn_implementation", None)
        if fn is None or getattr(fn, "_pyencoder_guard", False):
            continue
        cls.set_attn_implementation = _guarded_set_attn_implementation(fn)


def apply_pyencoder_to_wav2vec2(model, *, lookahead_frames=3, left_frames=None,
                                lookahead_layers="first", rope=True, pos_conv="drop",
                                group_norm="running", chunk_size=None, left_chunks=None,
                                sink_frames=0):
    """Patch a Wav2Vec2 / HuBERT / WavLM model (base or head) in place; returns the same object.

    Attention becomes band(left_frames, r_l) (or chunked(chunk_size, left_chunks, r_l) when
    ``chunk_size`` is given) with per-layer lookahead r_l from ``lookahead_layers``: "first" puts
    all ``lookahead_frames`` in layer 0 (total lookahead = lookahead_frames), "all" gives every
    layer ``lookahead_frames`` (total = layers x lookahead_frames), or a list gives one value per
    layer. ``rope``: True for RoPE over the whole head (a pyencoder.Rope for other settings), False
    for none. ``pos_conv``: "drop", "causal" or "keep" (offline only). ``group_norm``: "running"
    or "keep" (offline only); ignored by models without GroupNorm (feat_extract_norm="layer").
    ``sink_frames``: the first frames of the input every frame also sees (attention sinks,
    IntervalMask sink keys; WavLM's relative bias reads the saturated bucket rule at a sink key's
    true offset; a model in training mode with attention dropout and sinks is refused at its
    forward, naming the dropout: no kernel drops the sink keys' probabilities). Raises PatchError if the installed transformers lacks what the patch relies on, and
    ValueError if ``model`` is already patched."""
    base, family = base_model(model)
    if getattr(base, "_pyencoder_patch", None) is not None:
        raise ValueError("this model is already patched by pyencoder; call "
                         "pyencoder.hf.revert_pyencoder(model) before patching it again")
    if pos_conv not in POS_CONV_MODES:
        raise ValueError(f"pos_conv must be one of {POS_CONV_MODES}; got {pos_conv!r}")
    if group_norm not in GROUP_NORM_MODES:
        raise ValueError(f"group_norm must be one of {GROUP_NORM_MODES}; got {group_norm!r}")
    if not _compat.in_tested_range():
        warnings.warn(f"pyencoder.hf is tested with transformers {_compat.TESTED_SPEC}; you have "
                      f"{_compat.transformers_version()}. The patch checks what it relies on, but "
                      f"verify outputs on your model.", stacklevel=2)
    _check_model(base, family)
    att0 = base.encoder.layers[0].attention
    # the arguments first: a refused patch leaves the model as it was (its config object too)
    specs = build_specs(len(base.encoder.layers), att0.head_dim, lookahead_frames, left_frames,
                        lookahead_layers, rope, chunk_size, left_chunks, sink_frames)
    install_switch_guard()
    cfg = _own_config(model, base)
    if lookahead_layers == "all" and lookahead_frames and len(specs) > 1:
        warnings.warn(f"lookahead_layers='all': lookahead compounds over {len(specs)} layers, "
                      f"total lookahead = {len(specs)} x {lookahead_frames} = "
                      f"{len(specs) * lookahead_frames} frames "
                      f"({len(specs) * lookahead_frames * frame_ms(base):g} ms)", stacklevel=2)
    gn_mode = group_norm if cfg.feat_extract_norm == "group" else None
    record = PatchRecord(family=family, specs=specs, pos_conv=pos_conv, group_norm=gn_mode,
                         options=dict(lookahead_frames=lookahead_frames, left_frames=left_frames,
                                      lookahead_layers=lookahead_layers, rope=rope,
                                      pos_conv=pos_conv, group_norm=group_norm,
                                      chunk_size=chunk_size, left_chunks=left_chunks,
                                      **({"sink_frames": sink_frames} if sink_frames else {})))
    entry = config_entry(record.options)
    if family != "wavlm":
        if not is_registered():
            register()
        record.orig_attn_impl = cfg._attn_implementation_internal
    try:
        for layer, spec in zip(base.encoder.layers, specs):
            layer.attention._pyencoder_attn = spec
            if family == "wavlm":
                _set_forward(record, layer.attention, wavlm_forward)
        pc = base.encoder.pos_conv_embed
        if pos_conv == "drop":
            _set_forward(record, pc, _pos_conv_drop)
        elif pos_conv == "causal":
            _set_forward(record, pc, _pos_conv_causal)
        if gn_mode == "running":
            _set_forward(record, base.feature_extractor.conv_layers[0].layer_norm,
                         _running_norm_forward)
        if family != "wavlm":
            if cfg._attn_implementation != NAME:
                model.set_attn_implementation(NAME)
                if base.config._attn_implementation != NAME:
                    _compat.fail(f"set_attn_implementation({NAME!r}) did not take effect on "
                                 f"{type(base).__name__}")
            record.hook = base.register_forward_pre_hook(_impl_guard, with_kwargs=True)
    except BaseException:
        _undo(base, record)
        raise
    record.orig_config_entry = getattr(cfg, CONFIG_KEY, None)
    setattr(cfg, CONFIG_KEY, entry)
    record.config_entry_set = True
    base._pyencoder_patch = record
    # pyencoder.streaming.latency(model) reads `hop` / `lookahead` (input samples) on the base,
    # or `not_streamable` (the reason) for a patch that keeps a whole-utterance module
    why = unstreamable_reason(record)
    if why is None:
        lat = latency(base)
        base.hop = lat.hop
        base.lookahead = lat.lookahead_samples
    else:
        base.not_streamable = why
    return model


def _own_config(model, base):
    """A copy of the base's config for ``model``'s modules and the modules ``model`` lies inside
    (the head of a patched base), returned: the patch writes its entries there, never on the
    caller's config object. transformers does not copy a config passed to a model, so a student
    built as ``Wav2Vec2Model(teacher.config)`` shares the teacher's (or a teacher built later
    from it): the patch's ``_attn_implementation`` and ``config.pyencoder`` entry landed on the
    never-patched teacher too (its output_attentions came back empty, and it saved as patched:
    pyencoder.hf.from_pretrained loaded it causal). The copy stays after revert_pyencoder (equal
    in content to the original, the patch's entries undone). Finding the head walks the garbage
    collector's referrers once (patch time only)."""
    old = base.config
    new = copy.deepcopy(old)
    for h in _config_holders(old):
        if any(m is model for m in h.modules()):      # model itself, or a module holding it
            h.config = new
    for m in model.modules():
        if m.__dict__.get("config") is old:
            m.config = new
    return new


def _config_holders(cfg):
    """The nn.Modules whose ``config`` attribute is ``cfg``."""
    found, dicts = {}, []
    for r in gc.get_referrers(cfg):
        if isinstance(r, nn.Module):           # an object whose attributes are stored inline
            if r.__dict__.get("config") is cfg:
                found[id(r)] = r
        elif isinstance(r, dict) and r.get("config") is cfg:
            dicts.append(r)
    if dicts:
        for r in gc.get_referrers(*dicts):
            if isinstance(r, nn.Module) and r.__dict__.get("config") is cfg:
                found[id(r)] = r
    return list(found.values())


def unstreamable_reason(record):
    """Why a patch (its PatchRecord) cannot stream, or None: it kept the symmetric positional
    conv or the GroupNorm over time (offline-only options)."""
    if record.pos_conv == "keep":
        return ("pos_conv='keep' cannot stream: the symmetric positional conv looks half its "
                "kernel (e.g. 64 frames = 1.28 s) into the future. Patch with pos_conv='drop' or "
                "'causal'.")
    if record.group_norm == "keep":
        return ("group_norm='keep' cannot stream: conv layer 0's GroupNorm normalises over the "
                "whole utterance. Patch with group_norm='running'.")
    return None


def _undo(base, record):
    for m in record.instance_forwards:
        if "forward" in m.__dict__:
            del m.forward
    record.instance_forwards.clear()
    for layer in base.encoder.layers:
        if "_pyencoder_attn" in layer.attention.__dict__:
            del layer.attention._pyencoder_attn
    if record.hook is not None:
        record.hook.remove()
        record.hook = None
    if record.family != "wavlm" and record.orig_attn_impl is not None:
        base.config._attn_implementation_internal = record.orig_attn_impl
    for name in ("hop", "lookahead", "not_streamable"):
        if name in base.__dict__:
            delattr(base, name)
    if record.config_entry_set:
        if record.orig_config_entry is None:
            if hasattr(base.config, CONFIG_KEY):
                delattr(base.config, CONFIG_KEY)
        else:
            setattr(base.config, CONFIG_KEY, record.orig_config_entry)
        record.config_entry_set = False


def revert_pyencoder(model):
    """Undo apply_pyencoder_to_wav2vec2 exactly; returns the same model. Raises ValueError when
    the model is not patched. ``config.pyencoder`` goes back to what it was before the patch,
    except that a patch made from it (``reapply_pyencoder``, ``pyencoder.hf.from_pretrained``)
    takes it along: a loaded-then-reverted model saves unpatched."""
    base, _ = base_model(model, "revert_pyencoder")
    record = getattr(base, "_pyencoder_patch", None)
    if record is None:
        raise ValueError("this model is not patched by pyencoder")
    _undo(base, record)
    del base._pyencoder_patch
    return model


def config_entry(options):
    """The JSON-serialisable ``config.pyencoder`` entry recording a patch's options."""
    entry = dict(options)
    rope = entry["rope"]
    if isinstance(rope, bool) or rope is None or isinstance(rope, int):
        pass
    else:
        r = rope if isinstance(rope, Rope) else getattr(rope, "rope", None)
        if not isinstance(r, Rope):
            raise TypeError(f"rope must be True, False, an int rotary dim, a pyencoder.Rope or a "
                            f"RotaryEmbedding; got {type(rope).__name__}")
        entry["rope"] = dict(dim=r.dim, base=r.base, interleaved=r.interleaved)
    if isinstance(entry["lookahead_layers"], tuple):
        entry["lookahead_layers"] = list(entry["lookahead_layers"])
    entry["format"] = CONFIG_FORMAT
    return entry


def options_from_config(model):
    """The keyword arguments of apply_pyencoder_to_wav2vec2 recorded in ``model.config.pyencoder``
    (None when the config has no such entry)."""
    base, _ = base_model(model, "reapply_pyencoder")
    entry = getattr(base.config, CONFIG_KEY, None)
    if entry is None:
        return None
    if not isinstance(entry, dict) or entry.get("format") != CONFIG_FORMAT:
        raise ValueError(f"config.{CONFIG_KEY} must be a dict written by this version of "
                         f"pyencoder (format {CONFIG_FORMAT}); got {entry!r}")
    opts = {k: v for k, v in entry.items() if k != "format"}
    unknown = set(opts) - set(_OPTION_NAMES)
    if unknown:
        raise ValueError(f"config.{CONFIG_KEY} has unknown options {sorted(unknown)}; expected "
                         f"a subset of {list(_OPTION_NAMES)}")
    rope = opts.get("rope", True)
    if isinstance(rope, dict):
        opts["rope"] = Rope(**rope)
    return opts


def reapply_pyencoder(model):
    """Patch ``model`` with the options recorded in its ``config.pyencoder`` (written by
    apply_pyencoder_to_wav2vec2 and saved by ``save_pretrained``); returns the model. Raises
    ValueError when the config records no patch or the model is already patched."""
    opts = options_from_config(model)
    if opts is None:
        raise ValueError(f"the model's config has no {CONFIG_KEY!r} entry (it was not saved from "
                         f"a patched model); call apply_pyencoder_to_wav2vec2 with the options")
    apply_pyencoder_to_wav2vec2(model, **opts)
    # the entry is this patch's own record now: reverting the patch removes it (it used to be
    # restored as the config's prior entry, so a loaded-then-reverted model saved as patched)
    patch_record(model).orig_config_entry = None
    return model


def from_pretrained(cls, path, **kwargs):
    """``cls.from_pretrained(path, **kwargs)``, then re-apply the pyencoder patch its config
    records (a model saved while patched comes back patched; any other model comes back as
    transformers loads it)."""
    if not callable(getattr(cls, "from_pretrained", None)):
        raise TypeError(f"cls must be a transformers model class (e.g. transformers.WavLMModel); "
                        f"got {type(cls).__name__} {cls!r}")
    model = cls.from_pretrained(path, **kwargs)
    if options_from_config(model) is not None:
        reapply_pyencoder(model)
    return model


def patch_record(model):
    """The record of what ``apply_pyencoder_to_wav2vec2`` changed on ``model`` (None when it is not
    patched)."""
    base, _ = base_model(model, "patch_record")
    return getattr(base, "_pyencoder_patch", None)


def frontend_geometry(base):
    """(hop, receptive_field) in samples of the conv feature extractor."""
    hop, rf = 1, 1
    for k, s in zip(base.config.conv_kernel, base.config.conv_stride):
        rf += (k - 1) * hop
        hop *= s
    return hop, rf


def frame_ms(base):
    return frontend_geometry(base)[0] * 1000.0 / SAMPLE_RATE


def adapter_geometry(base):
    """[(kernel, stride, padding)] of the conv adapter's layers; [] without one."""
    cfg = hf_adapter_config(base)
    if not cfg:
        return []
    return [(cfg["adapter_kernel_size"], cfg["adapter_stride"], cfg["adapter_padding"])] * \
        cfg["num_adapter_layers"]


def _rows(base, specs):
    """The chain of a patched model for pyencoder.streaming.latency.compose: feature-extractor
    convs, attention layers (exact interval ends), conv adapter layers."""
    rows = []
    for i, (k, st) in enumerate(zip(base.config.conv_kernel, base.config.conv_stride)):
        rows.append((f"feature_extractor.conv_layers.{i}", "conv", st, k - st, None, 1))
    for i, sp in enumerate(specs):
        rows.append((f"encoder.layers.{i}", "attention", 1, sp.mask.hi_off, sp.mask.hi, sp.mask.block))
    for i, (k, st, p) in enumerate(adapter_geometry(base)):
        rows.append((f"adapter.layers.{i}", "conv adapter", st, k - p - st, None, 1))
    return rows


def latency(model, sample_rate=SAMPLE_RATE):
    """Algorithmic latency of a patched model: attention lookahead plus the feature extractor's,
    as a ``pyencoder.streaming.Latency`` (the type ``pyencoder.streaming.latency`` returns).

    ``lookahead_samples`` = lookahead_frames x hop + (receptive field - hop) of the feature
    extractor (``lookahead_ms``: 60 ms attention + 5 ms for 3 frames in the first layer);
    ``samples`` / ``ms`` add the frame's own hop. ``attention_ms``, ``frontend_ms``,
    ``per_layer_lookahead`` give the split. With a conv adapter (``config.add_adapter``), ``hop`` is
    the output hop (feature-extractor hop x ``adapter_stride``), ``lookahead_frames`` counts
    encoder frames through every layer and the adapter, ``adapter_lookahead_frames`` /
    ``adapter_ms`` what the adapter adds. ``sample_rate`` only converts samples to ms (the
    wav2vec2 family is trained at 16 kHz). The chain (conv layers, each layer's exact interval
    end, adapter convs) is added up by ``pyencoder.streaming.latency.compose``, the code that
    ``pyencoder.streaming.latency`` and ``CausalEncoder.latency`` use."""
    check_sample_rate(sample_rate)
    base, _ = base_model(model, "latency")
    record = getattr(base, "_pyencoder_patch", None)
    if record is None:
        raise ValueError("latency: the model is not patched by pyencoder (full attention has "
                         "unbounded lookahead)")
    why = unstreamable_reason(record)
    if why is not None:        # it used to add up the attention and convs as if it streamed
        raise NotStreamableError(f"latency: {why}")
    hop, rf = frontend_geometry(base)
    fe = rf - hop
    rows = _rows(base, record.specs)
    n_fe = len(base.config.conv_kernel)
    attn_frames = compose(rows[n_fe:n_fe + len(record.specs)], 1).lookahead_samples
    geometry = adapter_geometry(base)
    extra = dict(per_layer_lookahead=list(record.per_layer_lookahead),
                 frontend_lookahead_samples=fe, encoder_hop=hop, _legacy_dict=True)
    lat = compose(rows, sample_rate)
    frames = (lat.lookahead_samples - fe) // hop
    if geometry:
        extra.update(adapter_stride=lat.hop // hop, adapter_lookahead_frames=frames - attn_frames)
    return compose(rows, sample_rate, lookahead_frames=frames, **extra)
