"""Layer handlers: one file per layer family, each registering the torch functions it handles.

Importing this package registers every handler with ``fastdp.tap.register_op``.
"""
from . import conv, embedding, linear, norms  # noqa: F401  (registration side effects)
from ._autocast import SUPPORTED_LAYERS

__all__ = ["SUPPORTED_LAYERS"]
