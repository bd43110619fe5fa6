"""Autograd helpers shared by the registered ops."""
import torch
import torch.autograd.forward_ad as _fwad


def fresh(t):
    """An empty contiguous tensor of t's shape, dtype and device: what the fake kernels of the
    backward ops return, as their backends return contiguous gradients whatever the inputs'
    strides (torch.empty_like copied a transposed input's strides: a compiled module's backward
    graph then viewed a gradient wrongly and failed)."""
    return torch.empty(t.shape, dtype=t.dtype, device=t.device)


def refuse_forward_ad(what, *tensors):
    """Raise if forward-mode AD (torch.func.jvp / jacfwd, torch.autograd.forward_ad) carries a
    tangent into ``what``: the registered ops have no forward-mode formula, and torch then gives
    their outputs a zero (torch.func.jvp) or no (forward_ad) tangent without a word. One module
    attribute read outside forward-mode AD."""
    if _fwad._current_level < 0:
        return
    for t in tensors:
        if isinstance(t, torch.Tensor) and _fwad.unpack_dual(t).tangent is not None:
            raise NotImplementedError(
                f"pyencoder: {what} has no forward-mode AD (torch.func.jvp / jacfwd, "
                f"torch.autograd.forward_ad): torch would give its output a zero tangent "
                f"silently. Use reverse mode (backward(), torch.autograd.grad) or the plain-torch "
                f"reference in pyencoder.reference")


def forbid_double_backward(backward_op, what):
    """Give ``backward_op`` (the registered backward of an op) an autograd formula that raises:
    the kernels' backward is not itself differentiable, and without a formula torch's own error
    ("no autograd formula was registered. Please use register_autograd") reads as a packaging bug.
    A first-order backward never calls it, with or without create_graph=True."""
    message = (f"pyencoder: {what} does not support double backward (the gradient of its "
               f"gradient: autograd.grad(..., create_graph=True) followed by a second backward "
               f"through it); its backward is not differentiable")

    def _raise(ctx, *grads):
        raise NotImplementedError(message)

    backward_op.register_autograd(_raise)
