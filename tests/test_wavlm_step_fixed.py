"""WavLMSelfAttention.step_fixed (the CUDA-graph step with the gated relative bias in the ring
decode) and the WavLM stacks built on it.

CPU: after a warm-up with the general step over a random chunking, step_fixed sequences equal the
pure general step (the dispatch to step_fixed switched off: the plain-torch path of before, and
the op path) and the offline forward, band and chunked masks, gated and not, RoPE on and off, a
later layer reading layer 0's table; the state keeps its data pointers; no host synchronisation
(tests/test_streaming_fixed.NoHostSync); the general step dispatches to step_fixed in the steady
state; a CausalEncoder WavLM variant streamed with ``layers.step_fixed`` equals offline; the
window's bucket indices are built once per device and in-place table edits are seen; the Triton
decode path (interpreter) streams a WavLM module equal to offline.
GPU (marked): step_fixed captured in a torch.cuda.CUDAGraph and replayed equals the eager step,
for a module and a CausalEncoder WavLM layer stack.

Tolerances. float64: streamed and offline rows run the same float64 math up to the summation
order of the dot products and softmax sums, ~1e-15 relative; 1e-10 (tests/test_models_wavlm.py's
bound) is far below any mask / bias / gate error (O(1e-2) with these perturbed weights). float32:
DESIGN.md's streaming contract, 1e-5 relative.
"""
import random

import pytest
import torch

from _stream_utils import rel_err
from test_streaming_fixed import NoHostSync, _capture, _clone_state, _general_only
from pyencoder.models import CausalEncoder
from pyencoder.nn import WavLMSelfAttention, relpos
from test_models_wavlm import tiny_wavlm_config

F64_TOL = 1e-10
F32_TOL = 1e-5

CASES = {
    # name: (module kwargs, step length n, max_chunk)
    "band_r2_gated_rope": (dict(left=5, right=2, rope=True), 1, 4),
    "band_r0_ungated": (dict(left=7, right=0, gated=False), 3, 3),
    "band_r3_n2": (dict(left=9, right=3), 2, 5),
    "chunk4_la1": (dict(chunk_size=4, left_chunks=1, lookahead=1), 4, 4),
    "chunk3_la2_n6_rope": (dict(chunk_size=3, left_chunks=2, lookahead=2, rope=True), 6, 6),
    "chunk2_la0_ungated": (dict(chunk_size=2, left_chunks=3, lookahead=0, gated=False), 2, 3),
}


def _module(kw, dtype=torch.float64, shared=False):
    att = WavLMSelfAttention(16, 2, num_buckets=12, max_distance=20, **kw)
    if shared:   # a later layer: reads layer 0's table by reference
        owner = WavLMSelfAttention(16, 2, num_buckets=12, max_distance=20, **kw)
        att = WavLMSelfAttention(16, 2, num_buckets=12, max_distance=20, has_relative_bias=False,
                                 rel_attn_embed=owner.rel_attn_embed, **kw)
        att._owner = [owner]
        params = list(att.parameters()) + list(owner.parameters())
    else:
        params = list(att.parameters())
    with torch.no_grad():
        for p in params:
            p.add_(0.3 * torch.randn_like(p))
    if shared:
        owner.to(dtype)
    return att.to(dtype).eval()


def _warm_sizes(m, phase):
    """A random chunking long enough to reach the steady state at a given phase of the block."""
    warm = [random.randint(1, 5) for _ in range(random.randint(1, 4))]
    La = m.lookahead_frames
    while sum(warm) < La or (sum(warm) - La) % m.block != phase % m.block:
        warm.append(1)
    return warm


def _stream(m, x, warm, n, max_chunk, fixed):
    """Warm-up steps, then steps of n frames (step_fixed if ``fixed``, else the pure general
    step); the concatenated outputs and the state."""
    B, T = x.shape[:2]
    st = m.init_state(B, max_chunk=max_chunk)
    outs, t = [], 0
    for s in warm:
        y, st = m.step(x[:, t:t + s], st)
        outs.append(y[:, :int(st.out_lengths[0])])
        t += s
    if fixed:
        m.check_step_fixed(st, n)
        ptrs = {k: v.data_ptr() for k, v in st.tensors().items()}
    while t + n <= T:
        if fixed:
            outs.append(m.step_fixed(x[:, t:t + n], st))
            assert int(st.out_lengths.min()) == n == int(st.out_lengths.max())
        else:
            y, st = m.step(x[:, t:t + n], st)
            outs.append(y[:, :int(st.out_lengths[0])])
        t += n
    if fixed:
        assert {k: v.data_ptr() for k, v in st.tensors().items()} == ptrs
    return torch.cat(outs, 1), st


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("phase", [0, 1])
def test_step_fixed_equals_step_and_offline(name, dtype, phase):
    kw, n, mc = CASES[name]
    m = _module(kw, dtype, shared=phase == 1)
    x = torch.randn(2, 37, 16, dtype=dtype)
    warm = _warm_sizes(m, phase)
    tol = F64_TOL if dtype == torch.float64 else F32_TOL
    with torch.no_grad():
        ref = m(x)
        fixed, st = _stream(m, x, warm, n, mc, fixed=True)
        with _general_only():
            general, st2 = _stream(m, x, warm, n, mc, fixed=False)
    assert fixed.shape[1] == general.shape[1] > 0
    assert rel_err(fixed, general) <= tol
    assert rel_err(fixed, ref[:, :fixed.shape[1]]) <= tol
    for key in ("pos", "pending"):
        assert torch.equal(getattr(st, key), getattr(st2, key)), key
    for b in range(2):     # the queued queries and gates (past them: stale entries, never read)
        p = int(st.pending[b])
        assert torch.equal(st.gate[b, :, :p], st2.gate[b, :, :p])
        assert torch.equal(st.q[b, :, :p], st2.q[b, :, :p])
