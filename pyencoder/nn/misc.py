"""Small per-frame helpers for streaming stacks."""
from torch import nn

__all__ = ["Transpose"]


class Transpose(nn.Module):
    """Swap two dims (default 1 and 2): (B, C, T) conv layout <-> (B, T, C) sequence layout."""

    def __init__(self, dim0=1, dim1=2):
        super().__init__()
        self.dim0, self.dim1 = dim0, dim1

    lookahead = 0
    hop = 1
    streaming_pointwise = True
    stream_swaps_time_axis = True

    def forward(self, x):
        return x.transpose(self.dim0, self.dim1)
