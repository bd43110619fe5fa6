"""Helpers shared by the streaming tests."""


def rel_err(a, b):
    if b.numel() == 0:
        return 0.0
    scale = max(b.abs().max().item(), 1e-6)
    return (a - b).abs().max().item() / scale


def spy_calls(monkeypatch, cls, name="step_fixed"):
    """A list that gets an entry per call of ``cls.<name>`` (which still runs)."""
    calls = []
    real = getattr(cls, name)

    def spy(*a, **k):
        calls.append(1)
        return real(*a, **k)
    monkeypatch.setattr(cls, name, spy)
    return calls


def stream(module, x, sizes, time_dim, max_chunk=None):
    """Feed x through module.step in chunks of the given sizes (then the rest), then flush; return
    the concatenated valid outputs of slot 0.. as a batch (all slots in lockstep)."""
    from pyencoder.streaming import run_stream
    kw = {} if max_chunk is None else {"max_chunk": max_chunk}
    return run_stream(module, x, sizes, time_dim=time_dim, **kw)


def check_encoder_slot_reset(m, a, first_1, c, split, atol):
    """A CausalEncoder ``m`` streams two slots: slot 0 the waveform ``a`` (its first ``split``
    samples, then the rest), slot 1 ``first_1`` (``split`` samples) and then, after
    ``pyencoder.streaming.reset`` of slot 1 alone, the waveform ``c`` as a fresh stream. Each
    slot's outputs (steps + flush) must equal the offline forward of its own stream."""
    import torch
    from pyencoder.streaming import reset
    st = m.init_state(2, max_chunk=8)
    y, st = m.step(torch.stack((a[:split], first_1)), st)     # slot 0: a (partly), slot 1: first_1
    got0 = [y[0, :int(st.out_lengths[0])]]
    reset(st, torch.tensor([False, True]))                     # slot 1 now starts stream c
    x = torch.zeros(2, c.shape[0], dtype=a.dtype)
    x[0, :a.shape[0] - split], x[1] = a[split:], c
    y, st = m.step(x, st, lengths=torch.tensor([a.shape[0] - split, c.shape[0]]))
    got0.append(y[0, :int(st.out_lengths[0])])
    got1 = [y[1, :int(st.out_lengths[1])]]
    y, st = m.flush(st)
    got0.append(y[0, :int(st.out_lengths[0])])
    got1.append(y[1, :int(st.out_lengths[1])])
    torch.testing.assert_close(torch.cat(got0), m(a[None]).last_hidden_state[0], rtol=0,
                               atol=atol)
    torch.testing.assert_close(torch.cat(got1), m(c[None]).last_hidden_state[0], rtol=0,
                               atol=atol)


def check_encoder_ragged_stream(m, lengths, max_n, atol):
    """A CausalEncoder ``m`` streams two random float64 waveforms of ``lengths`` in ragged steps
    (each slot 0..``max_n`` new samples per step, ``lengths=`` per slot), checkpointed after the
    third step (state_dict into a fresh state object) and flushed: each slot's outputs must equal
    the offline forward of its waveform."""
    import random

    import torch
    wavs = [torch.randn(n, dtype=torch.float64) for n in lengths]
    refs = [m(w[None]).last_hidden_state[0] for w in wavs]
    st = m.init_state(2, max_chunk=8)
    got, pos, it = [[], []], [0, 0], 0
    while pos[0] < lengths[0] or pos[1] < lengths[1]:
        n = [min(random.randint(0, max_n), lengths[b] - pos[b]) for b in range(2)]
        x = torch.zeros(2, max(n), dtype=torch.float64)
        for b in range(2):
            x[b, :n[b]] = wavs[b][pos[b]:pos[b] + n[b]]
            pos[b] += n[b]
        y, st = m.step(x, st, lengths=torch.tensor(n))
        for b in range(2):
            got[b].append(y[b, :int(st.out_lengths[b])])
        it += 1
        if it == 3:   # checkpoint mid-stream and continue from a fresh state object
            st = m.init_state(2, max_chunk=8).load_state_dict(st.state_dict())
    y, st = m.flush(st)
    for b in range(2):
        got[b].append(y[b, :int(st.out_lengths[b])])
        torch.testing.assert_close(torch.cat(got[b], 0), refs[b], rtol=0, atol=atol)
