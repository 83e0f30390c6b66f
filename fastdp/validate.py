"""Before training: ``fix(model)`` replaces BatchNorm with GroupNorm; ``validate(model, example_input)`` lists every
trainable parameter fastdp would refuse, with the reason.

``fix`` follows the rule of Opacus' ``ModuleValidator.fix``: ``GroupNorm(gcd(32, C), C)``, with the BatchNorm's
``eps`` and ``affine``; the new layers start at the identity affine map (BatchNorm's running statistics have no
GroupNorm counterpart).

``validate`` checks the module types the engine refuses at attach (BatchNorm in training mode or trainable,
InstanceNorm tracking running statistics, sequence-first modules in a batch-first engine, modules with no handler
such as ``nn.Bilinear``); with an example input it also runs one forward and backward through a
``GradSampleEngine`` (a dry run: no parameter, ``.grad``, buffer or random state changes). Each refusal met there
freezes the module it names for the next try, so every refused use is listed, not just the first.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, List, Optional, Tuple

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from fastdp.tap import BatchSizeError, UnsupportedLayerError

_BATCHNORMS = (nn.modules.batchnorm._BatchNorm,)
_NO_HANDLER = (nn.Bilinear,)  # trainable modules whose ops no handler takes


@dataclasses.dataclass(frozen=True)
class Refusal:
    """A trainable parameter (``parameter``, its name in the model) of ``module`` that fastdp would refuse."""

    parameter: str
    module: str
    reason: str

    def __str__(self):
        return f"{self.parameter}: {self.reason}"


@dataclasses.dataclass
class FixReport:
    """What ``fix`` changed: ``replaced`` lists (module name, old module repr, new module repr)."""

    replaced: List[Tuple[str, str, str]] = dataclasses.field(default_factory=list)

    def __bool__(self):
        return bool(self.replaced)

    def __str__(self):
        if not self.replaced:
            return "nothing to fix"
        return "\n".join(f"{n or '<root>'}: {old} -> {new}" for n, old, new in self.replaced)


def group_norm_for(bn: nn.modules.batchnorm._BatchNorm) -> nn.GroupNorm:
    """The GroupNorm that replaces ``bn``: gcd(32, C) groups of its C channels, its eps and affine, same device and
    dtype (Opacus' rule)."""
    C = bn.num_features
    like = bn.weight if bn.weight is not None else bn.running_mean
    kw = {} if like is None else {"device": like.device, "dtype": like.dtype}
    return nn.GroupNorm(math.gcd(32, C), C, eps=bn.eps, affine=bn.affine, **kw)


def fix(model: nn.Module) -> Tuple[nn.Module, FixReport]:
    """Replace every BatchNorm (1d/2d/3d, SyncBatchNorm) of ``model`` with a GroupNorm, in place.

    Returns ``(model, report)``: the same model (or the new GroupNorm if ``model`` itself was a BatchNorm) and the
    list of replacements. Optimizers built before hold the old parameters: build them after ``fix``.
    """
    report = FixReport()
    if isinstance(model, _BATCHNORMS):
        new = group_norm_for(model).train(model.training)
        report.replaced.append(("", repr(model), repr(new)))
        return new, report
    for name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, _BATCHNORMS):
                new = group_norm_for(child).train(child.training)
                setattr(parent, child_name, new)
                full = f"{name}.{child_name}" if name else child_name
                report.replaced.append((full, repr(child), repr(new)))
    return model, report


def _module_refusal(name: str, m: nn.Module, batch_first: bool) -> Optional[str]:
    """The reason the engine refuses module ``m`` at attach or at its forward, known from its type alone."""
    from fastdp import model_hooks
    checks = [model_hooks._check_batchnorm] if isinstance(m, _BATCHNORMS) else []
    if isinstance(m, nn.modules.instancenorm._InstanceNorm) and hasattr(model_hooks, "_check_running_stats"):
        checks.append(model_hooks._check_running_stats)
    if batch_first:
        checks.append(model_hooks._check_sequence_first)
    for check in checks:
        try:
            check(name, m)
        except UnsupportedLayerError as e:
            return str(e)
    if isinstance(m, _NO_HANDLER) and any(p.requires_grad for p in m.parameters(recurse=False)):
        return (f"module '{name}' ({type(m).__name__}): no fastdp layer handler takes its op; freeze it or replace it "
                "with supported layers")
    return None


def _trainable(m: nn.Module, recurse: bool) -> List[nn.Parameter]:
    return [p for p in m.parameters(recurse=recurse) if p.requires_grad]


def _call(model, example_input):
    if isinstance(example_input, dict):
        return model(**example_input)
    if isinstance(example_input, (tuple, list)):
        return model(*example_input)
    return model(example_input)


def _scalar(out) -> Optional[torch.Tensor]:
    leaves = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor) and t.requires_grad
              and t.is_floating_point()]
    return sum(t.float().sum() for t in leaves) if leaves else None


def validate(model: nn.Module, example_input: Any = None, *, batch_first: bool = True,
             raise_errors: bool = False) -> List[Refusal]:
    """Every trainable parameter of ``model`` that fastdp would refuse, with the reason (empty: none).

    Args:
        model: the model, as it will be trained (its train/eval mode and frozen parameters count).
        example_input: a batch the model takes (a tensor; a tuple or list of positional arguments; a dict of keyword
            arguments), at least 2 samples. Without it only the module types are checked.
        batch_first: the layout the engine will use (``batch_first=False``: sequence-first models).
        raise_errors: raise ``UnsupportedLayerError`` listing every refusal instead of returning them.
    """
    names = {m: n for n, m in model.named_modules()}
    pnames = {p: n for n, p in model.named_parameters()}
    refusals: List[Refusal] = []
    blocked = []  # modules refused by type: frozen (BatchNorm also in eval mode) for the dry run
    for m, name in names.items():
        reason = _module_refusal(name, m, batch_first)
        if reason is not None:
            params = _trainable(m, recurse=True)
            refusals += [Refusal(pnames[p], name, reason) for p in params] or [Refusal("", name, reason)]
            blocked.append(m)
    if example_input is not None:
        refusals += _dry_run(model, example_input, batch_first, blocked, names, pnames)
    if raise_errors and refusals:
        raise UnsupportedLayerError("fastdp would refuse these parameters:\n" + "\n".join(map(str, refusals)))
    return refusals


_PARAM_IN_MESSAGE = re.compile(r"parameter '([^']*)'")
_MODULE_IN_MESSAGE = re.compile(r"module '([^']*)'")


def _culprits(msg: str, model: nn.Module, by_name) -> List[nn.Parameter]:
    """The trainable parameters a refusal names (``parameter 'name'``), else those of the module it names."""
    named = dict(model.named_parameters(remove_duplicate=False))
    params = [named[n] for n in _PARAM_IN_MESSAGE.findall(msg) if n in named and named[n].requires_grad]
    if params:
        return list(dict.fromkeys(params))
    for n in _MODULE_IN_MESSAGE.findall(msg):
        m = by_name.get("" if n == "<root>" else n)
        if m is not None and _trainable(m, recurse=False):
            return _trainable(m, recurse=False)
    return []


def _owner(names, p: nn.Parameter) -> str:
    return next((n for m, n in names.items() if any(q is p for q in m.parameters(recurse=False))), "")


def _dry_run(model, example_input, batch_first, blocked, names, pnames) -> List[Refusal]:
    """One forward and backward per try under a fresh engine; each refusal freezes the module it names."""
    from fastdp.clipping import FlatClip
    from fastdp.engine import GradSampleEngine
    by_name = {n: m for m, n in names.items()}
    saved_flags = {p: p.requires_grad for p in model.parameters()}
    saved_grads = {p: p.grad for p in model.parameters()}
    saved_modes = {m: m.training for m in model.modules()}
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    buffers = {id(b): b.detach().clone() for b in model.buffers()}
    found: List[Refusal] = []
    try:
        for m in blocked:
            for p in m.parameters():
                p.requires_grad_(False)
            if isinstance(m, _BATCHNORMS):
                m.eval()
        for _ in range(len(saved_flags) + 1):
            if not any(p.requires_grad for p in model.parameters()):
                break
            eng = GradSampleEngine(model, FlatClip(1.0), batch_first=batch_first)
            try:
                loss = _scalar(_call(model, example_input))
                if loss is not None:
                    loss.backward()
                break
            except (UnsupportedLayerError, BatchSizeError) as e:
                msg = str(e)
                params = _culprits(msg, model, by_name)
                if not params:  # names no trainable parameter: nothing to freeze, stop here
                    found.append(Refusal("", "", msg))
                    break
                found += [Refusal(pnames[p], _owner(names, p), msg) for p in params]
                for p in params:
                    p.requires_grad_(False)
            finally:
                eng.detach()
    finally:
        for p, flag in saved_flags.items():
            p.requires_grad_(flag)
            p.grad = saved_grads[p]
        for m, mode in saved_modes.items():
            m.training = mode
        for b in model.buffers():
            if id(b) in buffers:
                b.data.copy_(buffers[id(b)])
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
    return found
