"""One call of a registered op family (attention, conv, convnext) on the backend the registry
chose. Its own file because it imports pyencoder.ops._triton_ops (which registers the triton_ops
at first use, pyencoder.ops._triton_op) and ``_triton_ops`` imports ``_triton_op``: kept here, the
import graph has no cycle."""


def call_op(backend, triton_op, custom_op, *args):
    """One call of a registered op family on the backend the registry chose: ``triton_op(*args)``
    (a pyencoder triton_op, registered now if it was not yet) on triton, else the opaque custom
    op ``custom_op(*args, backend)``."""
    if backend == "triton":
        from . import _triton_ops  # noqa: F401  (registers the triton_ops at first use)
        return triton_op(*args)
    return custom_op(*args, backend)
