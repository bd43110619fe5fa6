"""Causal distillation: train a causal student with a few frames of lookahead to reproduce a
full-context teacher's hidden states (DyStream's Rope-Wav2vec2, FocalCodec-Stream's multi-stage
causal distillation of WavLM).

- ``layer_weights(n, schedule)``: per-layer weights: "uniform" (1/n each), "linear" (w_i ∝ i + 1,
  deeper layers count more) or "reversed_linear" (w_i ∝ n - i: the first distilled layer counts
  most, the last least; our reading of FocalCodec-Stream's reversed linear schedule), or explicit
  numbers. Weights are normalised to sum to 1.
- ``hidden_state_loss``: weighted sum over layer pairs of the mean squared error between student
  and teacher hidden states (B, T, E), over the valid frames only (``lengths``): padded frames are
  selected out, so whatever they hold (inf, NaN) reaches neither the loss nor the gradient.
- ``positional_embedding_loss``: causal positional-embedding distillation: the student's causal
  positional conv (CausalEncoder.positional_embedding) is trained to reproduce the teacher's
  symmetric one (e.g. transformers' ``encoder.pos_conv_embed``) on the same input.
- ``distill(student, teacher, data, optimizer, ...)``: the training loop. It works unchanged with
  a student wrapped in DistributedDataParallel or FSDP: the loss is divided by the *global* number
  of valid frames (one all-reduce of a count per step) and multiplied by the world size, so the
  averaged gradient equals the gradient of one process on the concatenated batch, even when ranks
  hold different numbers of valid frames.
"""
import inspect
import math
import numbers
import sys
import time
from typing import Callable, Iterable, Optional, Sequence, Tuple

import torch

from ._checks import tensor_arg
from .models.encoder import CausalEncoder, hf_inner

__all__ = ["layer_weights", "hidden_state_loss", "positional_embedding_loss", "distill",
           "frame_mask", "hidden_states", "global_count"]

SCHEDULES = ("uniform", "linear", "reversed_linear")


def layer_weights(n, schedule="uniform"):
    """List of n floats summing to 1."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int; got {n!r}")
    if isinstance(schedule, str):
        if schedule == "uniform":
            w = [1.0] * n
        elif schedule == "linear":
            w = [float(i + 1) for i in range(n)]
        elif schedule == "reversed_linear":
            w = [float(n - i) for i in range(n)]
        else:
            raise ValueError(f"schedule must be one of {SCHEDULES} or a sequence of {n} numbers; "
                             f"got {schedule!r}")
    else:
        try:
            items = list(schedule)
        except TypeError:
            items = None
        if items is None or any(
                isinstance(x, bool)
                or (isinstance(x, torch.Tensor) and (x.numel() != 1 or x.dtype == torch.bool))
                or not isinstance(x, (numbers.Real, torch.Tensor)) for x in items):
            raise TypeError(f"schedule must be one of {SCHEDULES} or a sequence of {n} numbers "
                            f"(not bools); got {type(schedule).__name__} {schedule!r}")
        w = [float(x) for x in items]
        if len(w) != n or any(x < 0 or not math.isfinite(x) for x in w) or sum(w) <= 0:
            raise ValueError(f"schedule must hold {n} non-negative finite numbers with a positive "
                             f"sum; got {schedule!r}")
    s = sum(w)
    return [x / s for x in w]


def frame_mask(lengths, T, device):
    """(B, T) bool: frame t of slot b is valid (all True when lengths is None)."""
    if lengths is None:
        return None
    lengths = _check_lengths(lengths, device)
    if isinstance(T, bool) or not isinstance(T, numbers.Integral) or T < 0:
        raise ValueError(f"T must be an int >= 0 (frames); got {T!r}")
    return torch.arange(T, device=device)[None, :] < lengths[:, None]


def _check_lengths(lengths, device, B=None):
    """``lengths``: (B,) integer valid frames per slot (a tensor, or a list of ints)."""
    lengths = tensor_arg("lengths", lengths, "None or a (B,) integer tensor (valid frames per "
                         "slot)")
    if lengths.is_floating_point() or lengths.is_complex() or lengths.dtype == torch.bool:
        raise TypeError(f"lengths must be integers; got dtype {lengths.dtype}")
    if lengths.dim() != 1 or (B is not None and lengths.shape[0] != B):
        # a (1,) or scalar lengths would broadcast over the batch: one slot's length for all
        raise ValueError(f"lengths must have shape ({'B' if B is None else B},) (one per batch "
                         f"slot); got {tuple(lengths.shape)}")
    return lengths.to(device)


def _is_dist():
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def global_count(count):
    """Sum of a local count over all ranks (the count itself outside torch.distributed)."""
    c = torch.as_tensor(count, dtype=torch.float64)
    if _is_dist() and torch.distributed.get_world_size() > 1:
        backend = torch.distributed.get_backend()
        dev = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else "cpu"
        c = c.to(dev)
        torch.distributed.all_reduce(c)
    return c.cpu()


def _world():
    return torch.distributed.get_world_size() if _is_dist() else 1


def hidden_state_loss(student_hidden, teacher_hidden, weights="uniform", lengths=None,
                      normalizer=None):
    """Weighted layer-wise L2 distance.

    ``student_hidden`` / ``teacher_hidden``: equal-length sequences of (B, T, E) tensors (pair i
    with i; the teacher's are detached). ``weights``: a schedule name or numbers (layer_weights).
    ``lengths`` (B,) valid frames (None: all). ``normalizer``: the number of valid frames to divide
    by (default: this batch's); pass a global count under data parallelism.

    Returns (loss, per_layer): loss = sum_i w_i * sum_valid ||s_i - t_i||^2 / (normalizer * E),
    per_layer the detached per-layer mean squared errors (list of floats is left to the caller)."""
    for name, hs in (("student_hidden", student_hidden), ("teacher_hidden", teacher_hidden)):
        if not isinstance(hs, (list, tuple)) or not all(isinstance(h, torch.Tensor) for h in hs):
            raise TypeError(f"{name} must be a sequence of (B, T, E) tensors; got "
                            f"{type(hs).__name__}")
    if len(student_hidden) != len(teacher_hidden) or not len(student_hidden):
        raise ValueError(f"student and teacher must give the same non-zero number of hidden states; "
                         f"got {len(student_hidden)} and {len(teacher_hidden)}")
    n = len(student_hidden)
    w = layer_weights(n, weights)
    ref = student_hidden[0]
    if ref.dim() != 3:
        raise ValueError(f"hidden states must be (B, T, E); got shape {tuple(ref.shape)}")
    B, T, E = ref.shape
    for i, (s, t) in enumerate(zip(student_hidden, teacher_hidden)):
        # every pair as the first student state (a later layer of another width was divided by
        # the first one's E: its per-layer error came out scaled)
        if s.shape != ref.shape or t.shape != ref.shape:
            raise ValueError(f"hidden states must all have the first student state's shape "
                             f"{tuple(ref.shape)}; pair {i} has {tuple(s.shape)} (student) and "
                             f"{tuple(t.shape)} (teacher)")
    if lengths is not None:
        lengths = _check_lengths(lengths, ref.device, B)
        if B and bool(((lengths < 0) | (lengths > T)).any()):
            # frames, not samples: a waveform's lengths would mark every frame valid silently
            raise ValueError(f"lengths must lie in [0, {T}] (valid frames of the (B, T, E) "
                             f"hidden states); got {lengths.tolist()}")
    if normalizer is not None and (isinstance(normalizer, bool) or not isinstance(
            normalizer, (int, float)) or not 0 <= normalizer < math.inf):
        # a negative count would flip the loss's sign; 0 (no valid frame anywhere) divides by 1
        raise ValueError(f"normalizer must be None or a finite count >= 0 (valid frames to "
                         f"divide by); got {normalizer!r}")
    mask = frame_mask(lengths, T, ref.device)
    count = float(B * T) if mask is None else float(mask.sum())
    norm = count if normalizer is None else float(normalizer)
    total = ref.new_zeros(())
    per_layer = []
    for wi, s, t in zip(w, student_hidden, teacher_hidden):
        diff = s - t.detach().to(s.dtype)
        if mask is not None:
            # select, not multiply: padded frames may hold inf / NaN (0 * inf = NaN)
            diff = torch.where(mask[:, :, None], diff, 0.0)
        d = diff.pow(2).sum(-1)
        sq = d.sum()
        total = total + wi * sq / (max(norm, 1.0) * E)
        per_layer.append(sq.detach() / (max(count, 1.0) * E))
    return total, torch.stack(per_layer)


def positional_embedding_loss(student_pos, teacher_pos, hidden, lengths=None, normalizer=None):
    """Causal positional-embedding distillation: mean squared error between
    ``student_pos(hidden)`` and ``teacher_pos(hidden)`` (callables (B, T, E) -> (B, T, E), e.g.
    ``student.positional_embedding`` and ``hf_model.encoder.pos_conv_embed``) on valid frames."""
    for name, fn in (("student_pos", student_pos), ("teacher_pos", teacher_pos)):
        if not callable(fn):
            raise TypeError(f"{name} must be a callable (B, T, E) -> (B, T, E); got "
                            f"{type(fn).__name__}")
    with torch.no_grad():
        t = teacher_pos(hidden)
    s = student_pos(hidden)
    loss, _ = hidden_state_loss([s], [t], lengths=lengths, normalizer=normalizer)
    return loss


def _check_not_shared(student, teacher):
    """Refuse what freezing the teacher would break: a student whose every trainable parameter
    is one of the teacher's (CausalEncoder.from_hf(teacher, share_weights=True): its backward
    failed in torch's words), or a trainable student parameter that shares the storage of a
    teacher's without being it (training it would move the teacher's targets). A student sharing
    some of the teacher's parameters (a frozen common feature extractor) trains the rest."""
    def ptr(p):
        p = p.to_local() if hasattr(p, "to_local") else p     # FSDP2's DTensor: its shard
        if not p.numel() or p.is_meta:
            return 0
        try:
            return (p.device, p.untyped_storage().data_ptr())
        except RuntimeError:      # a tensor subclass without storage: identity only
            return 0
    t_ids = {id(p) for p in teacher.parameters()}
    t_ptrs = {ptr(p) for p in teacher.parameters()} - {0}
    own = [(n, p) for n, p in student.named_parameters() if id(p) not in t_ids]
    moved = [n for n, p in own if p.requires_grad and ptr(p) in t_ptrs]
    if moved:
        raise ValueError(f"the student's parameter {moved[0]!r} (and {len(moved) - 1} more) "
                         f"shares storage with a teacher's: training it would change the "
                         f"teacher's targets; give the student its own copies")
    if not any(p.requires_grad for _, p in own):
        raise ValueError("every trainable parameter of the student is one of the teacher's "
                         "(e.g. CausalEncoder.from_hf(teacher, share_weights=True)); distill "
                         "freezes the teacher's parameters, leaving nothing to train: give the "
                         "student its own copies (from_hf copies unless share_weights=True)")


def _unwrap(model):
    return getattr(model, "module", model)


def hidden_states(model, wav, lengths=None):
    """(hidden states tuple, frame lengths or None) of a CausalEncoder (possibly wrapped in
    DDP/FSDP: called through the wrapper) or a transformers wav2vec2-family model."""
    if not isinstance(_unwrap(model), torch.nn.Module):
        raise TypeError(f"model must be a CausalEncoder or a transformers wav2vec2-family model; "
                        f"got {type(model).__name__}")
    enc = _unwrap(model)
    if isinstance(enc, CausalEncoder):
        out = model(wav, lengths=lengths, output_hidden_states=True)
        frames = out.lengths
        if frames is not None and enc.adapter is not None:
            # the hidden states come before the conv adapter; out.lengths counts the frames
            # after its strides (13 of 49 valid frames entered the loss)
            frames = enc.frame_lengths(torch.as_tensor(lengths, device=wav.device)).clamp(
                max=out.hidden_states[0].shape[1])
        return out.hidden_states, frames
    mask = None
    if lengths is not None:
        mask = frame_mask(lengths, wav.shape[-1], wav.device).to(torch.long)
    out = model(wav, attention_mask=mask, output_hidden_states=True)
    frames = None
    if lengths is not None:
        base = _unwrap(model)
        base = hf_inner(base) or base
        lengths = torch.as_tensor(lengths, device=wav.device)
        # the hidden states come before the conv adapter (config.add_adapter), whose strides
        # transformers' length helper adds by default
        fn = base._get_feat_extract_output_lengths          # (HuBERT's takes no add_adapter)
        kw = {"add_adapter": False} if "add_adapter" in inspect.signature(fn).parameters else {}
        frames = fn(lengths, **kw)
    return out.hidden_states, frames


def _check_batch_wav(student, wav):
    """A data item's waveform as the student takes it ((B, n); a CausalEncoder student also takes
    (B, 1, n) and checks dtype and device): checked before the teacher runs, where a transformers
    teacher named int16 or 1-D audio in torch's words (a conv's weight and input types)."""
    s = _unwrap(student)
    if isinstance(s, CausalEncoder):
        return s._check_wav(wav, "n")
    if not isinstance(wav, torch.Tensor):
        raise TypeError(f"wav must be a torch.Tensor (B, n); got {type(wav).__name__}")
    if wav.dim() != 2:
        raise ValueError(f"wav must have shape (B, n); got {tuple(wav.shape)}")
    if not wav.dtype.is_floating_point:
        raise TypeError(f"wav must be a floating tensor (scale integer PCM to [-1, 1] first); "
                        f"got {wav.dtype}")
    return wav


def _batch(item, device):
    if isinstance(item, dict):
        if "wav" not in item:
            raise ValueError(f"a data item dict must hold 'wav' (and optionally 'lengths'); got "
                             f"keys {sorted(item)}")
        wav, lengths = item["wav"], item.get("lengths")
    elif isinstance(item, (tuple, list)):
        if not 1 <= len(item) <= 2:
            raise ValueError(f"a data item must be wav, (wav, lengths) or {{'wav', 'lengths'}}; "
                             f"got a {type(item).__name__} of {len(item)} items")
        wav, lengths = item[0], (item[1] if len(item) > 1 else None)
    else:
        wav, lengths = item, None
    if not isinstance(wav, torch.Tensor):
        raise TypeError(f"a data item's wav must be a torch.Tensor (B, n); got "
                        f"{type(wav).__name__}")
    wav = wav.to(device) if device is not None else wav
    if lengths is not None:
        lengths = torch.as_tensor(lengths, device=wav.device)
    return wav, lengths


def _default_teacher_pos(t):
    """pos_weight's default teacher_pos: a CausalEncoder's positional_embedding, or a transformers
    model's encoder.pos_conv_embed (of the model or, for a head such as ...ForCTC, of its base
    model: ``base_model_prefix``); not one a pyencoder patch dropped (pos_conv="drop": it
    returns a 0-d zero)."""
    for cand in (t, hf_inner(t)):
        if callable(getattr(cand, "positional_embedding", None)):
            return cand.positional_embedding              # a CausalEncoder teacher
        if hasattr(getattr(cand, "encoder", None), "pos_conv_embed"):
            rec = getattr(cand, "_pyencoder_patch", None)
            if getattr(rec, "pos_conv", None) == "drop":
                raise ValueError("pos_weight > 0: the teacher's positional conv is dropped by "
                                 "its pyencoder patch (pos_conv='drop'): no embedding to match; "
                                 "patch it with pos_conv='keep' (or 'causal'), pass "
                                 "teacher_pos, or use pos_weight=0")
            return cand.encoder.pos_conv_embed            # a transformers model
    raise ValueError(f"pos_weight > 0 needs teacher_pos: the teacher ({type(t).__name__}) has "
                     f"neither positional_embedding nor encoder.pos_conv_embed")


def distill(student, teacher, data: Iterable, optimizer, *, steps=None, weights="uniform",
            layers: Optional[Sequence[Tuple[int, int]]] = None, pos_weight=0.0,
            teacher_pos: Optional[Callable] = None, scheduler=None, grad_clip=None,
            device=None, callback=None, progress=True):
    """Distil ``teacher`` into ``student`` for ``steps`` batches of ``data`` (or until it ends).

    ``data`` yields wav (B, L) tensors, (wav, lengths) pairs or {"wav", "lengths"} dicts.
    ``student``: a CausalEncoder, or one wrapped in DDP / FSDP (called through the wrapper so
    gradients are synchronised). ``teacher``: a CausalEncoder or a transformers
    Wav2Vec2/HuBERT/WavLM model; run in eval mode under no_grad. ``layers``: (student index,
    teacher index) pairs into the hidden-state tuples (default: every layer output, 1..L, which
    requires equal depths). ``pos_weight`` > 0 adds the positional-embedding loss against
    ``teacher_pos`` (default: a CausalEncoder teacher's ``positional_embedding``, a transformers
    teacher's ``encoder.pos_conv_embed``) on the student's projected
    features. ``callback(step, record)`` is called after every step. ``progress``: print a loss
    line to stderr (rank 0 only) after the first step, then at most every 10 s (a number: that
    many seconds), with s/step and, when ``steps`` or ``len(data)`` is known, an ETA, and a last
    line at the end; False (or 0) is silent.

    Returns the list of per-step records {step, loss, per_layer, frames} (loss reduced over ranks).
    """
    if student is teacher or _unwrap(student) is _unwrap(teacher):
        raise ValueError("student and teacher must be different models (distill freezes the "
                         "teacher's parameters)")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 0):
        raise ValueError(f"steps must be None or an int >= 0; got {steps!r}")
    if grad_clip is not None and (isinstance(grad_clip, bool) or not isinstance(
            grad_clip, (int, float)) or not 0 < grad_clip < math.inf):
        # clip_grad_norm_ scales every gradient by grad_clip / norm: a negative value would turn
        # each step uphill, 0 would freeze the student
        raise ValueError(f"grad_clip must be None or a finite float > 0 (the gradient norm to "
                         f"clip to); got {grad_clip!r}")
    if isinstance(pos_weight, bool) or not isinstance(pos_weight, (int, float)) or \
            not 0 <= pos_weight < math.inf:
        raise ValueError(f"pos_weight must be a finite float >= 0; got {pos_weight!r}")
    if pos_weight and teacher_pos is None:
        teacher_pos = _default_teacher_pos(_unwrap(teacher))
    if pos_weight and not callable(teacher_pos):
        raise TypeError(f"teacher_pos must be a callable (B, T, E) -> (B, T, E); got "
                        f"{type(teacher_pos).__name__}")
    # checked before any step: a bad one failed after optimizer.step() had changed the student
    if not (callable(getattr(optimizer, "zero_grad", None))
            and callable(getattr(optimizer, "step", None))):
        raise TypeError(f"optimizer must have zero_grad() and step() (a torch optimizer); got "
                        f"{type(optimizer).__name__} {optimizer!r}")
    if scheduler is not None and not callable(getattr(scheduler, "step", None)):
        raise TypeError(f"scheduler must be None or have step() (a torch LR scheduler); got "
                        f"{type(scheduler).__name__} {scheduler!r}")
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be None or a callable (step, record); got "
                        f"{type(callback).__name__} {callback!r}")
    if device is not None and not isinstance(device, torch.device):
        try:
            device = torch.device(device)
        except (RuntimeError, TypeError, ValueError) as e:
            raise ValueError(f"device must be None or name a torch device (e.g. 'cuda:0'); got "
                             f"{device!r}") from e
    _check_not_shared(student, teacher)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    student.train()
    history = []
    world = _world()
    if isinstance(progress, bool) or progress is None:
        interval = 10.0 if progress else None
    else:
        if not isinstance(progress, (int, float)) or progress < 0:
            raise ValueError(f"progress must be True, False or seconds between lines (>= 0); got "
                             f"{progress!r}")
        interval = float(progress) or None
    if interval is not None and _is_dist() and torch.distributed.get_rank() != 0:
        interval = None
    total = steps
    if total is None and hasattr(data, "__len__"):
        try:
            total = len(data)
        except TypeError:
            total = None
    t_start = t_last = time.perf_counter()
    for step, item in enumerate(data):
        if steps is not None and step >= steps:
            break
        wav, lengths = _batch(item, device)
        wav = _check_batch_wav(student, wav)     # before a transformers teacher fails in torch
        with torch.no_grad():
            t_hs, t_frames = hidden_states(teacher, wav, lengths)
        s_hs, s_frames = hidden_states(student, wav, lengths)
        if layers is None:
            if len(s_hs) != len(t_hs):
                raise ValueError(f"student has {len(s_hs) - 1} layers and teacher {len(t_hs) - 1}; "
                                 f"give layers=[(student_index, teacher_index), ...]")
            pairs = [(i, i) for i in range(1, len(s_hs))]
        else:
            pairs = _layer_pairs(layers, len(s_hs), len(t_hs))
        S = [s_hs[i] for i, _ in pairs]
        Tt = [t_hs[j] for _, j in pairs]
        T = min(S[0].shape[1], Tt[0].shape[1])
        S, Tt = [s[:, :T] for s in S], [t[:, :T] for t in Tt]
        frames = s_frames if s_frames is not None else t_frames
        B = S[0].shape[0]
        local = float(B * T) if frames is None else float(frames.clamp(max=T).sum())
        norm = float(global_count(local)) / world
        loss, per_layer = hidden_state_loss(S, Tt, weights,
                                            None if frames is None else frames.clamp(max=T),
                                            normalizer=norm)
        if pos_weight:
            smod = _unwrap(student)
            tp = teacher_pos
            feats = smod.feature_extractor(wav)
            h, _ = smod._embed(feats)
            T2 = h.shape[1]
            if frames is not None:
                # as the encoders' own forwards do before their positional convs: the padded
                # frames are zeros (the teacher's symmetric conv read them: a loss that
                # depended on what the padding held)
                valid = torch.arange(T2, device=h.device)[None, :] < frames[:, None]
                h = h * valid[..., None].to(h.dtype)
            loss = loss + pos_weight * positional_embedding_loss(
                smod.positional_embedding, tp, h, lengths=None if frames is None else
                frames.clamp(max=T2), normalizer=norm)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(student.parameters(), grad_clip)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        logged = loss.detach().to(torch.float64).cpu() / world
        if world > 1:
            logged = global_count(logged)
        rec = dict(step=step, loss=float(logged), per_layer=per_layer.cpu().tolist(),
                   frames=local)
        history.append(rec)
        if callback is not None:
            callback(step, rec)
        now = time.perf_counter()
        last = total is not None and step + 1 >= total   # the final line follows
        if interval is not None and not last and (step == 0 or now - t_last >= interval):
            t_last = now
            _progress_line(step + 1, total, now - t_start, rec["loss"])
    if interval is not None and history:
        _progress_line(len(history), total, time.perf_counter() - t_start, history[-1]["loss"],
                       final=True)
    return history


def _layer_pairs(layers, n_student, n_teacher):
    """``layers`` as a list of (student index, teacher index) int pairs, each within its
    hidden-state tuple (negative indices count from the end, as in Python), or a ValueError that
    names the offending pair."""
    pairs = []
    for pair in layers:
        ok = isinstance(pair, (tuple, list)) and len(pair) == 2 and all(
            isinstance(i, int) and not isinstance(i, bool) for i in pair)
        if not ok:
            raise ValueError(f"layers must be (student index, teacher index) int pairs; got "
                             f"{pair!r}")
        i, j = pair
        if not -n_student <= i < n_student or not -n_teacher <= j < n_teacher:
            raise ValueError(f"layers pair {pair!r} is out of range: the student gives "
                             f"{n_student} hidden states (indices 0..{n_student - 1}), the "
                             f"teacher {n_teacher} (0..{n_teacher - 1})")
        pairs.append((i, j))
    if not pairs:
        raise ValueError("layers must name at least one (student index, teacher index) pair; "
                         "got none")
    return pairs


def _progress_line(n, total, elapsed, loss, final=False):
    per = elapsed / max(n, 1)
    of = f"/{total}" if total is not None else ""
    eta = (f", ETA {per * (total - n):.0f} s" if total is not None and not final and total > n
           else "")
    head = "distill: finished" if final else "distill: step"
    print(f"{head} {n}{of}  loss {loss:.4g}  ({per:.2f} s/step{eta})", file=sys.stderr,
          flush=True)
