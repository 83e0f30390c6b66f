"""A model with an engine attached: ``torch.save`` of it loads a plain model (the original stays private), and a
second engine on it is refused, naming ``detach()``, with the parameter slots restored."""
import io

import pytest
import torch
import torch.nn as nn

import fastdp
from helpers import dp_sgd, small_mlp

pytestmark = pytest.mark.filterwarnings("ignore:noise_multiplier")


def test_second_engine_on_an_attached_model_names_detach():
    m = nn.Linear(4, 2)
    opt1 = dp_sgd(m, 1.0, B=4)
    opt2 = dp_sgd(m, 1.0, B=4)
    with pytest.raises(RuntimeError, match=r"detach\(\)"):
        m(torch.randn(4, 4))
    assert all(not isinstance(p, fastdp.tap.ParamTap) for p in m._parameters.values())  # slots restored
    opt1.detach()
    m(torch.randn(4, 4)).sum().backward()  # the new one works once the old one is detached
    assert opt2.engine.num_backward == 1
    opt2.detach()


def test_torch_save_of_an_attached_model_loads_a_plain_model():
    m = small_mlp()
    opt = dp_sgd(m, 1.0, B=2)
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    loaded(torch.randn(2, 4, dtype=torch.float64)).sum().backward()
    assert all(p.grad is not None for p in loaded.parameters())  # trains plainly
    m(torch.randn(2, 4, dtype=torch.float64)).sum().backward()  # the original is still private
    assert opt.engine.num_backward == 1 and all(p.grad is None for p in m.parameters())
    opt.detach()
