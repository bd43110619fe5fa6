"""One call of a registered op family (attention, conv, convnext) on the backend the registry
chose. Its own file because it imports pyencoder.ops._triton_ops (which registers the triton_ops
at first use, pyencoder.ops._triton_op) and ``_triton_ops`` imports ``_triton_op``: kept here, the
import graph has no cycle.

Eager calls that need no autograd graph (inference, streaming steps, ``torch.no_grad``) run the
triton_op's launcher body directly (``direct_ok``): what the registered op itself runs in eager
mode, without torch.library's dispatch and custom-op wrapper (~100 us of host time per call,
more than many of these kernels). A mutating op (the conv update step writes ``state``) then
bumps the mutated tensors' version counters as the op would (inference tensors have none).
Traces (torch.compile, export, FakeTensor, make_fx, torch.jit.trace), torch.func transforms,
calls with inputs that require grad, and PYENCODER_EAGER_FASTPATH=0 keep the registered op."""
import inspect

import torch

from .._env import env_flag

_MUTATED = {}   # triton_op name -> positions of its mutated arguments


def direct_ok(args):
    """Whether an eager call with these arguments may skip the registered op."""
    if not env_flag("PYENCODER_EAGER_FASTPATH", True) or torch.compiler.is_compiling() \
            or torch.jit.is_tracing():
        return False
    from torch.utils._python_dispatch import _get_current_dispatch_mode
    if _get_current_dispatch_mode() is not None or torch._C._are_functorch_transforms_active():
        return False
    if torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad
                                       for a in args):
        return False
    from torch._subclasses.fake_tensor import is_fake
    return not any(isinstance(a, torch.Tensor) and is_fake(a) for a in args)


def _mutated_positions(triton_op):
    pos = _MUTATED.get(triton_op.name)
    if pos is None:
        names = list(inspect.signature(triton_op.fn).parameters)
        pos = _MUTATED[triton_op.name] = tuple(names.index(n) for n in triton_op.mutates_args)
    return pos


def call_op(backend, triton_op, custom_op, *args):
    """One call of a registered op family on the backend the registry chose: ``triton_op(*args)``
    (a pyencoder triton_op, registered now if it was not yet; its launcher body directly when
    ``direct_ok``) on triton, else the opaque custom op ``custom_op(*args, backend)``."""
    if backend == "triton":
        from . import _triton_ops  # noqa: F401  (registers the triton_ops at first use)
        if direct_ok(args):
            out = triton_op.fn(*args)
            for i in _mutated_positions(triton_op):
                t = args[i] if i < len(args) else None
                if isinstance(t, torch.Tensor) and not t.is_inference():
                    # (inference tensors have no version counter)
                    torch.autograd.graph.increment_version(t)
            return out
        return triton_op(*args)
    return custom_op(*args, backend)
