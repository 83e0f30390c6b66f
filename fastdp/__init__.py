"""fastdp: fast differentially private training for PyTorch.

Examples:
    >>> import torch, fastdp
    >>> model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    >>> opt = fastdp.DPOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=1.0,
    ...                          max_grad_norm=1.0, expected_batch_size=32, sample_size=1000)
    >>> x, y = torch.randn(32, 8), torch.randint(0, 2, (32,))
    >>> torch.nn.functional.cross_entropy(model(x), y).backward()
    >>> opt.step(); opt.zero_grad()
"""
from fastdp.accounting import get_epsilon, get_noise_multiplier
from fastdp.audit import audit
from fastdp.clipping import AutomaticClip, FlatClip, PerLayerClip
from fastdp.engine import BatchSizeError, GradSampleEngine, NonFiniteNormError
from fastdp.layers import SUPPORTED_LAYERS
from fastdp.micro_adam import DPMicroAdam, MicroAdam
from fastdp.optimizer import DPOptimizer
from fastdp.private import make_private
from fastdp.tap import UnsupportedLayerError
from fastdp.validate import fix, validate
from fastdp.virtual_batches import VirtualBatches

__version__ = "0.1.0"

__all__ = [
    "AutomaticClip",
    "BatchSizeError",
    "DPMicroAdam",
    "DPOptimizer",
    "FlatClip",
    "GradSampleEngine",
    "MicroAdam",
    "NonFiniteNormError",
    "PerLayerClip",
    "SUPPORTED_LAYERS",
    "UnsupportedLayerError",
    "VirtualBatches",
    "audit",
    "fix",
    "get_epsilon",
    "get_noise_multiplier",
    "make_private",
    "validate",
]
