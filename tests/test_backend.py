"""Backend selection, availability report, and an import that never touches CUDA or _C."""
import os
import sys

import pytest

import _subproc
import torch

import pyencoder
from pyencoder import _backend
from pyencoder.ops import banded_attention, causal_conv1d


def test_import_does_not_initialise_cuda_or_load_extension():
    code = (
        "import sys, torch\n"
        "import pyencoder, pyencoder.ops\n"
        "assert 'pyencoder._C' not in sys.modules, 'extension loaded eagerly'\n"
        "assert 'triton' not in sys.modules, 'triton imported eagerly'\n"
        "assert not torch.cuda.is_initialized(), 'CUDA initialised at import'\n"
        "print('ok')\n")
    env = dict(os.environ)
    out = _subproc.run([sys.executable, "-c", code], env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_info_reports_every_backend():
    info = pyencoder.backend_info()
    assert set(info) == {"reference", "triton", "cuda"}
    assert info["reference"] == (True, None)
    for name, (ok, reason) in info.items():
        assert ok or (isinstance(reason, str) and reason)


def test_cli_info_runs():
    out = _subproc.run([sys.executable, "-m", "pyencoder", "info"])
    assert out.returncode == 0, out.stderr
    for name in ("reference", "triton", "cuda"):
        assert name in out.stdout
    assert "decode_attention  triton, reference" in out.stdout
    assert "conv              cuda, triton, reference" in out.stdout


def test_cpu_auto_is_reference():
    assert _backend.select("attention", "forward", "cpu", {}, None) == "reference"
    assert _backend.select("conv", "forward", "cpu", {}, None) == "reference"


def test_precedence_call_context_env(monkeypatch):
    monkeypatch.setenv("PYENCODER_BACKEND", "cuda")
    assert _backend.requested_backend("attention") == "cuda"
    with pyencoder.use_backend("reference"):
        assert _backend.requested_backend("attention") == "reference"
        with pyencoder.use_backend(conv="auto"):
            assert _backend.requested_backend("conv") == "auto"
            assert _backend.requested_backend("attention") == "reference"
        assert _backend.requested_backend("conv") == "reference"
        assert _backend.requested_backend("attention", "triton") == "triton"
    assert _backend.requested_backend("attention") == "cuda"
    monkeypatch.delenv("PYENCODER_BACKEND")
    assert _backend.requested_backend("attention") is None


def test_env_backend_is_validated(monkeypatch):
    monkeypatch.setenv("PYENCODER_BACKEND", "fastest")
    with pytest.raises(ValueError, match="PYENCODER_BACKEND must be one of"):
        banded_attention(*(torch.randn(1, 1, 4, 4) for _ in range(3)), left=1, right=0)


def test_use_backend_rejects_unknown():
    with pytest.raises(ValueError, match="unknown op family"):
        with pyencoder.use_backend(mlp="triton"):
            pass
    with pytest.raises(ValueError, match="must be one of"):
        with pyencoder.use_backend("tpu"):
            pass


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error path")
def test_forced_cuda_backend_on_cpu_raises_with_reason():
    x = torch.randn(1, 4, 10)
    w = torch.randn(4, 1, 3)
    with pytest.raises(RuntimeError, match=r"backend 'cuda' cannot run conv.forward here: .+"):
        causal_conv1d(x, w, groups=4, backend="cuda")
    q = torch.randn(1, 1, 4, 4)
    with pytest.raises(RuntimeError, match=r"backend 'cuda' cannot run attention.forward"):
        banded_attention(q, q, q, left=1, right=0, backend="cuda")


def test_forced_reference_runs_everywhere():
    q = torch.randn(1, 2, 6, 4)
    with pyencoder.use_backend("reference"):
        out = banded_attention(q, q, q, left=1, right=1)
    assert out.shape == q.shape


# ---- one registry for every op family (issue 14 item 2) -----------------------------------------

def test_every_family_registered_with_plain_imports():
    """Each family's backends are modules its ops file imported (no import-by-string): the
    reference from pyencoder.reference, the launchers from pyencoder.ops."""
    import pyencoder.ops  # noqa: F401
    assert set(_backend.FAMILIES) == {"attention", "decode_attention", "conv", "convnext"}
    for fam in _backend.FAMILIES:
        assert "reference" in _backend.implemented_backends(fam), fam
        for b in _backend.implemented_backends(fam):
            mod, why = _backend.impl_module(fam, b)
            assert why is None
            want = "pyencoder.reference." if b == "reference" else "pyencoder.ops._"
            assert mod.__name__.startswith(want), (fam, b, mod.__name__)
            assert callable(mod.forward) and callable(mod.supports_forward)
    assert _backend.implemented_backends("convnext") == ("reference", "triton")
    assert not hasattr(_backend, "importlib")


def _needs_triton():
    from conftest import has_triton
    if not has_triton() or not (torch.cuda.is_available()
                                or os.environ.get("TRITON_INTERPRET") == "1"):
        pytest.skip("needs triton (a GPU, or TRITON_INTERPRET=1)")


def _count(monkeypatch, mod):
    calls = []
    fwd = mod.forward

    def counted(*a):
        calls.append(1)
        return fwd(*a)
    monkeypatch.setattr(mod, "forward", counted)
    return calls


def _decode_args(dtype=torch.float32):
    B, H, M, D, cap = 2, 2, 3, 16, 11
    q = torch.randn(B, H, M, D, dtype=dtype)
    k, v = torch.randn(2, B, H, cap, D, dtype=dtype)
    n = torch.tensor([4, 2 * cap + 3])
    qpos = (n - 2)[:, None] + torch.arange(M)
    return (q, k, v, qpos, torch.tensor([M, 2]), n, pyencoder.Rope(8).inv_freq(q.device), False,
            1, 5, 1, D ** -0.5)


def test_use_backend_and_env_select_decode_attention(monkeypatch):
    """Before: decode attention had its own choice and ignored use_backend / PYENCODER_BACKEND."""
    _needs_triton()
    from pyencoder.ops import _decode_attention_triton as DT
    from pyencoder.ops.decode_attention import decode_attention
    from pyencoder.reference import decode_attention as DR
    tri, ref = _count(monkeypatch, DT), _count(monkeypatch, DR)
    args = _decode_args()
    expect = DR.decode_attention_reference(*args)
    torch.testing.assert_close(decode_attention(*args), expect, rtol=0, atol=0)   # auto on CPU
    assert (len(ref), len(tri)) == (1, 0)
    with pyencoder.use_backend(decode_attention="triton"):
        out = decode_attention(*args)
        with pyencoder.use_backend("reference"):
            decode_attention(*args)
    assert (len(ref), len(tri)) == (2, 1)
    torch.testing.assert_close(out, expect, rtol=1e-5, atol=2e-6)   # fp32: summation order
    monkeypatch.setenv("PYENCODER_BACKEND", "triton")
    decode_attention(*args)
    assert (len(ref), len(tri)) == (2, 2)
    with pyencoder.use_backend(decode_attention="reference"):
        decode_attention(*args)
    assert (len(ref), len(tri)) == (3, 2)
    assert _backend.select("decode_attention", "forward", "cpu",
                           dict(q=args[0], k_ring=args[1])) == "triton"


def test_use_backend_reaches_the_streaming_decode(monkeypatch):
    """A module's streaming step follows use_backend(decode_attention=...) too."""
    _needs_triton()
    from _stream_utils import rel_err, stream
    from pyencoder.nn import BandedSelfAttention
    from pyencoder.ops import _decode_attention_triton as DT
    tri = _count(monkeypatch, DT)
    m = BandedSelfAttention(16, 2, left=5, right=2)
    x = torch.randn(2, 13, 16)
    with torch.no_grad(), pyencoder.use_backend(decode_attention="triton"):
        assert rel_err(stream(m, x, [3, 1, 5], 1, max_chunk=4), m(x)) <= 1e-5
    assert tri


def test_use_backend_and_env_select_convnext(monkeypatch):
    """Before: convnext_dwconv_ln had a third selection mechanism (use_backend(convnext=...) was
    an unknown family)."""
    _needs_triton()
    from pyencoder.ops import _convnext_triton as CT
    from pyencoder.ops import convnext_dwconv_ln
    from pyencoder.reference import convnext as CR
    tri, ref = _count(monkeypatch, CT), _count(monkeypatch, CR)
    x, w, s = torch.randn(2, 6, 5), torch.randn(6, 1, 4), torch.randn(2, 6, 3)
    y0, f0 = convnext_dwconv_ln(x, w, initial_state=s, return_final_state=True)
    assert (len(ref), len(tri)) == (1, 0)
    with pyencoder.use_backend(convnext="triton"):
        y1, f1 = convnext_dwconv_ln(x, w, initial_state=s, return_final_state=True)
    assert (len(ref), len(tri)) == (1, 1)
    torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(f1, f0, rtol=0, atol=0)
    monkeypatch.setenv("PYENCODER_BACKEND", "triton")
    convnext_dwconv_ln(x, w)
    assert (len(ref), len(tri)) == (1, 2)
    with pyencoder.use_backend(convnext="reference"):
        convnext_dwconv_ln(x, w)
    assert (len(ref), len(tri)) == (2, 2)


def test_forced_backend_without_implementation_names_the_family():
    q = torch.randn(1, 1, 2, 4)
    with pytest.raises(ValueError, match=r"backend 'cuda' cannot run decode_attention.forward "
                                         r"here: there is no cuda implementation"):
        from pyencoder.ops.decode_attention import decode_attention
        decode_attention(q, q, q, torch.zeros(1, 2, dtype=torch.long), torch.tensor([2]),
                         torch.tensor([2]), None, False, 1, 1, 0, 0.5, backend="cuda")
    with pytest.raises(RuntimeError, match=r"implemented: \('reference', 'triton'\)"):
        with pyencoder.use_backend(convnext="cuda"):
            pyencoder.ops.convnext_dwconv_ln(torch.randn(1, 4, 3), torch.randn(4, 1, 2))


def test_blank_backend_env_is_unset_like_every_switch(monkeypatch):
    """PYENCODER_BACKEND=" " was refused (naming '' and "or None") where every other switch takes
    a blank value for unset; a wrong value is named as given."""
    from pyencoder._backend import requested_backend
    monkeypatch.setenv("PYENCODER_BACKEND", "  ")
    assert requested_backend("attention") is None
    monkeypatch.setenv("PYENCODER_BACKEND", " Reference ")
    assert requested_backend("attention") == "reference"
    monkeypatch.setenv("PYENCODER_BACKEND", "trtion")
    with pytest.raises(ValueError, match=r"PYENCODER_BACKEND must be one of .* \(or unset\); "
                                         r"got 'trtion'"):
        requested_backend("attention")


def test_convnext_backward_recomputes_on_the_forwards_conv_backend(monkeypatch):
    """convnext_dwconv_ln's backward recomputes its conv; the conv backend was chosen at backward
    time, from whatever block the backward ran in: a backend="reference" forward failed in a
    use_backend(conv="cuda") backward, a forward in use_backend("reference") failed with
    PYENCODER_BACKEND=triton outside it. It is the forward's call's choice now."""
    from pyencoder.ops import convnext_dwconv_ln
    torch.manual_seed(3)
    x = torch.randn(1, 4, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 1, 3, dtype=torch.float64, requires_grad=True)
    g = torch.randn(1, 6, 4, dtype=torch.float64)
    want = torch.autograd.grad((convnext_dwconv_ln(x, w) * g).sum(), (x, w))
    y = convnext_dwconv_ln(x, w, backend="reference")
    with pyencoder.use_backend(conv="cuda"):
        got = torch.autograd.grad((y * g).sum(), (x, w))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pyencoder.use_backend("reference"):
        y = convnext_dwconv_ln(x, w)
    monkeypatch.setenv("PYENCODER_BACKEND", "triton")
    got = torch.autograd.grad((y * g).sum(), (x, w))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # the environment forcing triton at the forward too: a reference forward still recomputes
    # on the reference conv (float64, which triton cannot run)
    y = convnext_dwconv_ln(x, w, backend="reference")
    got = torch.autograd.grad((y * g).sum(), (x, w))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
