"""pyencoder.streaming.latency: exact composition and the non-streamable cases."""
import pytest
import torch
from torch import nn

from pyencoder.nn import (BandedSelfAttention, CausalConv1d, ChunkedSelfAttention, Refiner,
                          TransformerLayer, Transpose)
from pyencoder.streaming import NotStreamableError, StreamingSequential, latency


def _extractor():
    convs = [CausalConv1d(1, 8, 10, 5, activation="gelu")]
    convs += [CausalConv1d(8, 8, 3, 2, activation="gelu") for _ in range(4)]
    convs += [CausalConv1d(8, 8, 2, 2, activation="gelu") for _ in range(2)]
    return convs


def test_wav2vec2_extractor_hop_and_per_layer_lookahead():
    layers = _extractor() + [Transpose(), nn.LayerNorm(8), nn.Linear(8, 16)]
    layers += [TransformerLayer(BandedSelfAttention(16, 2, left=50, right=3 if i == 0 else 0), 32)
               for i in range(12)]
    lat = latency(StreamingSequential(*layers))
    assert lat.hop == 320
    assert lat.lookahead_samples == 3 * 320
    assert lat.samples == 320 + 960 and lat.ms == pytest.approx(80.0)


def test_lookahead_compounds_over_layers():
    L, r = 4, 2
    model = nn.Sequential(CausalConv1d(1, 4, 4, 4), Transpose(),
                          *[BandedSelfAttention(4, 1, left=3, right=r) for _ in range(L)])
    lat = latency(model, sample_rate=8000)
    assert lat.lookahead_samples == L * r * 4
    assert lat.ms == pytest.approx(1000 * (4 + L * r * 4) / 8000)
    assert [row[3] for row in lat.breakdown] == [0, 0] + [r] * L


def test_chunked_and_refiner_worst_case():
    lat = latency([ChunkedSelfAttention(4, 1, chunk_size=4, left_chunks=1, lookahead=2),
                   Refiner(4, 3)])
    assert lat.lookahead_samples == (4 - 1 + 2) + (3 - 1)


def test_strided_lookahead_is_scaled_by_upstream_hop():
    lat = latency(nn.Sequential(CausalConv1d(1, 2, 2, 2), CausalConv1d(2, 2, 3, 3), Transpose(),
                                BandedSelfAttention(2, 1, left=1, right=1)))
    assert lat.hop == 6 and lat.lookahead_samples == 6


def test_groupnorm_over_time_raises():
    model = nn.Sequential(nn.Conv1d(1, 4, 10, 5, bias=False), nn.GroupNorm(4, 4))
    with pytest.raises(NotStreamableError, match="normalises over time"):
        latency(model)


def test_symmetric_conv_raises():
    with pytest.raises(NotStreamableError, match="padded .non-causal. conv"):
        latency(nn.Sequential(nn.Conv1d(32, 32, 128, padding=64, groups=16)))


@pytest.mark.parametrize("conv, ahead", [(nn.Conv1d(1, 1, 128, padding=64), 63),
                                         (nn.Conv1d(1, 1, 5, padding=1), 3),
                                         (nn.Conv1d(1, 1, 3, padding=2), 0),
                                         (nn.Conv1d(1, 1, 5, padding="same"), 2),
                                         (nn.Conv1d(1, 1, 4, padding="same", dilation=2), 3)])
def test_padded_conv_names_how_far_it_reads_ahead(conv, ahead):
    """The refusal said output t looked `padding` samples ahead (k=5, pad=1: "1", it reads t + 3;
    k=128, pad=64: "64", t + 63)."""
    with pytest.raises(NotStreamableError, match=rf"output t reads input t \+ {ahead},"):
        latency(conv)
    x = torch.randn(1, 1, 300)
    y = conv(x)            # the figure: the first output that changes with input sample 200
    x2 = x.clone()
    x2[..., 200] += 1.0
    first = int((conv(x2) - y).abs().flatten().nonzero()[0])
    assert 200 - first == ahead


def test_pointwise_same_conv_and_declared_per_frame_modules_stream():
    """padding='same' with k=1 pads nothing; a user module declaring streaming_pointwise (how
    the README says a per-frame module joins a stack) was refused as an unknown leaf."""
    class Swish(nn.Module):
        streaming_pointwise = True

        def forward(self, x):
            return x * torch.sigmoid(x)
    lat = latency(nn.Sequential(CausalConv1d(1, 4, 2), nn.Conv1d(4, 4, 1, padding="same"),
                                Swish()))
    assert lat.hop == 1 and lat.lookahead_samples == 0


def test_norms_without_running_statistics_are_not_streamable():
    """A BatchNorm without running statistics uses the batch's over time in eval mode too:
    latency() took it as per-frame (changing the last of 100 samples moved frame 0 by 0.045);
    an InstanceNorm tracking running statistics in eval mode is per-frame (was refused)."""
    with pytest.raises(NotStreamableError, match=r"without running statistics"):
        latency(nn.Sequential(CausalConv1d(1, 4, 2),
                              nn.BatchNorm1d(4, track_running_stats=False).eval()))
    with pytest.raises(NotStreamableError, match=r"in training mode"):
        latency(nn.BatchNorm1d(4).train())
    assert latency(nn.InstanceNorm1d(4, track_running_stats=True).eval()).lookahead_samples == 0
    with pytest.raises(NotStreamableError, match="normalises over time"):
        latency(nn.InstanceNorm1d(4))


def test_valid_conv_reports_its_lookahead():
    lat = latency(nn.Conv1d(1, 2, 10, stride=5))
    assert lat.hop == 5 and lat.lookahead_samples == 5


def test_unknown_leaf_raises():
    class Odd(nn.Module):
        def forward(self, x):
            return x.flip(-1)
    with pytest.raises(NotStreamableError, match="unknown module"):
        latency(Odd())


def test_latency_dict_style_access_reads_the_fields():
    lat = latency(nn.Sequential(CausalConv1d(1, 2, 10, 5), Transpose(),
                                BandedSelfAttention(2, 1, left=3, right=2)))
    assert lat["samples"] == lat.samples == 5 + 2 * 5   # no legacy meaning here
    assert lat["ms"] == lat.ms and lat["lookahead_ms"] == lat.lookahead_ms
    assert lat["hop_samples"] == lat.hop == 5
    assert lat.lookahead_frames is None and lat.attention_ms is None
    assert set(["samples", "ms", "hop", "lookahead_samples", "lookahead_ms"]) <= set(lat.keys())
    with pytest.raises(KeyError):
        lat["_legacy_dict"]
