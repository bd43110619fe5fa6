"""``Linear``: ``nn.Linear`` (same parameters, init and state_dict keys) with a faster CPU path for
the few-row inputs that a streaming step feeds it.

A streaming step at 20-100 ms chunks multiplies 1-5 frames by every weight matrix, so on a CPU it
is bound by how fast the GEMM streams the weights. MKL's ``sgemm`` for ``x @ W^T`` with 2-5 rows
reads them at a third to two thirds of the rate it reaches for the same product computed the
other way round, ``(W @ x^T)^T`` (many rows, 2-5 columns). Measured on the 2-core AMD EPYC CI machine,
torch 2.13 + MKL 2024.2, fp32, 2 threads (GB/s of weight read):

    weight     rows  F.linear  W @ x^T
    768x768      4     11.3     34.1
    3072x768     4     10.8     38.3
    768x3072     4     12.3     13.6
    768x768      5     13.2     16.8
    3072x768     5     11.8     22.0
    768x3072     5     13.5     17.5        (K-blocked copy, no longer used: see below)
    768x3072     6     13.7     12.5        (6+ rows: mixed, so not taken)
    768x3072     8     13.0      7.8
    768x768      1     15.2     30.1        (the row padded to two: one GEMM instead of gemv)
    3072x768     1     15.8     35.3
    768x3072     1     21.1     23.9

``linear`` takes the transposed product on CPU for fp32 inputs with 1-5 rows (all leading dims
flattened; a single row is duplicated into two so MKL runs its GEMM rather than its gemv) when
autograd records nothing (no_grad / inference_mode, or neither x nor the weight needs a gradient),
and ``F.linear`` everywhere else (GPU, other dtypes, >= 6 rows, training, under torch.compile or
CPU autocast). Both are one fp32 GEMM over the same products; only the summation blocking differs,
so results agree to fp32 rounding (test_linear.py). ``PYENCODER_CPU_SKINNY_GEMM=0`` turns the
transposed path off.

The product always reads the weight tensor itself: there is no cached copy of it. (An earlier
version kept a K-blocked contiguous copy for in_features > 1024, keyed by the weight's data pointer
and version counter; writes through ``weight.data`` -- EMA updates, weight surgery -- bump another
version counter, so that copy could silently serve old weights. Only a content check can validate
such a copy, and that reads the whole weight, which is the cost the copy was meant to save. The
table's 768x3072 5-row entry was measured with that copy; ``python -m
benchmarks.bench_linear_skinny`` compares F.linear, the transposed product and the old blocked copy
on the wav2vec2 shapes.)
"""
import torch
import torch.nn.functional as F
from torch import nn

from .._env import env_flag

_MIN_ROWS, _MAX_ROWS = 1, 5


def _enabled():
    return env_flag("PYENCODER_CPU_SKINNY_GEMM", True)


def uses_skinny_path(x, weight):
    """Whether ``linear(x, weight, ...)`` takes the transposed CPU product."""
    if x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != torch.float32 \
            or x.layout != torch.strided or weight.layout != torch.strided:
        return False
    if x.dim() == 0 or x.shape[-1] == 0 or torch.compiler.is_compiling() \
            or torch.jit.is_tracing() \
            or torch.is_autocast_enabled("cpu"):   # autocast decides F.linear's dtype
        return False
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return False
    rows = x.numel() // x.shape[-1]
    return _MIN_ROWS <= rows <= _MAX_ROWS and _enabled()


def linear(x, weight, bias=None):
    """``F.linear(x, weight, bias)``; on CPU with 1-5 fp32 rows and no autograd recording,
    computed as ``(W @ x^T)^T``."""
    if not uses_skinny_path(x, weight):
        return F.linear(x, weight, bias)
    return _skinny(x, weight, bias)


def _skinny(x, weight, bias):
    if x.shape[-1] != weight.shape[-1]:
        raise ValueError(f"linear: x has {x.shape[-1]} features in its last dim; weight "
                         f"{tuple(weight.shape)} expects {weight.shape[-1]}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    rows = x2.shape[0]
    if rows == 1:
        x2 = x2.expand(2, -1).contiguous()
    if bias is None:
        y = torch.mm(weight, x2.t())
    else:
        y = torch.addmm(bias.unsqueeze(1), weight, x2.t())
    return y[:, :rows].t().contiguous().view(*lead, weight.shape[0])


class Linear(nn.Linear):
    """``nn.Linear`` whose forward is :func:`linear` (see the module docstring). It holds nothing
    beyond nn.Linear's parameters: every call reads the current weight."""

    def forward(self, x):
        if not uses_skinny_path(x, self.weight):
            return F.linear(x, self.weight, self.bias)
        return _skinny(x, self.weight, self.bias)


class LinearView(nn.Module):
    """Runs someone else's ``nn.Linear`` (e.g. a Hugging Face model's projection) through the
    skinny path: the wrapped module stays the owner of its parameters, which are read at call
    time (so ``.to()``, ``load_state_dict`` or in-place updates of the wrapped model are seen).
    Elsewhere (GPU, >= 6 rows, an nn.Linear subclass, a module with forward hooks, ...) it calls
    the wrapped module itself."""

    def __init__(self, linear):
        super().__init__()
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear; got {type(linear).__name__}")
        self.linear = linear

    @property
    def weight(self):
        return self.linear.weight

    @property
    def bias(self):
        return self.linear.bias

    @property
    def in_features(self):
        return self.linear.in_features

    @property
    def out_features(self):
        return self.linear.out_features

    def forward(self, x):
        # the wrapped module's own call where the product would not be its forward: a subclass
        # (QAT, LoRA: another forward) or hooks (pruning's pre-hook keeps its weight current),
        # which the product skipped for 1-5 rows (a stream differed from offline)
        lin = self.linear
        w = lin.weight
        if type(lin) is not nn.Linear or has_hooks(lin) or not uses_skinny_path(x, w):
            return lin(x)
        return _skinny(x, w, lin.bias)


def skinny_view(module):
    """``module`` run through the skinny CPU path where that is exact: a ``LinearView`` of a plain
    ``nn.Linear`` (its type exactly: subclasses such as LoRA / quantised layers may compute
    something else), ``module`` itself otherwise (also when it is already a ``Linear``)."""
    if type(module) is nn.Linear:
        return LinearView(module)
    return module


def has_hooks(module):
    """Whether calling ``module`` runs forward hooks (its own or the global module hooks): a
    caller that replaces the call by its own product would skip them."""
    from torch.nn.modules import module as _m
    return bool(module._forward_hooks or module._forward_pre_hooks or _m._global_forward_hooks
                or _m._global_forward_pre_hooks)


def plain_linear(module):
    """The nn.Linear whose ``F.linear(x, weight, bias)`` a call of ``module`` computes (an
    nn.Linear or Linear, or a LinearView of an nn.Linear), or None: another type (a subclass may
    compute something else), or hooks that a direct product would skip."""
    if isinstance(module, LinearView):
        if has_hooks(module):
            return None
        module = module.linear
        if type(module) is not nn.Linear:
            return None
    if type(module) not in (nn.Linear, Linear) or has_hooks(module):
        return None
    return module

