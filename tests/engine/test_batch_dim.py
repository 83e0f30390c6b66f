"""Where the batch is: every trainable layer's input leads with the batch dim, and the batch size is found in the
forward's arguments wherever they carry it (mappings, dataclasses, after a 0-d argument). Frames or segments folded
into the batch dim, and a forward with no batched tensor, are refused (the model does not move); a model that keeps
the batch moves by at most R for one sample."""
import pytest
import torch
import torch.nn as nn

import fastdp
from helpers import assert_close, clipped_sum_reference, dp_sgd, flat_params, sq_loss

pytestmark = pytest.mark.filterwarnings("ignore:noise_multiplier")


class Folded(nn.Module):
    """A trainable layer applied to frames / segments folded into the batch dim."""

    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.layer = {"conv2d": lambda: nn.Conv2d(3, 2, 3, padding=1), "conv1d": lambda: nn.Conv1d(3, 2, 3),
                      "group_norm": lambda: nn.GroupNorm(1, 3), "layer_norm": lambda: nn.LayerNorm(3),
                      "rms_norm": lambda: nn.RMSNorm(3), "embedding": lambda: nn.Embedding(10, 3)}[kind]()

    def forward(self, x):  # x: [B, 2, ...]: two frames per sample
        B = x.shape[0]
        if self.kind == "embedding":
            return self.layer(x.flatten(0, 1)).reshape(B, -1).pow(2).sum(1)
        return self.layer(x.flatten(0, 1) * 5).reshape(B, -1).pow(2).sum(1) * 100


@pytest.mark.parametrize("kind", ["conv2d", "conv1d", "group_norm", "layer_norm", "rms_norm", "embedding"])
def test_frames_folded_into_the_batch_dim_are_refused(kind):
    shapes = {"conv2d": (1, 2, 3, 5, 5), "conv1d": (1, 2, 3, 6), "group_norm": (1, 2, 3, 4),
              "layer_norm": (1, 2, 4, 3), "rms_norm": (1, 2, 3)}
    m = Folded(kind).double()
    x = torch.randint(0, 10, (1, 2, 4)) if kind == "embedding" else torch.randn(*shapes[kind], dtype=torch.float64)
    opt = dp_sgd(m, R=0.1)
    before = flat_params(m)
    with pytest.raises(fastdp.BatchSizeError, match="batch size 1"):
        m(x).sum().backward()
        opt.step()  # (frames clipped one by one as samples: one sample moves the model by several R)
    assert torch.equal(flat_params(m), before)
    opt.detach()


def test_frame_model_with_the_batch_kept_moves_by_at_most_R():
    class Frames(nn.Module):
        def __init__(self):
            super().__init__()
            self.c, self.gn = nn.Conv2d(3, 4, 3, padding=1), nn.GroupNorm(2, 4)

        def forward(self, x):  # [B, T, 3, H, W]: frames as channels of one sample
            return self.gn(self.c(x[:, 0] + x[:, 1])).pow(2).sum((1, 2, 3)) * 100

    m = Frames().double()
    opt = dp_sgd(m, R=0.1)
    before = flat_params(m)
    m(torch.randn(1, 2, 3, 5, 5, dtype=torch.float64) * 5).sum().backward()
    opt.step()
    assert (flat_params(m) - before).norm() <= 0.1 + 1e-12


class ViTish(nn.Module):
    """A 0-d tensor as the first argument of the model's forward: the batch size comes from the next one."""

    def __init__(self):
        super().__init__()
        self.proj, self.cls, self.head = nn.Linear(3, 4), nn.Parameter(torch.randn(1, 1, 4)), nn.Linear(4, 2)

    def forward(self, temperature, x):
        h = self.proj(x)
        h = torch.cat([self.cls.expand(h.shape[0], -1, -1), h], 1)
        return self.head(h[:, 0]) / temperature


class FixedFirst(nn.Module):
    def __init__(self, inner, t):
        super().__init__()
        self.inner, self.t = inner, t

    def forward(self, x):
        return self.inner(self.t, x)


def test_a_zero_dim_first_argument_does_not_set_the_batch_size():
    m = ViTish().double()
    t, x = torch.tensor(2.0, dtype=torch.float64), torch.randn(4, 5, 3, dtype=torch.float64)
    ref, norms = clipped_sum_reference(FixedFirst(m, t), sq_loss, x, max_grad_norm=1e-2)
    eng = fastdp.GradSampleEngine(m, fastdp.FlatClip(1e-2))
    sq_loss(m(t, x)).backward()  # (the 0-d tensor taken as the batch: "cat with batched inputs is not supported for parameter 'cls'")
    eng.detach()
    assert eng.batch_size == 4
    assert_close(eng.last_norms, norms, 1e-9, 1e-14, "norms")
    for n, p in m.named_parameters():
        assert_close(eng.summed[p], ref["inner." + n], 1e-9, 1e-14, n)


@pytest.mark.parametrize("wrap", ["userdict", "dataclass", "nested"])
def test_batch_size_is_found_in_mappings_and_dataclasses(wrap):
    """A model called with an HF BatchEncoding-like mapping or a dataclass: the batch size is still found, so folded
    frames are refused (with no batch size found, every layer check would be skipped: 2.85 R for one sample)."""
    import collections
    import dataclasses

    @dataclasses.dataclass
    class Batch:
        pixels: torch.Tensor

    inner = Folded("conv2d").double()

    class Wrapped(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = inner

        def forward(self, batch):
            return self.inner(batch["pixels"] if isinstance(batch, collections.abc.Mapping) else batch.pixels)

    x = torch.randn(1, 2, 3, 5, 5, dtype=torch.float64)
    batch = {"userdict": lambda: collections.UserDict(pixels=x), "dataclass": lambda: Batch(x),
             "nested": lambda: [collections.UserDict(pixels=x)]}[wrap]()
    m = Wrapped()
    if wrap == "nested":
        m.forward = lambda b: Wrapped.forward(m, b[0])  # (instance attribute: the hooks still run)
    opt = dp_sgd(m, R=0.1)
    with pytest.raises(fastdp.BatchSizeError, match="batch size 1"):
        m(batch).sum().backward()
    opt.detach()


def test_a_forward_without_a_batched_tensor_is_refused():
    class Opaque:
        def __init__(self, x):
            self.x = x

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.l = nn.Linear(3, 2)

        def forward(self, o):
            return self.l(o.x)

    m = M().double()
    eng = fastdp.GradSampleEngine(m, fastdp.FlatClip(1.0))
    with pytest.raises(fastdp.BatchSizeError, match="no tensor argument"):
        m(Opaque(torch.randn(4, 3, dtype=torch.float64)))
    with torch.no_grad():  # evaluation is not checked
        m(Opaque(torch.randn(4, 3, dtype=torch.float64)))
    eng.detach()
