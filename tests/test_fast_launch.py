"""The fast launch path (pyencoder.ops._triton_op, PYENCODER_FAST_LAUNCH): a launch served from a
recorded plan must reach the same compiled kernel with the same grid, stream and arguments as
Triton's own JITFunction.run. Checked on the CPU by tests/_fast_launch_check.py in a subprocess
(real JITFunctions, a stand-in sm_90 driver, one stand-in compiled kernel per Triton cache key
that logs what its launcher receives): attention forward + backward over RoPE modes, masks,
padding, bias (tensor keywords), sink keys, offsets, streaming chunks with the RoPE tables (their
base moves per chunk), batch sizes, a misaligned input (Triton specialises pointers on 16-byte
alignment), the autotuner's path and a launch hook; the depthwise conv forward, backward and
update; a streaming decode step."""
import json
import os
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
pytest.importorskip("triton")


@pytest.fixture(scope="module")
def logs():
    sys.path.insert(0, HERE)
    import _subproc
    env = {k: v for k, v in os.environ.items()
           if k not in ("TRITON_INTERPRET", "PYENCODER_FAST_LAUNCH")}
    r = _subproc.run([sys.executable, os.path.join(HERE, "_fast_launch_check.py")], env=env,
                     cwd=os.path.dirname(HERE))
    assert r.returncode == 0, r.stderr[-4000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def _strip(log):
    return [{k: v for k, v in x.items() if k != "metadata"} for x in log]


def test_every_case_ran(logs):
    errors = {n: c["error"] for n, c in logs.items() if "error" in c}
    assert not errors
    assert len(logs) >= 31


@pytest.mark.parametrize("case", ["band-rope-table", "band-norope", "band-rope-pre",
                                  "chunked-klen", "full-fp32", "bias-gate", "sink", "offset-7",
                                  "batch-3", "misaligned", "autotune-full", "conv", "hook",
                                  "offsets-shift", "decode", "table-stream"])
def test_replay_equals_triton(logs, case):
    c = logs[case]
    off, record, replay = c["logs"]
    assert off, "the case launched nothing"
    # off: every launch through Triton; the replay: every launch from a plan, none through
    # JITFunction.run
    assert c["served"][0] == 0 and c["served"][2] == len(replay)
    assert c["triton_runs"][0] >= len(off) and c["triton_runs"][2] == 0
    assert _strip(replay) == _strip(off)
    if case not in ("offsets-shift", "decode", "table-stream"):     # recorded at other positions
        assert _strip(record) == _strip(off)
    hooked = case == "hook"
    # Triton's launch metadata reaches the launcher only when a launch hook wants it
    assert all(x["metadata"] for x in off)          # Triton builds it for every launch
    assert all(x["metadata"] == hooked for x in replay)


# Launches served by call programs (pyencoder.ops._attention_triton: a forward program, a backward
# program) in each case's replay: 2 for an attention forward + backward whose key the record run
# had; 0 where the compared call differs from the recorded one in a part of the program key (its
# launches must then be the path's own: test_replay_equals_triton's equality, checked for every
# case here), and for the non-attention kernels.
PROGRAMS = {
    "band-rope-table": 2, "band-norope": 2, "band-rope-pre": 2, "chunked-klen": 2,
    "full-fp32": 2, "bias-gate": 2, "sink": 2, "offset-7": 2, "batch-3": 2, "misaligned": 2,
    "autotune-full": 2, "conv": 0, "hook": 2, "decode": 0, "offsets-shift": 0, "spec-int": 0,
    "prog-offsets-rope": 0, "prog-seed": 2, "prog-klen-int32": 2, "prog-strides": 0,
    "prog-scale": 0, "prog-rope-mode": 0, "prog-deterministic": 1, "prog-inv-freq-edit": 0,
    "prog-no-grad": 1, "prog-misaligned": 0, "prog-bias-seed": 2, "prog-bias-plain": 2,
    "prog-bias-sink": 2, "prog-bias-offset": 0, "prog-bias-gate-none": 0, "table-stream": 0,
}


@pytest.mark.parametrize("case", sorted(PROGRAMS))
def test_call_programs(logs, case):
    """A call replayed by a call program makes the launches the path makes (same kernels, grids,
    arguments, and the call's own tensors: the logs compare contents too); a program serves only
    calls with its key: recorded at other offsets, strides, scale, RoPE mode, deterministic
    setting, alignment, or before an in-place edit of inv_freq, it does not."""
    c = logs[case]
    off, record, replay = c["logs"]
    assert off and _strip(replay) == _strip(off)
    assert c["programs"][0] == 0            # PYENCODER_FAST_LAUNCH=0: no programs either
    assert c["programs"][2] == PROGRAMS[case]


def test_every_case_has_a_program_count(logs):
    assert set(PROGRAMS) == set(logs)


def test_specialised_ints_are_not_coarsened(logs):
    """Plans recorded at N=48 (divisible by 16: Triton's 'D' specialisation of Nq / Nk) must not
    serve N=40: the replay run reaches the kernels Triton picks for 40."""
    off, record, replay = logs["spec-int"]["logs"]
    assert _strip(replay) == _strip(off)
    assert [x["key"] for x in record] != [x["key"] for x in off]


def test_specialisation_is_kept(logs):
    """The plan key is at least as fine as Triton's specialisation: a misaligned q/k/v gets the
    misaligned kernels Triton picks, another batch size its own grid, and the autotuner's chosen
    tile its resolved grid."""
    aligned = logs["band-rope-table"]["logs"][0]
    mis = logs["misaligned"]["logs"][0]
    assert [x["key"] for x in aligned] != [x["key"] for x in mis]
    assert logs["batch-3"]["logs"][0][0]["grid"] != aligned[0]["grid"]
    assert [x["key"] for x in logs["offset-7"]["logs"][0]] == [x["key"] for x in aligned]


def test_rope_table_streaming_shares_plans(logs):
    """Eager streaming with the RoPE tables (chunks at q_offset 40 then 64, keys 24 earlier):
    the tables' base tab_base changes with every chunk and is do_not_specialize, so the forward,
    dq and dk/dv plans recorded at one chunk serve the next one (no launch through
    JITFunction.run), with the other chunk's offsets and table base in the launch arguments."""
    c = logs["table-stream"]
    off, record, replay = c["logs"]
    assert [x["kernel"] for x in off] == ["_interval_attention_fwd_kernel",
                                          "_interval_attention_bwd_dq_kernel",
                                          "_interval_attention_bwd_dkdv_kernel"]
    assert c["served"] == [0, 0, 3] and c["triton_runs"][1:] == [3, 0]
    # one compiled kernel per launcher at both chunks, reached with other runtime ints
    assert [x["key"] for x in record] == [x["key"] for x in off]
    assert all(a["vals"] != b["vals"] for a, b in zip(record, replay))


@pytest.fixture
def stand_in_driver():
    from triton.runtime.driver import driver

    sys.path.insert(0, os.path.dirname(HERE))
    from benchmarks.triton_cache import TARGET, _FakeDriver
    active = driver._active
    driver.set_active(_FakeDriver(TARGET))
    yield
    driver._active = active


def test_plan_key_refuses_tensors_without_storage(stand_in_driver):
    """A fake, functional or functorch-wrapped tensor has no data pointer: its key raises, so the
    launch falls through to the fakeness checks and wrap_triton (never a plan)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from pyencoder.ops._triton_op import _plan_key
    real = torch.randn(4, 4)
    key = _plan_key((1, 1, 1), (real, 3, 1.5, None), {"X": real, "C": True})
    assert key == _plan_key((1, 1, 1), (torch.randn(4, 4), 3, 1.5, None),
                            {"X": torch.randn(4, 4), "C": True})
    assert key != _plan_key((1, 1, 1), (real, 4, 1.5, None), {"X": real, "C": True})
    assert key != _plan_key((1, 1, 1), (real.half(), 3, 1.5, None), {"X": real, "C": True})
    assert key != _plan_key((1, 1, 1), (real.view(-1)[1:], 3, 1.5, None), {"X": real, "C": True})
    _plan_key((1, 1, 1), (torch.nn.Parameter(real),), {})
    with FakeTensorMode() as mode:
        fake = mode.from_tensor(real)
    with pytest.raises(Exception):
        _plan_key((1, 1, 1), (fake,), {})
    with pytest.raises(Exception):
        _plan_key((1, 1, 1), (real,), {"X": fake})
    _plan_key((1, 1, 1), (real.to(torch.bfloat16), torch.zeros(3, dtype=torch.int32)), {})


def test_no_plan_under_transforms_or_modes(monkeypatch, stand_in_driver):
    """Under a torch.func transform or a dispatch mode (where functional / functorch wrappers of
    the plain tensor type live) a launch never consults the plans: a plan stored for every key
    would otherwise serve it."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from pyencoder.ops import _triton_op as TO
    monkeypatch.setattr(TO, "interpreting", lambda: False)
    consulted = []

    class Plans(dict):
        def get(self, key, default=None):
            consulted.append(key)
            return None

    class Kernel:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: None
    kernel = Kernel()
    monkeypatch.setitem(TO._PLANS, id(kernel), (kernel, (), Plans()))
    monkeypatch.setattr(TO, "_record", lambda *a: None)
    monkeypatch.setattr(TO.torch.library, "wrap_triton", lambda k: k)

    def launch(t):
        TO.launch(kernel)[(1,)](t, 3)
        return t
    torch.vmap(launch)(torch.randn(3, 4))
    torch.func.grad(lambda t: launch(t).sum())(torch.randn(3))
    torch.func.functionalize(launch)(torch.randn(3))
    with FakeTensorMode() as mode:
        launch(mode.from_tensor(torch.randn(3)))
    assert not consulted
    launch(torch.randn(3))      # the plain eager launch does consult them
    assert len(consulted) == 1


def test_plan_key_grid(stand_in_driver):
    from pyencoder.ops._triton_op import _plan_key
    real = torch.randn(2)
    with pytest.raises(Exception):      # a lambda grid has no key: never a plan
        _plan_key(lambda meta: (1,), (real,), {})


def test_block_grid():
    from pyencoder.ops._triton_op import BlockGrid
    g = BlockGrid(100, "BLOCK_M", 6)
    assert g({"BLOCK_M": 32, "BLOCK_N": 64}) == (4, 6)
    assert g.key == BlockGrid(100, "BLOCK_M", 6).key != BlockGrid(100, "BLOCK_N", 6).key


def test_a_full_kernel_records_no_more(monkeypatch, stand_in_driver):
    """A caller whose ints change every launch (streaming positions) fills its kernel's plans once
    (_PLANS_MAX) and then records no more: no unbounded growth, no clearing churn."""
    from pyencoder.ops import _triton_op as TO
    from triton.runtime.jit import JITFunction

    class Compiled:
        function, packed_metadata = 1, ()

        def run(self, *a):
            pass

    class Param:
        def __init__(self, name):
            self.name, self.has_default, self.default = name, False, None
    class Jit(JITFunction):
        __hash__ = object.__hash__

        def __init__(self):
            pass
    jit = Jit()
    jit.params, jit.pre_run_hooks, jit.arg_names = [Param("X"), Param("pos")], [], ["X", "pos"]
    monkeypatch.setattr(TO, "_PLANS_MAX", 4)
    monkeypatch.setitem(TO._PLANS, id(jit), (jit, (), {}))
    x = torch.randn(4)
    for pos in range(10):
        TO._record(jit, (1,), (x, pos), {}, Compiled())
    assert len(TO._PLANS[id(jit)][2]) == 4
