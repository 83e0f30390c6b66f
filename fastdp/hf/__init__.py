"""fastdp for Hugging Face ``transformers`` (``pip install fastdp[hf]``): ``DPTrainer``, a ``Trainer`` that trains
with DP-SGD on Poisson-sampled logical batches, and the per-sample losses it uses. ``import fastdp`` does not import
this package (nor transformers)."""
from fastdp.hf.losses import per_sample_losses, sequence_classification_losses, token_losses
from fastdp.hf.trainer import DPTrainer

__all__ = ["DPTrainer", "per_sample_losses", "sequence_classification_losses", "token_losses"]
