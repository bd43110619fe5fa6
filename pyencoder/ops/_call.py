"""One call of a registered op family (attention, conv, convnext) on the backend the registry
chose, and the eager fast path around the registered ops. Its own file because it imports
pyencoder.ops._triton_ops (which registers the triton_ops at first use, pyencoder.ops._triton_op)
and ``_triton_ops`` imports ``_triton_op``: kept here, the import graph has no cycle.

Every backend is a registered op: the triton backend a ``torch.library.triton_op``, the others
(reference, cuda) an opaque ``torch.library.custom_op`` taking the backend's name last
(``pyencoder::causal_conv1d``, ``..._update``, ``..._backward``, ``pyencoder::convnext_dwconv_ln``,
``..._backward``, ``pyencoder::interval_attention``). In eager mode an op call costs the
dispatcher and torch.library's custom-op wrapper (autograd impl, redispatch, ADInplaceOrView,
default filling, the dynamo-disable wrapper: ~70-100 us of host time per call on a CPU core),
more than many of these kernels at streaming sizes, so eager calls skip it (``route``):

- no autograd graph needed (inference, streaming steps, ``torch.no_grad``, a backward without
  create_graph; ``direct_ok``): what the registered op itself runs, called directly: the
  triton_op's launcher body (``triton_op.fn``), or the custom op's own body (the function it was
  made from, which calls ``_backend.get_entry(family, backend, entry)``) with the same arguments,
  the backend string included, so outputs are the op's bit for bit. Like the op, the direct path
  bumps the version counter of every mutated argument (``mutates_args``: the conv update step
  writes ``state``; inference tensors have none) before the body runs, and a custom op body's
  outputs pass the op's aliasing check (an output may not be an input or a view of one: the op
  raises, and so does the direct path, with torch's message);
- an autograd graph needed (an input requires grad under grad mode): a custom op with a
  registered autograd formula runs through ``_EagerOp``, an ``autograd.Function`` whose
  forward is the body and whose setup_context and backward are the ones the op registered
  (``register_autograd``), so the backward, and its refusal of a double backward, are the op's.
  A triton_op with a registered formula (the triton convs, the fused ConvNeXt op) runs the same
  way through ``_EagerOp`` (its launcher body, its registered setup_context and backward).
  The families' backward formulas call their backward ops through ``call_custom`` /
  ``call_triton`` too, so a backward without create_graph is direct as well. The triton
  backend's attention has its own eager ``autograd.Function`` (pyencoder.ops.attention.
  _EagerTriton); a mutating op (no autograd formula) takes the registered op when a graph is
  needed.

Traces (torch.compile, export, make_fx, FakeTensor, torch.jit.trace), Python dispatch modes,
torch.func transforms, forward-mode AD (a dual level), tensor subclasses other than
``nn.Parameter`` and PYENCODER_EAGER_FASTPATH=0 keep the registered op."""
import inspect

import torch
from torch.autograd import forward_ad as _forward_ad
from torch.utils._python_dispatch import _get_current_dispatch_mode

from .._env import env_flag
from ._triton_op import _maybe_fake, is_plain

__all__ = ["call_op", "call_custom", "call_triton", "direct_ok", "eager_ok", "route", "OP",
           "DIRECT", "AUTOGRAD"]

OP, DIRECT, AUTOGRAD = "op", "direct", "autograd"   # route()'s answers

_MUTATED = {}   # triton_op name -> positions of its mutated arguments
_CUSTOM = {}    # custom op -> positions of its mutated arguments, or None: no direct path
_Parameter = torch.nn.Parameter
_any_alias = getattr(torch._C, "_any_output_is_alias_to_input_or_output", None)


def eager_ok():
    """Whether nothing traces or transforms an eager call, so it may skip the registered op: the
    fast path is on (PYENCODER_EAGER_FASTPATH), no Dynamo trace or torch.jit.trace, no Python
    dispatch mode (FakeTensorMode, make_fx, functionalization), no torch.func transform and no
    forward-mode AD level."""
    if not env_flag("PYENCODER_EAGER_FASTPATH", True) or torch.compiler.is_compiling() \
            or torch.jit.is_tracing():
        return False
    return (_get_current_dispatch_mode() is None
            and not torch._C._are_functorch_transforms_active()
            and _forward_ad._current_level < 0)


def route(args):
    """How an eager call with these arguments runs: ``DIRECT`` (the op's body, no autograd graph
    needed), ``AUTOGRAD`` (an input requires grad under grad mode: an eager autograd.Function
    around the body) or ``OP`` (the registered op: ``eager_ok`` fails, or an argument is a fake
    tensor or a tensor subclass other than a real ``nn.Parameter``)."""
    if not eager_ok():
        return OP
    grad = torch.is_grad_enabled()
    needs_grad = False
    for a in args:
        if isinstance(a, torch.Tensor):
            if not is_plain(a) and (type(a) is not _Parameter or _maybe_fake(a)) or a.is_meta:
                return OP         # a meta tensor: the op's fake (shape-only) implementation
            if grad and a.requires_grad:
                needs_grad = True
    return AUTOGRAD if needs_grad else DIRECT


def direct_ok(args):
    """Whether an eager call with these arguments may run the op's body directly (``route``:
    nothing traces it and it needs no autograd graph)."""
    return route(args) == DIRECT


def _bump_versions(positions, args):
    """What the op's ADInplaceOrView kernel does: bump each mutated tensor's version counter
    (inference tensors have none)."""
    for i in positions:
        t = args[i] if i < len(args) else None
        if isinstance(t, torch.Tensor) and not t.is_inference():
            torch.autograd.graph.increment_version(t)


def _mutated_positions(triton_op):
    pos = _MUTATED.get(triton_op.name)
    if pos is None:
        names = list(inspect.signature(triton_op.fn).parameters)
        pos = _MUTATED[triton_op.name] = tuple(names.index(n) for n in triton_op.mutates_args)
    return pos


_OP_ATTRS = ("_init_fn", "_name", "_opoverload", "_setup_context_fn", "_backward_fn")


def _custom_mutated_positions(custom_op):
    """Positions of the custom op's mutated arguments (from its schema), or None when this torch's
    CustomOpDef lacks what the direct path reads (the op is then always called)."""
    try:
        return _CUSTOM[custom_op]
    except KeyError:
        pass
    pos = None
    if all(hasattr(custom_op, a) for a in _OP_ATTRS):
        pos = tuple(i for i, a in enumerate(custom_op._opoverload._schema.arguments)
                    if a.alias_info is not None and a.alias_info.is_write)
    _CUSTOM[custom_op] = pos
    return pos


def _run_body(custom_op, args):
    """The custom op's body on ``args``, as its CompositeExplicitAutograd kernel runs it, with the
    op's aliasing check on the outputs (torch's error when one is an input or a view of one)."""
    out = custom_op._init_fn(*args)
    if _any_alias is None or _any_alias(args, {}, out if isinstance(out, tuple) else (out,)):
        from torch._library import utils
        check = getattr(utils, "_c_check_aliasing_constraint", None) \
            or utils.check_aliasing_constraint
        fns = getattr(custom_op, "_backend_fns", None) or {}     # the op's message names its kernel
        check(custom_op._name, args, {}, out,
              lambda: inspect.getmodule(fns.get(None, custom_op._init_fn)))
    return out


class _EagerOp(torch.autograd.Function):
    """A registered op with an autograd formula, without the dispatcher: ``formula`` is (body,
    setup_context, backward) of the op (``_custom_formula`` / ``_triton_formula``); forward runs
    the body on the inputs, then the op's setup_context; backward is the op's backward with
    ``ctx.needs_input_grad`` of the op's own inputs, as torch.library's generated Function calls
    them (grads materialised as there). Used on the ``AUTOGRAD`` route only (``route``: nothing
    traces the call)."""

    @staticmethod
    def forward(ctx, formula, *inputs):
        # old-style forward(ctx, ...): a setup_context-style forward has its signature bound with
        # inspect on every apply
        body, setup, backward = formula
        output = body(inputs)
        if setup is not None:
            setup(ctx=ctx, inputs=inputs, output=output)
        ctx.pyencoder_backward = backward
        return output

    @staticmethod
    def backward(ctx, *grads):
        needs = ctx.needs_input_grad
        ctx.needs_input_grad = needs[1:]
        try:
            result = ctx.pyencoder_backward(ctx, *grads)
        finally:
            ctx.needs_input_grad = needs
        return (None, *result) if isinstance(result, tuple) else (None, result)


def _custom_formula(custom_op):
    """(body, setup_context, backward) of a custom op for _EagerOp (read per call: a formula
    registered later is the one used)."""
    return (lambda inputs: _run_body(custom_op, inputs), custom_op._setup_context_fn,
            custom_op._backward_fn)


def _triton_formula(triton_op):
    """(body, setup_context, backward) of a pyencoder triton_op for _EagerOp."""
    backward, setup = triton_op._autograd
    return (lambda inputs: triton_op.fn(*inputs), setup, backward)


def call_custom(custom_op, *args):
    """``custom_op(*args)`` (a ``torch.library.custom_op``; ``args`` all its arguments, the backend
    string included), on the eager fast path where ``route`` allows: the op's body directly (its
    mutated arguments' versions bumped first), or with an autograd graph ``_EagerOp`` when
    the op has an autograd formula and mutates nothing; the registered op otherwise."""
    how = route(args)
    if how != OP:
        mutated = _custom_mutated_positions(custom_op)
        if mutated is None:
            pass
        elif how == DIRECT:
            _bump_versions(mutated, args)
            return _run_body(custom_op, args)
        elif custom_op._backward_fn is not None and not mutated:
            return _EagerOp.apply(_custom_formula(custom_op), *args)
    return custom_op(*args)


def call_triton(triton_op, *args):
    """``triton_op(*args)`` (a pyencoder triton_op, registered now if it was not yet), on the eager
    fast path where ``route`` allows: its launcher body directly (mutated arguments' versions
    bumped), or with an autograd graph ``_EagerOp`` when it has an autograd formula and
    mutates nothing; the registered op otherwise."""
    from . import _triton_ops  # noqa: F401  (registers the triton_ops at first use)
    how = route(args)
    if how == DIRECT:
        out = triton_op.fn(*args)
        _bump_versions(_mutated_positions(triton_op), args)
        return out
    if how == AUTOGRAD and getattr(triton_op, "_autograd", None) is not None \
            and not _mutated_positions(triton_op):
        return _EagerOp.apply(_triton_formula(triton_op), *args)
    return triton_op(*args)


def call_op(backend, triton_op, custom_op, *args):
    """One call of a registered op family on the backend the registry chose: the pyencoder
    triton_op on triton (``call_triton``: its launcher body directly, or through
    ``_EagerOp``, where ``route`` allows), else the opaque custom op
    ``custom_op(*args, backend)`` (``call_custom``: its body directly, or through
    ``_EagerOp``, where ``route`` allows)."""
    if backend == "triton":
        return call_triton(triton_op, *args)
    return call_custom(custom_op, *args, backend)
