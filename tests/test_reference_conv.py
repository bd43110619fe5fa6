"""Reference causal conv vs an independent loop oracle; state round trips; update step;
strided streaming with leftover samples; gradcheck; opcheck; compile."""
import random

import pytest
import torch

from pyencoder.ops import causal_conv1d, causal_conv1d_update

from oracle import naive_causal_conv

CASES = [  # (C_in, C_out, groups, k, stride)
    (6, 6, 6, 1, 1), (6, 6, 6, 4, 1), (5, 5, 5, 7, 1), (4, 4, 4, 31, 1), (8, 8, 2, 9, 1),
    (8, 4, 4, 3, 1), (3, 6, 1, 10, 5), (6, 6, 1, 3, 2), (4, 4, 2, 2, 2), (6, 6, 3, 4, 3),
    # grouped, wide: few output frames take the CPU's batched-product path (_grouped_matmul),
    # many take F.conv1d (both in one parametrisation: L is drawn per test)
    (16, 16, 2, 16, 1), (24, 12, 3, 17, 2), (32, 32, 4, 20, 1),
]


@pytest.mark.parametrize("C,Co,G,k,s", CASES)
@pytest.mark.parametrize("activation", [None, "silu", "gelu"])
def test_forward_and_backward_vs_oracle(C, Co, G, k, s, activation):
    L = random.choice([1, k - 1 if k > 1 else 1, 2 * k + 3, 37])
    B = 2
    x = torch.randn(B, C, L, dtype=torch.float64, requires_grad=True)
    w = torch.randn(Co, C // G, k, dtype=torch.float64, requires_grad=True)
    b = torch.randn(Co, dtype=torch.float64, requires_grad=True)
    init = torch.randn(B, C, k - s, dtype=torch.float64, requires_grad=True)
    y, fin = causal_conv1d(x, w, b, stride=s, groups=G, activation=activation,
                           initial_state=init, return_final_state=True)
    ref, xp = naive_causal_conv(x, w, b, s, G, activation, init)
    T = L // s
    assert y.shape == (B, Co, T) and fin.shape == (B, C, k - s)
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(fin, xp[..., T * s: T * s + k - s], rtol=0, atol=0)
    gy, gf = torch.randn_like(y), torch.randn_like(fin)
    got = torch.autograd.grad((y, fin), (x, w, b, init), (gy, gf), allow_unused=True)
    exp = torch.autograd.grad((ref, xp[..., T * s: T * s + k - s]), (x, w, b, init), (gy, gf),
                              allow_unused=True)
    for a, e in zip(got, exp):
        e = torch.zeros_like(a) if e is None else e
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 2e-3),
                                       (torch.bfloat16, 1.6e-2)])
def test_low_precision(dtype, tol):
    # computed in float32, rounded once: error is half an ulp of dtype plus fp32 accumulation
    x = torch.randn(2, 16, 50)
    w = torch.randn(16, 1, 7) / 3
    y = causal_conv1d(x.to(dtype), w.to(dtype), groups=16, activation="silu")
    ref, _ = naive_causal_conv(x.to(dtype), w.to(dtype), None, 1, 16, "silu")
    assert y.dtype == dtype
    torch.testing.assert_close(y.double(), ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("C,Co,G,k,s", CASES)
def test_chunked_state_round_trip(C, Co, G, k, s):
    """Feeding random chunks with the final state (re-feeding leftover samples when a chunk is not
    a multiple of the stride) equals the one-shot forward."""
    L = 61
    x = torch.randn(2, C, L)
    w = torch.randn(Co, C // G, k)
    b = torch.randn(Co)
    full = causal_conv1d(x, w, b, stride=s, groups=G, activation="gelu")
    state = torch.zeros(2, C, k - s)
    pending = x[..., :0]
    outs = []
    pos = 0
    while pos < L:
        n = random.randint(1, 9)
        chunk = torch.cat((pending, x[..., pos:pos + n]), dim=-1)
        pos += n
        y, state = causal_conv1d(chunk, w, b, stride=s, groups=G, activation="gelu",
                                 initial_state=state, return_final_state=True)
        used = (chunk.shape[-1] // s) * s
        pending = chunk[..., used:]
        outs.append(y)
    torch.testing.assert_close(torch.cat(outs, -1), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("C,Co,G,k", [(6, 6, 6, 4), (8, 8, 2, 5), (4, 4, 4, 1), (4, 8, 1, 3),
                                      (16, 16, 2, 16)])
def test_update_sequence_equals_offline(C, Co, G, k):
    L = 30
    x = torch.randn(3, C, L)
    w = torch.randn(Co, C // G, k)
    b = torch.randn(Co)
    full = causal_conv1d(x, w, b, groups=G, activation="silu")
    state = torch.zeros(3, C, k - 1)
    outs, pos = [], 0
    while pos < L:
        n = random.randint(1, 4)
        outs.append(causal_conv1d_update(x[..., pos:pos + n], state, w, b, groups=G,
                                         activation="silu"))
        pos += n
    torch.testing.assert_close(torch.cat(outs, -1), full, rtol=1e-5, atol=1e-5)


def test_few_frame_grouped_path_is_taken_and_matches_the_oracle(monkeypatch):
    """The batched-product path (grouped, k >= 16, >= 8 channels a group, B * T <= 32 on CPU;
    wav2vec2's positional conv in a streaming step) is the one these calls run: counted, and
    compared with the float64 loop oracle (float64 and float32 inputs, stride, initial state,
    bias, activation). Depthwise, narrow, and many-frame calls keep F.conv1d."""
    from pyencoder.reference import conv as rc
    real, calls = rc._grouped_matmul, []
    monkeypatch.setattr(rc, "_grouped_matmul", lambda *a: calls.append(a[-1]) or real(*a))
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 2e-5)):
        for B, C, Co, G, k, s, L in ((1, 48, 48, 3, 40, 1, 4), (3, 16, 24, 2, 16, 2, 9),
                                     (2, 64, 32, 4, 33, 3, 14)):
            x = torch.randn(B, C, L, dtype=torch.float64)
            w = torch.randn(Co, C // G, k, dtype=torch.float64) / k ** 0.5
            b = torch.randn(Co, dtype=torch.float64)
            init = torch.randn(B, C, k - s, dtype=torch.float64)
            n = len(calls)
            y = causal_conv1d(x.to(dtype), w.to(dtype), b.to(dtype), stride=s, groups=G,
                              activation="gelu", initial_state=init.to(dtype))
            assert len(calls) == n + 1 and y.dtype == dtype and y.is_contiguous()
            ref, _ = naive_causal_conv(x.to(dtype).double(), w.to(dtype).double(),
                                       b.to(dtype).double(), s, G, "gelu",
                                       init.to(dtype).double())
            torch.testing.assert_close(y.double(), ref, rtol=tol, atol=tol)
    n = len(calls)
    causal_conv1d(torch.randn(1, 16, 4), torch.randn(16, 1, 64), groups=16)      # depthwise
    causal_conv1d(torch.randn(1, 16, 4), torch.randn(16, 8, 7), groups=2)        # narrow
    causal_conv1d(torch.randn(1, 16, 40), torch.randn(16, 8, 16), groups=2)      # 40 frames
    assert len(calls) == n


def test_update_with_state_indices_and_padding_slots():
    C, k, S = 4, 5, 6
    w = torch.randn(C, 1, k)
    pool = torch.randn(S, C, k - 1)
    before = pool.clone()
    idx = torch.tensor([3, -1, 0])
    x = torch.randn(3, C, 2)
    y = causal_conv1d_update(x, pool, w, groups=C, state_indices=idx)
    assert (y[1] == 0).all()
    for row, slot in ((0, 3), (2, 0)):
        exp, fin = causal_conv1d(x[row:row + 1], w, groups=C, initial_state=before[slot:slot + 1],
                                 return_final_state=True)
        torch.testing.assert_close(y[row:row + 1], exp)
        torch.testing.assert_close(pool[slot:slot + 1], fin)
    for slot in (1, 2, 4, 5):
        assert torch.equal(pool[slot], before[slot])


def test_gradcheck():
    x = torch.randn(2, 4, 13, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 2, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    s0 = torch.randn(2, 4, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, w, b, s0: causal_conv1d(x, w, b, stride=2, groups=2, activation="silu",
                                          initial_state=s0, return_final_state=True),
        (x, w, b, s0))


def test_opcheck():
    x = torch.randn(2, 4, 13, requires_grad=True)
    w = torch.randn(4, 1, 5, requires_grad=True)
    b = torch.randn(4, requires_grad=True)
    s0 = torch.randn(2, 4, 4, requires_grad=True)
    torch.library.opcheck(torch.ops.pyencoder.causal_conv1d.default,
                          (x, w, b, s0, 1, 4, "silu", "reference"))
    torch.library.opcheck(torch.ops.pyencoder.causal_conv1d.default,
                          (x, torch.randn(4, 2, 6, requires_grad=True), None, None, 3, 2, "",
                           "reference"))
    st = torch.randn(2, 4, 4)
    torch.library.opcheck(torch.ops.pyencoder.causal_conv1d_update.default,
                          (torch.randn(2, 4, 2), st, w.detach(), None, None, 4, "gelu",
                           "reference"))


def test_torch_compile_fullgraph():
    w = torch.randn(8, 1, 7)

    def f(x):
        return causal_conv1d(x, w, groups=8, activation="gelu")

    x = torch.randn(2, 8, 40)
    y = torch.compile(f, fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(y, f(x))
