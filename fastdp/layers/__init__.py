"""Layer handlers: one file per layer family, each registering the torch functions it handles.

Importing this package registers every handler with ``fastdp.tap.register_op``.
"""
from . import conv, embedding, linear, norms, prelu  # noqa: F401  (registration side effects)

# (layer, intercepted op, per-sample norm): the README's table has exactly these rows (tested).
SUPPORTED_LAYERS = [
    ("nn.Linear (any leading dims)", "`F.linear`", "ghost or direct, cheaper by FLOPs"),
    ("transformers Conv1D", "`torch.addmm` / `x @ W`", "ghost or direct"),
    ("nn.Conv1d, nn.Conv2d (stride, padding incl. 'same', dilation, groups, padding modes)", "`F.conv1d/2d`",
     "direct (per-sample tiles) or ghost over patches"),
    ("nn.Embedding (padding_idx)", "`F.embedding`", "ghost through index equality"),
    ("nn.LayerNorm, nn.GroupNorm, nn.RMSNorm (and subclasses, e.g. timm's)", "`F.layer_norm/group_norm/rms_norm`",
     "exact per-sample, O(B·C)"),
    ("nn.PReLU (one slope, or one per channel)", "`F.prelu`", "exact per-sample, O(B·C)"),
    ("tied weights (Embedding + LM head, any repeated use of a parameter)", "any of the above", "exact cross terms"),
    ("parameters used directly (`cls_token`, `pos_embed`, scales)", "elementwise broadcasting, `expand`",
     "exact per-sample"),
]

__all__ = ["SUPPORTED_LAYERS"]
