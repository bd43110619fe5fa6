"""benchmarks/count_step_kernels.py (ops per step_fixed, counted on the CPU) and the per-state
helpers that keep the steady-state step short: fixed_index, fill_counter, shift_queue and the
packed q/k/v projection."""
import copy
import os
import sys

import pytest
import torch

import _subproc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from pyencoder.nn import BandedSelfAttention, ChunkedSelfAttention  # noqa: E402
from pyencoder.streaming.state import fill_counter, fixed_index, shift_queue  # noqa: E402
from conftest import has_triton  # noqa: E402

# the counts run the device path's Triton kernels in its interpreter
pytestmark = pytest.mark.skipif(not has_triton(), reason="triton is not installed")

TINY = dict(dim=16, heads=2, ffn=32, conv_dim=8)


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


@pytest.fixture(scope="module")
def counts():
    from benchmarks.count_step_kernels import count
    return {(m, p): count(m, p, layers=2, dims=TINY) for m in ("banded", "chunked")
            for p in ("cpu", "cuda-torch-ring", "cuda")}


def test_counter_counts_kernels_not_views():
    from benchmarks.count_step_kernels import _Counter
    stack = [("f", "F")]
    x = torch.randn(3, 4)
    with _Counter(stack) as c:
        y = x.reshape(12).view(4, 3).t().t()    # views only (x.t().reshape would copy)
        x = x.view(4, 3)
        z = (y + 1) * 2                          # two kernels
        z.add_(x[0])                             # one kernel (x[0] a view)
    assert sum(c.ops.values()) == 3, c.ops
    assert {name for (_, name) in c.ops} == {"add", "mul", "add_"}
    assert c.excluded and not c.syncs
    with _Counter(stack) as c:
        int(x.sum())                             # a host read is a sync
    assert sum(c.syncs.values()) == 1 and sum(c.ops.values()) == 1


def test_step_fixed_counts(counts):
    for (mask, path), r in counts.items():
        assert r["syncs"] == 0, (mask, path)
        assert r["total"] == sum(r["by_type"].values())
        assert len(r["per_layer"]) == 2 and all(v > 0 for v in r["per_layer"])
    for mask in ("banded", "chunked"):
        c, t, f = (counts[(mask, p)] for p in ("cpu", "cuda-torch-ring", "cuda"))
        assert f["total"] < t["total"] < c["total"]
        # the torch ring write: rope of the new keys and an index_put_ each for k, v and q
        assert "triton:_ring_write_kernel" not in t["ops"] and t["ops"]["index_put_"] >= 3 * 2
        # the fused path: one ring write and one decode launch per layer, no index_put_
        assert f["ops"]["triton:_ring_write_kernel"] == 2
        assert f["ops"]["triton:_decode_attention_fwd_kernel"] == 2
        att = "BandedSelfAttention" if mask == "banded" else "ChunkedSelfAttention"
        assert not any(k.startswith(att + ".index_put_") for k in f["by_type_op"])
        # q, k, v as one GEMM: 1 + out_proj + the FFN's first per layer, + the conv projection;
        # the FFN's second GEMM accumulates onto the residual kernel's sum (addmm_, in place:
        # no copy of the sum into a fresh output, no add)
        assert f["ops"]["addmm"] == 2 * 3 + 1 and f["ops"]["addmm_"] == 2
        # every module's stream counter (2 layers' pos, 7 convs' seen) in one foreach add at
        # the end of the stack's step, no add_ of its own
        assert f["ops"]["_foreach_add_"] == 1 and "add_" not in f["ops"], f["ops"]
        assert f["by_type_op"]["StreamingSequential._foreach_add_"] == 1
    # Ceilings of a (pre-LN) layer on the fused path: LayerNorm, q/k/v GEMM, ring write (with
    # the query positions and the key count), decode, out GEMM, the residual kernel (sum + the
    # output projection's bias + the second LayerNorm), two FFN GEMMs (the second accumulating
    # onto the sum), GELU (9). The banded layer 0 and every chunked layer hold frames back: the
    # ring write advances the query queue and the residual kernel the residual queue, so they
    # cost no more (the torch path: + index_put_ + 2 shift copies). Raising these means a step
    # got slower.
    # the feature extractor's dense strided convs as a CUDA build runs them (the cuda backend's
    # cuDNN route, its torch ops counted one by one): per conv a cat, the conv, the GELU and the
    # history copy; the history's tail goes in as a view (no copy: 4 fewer), the op's final state
    # is not made (an output-only call: 5 copies fewer), the seen counters join the stack's
    # foreach add
    for mask in ("banded", "chunked"):
        c = counts[(mask, "cuda")]["by_type_op"]
        assert c["CausalConv1d.convolution"] == 7 and c["CausalConv1d.cat"] == 7, c
        assert "CausalConv1d.pyencoder::causal_conv1d" not in c
        assert "CausalConv1d.clone" not in c and c["CausalConv1d.gelu"] == 7, c
        assert sum(v for k, v in c.items() if k.startswith("CausalConv1d.")) <= 28
    for mask in ("banded", "chunked"):
        assert max(counts[(mask, "cuda")]["per_layer"]) <= 9, mask
        f = counts[(mask, "cuda")]["ops"]
        assert f["triton:_residual_kernel"] == 2, mask
        assert "copy_" not in {k.split(".")[1] for k in counts[(mask, "cuda")]["by_type_op"]
                               if k.startswith(("TransformerLayer.", "BandedSelfAttention.",
                                                "ChunkedSelfAttention."))}, mask


def test_post_ln_layers_fuse_both_norms():
    """Post-LN layers (wav2vec2-base's) on the fused path: the residual kernel also takes the
    feed-forward's add + LayerNorm, so no LayerNorm or residual add is left in a layer: 9
    kernels (pre-LN: 9 too, its first LayerNorm in place of the second residual launch)."""
    from benchmarks.count_step_kernels import count
    for mask in ("banded", "chunked"):
        r = count(mask, "cuda", layers=2, dims=TINY, norm_first=False)
        assert r["per_layer"] == [9, 9], (mask, r["per_layer"])
        assert r["ops"]["triton:_residual_kernel"] == 4
        assert not any(k.startswith("TransformerLayer.") and k.endswith((".add", ".add_"))
                       for k in r["by_type_op"]), r["by_type_op"]


def test_encoder_step_counts():
    """The converted wav2vec2-base CausalEncoder's whole step_fixed (count_step_kernels
    --model encoder) on the cuda path: no host sync, one foreach add for every counter (convs'
    seen, the running norm's count, layers' pos), the layers as the stack's post-LN layers (9
    each), the feature convs as the stack's (<= 4 each: cat, conv, GELU, history copy; the last
    two hold one more sample than k - stride, so they take the cat path with no cat in the
    op), the running GroupNorm in one launch, and no out_lengths fill (every counter holds the
    step's frame count)."""
    from benchmarks.count_step_kernels import count
    for mask in ("banded", "chunked"):
        r = count(mask, "cuda", layers=2, dims=TINY, norm_first=False, model="encoder")
        assert r["syncs"] == 0 and r["per_layer"] == [9, 9], (mask, r["per_layer"])
        assert r["ops"]["_foreach_add_"] == 1 and "add_" not in r["ops"], r["ops"]
        assert "fill_" not in r["ops"], r["ops"]
        c = r["by_type_op"]
        assert c["FeatureConv1d.convolution"] == 7 and c["FeatureConv1d.copy_"] == 7, c
        assert sum(v for k, v in c.items() if k.startswith("FeatureConv1d.")) <= 28, c
        # the running GroupNorm's step and its GELU: one Triton launch (torch: 25 float64 ops
        # and the GELU)
        assert c["RunningGroupNorm.triton:_running_norm_step_kernel"] == 1, c
        assert sum(v for k, v in c.items() if k.startswith("RunningGroupNorm.")) == 1, c
        assert c.get("GELU.gelu", 0) == 2, c           # the two feed-forwards' only
        # post-LN: the positional embedding's add and the LayerNorm after it, one launch; the
        # feature projection's LayerNorm: torch's at one frame a step (a contiguous view), the
        # channel kernel on the transposed features at four
        assert c["CausalEncoder.triton:_residual_kernel"] == 1, c
        assert "CausalEncoder.add" not in c, c
        assert c.get("LayerNorm.native_layer_norm", 0) == (mask == "banded"), c
        assert c.get("FeatureProjection.triton:_channel_norm_act_kernel", 0) == (
            mask == "chunked"), c
        assert r["total"] - sum(r["per_layer"]) <= 37, r["total"]


def test_encoder_with_conv_adapter_counts():
    """count_step_kernels --model encoder --adapter N: the encoder's fixed step plus, per adapter
    layer, 7 kernels (cat, the slots' phase: remainder + row index, the window gather, the conv,
    the history copy, the GLU); no host read, no fill; steps of whole adapter strides."""
    from benchmarks.count_step_kernels import count
    base = count("chunked", "cuda", layers=2, dims=TINY, norm_first=False, model="encoder")
    r = count("chunked", "cuda", layers=2, dims=TINY, norm_first=False, model="encoder",
              adapter=3)
    assert r["step_frames"] == 8 and base["step_frames"] == 4
    assert r["syncs"] == 0 and "fill_" not in r["ops"], r["ops"]
    c = r["by_type_op"]
    ad = {k: v for k, v in c.items() if k.startswith(("PaddedConv1d.", "ConvAdapter"))}
    assert ad == {f"PaddedConv1d.{op}": 3 for op in ("cat", "remainder", "index", "gather",
                                                      "convolution", "copy_")} | {
        "ConvAdapterLayer.glu": 3}, ad
    assert r["ops"]["_foreach_add_"] == 1, r["ops"]
    with pytest.raises(ValueError, match="adapter is the encoder's option"):
        count("chunked", "cuda", layers=2, dims=TINY, model="stack", adapter=1)


def test_decoder_step_counts():
    """count_step_kernels --model decoder (FocalCodec-Stream's ConvNeXt decoder, 4-frame
    steps): no host read, no fill; each ConvNeXt block 8 kernels (the depthwise conv's cat,
    launch and history copy, its output normalised as it lies in one launch, two GEMMs, the
    GELU, x + gamma * h in one addcmul), the embed conv's LayerNorm in one launch too; the
    general step dispatches to it (+ the counter copy)."""
    from benchmarks.count_step_kernels import count
    r = count("banded", "cuda", dims=TINY, model="decoder")
    assert r["syncs"] == 0 and "fill_" not in r["ops"], r["ops"]
    c = r["by_type_op"]
    assert c["ConvNeXtBlock.addcmul"] == 8 and "ConvNeXtBlock.mul" not in c, c
    assert c["ConvNeXtBlock.triton:_channel_norm_act_kernel"] == 8, c
    assert c["LayerNorm.triton:_channel_norm_act_kernel"] == 1, c
    assert c["LayerNorm.native_layer_norm"] == 1, c                  # the last one, contiguous
    assert not any("copy (inside" in k for k in c), c
    assert r["total"] == 8 * 8 + 7, r["total"]
    g = count("banded", "cuda", dims=TINY, model="decoder", call="step")
    assert g["syncs"] == 0 and g["total"] == r["total"] + 1, (g["total"], g["syncs"])


def test_adapter_phase_rows_under_graph_capture(monkeypatch):
    """The adapter conv's phase table: kept per (L, device); built but not kept during capture."""
    import pyencoder.streaming.state as S
    from pyencoder.models.adapter import PaddedConv1d
    conv = PaddedConv1d(2, 2, 3, 2, 1)
    cpu = torch.device("cpu")
    monkeypatch.setattr(S, "_capturing", lambda device: True)
    a = conv._phase_rows(5, cpu)
    assert conv.__dict__["_phase_cache"] == {}
    monkeypatch.setattr(S, "_capturing", lambda device: False)
    b = conv._phase_rows(5, cpu)
    assert conv._phase_rows(5, cpu) is b and torch.equal(a, b)
    # seen % 2 == 0: held 1 (k - s), the window starts at k - 1 - 1 = 1; odd: held 2, at 0
    assert b.tolist() == [[1, 2, 3, 4, 5], [0, 1, 2, 3, 4]]


def test_layer_extractor_encoder_counts(monkeypatch):
    """A "layer" extractor (the large models'): each conv layer's LayerNorm over channels and
    GELU are one Triton launch (torch: the LayerNorm's hidden contiguous copy of the transposed
    conv output, the norm, the GELU), and the feature projection's LayerNorm reads the
    transposed features as they lie: no copy inside a LayerNorm anywhere in the step; with the
    kernel off, the GELU and the copy per conv layer more."""
    from benchmarks.count_step_kernels import count
    from pyencoder.ops import _channel_norm_triton as CN
    for mask in ("banded", "chunked"):
        r = count(mask, "cuda", layers=2, dims=TINY, norm_first=False, model="encoder",
                  extractor="layer")
        c = r["by_type_op"]
        assert c["ConvFeatureExtractor.triton:_channel_norm_act_kernel"] == 7, c
        # (at one frame a step the transposed view is contiguous: torch's LayerNorm, no copy)
        assert c.get("FeatureProjection.triton:_channel_norm_act_kernel", 0) == (
            mask == "chunked"), c
        assert not any("inside" in k for k in c), c
        with monkeypatch.context() as mp:
            mp.setattr(CN, "fused_ok", lambda *a: False)
            r0 = count(mask, "cuda", layers=2, dims=TINY, norm_first=False, model="encoder",
                       extractor="layer")
        c0 = r0["by_type_op"]
        # a copy per conv layer whose step has more than one frame (banded: the last has one)
        copies = c0["ChannelLayerNorm.copy (inside native_layer_norm)"]
        assert copies == (7 if mask == "chunked" else 6), c0
        # per conv layer the GELU and the copy (the projection's LayerNorm then reads the last
        # GELU's output, which keeps the LayerNorm's (B, T, C) layout: no copy there)
        assert r0["total"] - r["total"] == 7 + copies, (r0["total"], r["total"])


def test_hidden_layer_norm_copy_counted():
    """A LayerNorm over a non-contiguous input counts the copy CUDA makes inside the op (the
    bench stack's Transpose -> LayerNorm at 4 frames a step; at 1 frame the view is
    contiguous)."""
    from benchmarks.count_step_kernels import count
    one, four = (count(m, "cuda", layers=2, dims=TINY) for m in ("banded", "chunked"))
    key = "LayerNorm.copy (inside native_layer_norm)"
    assert key not in one["by_type_op"] and four["by_type_op"][key] == 1
    assert four["total"] == one["total"] + 1


@pytest.mark.parametrize("model", ["stack", "encoder"])
def test_eager_general_step_counts(model):
    """The eager general ``step`` in the steady state (count_step_kernels --call step) runs as
    step_fixed: no host read, the fixed step's kernels plus one multi-tensor copy of the
    counters (pyencoder.streaming.state.fresh_counters); with the dispatch off
    (--call step-no-dispatch) the general step reads the device many times and runs many more
    kernels."""
    from benchmarks.count_step_kernels import count
    kw = dict(layers=2, dims=TINY, norm_first=model == "stack", model=model)
    fixed = count("chunked", "cuda", **kw)
    eager = count("chunked", "cuda", call="step", **kw)
    general = count("chunked", "cuda", call="step-no-dispatch", **kw)
    assert eager["syncs"] == 0, eager["ops"]
    assert eager["total"] == fixed["total"] + 1, (eager["ops"], fixed["ops"])
    assert eager["ops"]["_foreach_add"] == 1 and "clone" not in eager["ops"], eager["ops"]
    assert "fill_" not in eager["ops"] and "full" not in eager["ops"], eager["ops"]
    assert general["syncs"] >= 8 and general["total"] > 2 * eager["total"], general["total"]
    with pytest.raises(ValueError, match="call must be one of"):
        count("chunked", "cuda", call="graph", **kw)


def test_script_prints_table():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    r = _subproc.run([sys.executable, "-m", "benchmarks.count_step_kernels", "--layers", "2",
                      "--mask", "chunked", "--dtype", "float32"], cwd=ROOT, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    for s in ("total kernels", "chunked/cpu", "chunked/cuda-torch-ring", "chunked/cuda",
              "ChunkedSelfAttention",
              "host syncs", "excluded (views / metadata)"):
        assert s in r.stdout, r.stdout


class _S:
    pass


def test_fill_counter_skips_only_unchanged_counters():
    s = _S()
    s.out_lengths = torch.zeros(3, dtype=torch.int64)
    fill_counter(s, 4)
    v = s.out_lengths._version
    fill_counter(s, 4)
    assert s.out_lengths._version == v            # skipped: already 4, not written since
    s.out_lengths[1] = 7                          # an in-place edit is seen
    fill_counter(s, 4)
    assert s.out_lengths.tolist() == [4, 4, 4]
    fill_counter(s, 2)                            # another n
    assert s.out_lengths.tolist() == [2, 2, 2]
    s.out_lengths = torch.full((3,), 2)           # another tensor holding the same values
    s.out_lengths.zero_()
    fill_counter(s, 2)
    assert s.out_lengths.tolist() == [2, 2, 2]
    with torch.inference_mode():                  # no version counter: always filled
        s.out_lengths = torch.zeros(3, dtype=torch.int64)
        fill_counter(s, 5)
        s.out_lengths.zero_()
        fill_counter(s, 5)
        assert s.out_lengths.tolist() == [5, 5, 5]


def test_fill_counter_filled_alias():
    """``filled``: a container's counter that is the tensor its child just filled is not
    filled again (each fill would bump the version the other's record holds: both would fill
    on every step); a counter of its own is filled."""
    child, parent = _S(), _S()
    child.out_lengths = torch.zeros(2, dtype=torch.int64)
    parent.out_lengths = child.out_lengths
    for _ in range(3):
        fill_counter(child, 3)
        v = child.out_lengths._version
        fill_counter(parent, 3, filled=child.out_lengths)
        assert child.out_lengths._version == v
    assert child.out_lengths.tolist() == [3, 3]
    parent.out_lengths = torch.zeros(2, dtype=torch.int64)
    fill_counter(parent, 3, filled=child.out_lengths)
    assert parent.out_lengths.tolist() == [3, 3]


def test_fixed_index_follows_the_counter():
    s = _S()
    s.pending = torch.tensor([0, 2, 1])
    a = fixed_index(s, "pending", 3, torch.device("cpu"))
    assert a.qidx.tolist() == [[0, 1, 2], [2, 3, 4], [1, 2, 3]]
    assert a.qoff.tolist() == [[-3, -2, -1], [-5, -4, -3], [-4, -3, -2]]
    assert a.bidx.tolist() == [[0] * 3, [1] * 3, [2] * 3]
    assert fixed_index(s, "pending", 3, torch.device("cpu")) is a     # cached
    s.pending[0] = 2                                                   # in place: rebuilt
    b = fixed_index(s, "pending", 3, torch.device("cpu"))
    assert b is not a and b.qidx[0].tolist() == [2, 3, 4]
    s.pending = torch.tensor([1, 1, 1])                               # another tensor
    assert fixed_index(s, "pending", 3, torch.device("cpu")).qidx[2].tolist() == [1, 2, 3]
    assert fixed_index(s, "pending", 2, torch.device("cpu")).ar.tolist() == [0, 1]


@pytest.mark.parametrize("n,keep", [(1, 3), (2, 2), (4, 3), (5, 1)])
def test_shift_queue(n, keep):
    buf = torch.randn(2, 3, n + keep + 2, 4)
    want = buf.clone()
    want[:, :, :keep] = buf[:, :, n:n + keep].clone()
    shift_queue(buf, n, keep, 2)
    assert torch.equal(buf, want)


def _attn(kind):
    torch.manual_seed(0)
    if kind == "banded":
        return BandedSelfAttention(32, 4, left=6, right=2).eval()
    return ChunkedSelfAttention(32, 4, chunk_size=2, left_chunks=3, lookahead=1).eval()


def _unpack(m):
    params = [p for mod in (m.q_proj, m.k_proj, m.v_proj) for p in mod.parameters()]
    vals = [p.detach().clone() for p in params]
    m.unpack_qkv_()
    assert not m.unpack_qkv_()                  # nothing left to undo
    assert m._packed_qkv(m._qkv_modules()) is None
    assert [p for mod in (m.q_proj, m.k_proj, m.v_proj) for p in mod.parameters()] == params
    assert all(torch.equal(p, v) for p, v in zip(params, vals))
    ptrs = {p.untyped_storage().data_ptr() for p in params}
    assert len(ptrs) == len(params)             # each its own storage again


@pytest.mark.parametrize("kind", ["banded", "chunked"])
def test_packed_qkv_step_sees_edits(kind):
    """pack_qkv_ (opt-in) puts q/k/v in one buffer (same Parameters, same values);
    the step's single GEMM reads the parameters' own memory, so edits through .data / in place
    are seen."""
    m = _attn(kind)
    params = [m.q_proj.weight, m.k_proj.weight, m.v_proj.weight, m.v_proj.bias]
    vals = [p.detach().clone() for p in params]
    x = torch.randn(2, 16, 32)
    with torch.no_grad():
        st = m.init_state(2, max_chunk=4)
        assert m._packed_qkv(m._qkv_modules()) is None      # not on the CPU
        assert m.pack_qkv_() and m.pack_qkv_()
        assert m._packed_qkv(m._qkv_modules()) is not None
        assert all(a is b and torch.equal(a, v) for a, b, v in
                   zip(params, [m.q_proj.weight, m.k_proj.weight, m.v_proj.weight,
                                m.v_proj.bias], vals))
        _, st = m.step(x[:, :6], st)
        ref = copy.deepcopy(m)                  # deepcopy clones each Parameter: unpacked
        assert ref._packed_qkv(ref._qkv_modules()) is None
        m2 = copy.deepcopy(m)
        assert m2.pack_qkv_() and m2.unpack_qkv_()
        _unpack(m2)
        st_ref = copy.deepcopy(st)
        m.k_proj.weight.data.mul_(1.5)          # EMA-style write, no version bump on the param
        m.v_proj.bias.add_(0.25)
        ref.k_proj.weight.mul_(1.5)
        ref.v_proj.bias.add_(0.25)
        y = m.step_fixed(x[:, 6:10], st)
        y_ref = ref.step_fixed(x[:, 6:10], st_ref)
        assert _rel(y, y_ref) <= 1e-5
        off = m(x)
        m.to(torch.float64)                     # .to() unpacks: three GEMMs, same function
        assert m._packed_qkv(m._qkv_modules()) is None
        assert _rel(m(x.double()).float(), off) <= 1e-5


def test_qkv_not_packed_for_views_or_other_modules():
    m = _attn("banded")
    flat = torch.cat([p.detach().reshape(-1) for p in m.parameters()])
    with torch.no_grad():                       # parameters as views of one flat buffer (FSDP)
        off = 0
        for p in m.parameters():
            p.data = flat[off:off + p.numel()].view_as(p)
            off += p.numel()
    assert not m.pack_qkv_()
    m2 = _attn("banded")
    m2.k_proj = torch.nn.utils.parametrizations.weight_norm(m2.k_proj)
    assert not m2.pack_qkv_()
    m3 = _attn("banded")
    m3.v_proj.bias = None
    assert not m3.pack_qkv_()


def test_qkv_not_packed_with_hooks_or_grad():
    m = _attn("banded")
    assert m.pack_qkv_()
    x = torch.randn(1, 3, 32)
    seen = []
    h = m.k_proj.register_forward_hook(lambda *a: seen.append(1))
    with torch.no_grad():
        m._qkv(x)
    assert seen == [1]                          # the hook ran: three projections
    h.remove()
    q, k, v = m._qkv(x)                         # grad enabled and weights require grad
    assert k.grad_fn is not None
    k.sum().backward()
    assert m.k_proj.weight.grad is not None and m.q_proj.weight.grad is None


@pytest.mark.parametrize("k,s,n", [(4, 2, 2), (4, 2, 4), (10, 5, 5), (10, 5, 20), (3, 1, 1),
                                   (3, 1, 5), (2, 2, 2), (1, 1, 3)])
def test_conv_step_fixed_equals_step(k, s, n):
    """CausalConv1d.step_fixed (no cat when n >= k - 1, the general cat otherwise) gives the
    general step's output and history, also in bfloat16."""
    from pyencoder.nn import CausalConv1d
    for dtype in (torch.float32, torch.bfloat16):
        conv = CausalConv1d(3, 5, k, stride=s, activation="gelu").to(dtype)
        x = torch.randn(2, 3, s * 3 + 10 * n, dtype=dtype)
        with torch.no_grad():
            a, b = conv.init_state(2), conv.init_state(2)
            _, a = conv.step(x[..., :s * 3], a)
            _, b = conv.step(x[..., :s * 3], b)
            for t in range(s * 3, x.shape[-1], n):
                y = conv.step_fixed(x[..., t:t + n], a)
                y_ref, b = conv.step(x[..., t:t + n], b)
                assert torch.equal(y, y_ref), (dtype, t)
                assert torch.equal(a.hist, b.hist) and torch.equal(a.seen, b.seen)
                assert a.out_lengths.tolist() == [n // s] * 2


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" or torch.cuda.is_available(),
                    reason="the CUDA path emulated on CPU tensors under TRITON_INTERPRET=1")
@pytest.mark.parametrize("kind", ["banded", "chunked"])
def test_cuda_path_step_equals_cpu_path(kind, monkeypatch):
    """What a CUDA step runs (packed q/k/v, the fused ring write on the strided views of the one
    GEMM's output, the Triton decode fed the int64 counters and writing its token-major output),
    interpreted on CPU tensors, equals the CPU path's step (float32; the decode sums in another
    order) and leaves the same counters."""
    import pyencoder
    from pyencoder.ops import _decode_attention_triton as DT
    from pyencoder.ops import _ring_write_triton as RW
    m = _attn(kind)
    m2 = copy.deepcopy(m)
    assert m2.pack_qkv_()
    n = m.block
    x = torch.randn(2, 8 * n + 4, 32)
    with torch.no_grad():
        a, b = m.init_state(2, max_chunk=n), m2.init_state(2, max_chunk=n)
        _, a = m.step(x[:, :4], a)
        _, b = m2.step(x[:, :4], b)
        for t in range(4, x.shape[1], n):
            ya = m.step_fixed(x[:, t:t + n], a, check=t == 4)
            with monkeypatch.context() as mp, pyencoder.use_backend(decode_attention="triton"):
                mp.setattr(RW, "FORCE_INTERPRET", True)
                calls = []
                real, dec = RW.ring_write, DT.forward
                mp.setattr(RW, "ring_write", lambda *args: calls.append(1) or real(*args))
                mp.setattr(DT, "forward", lambda *args: calls.append(2) or dec(*args))
                yb = m2.step_fixed(x[:, t:t + n], b)
            assert calls == [1, 2]
            assert _rel(yb, ya) <= 1e-5, t
            for key in ("pos", "pending", "out_lengths"):
                assert torch.equal(getattr(a, key), getattr(b, key)), key
            assert _rel(b.k, a.k) <= 1e-5 and _rel(b.v, a.v) <= 1e-5


def test_helpers_under_graph_capture(monkeypatch):
    """During CUDA graph capture (simulated: capture records kernels without running them) a
    missing index entry is built but not cached, entries a graph reads are pinned for the
    state's lifetime (never freed under a graph), and a fill is not marked as done."""
    import pyencoder.streaming.state as S
    s = _S()
    s.pending = torch.tensor([1, 2])
    s.out_lengths = torch.zeros(2, dtype=torch.int64)
    cpu = torch.device("cpu")
    monkeypatch.setattr(S, "_capturing", lambda device: True)
    a = fixed_index(s, "pending", 2, cpu)
    assert s.__dict__["_fixed_index"] == {} and s.__dict__["_graph_pinned"] == [a]
    fill_counter(s, 2)
    assert "_filled_out_lengths" not in s.__dict__
    monkeypatch.setattr(S, "_capturing", lambda device: False)
    b = fixed_index(s, "pending", 2, cpu)             # eager: built and cached
    assert b is not a and fixed_index(s, "pending", 2, cpu) is b
    assert b.count_n.tolist() == [2, 2]
    fill_counter(s, 2)
    assert s.__dict__["_filled_out_lengths"][1] == 2
    monkeypatch.setattr(S, "_capturing", lambda device: True)
    assert fixed_index(s, "pending", 2, cpu) is b      # a capture after warm-up reads the cache
    assert s.__dict__["_graph_pinned"] == [a, b]
    s.pending[0] = 0                                   # in place: rebuilt, b stays pinned
    monkeypatch.setattr(S, "_capturing", lambda device: False)
    c = fixed_index(s, "pending", 2, cpu)
    assert c is not b and s.__dict__["_graph_pinned"] == [a, b]


def test_pack_qkv_model_helpers_opt_in():
    """pyencoder.nn.pack_qkv_ / unpack_qkv_ over a model; init_state never packs by itself (shared
    storage would make safetensors' save_file refuse the user's state_dict)."""
    import pyencoder.nn as pnn
    model = torch.nn.Sequential(_attn("banded"), torch.nn.Linear(32, 32), _attn("chunked"))
    with torch.no_grad():
        model[0].init_state(1, max_chunk=4)
    assert all(m._packed_qkv(m._qkv_modules()) is None for m in (model[0], model[2]))
    x = torch.randn(1, 12, 32)
    ref = model(x)
    assert pnn.pack_qkv_(model) == 2
    assert all(m._packed_qkv(m._qkv_modules()) is not None for m in (model[0], model[2]))
    assert torch.equal(model(x), ref)
    assert pnn.unpack_qkv_(model) == 2 and pnn.unpack_qkv_(model) == 0
    sd = model.state_dict()
    ptrs = [t.untyped_storage().data_ptr() for t in sd.values()]
    assert len(set(ptrs)) == len(ptrs)


def test_batched_counters_queue_adds_until_exit(monkeypatch):
    """advance_counter adds at once outside a scope; inside batched_counters() the adds wait
    for the scope's exit (nested scopes join the outer one) and then run as one foreach add per
    (device, dtype); a tensor queued twice gets the sum; counters sharing memory are added one
    by one (a foreach would race); an exception still applies what was queued."""
    import pyencoder.streaming.state as S
    calls = []
    real = torch._foreach_add_
    monkeypatch.setattr(torch, "_foreach_add_",
                        lambda ts, ns: calls.append(len(ts)) or real(ts, ns))
    a, b = torch.tensor([1, 2]), torch.tensor([10, 20, 30])
    c = torch.tensor([5], dtype=torch.int32)
    S.advance_counter(a, 3)
    assert a.tolist() == [4, 5] and not calls
    with S.batched_counters():
        S.advance_counter(a, 1)
        with S.batched_counters():
            S.advance_counter(b, 2)
        assert b.tolist() == [10, 20, 30]            # the inner exit does not flush
        S.advance_counter(a, 2)
        S.advance_counter(c, 7)
        assert a.tolist() == [4, 5] and c.tolist() == [5]
    assert a.tolist() == [7, 8] and b.tolist() == [12, 22, 32] and c.tolist() == [12]
    assert calls == [2]                              # int64: a (1 + 2) and b; int32: add_
    base = torch.zeros(4, dtype=torch.int64)
    lo, hi = base[:3], base[1:]                      # overlapping views of one counter
    with S.batched_counters():
        S.advance_counter(lo, 1)
        S.advance_counter(hi, 1)
    assert base.tolist() == [1, 2, 2, 1] and calls == [2]
    with pytest.raises(RuntimeError, match="boom"):
        with S.batched_counters():
            S.advance_counter(a, 1)
            raise RuntimeError("boom")
    assert a.tolist() == [8, 9]
    S.advance_counter(a, 1)                          # the scope is closed again
    assert a.tolist() == [9, 10]


@pytest.mark.parametrize("fused", [False, True], ids=["torch", "fused"])
def test_stack_step_fixed_batches_counters(fused, monkeypatch):
    """The bench stack's step_fixed (one batched counter add) == its children's step_fixed run
    one by one (each adding its own counters): the same output and state, bit for bit, after
    every step; on the CUDA path emulated (fused ring write and residual kernel, interpreted)
    too, where the decode reads the key count from the ring write instead of pos."""
    import pyencoder
    from benchmarks.bench_streaming import GPU_MASKS, HOP, _warm_steps, build
    from pyencoder.ops import _ring_write_triton as RW
    monkeypatch.setattr(RW, "FORCE_INTERPRET", fused)
    cfg = dict(GPU_MASKS["chunked"])
    sf = cfg.pop("step_frames")
    torch.manual_seed(3)
    model = build(layers=2, dim=16, heads=2, ffn=32, conv_dim=8, **cfg).eval()
    st = model.init_state(2, max_chunk=sf)
    import contextlib
    ctx = pyencoder.use_backend(decode_attention="triton") if fused else \
        contextlib.nullcontext()
    with torch.no_grad(), ctx:
        for _ in range(_warm_steps(model, sf)):
            model.step(torch.randn(2, 1, HOP * sf), st)
        st2 = copy.deepcopy(st)
        for i in range(3):
            x = torch.randn(2, 1, HOP * sf)
            want = model.step_fixed(x, st, check=(i == 0))
            y = x
            for m, s in zip(model, st2.layers):
                y = m.step_fixed(y, s) if hasattr(m, "step_fixed") else m(y)
            assert torch.equal(want, y), i
            ta, tb = st.tensors(), st2.tensors()
            assert ta.keys() == tb.keys()
            for name, a in ta.items():
                assert torch.equal(a, tb[name]), (i, name)
