"""Importing this module registers every pending pyencoder triton_op with torch.library
(pyencoder.ops._triton_op.register_pending; this imports triton).

Why a module import and not a function call: the first use of a Triton op may happen inside a
torch.compile trace, and dynamo cannot trace ``torch.library.triton_op`` itself (it is not a
tensor operation), but it does execute an ``import`` statement for real at trace time. So the
functional ops (pyencoder.ops.attention, conv, convnext, decode_attention) import this module
before they call a Triton op, and the registration runs eagerly whenever it is first needed,
compiled or not.
"""
from ._triton_op import register_pending

register_pending()
