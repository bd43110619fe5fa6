"""Drop-in replacements for other projects' Python APIs, implemented on pyencoder's ops.

- ``pyencoder.compat.causal_conv1d``: causal-conv1d's ``causal_conv1d_fn`` and
  ``causal_conv1d_update`` (any width, not only 2..4): swap
  ``from causal_conv1d import causal_conv1d_fn, causal_conv1d_update`` for
  ``from pyencoder.compat.causal_conv1d import causal_conv1d_fn, causal_conv1d_update``.
"""
