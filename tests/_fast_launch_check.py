"""Subprocess of tests/test_fast_launch.py: every launch of a set of real calls on CPU tensors, as
on an sm_90 device (Triton's own JITFunction.run up to the compile, on a stand-in driver; no
interpreter), with the fast launch path off, then on twice (the first call records plans, the
second replays them). Each stand-in compiled kernel is one per Triton cache key and logs what its
launcher receives. Prints one JSON object: per case the three normalised launch logs, how many
launches each run served from plans, how many call programs it ran and how many launches went
through JITFunction.run. Run with TRITON_INTERPRET unset."""
import json
import os
import sys

import torch

assert os.environ.get("TRITON_INTERPRET", "0") != "1"
sys.path[:0] = [os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]

import pyencoder  # noqa: E402
from benchmarks._common import temp_env  # noqa: E402
from benchmarks.triton_cache import TARGET, _FakeDriver  # noqa: E402
from pyencoder import _backend  # noqa: E402
from pyencoder.ops import _attention_triton as A  # noqa: E402
from pyencoder.ops import _triton_op as TO  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402
from triton.runtime.driver import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

LOG = []
KEYS = {}


class StandIn:
    """One per (kernel, Triton cache key): what a compiled kernel offers the launch paths."""

    def __init__(self, name, key):
        self.name, self.key = name, key
        self.function, self.packed_metadata = object(), ("packed", name)

    def launch_metadata(self, grid, stream, *args):
        return ("metadata", self.name)

    def run(self, g0, g1, g2, stream, function, packed, md, enter, leave, *vals):
        assert function is self.function and packed is self.packed_metadata
        LOG.append({"kernel": self.name, "key": KEYS.setdefault(self.key, len(KEYS)),
                    "grid": [g0, g1, g2], "stream": stream, "metadata": md is not None,
                    "vals": [_norm(v) for v in vals]})


def _norm(v):
    if isinstance(v, torch.Tensor):
        # contents too (every allocation is filled, ``filled_empty``): a replay that passes
        # another tensor of the same layout (a stale table, the recorded call's key_lengths,
        # k for v) differs
        return ["T", str(v.dtype), list(v.shape), list(v.stride()), v.data_ptr() % 16 == 0,
                _fingerprint(v)]
    if isinstance(v, float):
        return ["f", v]
    return repr(v)


def _fingerprint(t):
    if t.numel() == 0:
        return None
    x = t.detach().double()
    # position-weighted: a permutation or a shifted window changes it too
    w = torch.arange(1, x.numel() + 1, dtype=torch.float64).reshape(x.shape)
    return repr(float((torch.nan_to_num(x, nan=0.5, posinf=3.0, neginf=-3.0) * w).sum()))


def _fill(t):
    return t.fill_(float("nan") if t.is_floating_point() else -7 if t.dtype != torch.bool
                   else True)


def _filled(alloc):
    """``alloc`` (torch.empty, torch.empty_like, Tensor.new_empty) with defined contents (NaN, or
    -7 for integers): outputs the stand-in kernels never write still compare equal between
    runs."""
    def filled(*args, **kwargs):
        return _fill(alloc(*args, **kwargs))
    return filled


def do_compile(fn, key, signature, device, constexprs, options, attrs, warmup):
    s = StandIn(fn.fn.__name__, key)
    fn.device_caches[device][0][key] = s
    return s


PLAN_LAUNCHES = [0]
TRITON_RUNS = [0]
_plan_launch = TO._Plan.launch
_jit_run = JITFunction.run


def counted(self, args, kwargs):
    PLAN_LAUNCHES[0] += 1
    return _plan_launch(self, args, kwargs)


def triton_run(self, *args, **kwargs):
    TRITON_RUNS[0] += 1
    return _jit_run(self, *args, **kwargs)


def bench(self, *args, config, **kwargs):     # the autotuner's timing: deterministic stand-in
    return [float(config.kwargs["BLOCK_M"] * 1000 + config.kwargs["BLOCK_N"]
                  + config.num_warps)] * 3


PROGRAM_RUNS = [0]


def _counting_run(cls):
    run = cls.run

    def counted_run(self, *args):
        res = run(self, *args)
        PROGRAM_RUNS[0] += res is not None
        return res
    cls.run = counted_run


def setup():
    torch.empty, torch.empty_like = _filled(torch.empty), _filled(torch.empty_like)
    torch.Tensor.new_empty = _filled(torch.Tensor.new_empty)
    _counting_run(A._FwdProgram)
    _counting_run(A._BwdProgram)
    driver.set_active(_FakeDriver(TARGET))
    JITFunction._do_compile = do_compile
    Autotuner._bench = bench
    TO._Plan.launch = counted
    JITFunction.run = triton_run
    _backend.select = lambda *a, **k: "triton"
    A._interpret, A._arch = (lambda: False), (lambda device: "sm90")


def attention(B=2, H=4, Hk=2, N=40, D=32, dtype=torch.float16, rope=True, mask="band",
              offset=0, key_lengths=False, bias=False, misaligned=False, sink=0, seed=0,
              transposed=False, scale=None, klen_dtype=torch.int64, grad=True, Nq=None,
              k_shift=0, rel_offset=-100):
    """Forward and backward (``grad``) of one call: q (B, H, Nq, D) at q_offset = ``offset``, k
    and v (B, Hk, N, D) at k_offset = offset - ``k_shift`` (a streaming chunk's queries over its
    keys); ``bias``: True (gated) or "plain" (no gate)."""
    g = torch.Generator().manual_seed(seed)
    Nq = N if Nq is None else Nq

    def t(h, n):
        if misaligned:      # a view 2 bytes past an aligned start: data_ptr % 16 != 0
            base = torch.randn(B * h * n * D + 1, generator=g).to(dtype)
            return base[1:].view(B, h, n, D).requires_grad_()
        if transposed:      # (B, N, H, D) storage seen as (B, H, N, D): other strides
            return torch.randn(B, n, h, D, generator=g).to(dtype).transpose(1, 2) \
                .requires_grad_()
        return torch.randn(B, h, n, D, generator=g).to(dtype).requires_grad_()
    q, k, v = t(H, Nq), t(Hk, N), t(Hk, N)
    if rope is True:    # one Rope per head_dim, as a model holds its own (programs key on it)
        rope = ROPES.setdefault(D, pyencoder.Rope(D))
    kw = dict(rope=rope or None, backend="triton", q_offset=offset, k_offset=offset - k_shift,
              scale=scale)
    if key_lengths:
        kw["key_lengths"] = torch.tensor([N, N - 7 - seed][:B] + [N] * max(0, B - 2),
                                         dtype=klen_dtype)
    if bias:
        kw["rel_bias"] = torch.randn(H, 200, generator=g)
        kw["gate"] = torch.rand(B, H, Nq, generator=g) if bias != "plain" else None
        kw["rel_offset"] = rel_offset
    if mask == "band":
        m = pyencoder.IntervalMask.band(20, 3, sink=sink)
    elif mask == "chunked":
        m = pyencoder.IntervalMask.chunked(8, 2, 1)
    else:
        m = pyencoder.IntervalMask.band(None, 0)
    if not grad:
        with torch.no_grad():
            pyencoder.ops.interval_attention(q, k, v, mask=m, **kw)
        return
    out = pyencoder.ops.interval_attention(q, k, v, mask=m, **kw)
    torch.autograd.grad(out, (q, k, v), torch.randn(out.shape, generator=g).to(dtype))


def conv(B=2, C=16, L=37, K=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, L, generator=g).requires_grad_()
    w = torch.randn(C, 1, K, generator=g).requires_grad_()
    b = torch.randn(C, generator=g).requires_grad_()
    y = pyencoder.ops.causal_conv1d(x, w, b, groups=C, activation="silu", backend="triton")
    y = y[0] if isinstance(y, tuple) else y
    torch.autograd.grad(y, (x, w, b), torch.randn(y.shape, generator=g))
    state = torch.randn(B, C, K - 1, generator=g)
    with torch.no_grad():
        pyencoder.ops.causal_conv1d_update(x[..., :3].detach(), state, w.detach(), b.detach(), groups=C,
                                           backend="triton")


def decode(B=2, H=4, M=3, D=32, cap=24, step=0, seed=0):
    """One streaming decode step (pending queries over a ring), positions as tensors; ``step``
    moves every position (the ring wraps)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, M, D, generator=g).half()
    ring_k, ring_v = (torch.randn(B, H, cap, D, generator=g).half() for _ in range(2))
    n_keys = torch.tensor([30, 17][:B]) + step
    q_pos = n_keys[:, None] - 5 + torch.arange(M)[None]
    with torch.no_grad():
        pyencoder.ops.decode_attention(q, ring_k, ring_v, q_pos, torch.full((B,), M), n_keys,
                                       torch.rand(D // 4, generator=g), False, 1, 10, 3,
                                       D ** -0.5, backend="triton")


def hooked():
    """A launch hook installed (a profiler): Triton's launch metadata reaches the launcher."""
    from triton import knobs
    seen = []
    hook = seen.append
    knobs.runtime.launch_enter_hook.add(hook)
    try:
        attention(rope=False)
    finally:
        knobs.runtime.launch_enter_hook.remove(hook)


ROPES = {}
ROPE = pyencoder.Rope(32)     # its own object: the case below edits it in place


def edited_rope():
    """A call with the Rope's inv_freq edited in place, then restored in place: the recorded
    program's tables hold the edited values, and the compared call (same values as the first
    run, two versions later) must not be served by it."""
    inv = ROPE.inv_freq(torch.device("cpu"))
    saved = inv.clone()
    inv.mul_(1.5)
    attention(rope=ROPE)
    inv.copy_(saved)


def env_call(**env):
    def call():
        with temp_env(**env):
            attention()
    return call


CASES = {
    "band-rope-table": lambda: attention(),
    "band-norope": lambda: attention(rope=False),
    "band-rope-pre": lambda: attention(),         # PYENCODER_ROPE_MODE=pre below
    "chunked-klen": lambda: attention(mask="chunked", key_lengths=True),
    "full-fp32": lambda: attention(mask="full", dtype=torch.float32, rope=False),
    "bias-gate": lambda: attention(bias=True, rope=False),
    "sink": lambda: attention(sink=4),
    "offset-7": lambda: attention(offset=7),
    "batch-3": lambda: attention(B=3),
    "misaligned": lambda: attention(misaligned=True),
    "autotune-full": lambda: attention(rope=False),   # PYENCODER_TRITON_AUTOTUNE=full below
    "conv": lambda: conv(),
    "hook": hooked,
    "decode": (lambda: decode(step=7), lambda: decode()),
    # recorded at offsets 5, compared at 22: q_offset / k_offset are do_not_specialize (keyed by
    # range), so the plans recorded at 5 serve 22
    "offsets-shift": (lambda: attention(rope=False, offset=22),
                      lambda: attention(rope=False, offset=5)),
    # eager streaming with the RoPE tables: chunks of 8 queries over 32 keys, recorded at chunk 5
    # (q_offset 40, k_offset 16), compared at chunk 8 (64, 40): the tables' base tab_base moves
    # with the offsets (16 -> 5 and 40 -> 37 after the launcher's move to 5 mod 16) and is
    # do_not_specialize, so the plans recorded at chunk 5 serve chunk 8
    "table-stream": (lambda: attention(Nq=8, N=32, offset=64, k_shift=24),
                     lambda: attention(Nq=8, N=32, offset=40, k_shift=24)),
    # recorded at N=48 (Triton: Nq, Nk divisible by 16), compared at N=40: a specialised int, so
    # no plan of 48 may serve 40
    "spec-int": (lambda: attention(rope=False, N=40), lambda: attention(rope=False, N=48)),
    # call programs (pyencoder.ops._attention_triton): compared with a recorded call that differs
    # in one part of the program key only (same layout, other contents for prog-seed): the
    # replay must be the path's launches (served by the recorded program only where the key
    # is the same: test_call_programs)
    "prog-offsets-rope": (lambda: attention(offset=5), lambda: attention(offset=22)),
    "prog-seed": (lambda: attention(seed=1, key_lengths=True),
                  lambda: attention(seed=3, key_lengths=True)),
    "prog-klen-int32": (lambda: attention(key_lengths=True),
                        lambda: attention(key_lengths=True, klen_dtype=torch.int32)),
    "prog-strides": (lambda: attention(), lambda: attention(transposed=True)),
    "prog-scale": (lambda: attention(scale=0.2), lambda: attention(scale=0.3)),
    "prog-rope-mode": (env_call(PYENCODER_ROPE_MODE="table"), env_call(PYENCODER_ROPE_MODE="pre")),
    "prog-deterministic": (lambda: attention(), env_call(PYENCODER_DETERMINISTIC="1")),
    "prog-inv-freq-edit": (lambda: attention(rope=ROPE), edited_rope),
    "prog-no-grad": (lambda: attention(grad=False), lambda: attention(grad=False)),
    "prog-misaligned": (lambda: attention(), lambda: attention(misaligned=True)),
    # biased programs rebuild REL / GATE / DREL / DGATE per call from the call's own tensors
    "prog-bias-seed": (lambda: attention(bias=True, seed=1), lambda: attention(bias=True, seed=2)),
    "prog-bias-plain": (lambda: attention(bias="plain", seed=1),
                        lambda: attention(bias="plain", seed=2)),
    "prog-bias-sink": (lambda: attention(bias=True, sink=3, seed=1),
                       lambda: attention(bias=True, sink=3, seed=2)),
    "prog-bias-offset": (lambda: attention(bias=True, rel_offset=-101),
                         lambda: attention(bias=True, rel_offset=-100)),
    "prog-bias-gate-none": (lambda: attention(bias="plain"), lambda: attention(bias=True)),
}
ENV = {"band-rope-pre": {"PYENCODER_ROPE_MODE": "pre"},
       "table-stream": {"PYENCODER_ROPE_MODE": "table"},
       "autotune-full": {"PYENCODER_TRITON_AUTOTUNE": "full"}}


def run_case(name):
    env = {"PYENCODER_TRITON_AUTOTUNE": "0", **ENV.get(name, {})}
    logs, served, programs, runs = [], [], [], []
    case = CASES[name]
    compared, recorded = case if isinstance(case, tuple) else (case, case)
    TO.clear_launch_plans()     # and the call programs: this case's record run leaves them
    for flag, fn in (("0", compared), ("1", recorded), ("1", compared)):
        with temp_env(PYENCODER_FAST_LAUNCH=flag, **env):
            LOG.clear()
            PLAN_LAUNCHES[0] = PROGRAM_RUNS[0] = TRITON_RUNS[0] = 0
            try:
                fn()
            except Exception as e:      # reported, not raised: the other cases still run
                return {"error": f"{type(e).__name__}: {e}"}
        logs.append(list(LOG))
        served.append(PLAN_LAUNCHES[0])
        programs.append(PROGRAM_RUNS[0])
        runs.append(TRITON_RUNS[0])
    return {"logs": logs, "served": served, "programs": programs, "triton_runs": runs}


def main():
    setup()
    res = {name: run_case(name) for name in (sys.argv[1:] or CASES)}
    print(json.dumps(res))


if __name__ == "__main__":
    main()
