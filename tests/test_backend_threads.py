"""pyencoder.use_backend is per thread and per asyncio task (issue 13, item 6): a block in one
thread is invisible to the others, and leaving blocks in any order restores each thread's own
setting. The interleavings are forced with barriers / events, not timing."""
import asyncio
import threading

import pytest

import pyencoder
from pyencoder import _backend


def _seen():
    return _backend.requested_backend("attention"), _backend.requested_backend("conv")


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    monkeypatch.delenv("PYENCODER_BACKEND", raising=False)


def test_threads_do_not_see_each_others_blocks():
    entered, both_in, a_left, b_left = (threading.Barrier(3) for _ in range(4))
    seen, errors = {}, []

    def a():
        with pyencoder.use_backend("reference"):
            entered.wait()
            both_in.wait()
            seen["a_inside"] = _seen()
        a_left.wait()
        seen["a_after"] = _seen()
        b_left.wait()

    def b():
        entered.wait()
        with pyencoder.use_backend("triton", conv="cuda"):
            both_in.wait()
            seen["b_inside"] = _seen()
            a_left.wait()
            seen["b_after_a_left"] = _seen()
        b_left.wait()
        seen["b_after"] = _seen()

    def run(f):
        try:
            f()
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)
            for bar in (entered, both_in, a_left, b_left):
                bar.abort()

    threads = [threading.Thread(target=run, args=(f,)) for f in (a, b)]
    for t in threads:
        t.start()
    entered.wait()
    both_in.wait()
    seen["main_inside"] = _seen()
    a_left.wait()
    b_left.wait()
    for t in threads:
        t.join(30)
    assert not errors
    assert seen["a_inside"] == ("reference", "reference")
    assert seen["b_inside"] == ("triton", "cuda")
    assert seen["b_after_a_left"] == ("triton", "cuda")
    assert seen["main_inside"] == (None, None)
    assert seen["a_after"] == seen["b_after"] == (None, None)
    assert _seen() == (None, None)
    third = []
    t = threading.Thread(target=lambda: third.append(_seen()))
    t.start()
    t.join(30)
    assert third == [(None, None)]


def test_nested_blocks_restore_in_a_thread():
    with pyencoder.use_backend("reference"):
        with pyencoder.use_backend(conv="triton"):
            assert _seen() == ("reference", "triton")
        assert _seen() == ("reference", "reference")
    assert _seen() == (None, None)


def test_asyncio_tasks_have_their_own_blocks():
    async def main():
        a_in, b_in, a_out = asyncio.Event(), asyncio.Event(), asyncio.Event()
        seen = {}

        async def a():
            with pyencoder.use_backend("reference"):
                a_in.set()
                await b_in.wait()
                seen["a"] = _seen()
            a_out.set()

        async def b():
            await a_in.wait()
            with pyencoder.use_backend("triton"):
                b_in.set()
                await a_out.wait()
                seen["b"] = _seen()
            seen["b_after"] = _seen()

        await asyncio.gather(a(), b())
        seen["main"] = _seen()
        return seen

    seen = asyncio.run(main())
    assert seen == {"a": ("reference", "reference"), "b": ("triton", "triton"),
                    "b_after": (None, None), "main": (None, None)}


def test_compiled_code_follows_the_threads_setting():
    """Under torch.compile the selection is read from a per-thread mirror that dynamo guards on:
    entering a block recompiles, another thread keeps its own setting."""
    import torch

    def f(x):
        return x + 1 if _backend.requested_backend("attention") == "reference" else x * 2

    cf = torch.compile(f, fullgraph=True, backend="eager")
    x = torch.full((1,), 3.0)
    assert cf(x).item() == 6.0
    with pyencoder.use_backend("reference"):
        assert cf(x).item() == 4.0
        other = []
        t = threading.Thread(target=lambda: other.append(cf(x).item()))
        t.start()
        t.join(60)
        assert other == [6.0]
    assert cf(x).item() == 6.0
