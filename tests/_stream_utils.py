"""Helpers shared by the streaming tests."""


def rel_err(a, b):
    if b.numel() == 0:
        return 0.0
    scale = max(b.abs().max().item(), 1e-6)
    return (a - b).abs().max().item() / scale


def stream(module, x, sizes, time_dim, max_chunk=None):
    """Feed x through module.step in chunks of the given sizes (then the rest), then flush; return
    the concatenated valid outputs of slot 0.. as a batch (all slots in lockstep)."""
    from pyencoder.streaming import run_stream
    kw = {} if max_chunk is None else {"max_chunk": max_chunk}
    return run_stream(module, x, sizes, time_dim=time_dim, **kw)
