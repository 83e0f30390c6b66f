"""Layer handlers: one file per layer family, each registering the torch functions it handles.

Importing this package registers every handler with ``fastdp.tap.register_op``.
"""
from . import attention, conv, conv_transpose, embedding, embedding_bag, linear, norms, prelu, rnn  # noqa: F401  (registration)

# (layer, intercepted op, per-sample norm): the README's table has exactly these rows (tested).
SUPPORTED_LAYERS = [
    ("nn.Linear (any leading dims)", "`F.linear`", "ghost or direct, cheaper by FLOPs"),
    ("transformers Conv1D", "`torch.addmm` / `x @ W`", "ghost or direct"),
    ("nn.Conv1d, nn.Conv2d, nn.Conv3d (stride, padding incl. 'same', dilation, groups, padding modes)",
     "`F.conv1d/2d/3d`", "direct (per-sample tiles) or ghost over patches (1-D/2-D); 3-D: direct, by batch chunks"),
    ("nn.ConvTranspose1d/2d/3d (stride, padding, output_padding / output_size, dilation, groups)",
     "`F.conv_transpose1d/2d/3d`", "as the adjoint convolution (operands swapped): as Conv1d/2d/3d"),
    ("nn.Embedding (padding_idx)", "`F.embedding`", "ghost through index equality"),
    ("nn.EmbeddingBag (sum, mean, max; [B, L] ids, or 1-D ids + offsets; per_sample_weights, padding_idx)",
     "`F.embedding_bag`", "exact per bag: ‖a_b‖·‖dY_b‖ (sum/mean), ‖dY_b‖ (max)"),
    ("nn.LayerNorm, nn.GroupNorm, nn.RMSNorm (and subclasses, e.g. timm's)", "`F.layer_norm/group_norm/rms_norm`",
     "exact per-sample, O(B·C)"),
    ("nn.InstanceNorm1d/2d/3d (affine; running statistics in eval mode only)", "`F.instance_norm`",
     "exact per-sample, O(B·C)"),
    ("nn.PReLU (one slope, or one per channel)", "`F.prelu`", "exact per-sample, O(B·C)"),
    ("nn.MultiheadAttention (and nn.TransformerEncoder/Decoder on it; packed or kdim/vdim projections, bias_k/v, "
     "zero attention, masks, need_weights)", "`F.multi_head_attention_forward`",
     "projections as nn.Linear; bias_k/v exact per-sample"),
    ("nn.LSTM, nn.GRU, nn.RNN (tanh, relu): layers, bidirectional, batch_first, PackedSequence (sorted or not), "
     "initial states, LSTM proj_size, dropout between layers, bias=False", "`torch.lstm/gru/rnn_tanh/rnn_relu`",
     "ghost or direct over the stacked time steps (one use per weight)"),
    ("nn.LSTMCell, nn.GRUCell, nn.RNNCell", "`torch.lstm_cell/gru_cell/rnn_tanh_cell/rnn_relu_cell`",
     "ghost or direct; one use per call (a loop of T calls: exact cross terms, O(T²) pairs)"),
    ("tied weights (Embedding + LM head, any repeated use of a parameter)", "any of the above", "exact cross terms"),
    ("parameters used directly (`cls_token`, `pos_embed`, scales)", "elementwise broadcasting, `expand`",
     "exact per-sample"),
]

__all__ = ["SUPPORTED_LAYERS"]
