"""Benchmark workloads: ``build(name, tiny=False) -> (model, make_batch, loss_fn)``.

* ``make_batch(batch_size, device)`` returns a fixed synthetic batch (generator seed 1234, drawn on the CPU
  and then moved, so every device and every call sees the same numbers): images ``torch.randn``, token ids
  ``torch.randint``.
* ``loss_fn(model, batch)`` runs the forward pass and returns the scalar mean loss.
* Models are built from ``torch.manual_seed(0)``: two builds give identical weights.

Workloads (the peer baseline's, ``shared/docs/peer-baseline.md`` §2):

* ``vit``: timm ``vit_small_patch16_224`` from scratch, 1000 classes, 224x224, cross-entropy. Needs timm;
  without it :class:`WorkloadUnavailable` (an ``ImportError``) is raised.
* ``gpt2``: stock Hugging Face ``GPT2LMHeadModel(GPT2Config())`` (124M, tied wte/lm_head, HF ``Conv1D``),
  dropout 0, T=256, called with ``use_cache=False``; loss = mean token cross-entropy against random targets.
* ``wrn``: pre-activation WRN-16-4 with GroupNorm(16) for 32x32 input, 10 classes (:class:`WideResNet`).

``tiny=True`` gives CPU-sized versions of each (see ``TINY``).
"""
from __future__ import annotations

from typing import Callable, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

BATCH_SEED = 1234
DEFAULT_BATCH = {"vit": 64, "gpt2": 16, "wrn": 256}
TINY_BATCH = {"vit": 4, "gpt2": 4, "wrn": 8}
WORKLOADS = ("vit", "gpt2", "wrn")


class WorkloadUnavailable(ImportError):
    """A workload's optional dependency (timm) is not installed."""


# ---------------------------------------------------------------- WRN-16-4 with GroupNorm
class PreActBlock(nn.Module):
    """GN -> ReLU -> conv3x3(stride) -> GN -> ReLU -> conv3x3, plus identity or a 1x1-conv shortcut.

    As in Zagoruyko & Komodakis' reference code, when the shape changes the shortcut conv takes the
    pre-activated input ``relu(gn1(x))``; otherwise the shortcut is ``x`` itself.
    """

    def __init__(self, c_in: int, c_out: int, stride: int, groups: int = 16):
        super().__init__()
        self.gn1 = nn.GroupNorm(groups, c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.gn2 = nn.GroupNorm(groups, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, stride=1, padding=1, bias=False)
        self.shortcut = None
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False)

    def forward(self, x):
        a = F.relu(self.gn1(x))
        skip = x if self.shortcut is None else self.shortcut(a)
        out = self.conv1(a)
        out = self.conv2(F.relu(self.gn2(out)))
        return out + skip


class WideResNet(nn.Module):
    """Pre-activation WRN-depth-k with GroupNorm: stem conv 3->16, 3 stages of (depth-4)/6 blocks at widths
    16k, 32k, 64k (strides 1, 2, 2), then GN, ReLU, global average pooling and a linear head.

    WRN-16-4 (``depth=16, widen=4``) has 2,748,890 parameters. Input [B, 3, H, W] -> logits [B, num_classes].
    """

    def __init__(self, depth: int = 16, widen: int = 4, num_classes: int = 10, groups: int = 16):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.stem = nn.Conv2d(3, widths[0], 3, padding=1, bias=False)
        blocks = []
        for stage, stride in zip(range(3), (1, 2, 2)):
            for i in range(n):
                c_in = widths[stage] if i == 0 else widths[stage + 1]
                blocks.append(PreActBlock(c_in, widths[stage + 1], stride if i == 0 else 1, groups))
        self.blocks = nn.Sequential(*blocks)
        self.gn = nn.GroupNorm(groups, widths[3])
        self.head = nn.Linear(widths[3], num_classes)

    def forward(self, x):
        x = self.blocks(self.stem(x))
        x = F.relu(self.gn(x))
        return self.head(x.mean(dim=(2, 3)))


# ---------------------------------------------------------------- builders
def _batch_gen():
    return torch.Generator().manual_seed(BATCH_SEED)


def _image_task(num_classes: int, size: int):
    def make_batch(batch_size: int, device):
        g = _batch_gen()
        x = torch.randn(batch_size, 3, size, size, generator=g)
        y = torch.randint(0, num_classes, (batch_size,), generator=g)
        return x.to(device), y.to(device)

    def loss_fn(model, batch):
        x, y = batch
        return F.cross_entropy(model(x), y)

    return make_batch, loss_fn


def build_vit(tiny: bool = False):
    try:
        import timm
    except ImportError as err:
        raise WorkloadUnavailable(f"the vit workload needs timm, which is not importable ({err})") from err
    torch.manual_seed(0)
    if tiny:
        from timm.models.vision_transformer import VisionTransformer
        model = VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=10)
        return model, *_image_task(10, 32)
    model = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=1000)
    return model, *_image_task(1000, 224)


def build_gpt2(tiny: bool = False, seq_len: int | None = None, narrow: bool = False):
    """GPT-2 small; ``tiny``: 2 blocks of width 64; ``narrow``: GPT-2 small's 12 blocks at width 64, vocabulary 500."""
    from transformers import GPT2Config, GPT2LMHeadModel

    no_dropout = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, summary_first_dropout=0.0)
    if narrow:
        cfg = GPT2Config(n_embd=64, n_head=2, vocab_size=500, bos_token_id=499, eos_token_id=499, **no_dropout)
        T = seq_len or 256
    elif tiny:
        cfg = GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=500, n_positions=64, bos_token_id=499,
                         eos_token_id=499, **no_dropout)
        T = seq_len or 32
    else:
        cfg = GPT2Config(**no_dropout)
        T = seq_len or 256
    torch.manual_seed(0)
    model = GPT2LMHeadModel(cfg)
    V = cfg.vocab_size

    def make_batch(batch_size: int, device):
        g = _batch_gen()
        idx = torch.randint(0, V, (batch_size, T), generator=g)
        tgt = torch.randint(0, V, (batch_size, T), generator=g)
        return idx.to(device), tgt.to(device)

    def loss_fn(model, batch):
        idx, tgt = batch
        logits = model(input_ids=idx, use_cache=False).logits
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1))

    return model, make_batch, loss_fn


def build_wrn(tiny: bool = False):
    torch.manual_seed(0)
    if tiny:
        return WideResNet(depth=16, widen=1, num_classes=10), *_image_task(10, 16)
    return WideResNet(depth=16, widen=4, num_classes=10), *_image_task(10, 32)


BUILDERS = {"vit": build_vit, "gpt2": build_gpt2, "wrn": build_wrn}


def build(name: str, tiny: bool = False) -> Tuple[nn.Module, Callable, Callable]:
    """``(model, make_batch(batch_size, device), loss_fn(model, batch))`` for workload ``name``."""
    if name not in BUILDERS:
        raise ValueError(f"unknown workload {name!r}; choose from {', '.join(WORKLOADS)}")
    return BUILDERS[name](tiny=tiny)
