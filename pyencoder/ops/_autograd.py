"""Autograd helpers shared by the registered ops."""


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
