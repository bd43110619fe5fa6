"""pyencoder.streaming.admit / CudaGraphStep.admit: a new stream takes a slot of a batch that
step_fixed (a CUDA graph) advances, without replacing any state tensor. CPU (float64): the new
stream's warm-up outputs followed by its rows of the batch's fixed steps equal its offline forward,
the other slots go on equal to theirs, no tensor is replaced and the slot's counters read what the
others do; for a conv + transformer stack (banded, chunked) and for encoders (wav2vec2's conv
geometry with a running GroupNorm, WavLM chunked); too few chunks: ValueError, nothing written; a
graph's pinned index tensors of another phase: RuntimeError, nothing written; bad arguments.
GPU (marked): CudaGraphStep.admit, then replays, equal offline.
"""
import pytest
import torch

from _stream_utils import rel_err
from test_encoder_step_fixed import _encoder, _frames
from test_streaming_fixed import _stack
from pyencoder.streaming import CudaGraphStep, admit

F64_TOL = 1e-10


def _snapshot(st):
    return {k: (v, v.clone()) for k, v in st.tensors().items()}


def _unchanged(st, snap, same_values=True):
    now = st.tensors()
    assert now.keys() == snap.keys()
    for k, (t, v) in snap.items():
        assert now[k] is t, k
        if same_values:
            assert torch.equal(t, v), k


def _run(model, xs, step, warm, admit_at, slot, new, new_warm, time_axis):
    """Streams xs (B, ...) in lockstep: ``warm`` general steps, then step_fixed; at fixed step
    ``admit_at`` stream ``new`` takes ``slot`` (its first ``new_warm`` chunks admitted), then the
    batch goes on with step_fixed (the new stream's next chunks in that slot). Returns
    ({slot: rows before admission}, the new stream's rows, the state)."""
    B = xs.shape[0]
    ch = lambda x, i: x.narrow(time_axis, i * step, step)  # noqa: E731
    st = model.init_state(B, max_chunk=4)
    outs = [[] for _ in range(B)]
    new_rows = []
    j = None
    n_chunks = xs.shape[time_axis] // step
    for i in range(n_chunks):
        x = ch(xs, i).clone()
        if i < warm:
            y, st = model.step(x, st)
            for b in range(B):
                outs[b].append(y[b:b + 1, :int(st.out_lengths[b])])
            continue
        if i == warm + admit_at:
            snap = _snapshot(st)
            ys = admit(model, st, slot, [ch(new, c) for c in range(new_warm)], step)
            _unchanged(st, snap, same_values=False)
            new_rows += ys
            j = new_warm
            # the slot's counters read what the other slots' read
            for key, t in st.tensors().items():
                if key.rsplit(".", 1)[-1] in ("out_lengths",):
                    assert int(t[slot]) == int(t[(slot + 1) % B]), key
        if j is not None:
            if (j + 1) * step > new.shape[time_axis]:
                break
            x.narrow(0, slot, 1).copy_(ch(new, j))
            j += 1
        y = model.step_fixed(x, st)
        for b in range(B):
            if j is not None and b == slot:
                new_rows.append(y[b:b + 1])
            else:
                outs[b].append(y[b:b + 1])
    return outs, new_rows, st


@pytest.mark.parametrize("kind", ["banded", "chunked"])
def test_admit_stack(kind):
    torch.manual_seed(11)
    model = _stack(kind).double()
    step, B = 8, 3
    xs = torch.randn(B, 1, step * 20, dtype=torch.float64)
    new = torch.randn(1, 1, step * 12, dtype=torch.float64)
    with torch.no_grad():
        outs, rows, st = _run(model, xs, step, warm=5, admit_at=3, slot=1, new=new, new_warm=5,
                              time_axis=-1)
        ref = model(xs)
        ref_new = model(new)
    got = torch.cat(rows, 1)
    assert got.shape[1] >= 18          # 24 frames fed, a few held back for lookahead
    assert rel_err(got, ref_new[:, :got.shape[1]]) <= F64_TOL
    for b in (0, 2):
        a = torch.cat(outs[b], 1)
        assert rel_err(a, ref[b:b + 1, :a.shape[1]]) <= F64_TOL


@pytest.mark.parametrize("case", ["w2v2_geometry_hubert_bn", "wavlm_chunked", "band_sink",
                                  "adapter_chunked_k5"])
def test_admit_encoder(case):
    torch.manual_seed(12)
    m = _encoder(case)
    n = m.hop * _frames(m)
    B = 2
    xs = torch.randn(B, n * 14, dtype=torch.float64)
    new = torch.randn(1, n * 10, dtype=torch.float64)
    with torch.no_grad():
        outs, rows, st = _run(m, xs, n, warm=5, admit_at=2, slot=0, new=new, new_warm=5,
                              time_axis=-1)
        ref = m(xs).last_hidden_state
        ref_new = m(new).last_hidden_state
    got = torch.cat(rows, 1)
    assert got.shape[1] >= 5 * _frames(m)
    assert rel_err(got, ref_new[:, :got.shape[1]]) <= F64_TOL
    a = torch.cat(outs[1], 1)
    assert rel_err(a, ref[1:2, :a.shape[1]]) <= F64_TOL


def test_admit_needs_enough_chunks_and_good_arguments():
    torch.manual_seed(13)
    model = _stack("chunked").double()
    step = 8
    x = torch.randn(2, 1, step * 8, dtype=torch.float64)
    with torch.no_grad():
        st = model.init_state(2, max_chunk=4)
        for i in range(6):
            _, st = model.step(x[..., i * step:(i + 1) * step], st)
        snap = _snapshot(st)
        first = x[:1, :, :step]
        with pytest.raises(ValueError, match="not yet in the steady state"):
            admit(model, st, 0, [first], step)
        _unchanged(st, snap)
        with pytest.raises(ValueError, match="slot must be an int in \\[0, 2\\)"):
            admit(model, st, 2, [first], step)
        with pytest.raises(ValueError, match="step must be an int >= 1"):
            admit(model, st, 0, [first], 0)
        with pytest.raises(ValueError, match="batch-1 tensors"):
            admit(model, st, 0, [x[..., :step]], step)
        with pytest.raises(ValueError, match="no steady step of length 12"):
            admit(model, st, 0, [first], 12)       # 3 frames: not whole chunks of 2
        other = _stack("banded").double()
        with pytest.raises(ValueError, match="state was made by"):
            admit(other, st, 0, [first], step)
        _unchanged(st, snap)
        # the fewest chunks that make it steady: the last warm-up step emitted fewer frames than
        # a steady step, yet every out_lengths of the slot reads the steady count afterwards
        model.step_fixed(x[..., 6 * step:7 * step], st, check=True)
        k = 1
        while True:
            try:
                ys = admit(model, st, 0, [x[1:, :, c * step:(c + 1) * step] for c in range(k)],
                           step)
                break
            except ValueError:
                k += 1
        assert ys[-1].shape[1] < 2, [y.shape for y in ys]
        for key, t in st.tensors().items():
            if key.endswith("out_lengths"):
                assert int(t[0]) == int(t[1]), key


def test_admit_refuses_another_phase_under_a_graph():
    """A captured graph's index tensors hold each slot's held-back count (its phase modulo the
    mask block): a new stream at another phase is refused while they are pinned (nothing
    written), admitted when no graph pinned them (an eager step_fixed rebuilds them)."""
    torch.manual_seed(14)
    model = _stack("chunked").double()
    step = 8
    x = torch.randn(2, 1, step * 12, dtype=torch.float64)
    new = torch.randn(1, 1, 4 + step * 8, dtype=torch.float64)
    chunks = [new[..., :4]] + [new[..., 4 + i * step:4 + (i + 1) * step] for i in range(5)]
    with torch.no_grad():
        st = model.init_state(2, max_chunk=4)
        for i in range(6):
            _, st = model.step(x[..., i * step:(i + 1) * step], st)
        model.step_fixed(x[..., 6 * step:7 * step], st, check=True)
        pinned = 0
        for s in st.states().values():
            cache = s.__dict__.get("_fixed_index", {})
            if cache:
                s.__dict__["_graph_pinned"] = list(cache.values())     # what a capture does
                pinned += len(cache)
        assert pinned
        snap = _snapshot(st)
        with pytest.raises(RuntimeError, match="phase modulo the mask block"):
            admit(model, st, 1, chunks, step)
        _unchanged(st, snap)
        for s in st.states().values():
            s.__dict__.pop("_graph_pinned", None)
        ys = admit(model, st, 1, chunks, step)
        rows = list(ys)
        for i in range(7, 10):
            xi = x[..., i * step:(i + 1) * step].clone()
            xi[1:] = new[..., 4 + (i - 2) * step:4 + (i - 1) * step]
            rows.append(model.step_fixed(xi, st)[1:])
        got = torch.cat(rows, 1)
        ref = model(new)
    assert rel_err(got, ref[:, :got.shape[1]]) <= F64_TOL


@pytest.mark.gpu
@pytest.mark.gpu_quick
def test_cuda_graph_step_admit():
    """On a GPU: CudaGraphStep replays; a new stream admitted into slot 0; replays go on and the
    new stream's rows (warm-up outputs, then the graph's) equal its offline forward (fp32)."""
    torch.manual_seed(15)
    m = _encoder("w2v2_geometry_hubert_bn", dtype=torch.float32).cuda()
    n = m.hop * _frames(m)
    xs = torch.randn(2, n * 16, device="cuda")
    new = torch.randn(1, n * 10, device="cuda")
    with torch.no_grad():
        st = m.init_state(2, max_chunk=4)
        for i in range(5):
            _, st = m.step(xs[:, i * n:(i + 1) * n], st)
        g = CudaGraphStep(m, st, xs[:, 5 * n:6 * n])
        for i in range(5, 8):
            g(xs[:, i * n:(i + 1) * n])
        rows = list(g.admit(0, [new[:, c * n:(c + 1) * n] for c in range(5)]))
        for c in range(5, 10):
            x = xs[:, (c + 3) * n:(c + 4) * n].clone()
            x[:1] = new[:, c * n:(c + 1) * n]
            rows.append(g(x)[:1].clone())
        torch.cuda.synchronize()
        got = torch.cat(rows, 1)
        ref = m(new).last_hidden_state
    assert rel_err(got, ref[:, :got.shape[1]]) <= 1e-4


def _hf_encoder(seed):
    """A tiny patched transformers wav2vec2 (band, 2 frames of lookahead, causal positional
    conv) and its pyencoder.hf.StreamingEncoder."""
    pytest.importorskip("transformers")
    import pyencoder.hf as H
    from test_hf import make_model
    torch.manual_seed(seed)
    model = make_model("w2v2_post").eval()
    H.apply_pyencoder_to_wav2vec2(model, lookahead_frames=2, left_frames=6, pos_conv="causal")
    return model, H.StreamingEncoder(model)


def test_admit_hf_streaming_encoder():
    """pyencoder.hf.StreamingEncoder (a patched transformers wav2vec2): admit then step_fixed
    equals the model's offline forward for the new stream (float32)."""
    model, enc = _hf_encoder(16)
    import pyencoder.hf as H
    n = enc.hop * 2
    xs = torch.randn(2, n * 10)
    new = torch.randn(1, n * 9)
    from pyencoder.models import CausalEncoder
    calls = []
    real = CausalEncoder.step_fixed

    def spy(self, *a, **k):
        calls.append(1)
        return real(self, *a, **k)
    with torch.no_grad(), pytest.MonkeyPatch.context() as mp:
        mp.setattr(CausalEncoder, "step_fixed", spy)
        st = enc.init_state(2, max_chunk=4)
        for i in range(4):
            _, st = enc.step(xs[:, i * n:(i + 1) * n], st)
        assert calls            # the general step runs as step_fixed once steady (shared pos conv)
        rows = list(admit(enc, st, 1, [new[:, c * n:(c + 1) * n] for c in range(4)], n))
        for c in range(4, 9):
            x = xs[:, (c + 1) * n:(c + 2) * n].clone()
            x[1:] = new[:, c * n:(c + 1) * n]
            rows.append(enc.step_fixed(x, st)[1:])
        ref = model(new).last_hidden_state
        got = torch.cat(rows, 1)
    torch.testing.assert_close(got, ref[:, :got.shape[1]], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="no steady step"):
        admit(H.StreamingEncoder(model, output_hidden_states=True), st, 0, [new[:, :n]], n)


def test_admit_names_the_phase_and_hidden_states():
    """admit told a new stream whose first chunks totalled off the hop (37 + 163 + 5 samples)
    to pass more chunks (which never helps: steps of whole hops keep it out of phase), and an
    encoder built with output_hidden_states=True that its step length was wrong."""
    model, enc = _hf_encoder(17)
    import pyencoder.hf as H
    n = enc.hop * 4
    new = torch.randn(1, n * 9)
    with torch.no_grad():
        st = enc.init_state(2)
        for i in range(4):
            _, st = enc.step(torch.randn(2, n), st)
        snap = _snapshot(st)
        odd = [new[:, :37], new[:, 37:200], new[:, 200:205]]
        with pytest.raises(ValueError, match=rf"first chunks total 205 samples, not a multiple of "
                                             rf"StreamingEncoder's hop \({enc.hop}\)"):
            admit(enc, st, 1, odd, n)
        with pytest.raises(ValueError, match="not yet in the steady state"):
            admit(enc, st, 1, [new[:, :enc.hop]], n)      # in phase, too short: more chunks
        _unchanged(st, snap)
        hidden = H.StreamingEncoder(model, output_hidden_states=True)
        with pytest.raises(ValueError, match="built with output_hidden_states=True"):
            admit(hidden, hidden.init_state(2), 0, [new[:, :n]], n)
