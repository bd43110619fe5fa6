"""Explicit streaming state (DESIGN.md, "Streaming").

A state is a dataclass whose fields are tensors with the batch (slot) dimension first, nested
states, or lists of nested states. Nothing else lives in it: a module's configuration stays on the
module, so ``state_dict()`` / ``load_state_dict()`` round-trip a stream through ``torch.save`` and
a fresh process. ``reset(mask)`` returns the masked slots to their initial (all-zero) state, which
is how a batched server recycles a slot for a new stream.
"""
import dataclasses

import torch

__all__ = ["StreamState", "reset", "state_nbytes"]


@dataclasses.dataclass
class StreamState:
    """Base of every stream state: a dataclass of tensors (and nested states) with
    ``state_dict()`` / ``load_state_dict()`` to checkpoint and resume a stream, ``reset(mask)`` to
    recycle slots, ``batch_size`` and ``nbytes()``."""

    def _items(self):
        for f in dataclasses.fields(self):
            yield f.name, getattr(self, f.name)

    def tensors(self, prefix=""):
        """Flat {dotted name: tensor} over this state and its nested states."""
        out = {}
        for name, v in self._items():
            key = prefix + name
            if isinstance(v, torch.Tensor):
                out[key] = v
            elif isinstance(v, StreamState):
                out.update(v.tensors(key + "."))
            elif isinstance(v, (list, tuple)):
                for i, s in enumerate(v):
                    if not isinstance(s, StreamState):
                        raise TypeError(f"{type(self).__name__}.{name}[{i}] must be a StreamState; "
                                        f"got {type(s).__name__}")
                    out.update(s.tensors(f"{key}.{i}."))
            elif v is not None:
                raise TypeError(f"{type(self).__name__}.{name} must be a tensor, a StreamState or "
                                f"a list of them; got {type(v).__name__}")
        return out

    def state_dict(self):
        """{dotted name: tensor (detached clone)}: pass to torch.save."""
        return {k: v.detach().clone() for k, v in self.tensors().items()}

    def load_state_dict(self, state_dict):
        """Load tensors saved by ``state_dict()`` (shapes may differ where a buffer grew) onto this
        state's devices and dtypes. Returns self."""
        mine = self.tensors()
        missing = sorted(set(mine) - set(state_dict))
        extra = sorted(set(state_dict) - set(mine))
        if missing or extra:
            raise KeyError(f"load_state_dict: state keys do not match; missing {missing}, "
                           f"unexpected {extra}")
        for key, cur in mine.items():
            self._set(key.split("."), state_dict[key].to(device=cur.device, dtype=cur.dtype))
        return self

    def _set(self, path, value):
        obj = self
        for p in path[:-1]:
            obj = obj[int(p)] if isinstance(obj, (list, tuple)) else getattr(obj, p)
        setattr(obj, path[-1], value)

    @property
    def batch_size(self):
        for v in self.tensors().values():
            return v.shape[0]
        return 0

    def nbytes(self):
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def reset(self, mask):
        """Zero every tensor at the slots where ``mask`` (B,) bool is True (in place)."""
        for t in self.tensors().values():
            m = mask.to(t.device).view(-1, *([1] * (t.dim() - 1)))
            t.masked_fill_(m, 0)
        return self


def reset(state, mask):
    """Recycle the slots of ``state`` where ``mask`` (B,) is True: they restart a fresh stream at
    position 0. Returns the state (modified in place)."""
    if not isinstance(state, StreamState):
        raise TypeError(f"state must be a StreamState; got {type(state).__name__}")
    mask = torch.as_tensor(mask)
    if mask.dtype != torch.bool or mask.dim() != 1 or mask.shape[0] != state.batch_size:
        raise ValueError(f"mask must be a bool tensor of shape ({state.batch_size},); got "
                         f"{mask.dtype} {tuple(mask.shape)}")
    return state.reset(mask)


def state_nbytes(state):
    """Bytes held by the tensors of a stream state (nested states included)."""
    return state.nbytes()
