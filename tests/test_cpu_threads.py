"""pyencoder._cpu_threads: the per-call thread count of the CPU path is scoped and restored, follows
PYENCODER_CPU_THREADS, lowers but never raises torch's count, reads machine load correctly (probes
faked here: no test depends on the real load or on speed), and does not change any output."""
import random

import pytest
import torch

import pyencoder
from pyencoder import _cpu_threads as ct
from pyencoder.reference import attention as ra
from pyencoder.ops.decode_attention import decode_attention


@pytest.fixture
def two_threads(monkeypatch):
    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    monkeypatch.setattr(ct, "_probe", {"t": None, "idle": None, "own": None, "avail": None})
    yield
    torch.set_num_threads(saved)


def _fake_machine(monkeypatch, idle_per_s, own_per_s, load=0.0, cores=2):
    clock = {"t": 100.0}
    monkeypatch.setattr(ct.time, "monotonic", lambda: clock["t"])
    monkeypatch.setattr(ct.time, "process_time", lambda: own_per_s * clock["t"])
    monkeypatch.setattr(ct, "_idle_seconds", lambda: idle_per_s * clock["t"])
    monkeypatch.setattr(ct.os, "getloadavg", lambda: (load, load, load))
    monkeypatch.setattr(ct, "_usable_cores", lambda: cores)
    return clock


def test_scope_lowers_and_restores(two_threads, monkeypatch):
    monkeypatch.setenv("PYENCODER_CPU_THREADS", "auto")
    with ct.threads_for(1e3):                       # tiny work: one thread
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2
    with pytest.raises(RuntimeError):
        with ct.threads_for(1e3):
            raise RuntimeError("boom")
    assert torch.get_num_threads() == 2
    with ct.threads_for(1e3, device="meta"):        # not a CPU call: untouched
        assert torch.get_num_threads() == 2


def test_policy_values(two_threads, monkeypatch):
    monkeypatch.setenv("PYENCODER_CPU_THREADS", "torch")
    assert ct.choose(1e3) == 2
    monkeypatch.setenv("PYENCODER_CPU_THREADS", "1")
    assert ct.choose(1e12) == 1
    monkeypatch.setenv("PYENCODER_CPU_THREADS", "8")
    assert ct.choose(1e12) == 2                     # a cap, never above torch's count
    for bad in ("0", "many"):
        monkeypatch.setenv("PYENCODER_CPU_THREADS", bad)
        with pytest.raises(ValueError, match="PYENCODER_CPU_THREADS"):
            ct.choose(1e12)
    torch.set_num_threads(1)
    monkeypatch.setenv("PYENCODER_CPU_THREADS", "auto")
    assert ct.choose(1e12) == 1                     # never raised above the caller's choice


def test_auto_follows_available_cores(two_threads, monkeypatch):
    monkeypatch.delenv("PYENCODER_CPU_THREADS", raising=False)
    # first call: cores - 1-minute load average
    _fake_machine(monkeypatch, idle_per_s=0.0, own_per_s=1.0, load=3.0)
    assert ct.choose(1e12) == 1
    monkeypatch.setattr(ct, "_probe", {"t": None, "idle": None, "own": None, "avail": None})
    clock = _fake_machine(monkeypatch, idle_per_s=1.0, own_per_s=1.0, load=0.1)
    assert ct.choose(1e12) == 2
    # later windows: idle + own CPU seconds per wall second. A neighbour on one core while we
    # run one thread: 0 idle + 1 own = 1 core -> stay at 1 (2 would meet the neighbour).
    monkeypatch.setattr(ct.time, "process_time", lambda: 1.0 * clock["t"])
    monkeypatch.setattr(ct, "_idle_seconds", lambda: 0.0 * clock["t"])
    clock["t"] += 1.0
    assert ct.choose(1e12) == 1
    # the neighbour left: 1 idle + 1 own -> 2 again
    base_idle = 0.0 * clock["t"]
    t0 = clock["t"]
    monkeypatch.setattr(ct, "_idle_seconds", lambda: base_idle + (clock["t"] - t0))
    clock["t"] += 1.0
    assert ct.choose(1e12) == 2
    # within one window the estimate is reused
    clock["t"] += ct.WINDOW_S / 4
    assert ct.choose(1e12) == 2
    assert ct.choose(1e3) == 1                      # small work: one thread regardless


def test_outputs_do_not_depend_on_thread_count(monkeypatch):
    monkeypatch.setenv("PYENCODER_CPU_THREADS", "torch")
    saved = torch.get_num_threads()
    rng = random.Random(torch.randint(0, 10**6, ()).item())
    try:
        for _ in range(4):
            B, Hk, g, N, D = rng.randint(1, 2), rng.choice([1, 2]), rng.choice([1, 3]), \
                rng.choice([97, 700]), rng.choice([16, 64])
            q = torch.randn(B, Hk * g, N, D)
            k, v = torch.randn(B, Hk, N, D), torch.randn(B, Hk, N, D)
            inv = pyencoder.Rope(D).inv_freq()
            lo, hi = rng.choice([(250, 3), (-1, 0), (20, 5)])
            res = []
            for n in (2, 1):
                torch.set_num_threads(n)
                out, lse = ra.forward(q, k, v, inv, None, 1, lo, hi, 0, 0, D ** -0.5, False)
                grads = ra.backward(torch.ones_like(out), q, k, v, out, lse, inv, None, 1, lo,
                                    hi, 0, 0, D ** -0.5, False)
                kr, vr = k[:, :, :257], v[:, :, :257]
                n_keys = torch.tensor([min(N, 257)] * B)
                dec = decode_attention(q[:, :Hk, :4].contiguous(), kr, vr, torch.arange(4)[None].expand(B, 4),
                                       torch.tensor([4] * B), n_keys, inv, False, 1, lo, hi,
                                       D ** -0.5, backend="reference")
                res.append((out, lse) + tuple(grads) + (dec,))
            # Same function at any thread count. Bit-equality is the usual outcome, but MKL does
            # not promise it across thread counts (seen once in CI-like runs on a loaded
            # machine), so fp32 rounding-level differences are allowed.
            for a, b in zip(*res):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    finally:
        torch.set_num_threads(saved)


def test_traced_by_torch_compile_without_graph_break():
    def f(x):
        with ct.threads_for(1e3, x.device):
            return x * 2 + 1
    x = torch.randn(8)
    torch.testing.assert_close(torch.compile(f, fullgraph=True, backend="eager")(x), x * 2 + 1)


@pytest.mark.parametrize("value", ["junk", "0", "-2", "1.5"])
def test_junk_policy_is_rejected(monkeypatch, value):
    monkeypatch.setenv("PYENCODER_CPU_THREADS", value)
    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with pytest.raises(ValueError, match=f"PYENCODER_CPU_THREADS must be one of auto, torch "
                                             f"or an integer >= 1; got '{value}'"):
            ct.choose(1e12)
    finally:
        torch.set_num_threads(saved)
