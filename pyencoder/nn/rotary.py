"""RotaryEmbedding: an nn.Module face for pyencoder.Rope.

It holds no parameters or buffers (so adding it never changes a state_dict); the attention
modules take it as their ``rope`` argument and apply it inside the attention op. ``forward``
rotates a (B, H, N, D) tensor at integer positions in plain torch (float32 angles), the same
values the kernels compute.
"""
from torch import nn

from ..rope import Rope

__all__ = ["RotaryEmbedding"]


class RotaryEmbedding(nn.Module):
    """nn.Module face of ``pyencoder.Rope(dim, base, interleaved)``: no parameters or buffers;
    pass it as an attention module's ``rope``; ``forward`` rotates (B, H, N, D) in plain torch."""

    def __init__(self, dim, base=10000.0, interleaved=False):
        super().__init__()
        self.rope = Rope(dim, base=base, interleaved=interleaved)

    @property
    def dim(self):
        return self.rope.dim

    def inv_freq(self, device=None):
        return self.rope.inv_freq(device)

    def forward(self, x, positions, inverse=False):
        """x (..., N, D), positions (N,) or (B, N) ints -> x rotated on its first ``dim`` features."""
        return self.rope.rotate(x, positions, inverse=inverse)

    def extra_repr(self):
        return f"dim={self.rope.dim}, base={self.rope.base}, interleaved={self.rope.interleaved}"
