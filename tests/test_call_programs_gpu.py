"""Call programs on a GPU (pyencoder.ops._attention_triton: a repeated eager attention call
replays its launches). tests/test_fast_launch.py checks every launch of a replay against the path
on the CPU with stand-in compiled kernels; here the real kernels: a repeated call must give
bit-identical outputs and gradients to its first call and to PYENCODER_FAST_LAUNCH=0 (no plans,
no programs), and the programs must actually serve the repeats. Shapes and masks are those the
fast tier already compiles (tests/test_attention_triton.py's bf16 band(250,3) and
chunked(4,128,3) grid cases, tests/test_attention_sink_bias.py's bf16 sink + bias case), so the
tier needs no new compile."""
import pytest
import torch

import pyencoder
from pyencoder import IntervalMask
from pyencoder.ops.attention import relative_offsets

pytestmark = [pytest.mark.gpu, pytest.mark.gpu_quick]

B, HQ, HK, N, D = 2, 4, 2, 1000, 64


def _case(kind, seed=0):
    torch.manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, device="cuda").to(torch.bfloat16)
    q, k, v = r(B, HQ, N, D), r(B, HK, N, D), r(B, HK, N, D)
    dout = r(B, HQ, N, D)
    kw = dict(rope=pyencoder.Rope(D), backend="triton")
    tensors = [q, k, v]
    if kind == "band":
        kw.update(mask=IntervalMask.band(250, 3),
                  key_lengths=torch.tensor([N, 613], dtype=torch.int32, device="cuda"))
    elif kind == "chunked":          # the prerotate RoPE mode (window bucket 1024)
        kw.update(mask=IntervalMask.chunked(4, 128, 3),
                  key_lengths=torch.tensor([N, 613], dtype=torch.int32, device="cuda"))
    else:                            # sink keys + gated bias, offsets
        mask = IntervalMask.band(250, 3, sink=4)
        r_min, r_max = relative_offsets(N, N, block=1, lo_off=250, hi_off=3, q_offset=5,
                                        k_offset=3)
        rel = r(HQ, r_max - r_min + 1)
        gate = (torch.rand(B, HQ, N, device="cuda") * 2).to(torch.bfloat16)
        tensors += [rel, gate]
        kw.update(mask=mask, key_lengths=torch.tensor([N, 613], device="cuda"), q_offset=5,
                  k_offset=3, rel_offset=r_min)
    return tensors, dout, kw


def _run(tensors, dout, kw):
    leaves = [t.clone().requires_grad_(True) for t in tensors]
    extra = {}
    if len(leaves) == 5:
        extra = dict(rel_bias=leaves[3], gate=leaves[4])
    out = pyencoder.ops.interval_attention(*leaves[:3], **kw, **extra)
    return (out.detach(),) + torch.autograd.grad(out, leaves, dout)


@pytest.mark.parametrize("kind", ["band", "chunked", "sink_bias"])
def test_gpu_repeated_calls_replay_bitwise(monkeypatch, kind):
    from pyencoder.ops import _attention_triton as A
    served = []
    for cls in (A._FwdProgram, A._BwdProgram):
        real = cls.run

        def counted(self, *args, _real=real):
            res = _real(self, *args)
            served.append(res is not None)
            return res
        monkeypatch.setattr(cls, "run", counted)
    tensors, dout, kw = _case(kind)
    monkeypatch.setenv("PYENCODER_FAST_LAUNCH", "0")
    want = _run(tensors, dout, kw)
    monkeypatch.setenv("PYENCODER_FAST_LAUNCH", "1")
    runs = [_run(tensors, dout, kw) for _ in range(3)]
    torch.cuda.synchronize()
    assert sum(served) >= 4, f"call programs served {sum(served)} of the repeats' 4+ calls"
    names = ("out", "dq", "dk", "dv", "drel", "dgate")
    for got in runs:
        for name, a, b in zip(names, got, want):
            if name in ("drel", "dgate"):     # float32 atomics: the summation order varies
                torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)
            else:
                assert torch.equal(a, b), f"{kind}: {name} differs from the path's"
    # a program must use the call's own tensors: other inputs, other results
    tensors2, dout2, _ = _case(kind, seed=1)
    other = _run(tensors2, dout2, kw)
    assert not torch.equal(other[0], want[0])
    monkeypatch.setenv("PYENCODER_FAST_LAUNCH", "0")
    other_path = _run(tensors2, dout2, kw)
    for name, a, b in zip(names[:4], other, other_path):
        assert torch.equal(a, b), f"{kind}: {name} (second inputs) differs from the path's"
