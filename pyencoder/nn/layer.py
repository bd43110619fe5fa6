"""TransformerLayer: a wav2vec2-style encoder layer around a streaming attention module.

y = x + attn(ln1(x)); y = y + ffn(ln2(y))            (norm_first=True, pre-LN like wav2vec2-large)
y = ln1(x + attn(x)); y = ln2(y + ffn(y))            (norm_first=False, post-LN like wav2vec2-base)

With an ``adapter`` (pre-LN only, as MMS's per-language attention adapters in wav2vec2's
stable-layer-norm layers): y = y + adapter(y) after the feed-forward; ``AttentionAdapter`` is
that block (LayerNorm -> Linear(E, A) -> ReLU -> Linear(A, E)), per frame.

ffn = Linear(E, F) -> GELU -> Linear(F, E). Streaming: the attention holds queries back for
lookahead; the layer holds the matching residual inputs in a buffer of the same capacity and
releases them with the attention outputs, so step + flush equal the offline forward.
"""
import dataclasses

import torch
from torch import nn

from .._checks import autocasting, check_eps, check_int, check_module_input
from ..ops import _ring_write_triton as _ring
from ..streaming.state import (StreamState, check_init_args, check_state, check_step_lengths,
                               check_step_slots, ends_stream, fill_counter, fixed_index,
                               fresh_counters, inference_step, marks_partial, record_steady,
                               shift_queue, stamp, steady_check)
from .attention import IntervalSelfAttention, concat_ragged
from .linear import Linear, has_hooks, plain_linear

__all__ = ["TransformerLayer", "LayerState", "FeedForward", "AttentionAdapter"]


class FeedForward(nn.Module):
    """wav2vec2's feed-forward block: Linear(embed_dim, ffn_dim) -> GELU -> Linear(ffn_dim,
    embed_dim), with wav2vec2's parameter names (intermediate_dense, output_dense)."""
    def __init__(self, embed_dim, ffn_dim, bias=True):
        super().__init__()
        self.intermediate_dense = Linear(embed_dim, ffn_dim, bias=bias)
        self.act = nn.GELU()
        self.output_dense = Linear(ffn_dim, embed_dim, bias=bias)

    def forward(self, x):
        return self.output_dense(self.act(self.intermediate_dense(x)))


class AttentionAdapter(nn.Module):
    """MMS-style bottleneck adapter (transformers' Wav2Vec2AttnAdapterLayer parameter names):
    LayerNorm(E) -> Linear(E, adapter_dim) -> ReLU -> Linear(adapter_dim, E), per frame."""
    hop, lookahead = 1, 0          # per frame (declared: pyencoder.streaming.latency)
    streaming_pointwise = True

    def __init__(self, embed_dim, adapter_dim, eps=1e-5):
        super().__init__()
        self.norm = nn.LayerNorm(embed_dim, eps=eps)
        self.linear_1 = Linear(embed_dim, adapter_dim)
        self.act_fn = nn.ReLU()
        self.linear_2 = Linear(adapter_dim, embed_dim)

    def forward(self, x):
        return self.linear_2(self.act_fn(self.linear_1(self.norm(x))))


@dataclasses.dataclass
class LayerState(StreamState):
    attention: StreamState
    res: torch.Tensor          # (B, qcap, E) residual inputs of the held-back frames
    count: torch.Tensor        # (B,) int64
    out_lengths: torch.Tensor  # (B,) int64

    def _invalid(self):
        if self.count.numel() and int(self.count.max()) > self.res.shape[1]:
            return f"count {self.count.tolist()} exceeds the residual queue ({self.res.shape[1]})"
        return None


class TransformerLayer(nn.Module):
    """wav2vec2-style encoder layer (pre-LN with ``norm_first=True``, post-LN otherwise) around a
    BandedSelfAttention or ChunkedSelfAttention; streams with the attention's lookahead (module
    docstring)."""
    def __init__(self, attention, ffn_dim, *, norm_first=True, layer_norm_eps=1e-5,
                 adapter=None):
        super().__init__()
        if not isinstance(attention, IntervalSelfAttention):
            raise TypeError(f"attention must be a BandedSelfAttention or ChunkedSelfAttention; got "
                            f"{type(attention).__name__}")
        if adapter is not None and not norm_first:
            raise ValueError("adapter: an attention adapter follows the feed-forward of a pre-LN "
                             "layer (norm_first=True, wav2vec2's stable layer norm); got "
                             "norm_first=False")
        if adapter is not None and not isinstance(adapter, nn.Module):
            raise TypeError(f"adapter must be None or a per-frame nn.Module; got "
                            f"{type(adapter).__name__}")
        check_int("ffn_dim", ffn_dim, min_value=1)
        check_eps("layer_norm_eps", layer_norm_eps)
        E = attention.embed_dim
        self.attention = attention
        self.layer_norm = nn.LayerNorm(E, eps=layer_norm_eps)
        self.feed_forward = FeedForward(E, ffn_dim)
        self.final_layer_norm = nn.LayerNorm(E, eps=layer_norm_eps)
        self.norm_first = norm_first
        self.adapter = adapter

    @property
    def lookahead(self):
        return self.attention.lookahead

    hop = 1

    @property
    def period(self):
        return self.attention.period

    def last_input(self, t):
        return self.attention.last_input(t)

    def _post(self, x, a):
        if self.norm_first:
            h = x + a
            h = h + self.feed_forward(self.final_layer_norm(h))
            return h if self.adapter is None else h + self.adapter(h)
        h = self.layer_norm(x + a)
        return self.final_layer_norm(h + self.feed_forward(h))

    def _check(self, x):
        E = self.attention.embed_dim
        check_module_input(x, 2, E, f"(B, T, {E})", self.attention.q_proj.weight)

    def forward(self, x, key_lengths=None):
        self._check(x)
        h = self.layer_norm(x) if self.norm_first else x
        return self._post(x, self.attention(h, key_lengths=key_lengths))

    def _stream_config(self):
        ff = self.feed_forward
        return (f"TransformerLayer(embed_dim={self.attention.embed_dim}, ffn_dim="
                f"{ff.intermediate_dense.out_features}, norm_first={self.norm_first})")

    def _check_state(self, state):
        check_state(self, state, LayerState)
        self.attention._check_state(state.attention)

    def init_state(self, batch_size, *, device=None, dtype=None, max_chunk=64):
        check_init_args(batch_size, dtype, device, self)
        att = self.attention.init_state(batch_size, device=device, dtype=dtype,
                                        max_chunk=max_chunk)
        qcap = att.q.shape[2]
        zi = lambda: torch.zeros(batch_size, dtype=torch.int64, device=att.pos.device)  # noqa
        return stamp(self, LayerState(attention=att, res=att.q.new_zeros(
            batch_size, qcap, self.attention.embed_dim), count=zi(), out_lengths=zi()))

    @inference_step
    def step(self, x, state, lengths=None):
        self._check(x)
        self._check_state(state)
        B, n, E = x.shape
        check_step_slots(B, state.count.shape[0])
        if lengths is not None:
            lengths = check_step_lengths(lengths, B, n, x.device)
        if self.attention._fixed_ok(n, state.attention, lengths):
            fresh_counters(state)
            y = self.step_fixed(x, state)
            record_steady(state.attention, self.attention.steady_check(n, state.attention))
            return y, state
        # the attention's own split: its queue holds max_chunk frames past what it holds back
        # (hi_off, or sink - 1 while queries wait for the last sink key: the residual queue has
        # the same capacity)
        mc = self.attention._max_chunk(state.attention)
        if n > mc:
            outs, counts = [], []
            L = torch.full((B,), n, dtype=torch.int64, device=x.device) if lengths is None \
                else torch.as_tensor(lengths, device=x.device).to(torch.int64)
            with marks_partial(state, "TransformerLayer.step",
                               lambda s: f"frames {s}-{min(s + mc, n) - 1}") as p:
                for s in range(0, n, mc):
                    y, state = self.step(x[:, s:s + mc], state,
                                         (L - s).clamp(0, min(mc, n - s)))
                    outs.append(y)
                    counts.append(state.out_lengths.clone())
                    p.took.append(s)
            return concat_ragged(outs, counts, state)
        h = self.layer_norm(x) if self.norm_first else x
        a, state.attention = self.attention.step(h, state.attention, lengths)
        return self._release(x, a, state, lengths)

    def steady_check(self, n, state):
        """pyencoder.streaming.state.SteadyCheck of a general step of n frames: its attention's
        (the residual queue holds what the attention holds back)."""
        return steady_check(self.attention, n, state.attention)

    @inference_step
    def step_fixed(self, x, state, check=False):
        """CUDA-graph friendly steady-state step (preconditions: the attention's ``step_fixed``).
        The residual inputs of the held-back frames are queued like the attention's queries:
        written behind ``state.count`` (device-side index) and shifted by n; without lookahead
        (hi_off 0) nothing is held back and the queue is not touched. On CUDA one fused kernel
        queues, releases and shifts, adds the attention output and applies the LayerNorm after
        it (pyencoder.ops._ring_write_triton.residual_step; post-LN: one more for the
        feed-forward's add + LayerNorm). State in place."""
        self._check(x)
        self._check_state(state)
        B, n, E = x.shape
        h = self.layer_norm(x) if self.norm_first else x
        a = self.attention.step_fixed(h, state.attention, check=check)
        keep = self.attention.hi_off
        if _ring.residual_ok(x, a, state.res, keep):
            y = self._fused_post(x, a, state, keep)
        elif keep:
            idx = fixed_index(state, "count", n, x.device)
            state.res[idx.bidx, idx.qidx] = x.to(state.res.dtype)
            y = self._post(state.res[:, :n].to(x.dtype), a)
            shift_queue(state.res, n, keep, 1)
        else:
            # hi_off == 0: nothing is held back (count is 0 in the steady state), so the frames
            # released now are x itself (through the queue's dtype, as the queue would give them)
            y = self._post(x.to(state.res.dtype).to(x.dtype), a)
        state.in_dtype = x.dtype
        # (a general step leaves out_lengths aliased to the attention's, filled just now)
        fill_counter(state, n, filled=state.attention.out_lengths)
        return y

    def _fused_post(self, x, a, state, keep):
        # CUDA step: one kernel queues x, releases n residuals, adds them to a, keeps the rest
        # queued (keep > 0) and applies the LayerNorm that follows the sum; post-LN: one more
        # for the feed-forward's add + LayerNorm. The same ops as _post, in 2 kernels, not 4-7.
        fold = self._ffn_fold(a) if self.norm_first else None
        s, h = _ring.residual_step(state.res, state.count, x, a, keep,
                                   self.final_layer_norm if self.norm_first else self.layer_norm,
                                   need_sum=self.norm_first,
                                   sum_bias=None if fold is None else fold[1])
        if fold is not None:
            # pre-LN: the residual kernel stored s + the output projection's bias, so the
            # feed-forward's last GEMM accumulates onto it in place: s + ffn(h) in one kernel
            # (cuBLAS with beta = 1), not a GEMM and an add
            ff = self.feed_forward
            g = ff.act(ff.intermediate_dense(h))
            s.view(-1, s.shape[-1]).addmm_(g.reshape(-1, g.shape[-1]), fold[0].t())
            return s if self.adapter is None else s + self.adapter(s)
        if self.norm_first:
            s = s + self.feed_forward(h)
            return s if self.adapter is None else s + self.adapter(s)
        f = self.feed_forward(h)
        return _ring.residual_step(h, None, h, f, 0, self.final_layer_norm, need_sum=False)[1]

    def _ffn_fold(self, a):
        """(weight, bias or None) of the feed-forward's output projection when ``_fused_post``
        may fold the residual add into that GEMM (``s.addmm_(g, weight.t())`` after the residual
        kernel stored s + bias): a FeedForward and a plain Linear (nn.Linear, our Linear or a
        LinearView of an nn.Linear: F.linear), no hooks that a direct GEMM would skip, weight and
        bias in a's dtype and device, no autocast, and no gradient recorded for them (the bias
        goes through the kernel). None otherwise (the module's own calls)."""
        ff = self.feed_forward
        if type(ff).forward is not FeedForward.forward or has_hooks(ff):
            return None
        lin = plain_linear(ff.output_dense)
        if lin is None:
            return None
        w, b = lin.weight, lin.bias
        if autocasting(a) or (torch.is_grad_enabled() and any(
                t is not None and t.requires_grad for t in (w, b))):
            return None
        E = a.shape[-1]
        if w.dtype != a.dtype or w.device != a.device or w.dim() != 2 or w.shape[0] != E:
            return None
        if b is not None and (b.dtype != a.dtype or b.device != a.device or b.shape != (E,)
                              or b.stride() != (1,)):
            return None
        return w, b

    @ends_stream
    @inference_step
    def flush(self, state):
        self._check_state(state)
        a, state.attention = self.attention.flush(state.attention)
        B = state.res.shape[0]
        # the held-back residuals come out in the dtype the steps' inputs had (_release)
        dt = getattr(state, "in_dtype", None) or state.res.dtype
        return self._release(state.res.new_zeros(B, 0, state.res.shape[2], dtype=dt), a, state,
                             None)

    def _release(self, x, a, state, lengths):
        B, n, E = x.shape
        dev = x.device
        if n:
            L = torch.full((B,), n, dtype=torch.int64, device=dev) if lengths is None \
                else torch.as_tensor(lengths, device=dev).to(torch.int64)
            j = torch.arange(n, device=dev)
            bi, ji = (j[None, :] < L[:, None]).nonzero(as_tuple=True)
            state.res[bi, state.count[bi] + ji] = x[bi, ji].to(state.res.dtype)
            state.count = state.count + L
        r = state.attention.out_lengths
        m = a.shape[1]
        # the residual in the dtype of the layer's input, as offline adds x (it was cast to the
        # attention output's: under autocast a float32 input's residual was rounded to bf16)
        y = self._post(state.res[:, :m].to(x.dtype), a)
        state.in_dtype = x.dtype
        if m:
            cap = state.res.shape[1]
            idx = (torch.arange(cap, device=dev)[None, :] + r[:, None]).clamp(max=cap - 1)
            state.res = state.res.gather(1, idx[:, :, None].expand(B, cap, E))
            state.count = state.count - r
        state.out_lengths = r
        return y, state
