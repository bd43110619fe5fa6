"""Test configuration. On a machine without CUDA the Triton kernels run in the interpreter
(TRITON_INTERPRET must be set before any kernel module is imported)."""
import os

import pytest

try:
    import torch
    _HAS_CUDA = torch.cuda.is_available()
except Exception:  # pragma: no cover
    _HAS_CUDA = False

if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The CPU path picks its thread count per call from the machine's load under the default
# PYENCODER_CPU_THREADS=auto (pyencoder/_cpu_threads.py), and MKL does not promise bit-equal
# results across counts: tests that compare two runs exactly failed under load (CI beside other
# work). One thread for the session, whatever the load (the policy's own tests set the variable
# themselves; a value already in the environment is kept).
os.environ.setdefault("PYENCODER_CPU_THREADS", "1")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    # The fast GPU tier (-m gpu_quick): a gpu test is in it when marked directly or when its
    # module's gpu_quick(name, params) says so (name without the [id], params of the callspec).
    # tryfirst: the marks must exist before `-m` deselects.
    for item in items:
        pred = getattr(getattr(item, "module", None), "gpu_quick", None)
        if callable(pred) and "gpu" in item.keywords and "gpu_quick" not in item.keywords:
            params = item.callspec.params if hasattr(item, "callspec") else {}
            if pred(item.originalname, params):
                item.add_marker(pytest.mark.gpu_quick)
    if "compile_full" not in (config.getoption("markexpr", "") or ""):
        full = pytest.mark.skip(reason="the full Triton compile matrix: make test-compile-full "
                                       "(pytest -m compile_full)")
        for item in items:
            if "compile_full" in item.keywords:
                item.add_marker(full)
    if _HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


_INTERPRET_BEFORE = pytest.StashKey[object]()
_UNSET = object()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
    # Before any fixture of the test is set up.
    item.stash[_INTERPRET_BEFORE] = os.environ.get("TRITON_INTERPRET", _UNSET)
    return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item, nextitem):
    """Fail a test that leaves TRITON_INTERPRET changed after its teardown (monkeypatch restores
    count as unchanged). Kernel modules imported while it was unset are built for a GPU, and every
    later interpreter test in the process fails with "cannot call @triton.jit'd outside of the
    scope of a kernel"; this names the test that did it instead."""
    try:
        return (yield)
    finally:            # also when a fixture's teardown raised
        _check_interpret(item)


def _check_interpret(item):
    before = item.stash.get(_INTERPRET_BEFORE, _UNSET)
    after = os.environ.get("TRITON_INTERPRET", _UNSET)
    if after is not before and after != before:
        show = lambda v: "unset" if v is _UNSET else repr(v)  # noqa: E731
        if before is _UNSET:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = before
        pytest.fail(f"{item.nodeid} changed TRITON_INTERPRET ({show(before)} before the test, "
                    f"{show(after)} after its teardown) and did not restore it: later Triton "
                    f"interpreter tests in this process would break. Use monkeypatch.setenv / "
                    f"delenv (restored at teardown) or patch what reads it (e.g. "
                    f"benchmarks.bench_attention_ext._interpreting) instead; restored now.",
                    pytrace=False)


@pytest.fixture(autouse=True)
def _seed():
    # Fresh random inputs every run, but reproducible from the printed seed when a test fails.
    import random
    from pyencoder._env import test_seed
    seed = test_seed()          # a bad value raises naming the variable
    seed = random.randrange(2**31) if seed is None else seed
    torch.manual_seed(seed)
    random.seed(seed)
    print(f"PYENCODER_TEST_SEED={seed}")  # shown with the captured output of a failing test
    yield seed


def has_triton():
    try:
        import triton  # noqa: F401
        return True
    except ImportError:
        return False


def attention_op_args(q, k, v, inv_freq=None, key_lengths=None, *, block, lo_off, hi_off,
                      k_block=None, sink=0, rel_bias=None, gate=None, rel_offset=0, q_offset=0,
                      k_offset=0, scale=0.35, interleaved=False):
    """The positional arguments of the interval attention ops (pyencoder.ops._attention_op's
    schema) without the reference op's trailing backend string."""
    return (q, k, v, inv_freq, key_lengths, rel_bias, gate, block,
            block if k_block is None else k_block, lo_off, hi_off, sink, rel_offset, q_offset,
            k_offset, scale, interleaved)


def gradcheck_inputs():
    """Small float64 leaves for an attention gradcheck: q (1, 2, 11, 6) against k, v
    (1, 1, 13, 6) (GQA, Nq != Nk), a partial interleaved Rope(4) and key_lengths [10] (padding).
    Returns (q, k, v, rope, key_lengths)."""
    import pyencoder
    q = torch.randn(1, 2, 11, 6, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 1, 13, 6, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 1, 13, 6, dtype=torch.float64, requires_grad=True)
    return q, k, v, pyencoder.Rope(4, interleaved=True), torch.tensor([10])


def compiled_matches_eager(f, args, tol):
    """torch.compile(f, fullgraph=True) through AOTAutograd (graphs run as traced), forward and
    backward, against eager at rtol = atol = ``tol``; every leaf in ``args`` must get a nonzero
    gradient. Returns the code of the traced forward and backward graphs."""
    from functorch.compile import make_boxed_func
    from torch._functorch.aot_autograd import aot_module_simplified
    graphs = []

    def inner(gm, example_inputs):
        graphs.append(gm.code)
        return make_boxed_func(gm.forward)

    def backend(gm, example_inputs):
        return aot_module_simplified(gm, example_inputs, fw_compiler=inner, bw_compiler=inner)
    torch._dynamo.reset()
    out = torch.compile(f, backend=backend, fullgraph=True)(*args)
    out.backward()
    got = [a.grad.clone() for a in args]
    for a in args:
        a.grad = None
    ref = f(*args)
    ref.backward()
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
    for g, a in zip(got, args):
        assert g.abs().sum() > 0
        torch.testing.assert_close(g, a.grad, rtol=tol, atol=tol)
    return "\n".join(graphs)


def _flex_available():
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
        return True
    except ImportError:
        return False


needs_flex = pytest.mark.skipif(not _flex_available(), reason="no FlexAttention in this torch")
