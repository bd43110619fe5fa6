"""A server's usage: several Python threads sharing one module (the process-wide memo tables),
copies of stream states (copy.deepcopy / pickle: forks and checkpoints of a stream), and a
differentiable stream through frozen convs (the gradient with respect to the input only)."""
import copy
import pickle
import sys
import threading

import torch

from pyencoder._fifo import put
from pyencoder.models import DecoderConfig, StreamingDecoder
from pyencoder.nn import CausalConv1d, ChunkedSelfAttention, StreamingSequential
from pyencoder.streaming import reset


class _ChangedUnderIteration(dict):
    """A table another thread changes while put looks for its oldest key."""

    def __iter__(self):
        raise RuntimeError("dictionary changed size during iteration")


def test_put_tolerates_another_thread_evicting_first():
    cache = {"a": 1, "b": 2}
    put(cache, "c", 3, 2)
    assert list(cache) == ["b", "c"]
    raced = _ChangedUnderIteration(a=1, b=2)
    assert put(raced, "c", 3, 2) == 3 and raced["c"] == 3    # stored, one entry over for now
    over = {i: i for i in range(5)}
    put(over, "d", 4, 2)                                      # a later store trims the excess
    assert list(over) == [4, "d"]
    gone = {}
    assert put(gone, "x", 1, 0) == 1                          # emptied by another thread


def test_memo_tables_under_threads():
    """put evicted with cache.pop(next(iter(cache))): two threads popping the same oldest key
    raised KeyError (from check_lengths' and the bias checks' memos in a WavLM forward served
    by several threads), or RuntimeError (dict changed size during iteration)."""
    cache, errs = {}, []

    def work(t):
        try:
            for i in range(20000):
                put(cache, (t, i), i, 16)
        except Exception as e:      # noqa: BLE001 (any exception is the failure)
            errs.append(repr(e))
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(old)
    assert not errs, errs[:3]
    put(cache, "last", 0, 16)       # alone now: trimmed back to the limit
    assert len(cache) == 16


def _stream(m, st, x, c=4):
    outs = []
    for i in range(0, x.shape[1], c):
        y, st = m.step(x[:, i:i + c], st)
        outs.append(y)
    return torch.cat(outs, 1), st


def test_copied_state_does_not_reuse_the_steady_record():
    """A state's steady-dispatch record is (counter, version); a copied tensor's version
    restarts, so a deep copy of a reset state matched a record taken before the reset and its
    general step ran as step_fixed on a stream that was not steady (40 frames instead of 38)."""
    torch.manual_seed(0)
    m = ChunkedSelfAttention(16, 2, chunk_size=2, left_chunks=3, lookahead=1).eval()
    x = torch.randn(1, 40, 16)
    with torch.no_grad():
        want, _ = _stream(m, m.init_state(1), x)
        st = m.init_state(1)
        _, st = _stream(m, st, torch.randn(1, 40, 16))        # steady now
        for clone in (copy.deepcopy, lambda s: pickle.loads(pickle.dumps(s))):
            fork = clone(st)
            assert "_steady_record" not in fork.__dict__
            _, fork = _stream(m, fork, torch.randn(1, 8, 16))  # dispatched fixed steps
            reset(fork, torch.ones(1, dtype=torch.bool))
            again = clone(fork)
            assert again.config == fork.config and again.weights_dtype == torch.float32
            got, _ = _stream(m, again, x)
            assert got.shape == want.shape
            torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


def test_frozen_stack_streams_differentiably():
    """With frozen parameters and the gradient wanted for the first chunk only, a stack's later
    general steps ran as step_fixed (in place) because only x and the parameters were asked
    whether autograd records: backward raised. The state's history carries the graph."""
    torch.manual_seed(1)
    cases = [
        (StreamingSequential(CausalConv1d(4, 4, 3), CausalConv1d(4, 4, 3)),
         torch.randn(1, 4, 24), -1),
        (StreamingDecoder(DecoderConfig(input_dim=8, dim=8, intermediate_dim=12, num_blocks=2,
                                        samples_per_frame=4)), torch.randn(1, 24, 8), 1)]
    for m, x, tdim in cases:
        m.requires_grad_(False)
        c = 4
        first = x.narrow(tdim, 0, c).clone().requires_grad_(True)
        rest = x.narrow(tdim, c, x.shape[tdim] - c)
        first_off = first.detach().clone().requires_grad_(True)
        want = m(torch.cat([first_off, rest], tdim))
        w = torch.randn_like(want)
        (g_want,) = torch.autograd.grad((want * w).sum(), first_off)
        st = m.init_state(1)
        outs = []
        y, st = m.step(first, st)
        outs.append(y)
        for i in range(0, rest.shape[tdim], c):
            y, st = m.step(rest.narrow(tdim, i, c), st)
            outs.append(y)
        y, st = m.flush(st)
        outs.append(y)
        got = torch.cat(outs, -1 if tdim == -1 else 1)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        (g_got,) = torch.autograd.grad((got * w).sum(), first)
        torch.testing.assert_close(g_got, g_want, atol=1e-5, rtol=1e-5)


def test_admit_fresh_slot_holds_no_graph():
    """admit's private batch-1 state is a slot copy reset by the state's own reset: where the
    batch state's history carries an autograd graph (a differentiable stream), the copy must
    not hold on to it."""
    from pyencoder.streaming.admit import _fresh_slot
    conv = CausalConv1d(3, 3, 3)
    st = conv.init_state(2)
    _, st = conv.step(torch.randn(2, 3, 4, requires_grad=True), st)
    assert st.hist.requires_grad
    fresh = _fresh_slot(st, 1)
    assert not any(t.requires_grad for t in fresh.tensors().values())
    assert all((t == 0).all() for t in fresh.tensors().values())
