"""fastdp.kernels: one op per file, each with its PyTorch reference.

Each op's dispatching function lives in its module (``fastdp.kernels.ghost_norm.ghost_norm``); the package
re-exports the references and the dispatchers whose names differ from their module's.

Every op file holds the reference implementation the engine runs on the CPU (and on any
device until a Triton kernel is dispatched for it) and which the parity tests compare against.
This package is installed as ``fastdp.kernels``; never import it as a top-level ``kernels``.
"""
from .clip_accumulate import clip_accumulate_ref
from .clip_factor import clip_factor_ref
from .conv_norm import conv_norm_ref, conv_per_sample_grad_ref, unfold_patches
from .direct_norm import direct_dot_ref, direct_norm_ref
from .ef_quant import block_minmax, ef_dequant_add, ef_dequant_add_ref, ef_quant_ref
from .embedding_norm import (
    embedding_accumulate_ref,
    embedding_dot_ref,
    embedding_linear_dot_ref,
    embedding_norm_ref,
)
from .ghost_norm import ghost_dot, ghost_dot_ref, ghost_norm_ref
from .masked_direct_norm import masked_direct_norm_ref
from .masked_noise import masked_noise_ref
from .microadam_update import microadam_update_ref
from .noisy_sgd import noisy_sgd_ref
from .norm_affine_grad import norm_affine_grad_ref
from .row_abs_sum import row_abs_sum_ref
from .topk_gather import gather_zero, gather_zero_ref

__all__ = [
    "ghost_dot",
    "masked_direct_norm_ref",
    "masked_noise_ref",
    "noisy_sgd_ref",
    "row_abs_sum_ref",
    "block_minmax",
    "ef_dequant_add",
    "ef_dequant_add_ref",
    "ef_quant_ref",
    "gather_zero",
    "gather_zero_ref",
    "microadam_update_ref",
    "clip_accumulate_ref",
    "clip_factor_ref",
    "norm_affine_grad_ref",
    "conv_norm_ref",
    "conv_per_sample_grad_ref",
    "direct_dot_ref",
    "direct_norm_ref",
    "embedding_accumulate_ref",
    "embedding_dot_ref",
    "embedding_linear_dot_ref",
    "embedding_norm_ref",
    "ghost_dot_ref",
    "ghost_norm_ref",
    "unfold_patches",
]
