"""``DPOptimizer``: wraps any torch optimizer; the user's training loop stays as it is.

After ``step()`` the wrapped optimizer sees, for every trainable parameter,

    p.grad = (sum_i c_i g_i + N(0, sigma^2 S^2 I)) / expected_batch_size

(Opacus' convention for a mean-reduced loss; with ``loss_reduction="sum"`` fastdp divides too, where Opacus
does not: ``loss_reduction`` only says how the per-sample gradients are recovered from the loss), where
``sum_i c_i g_i`` comes from the book-keeping engine and ``S`` is the
clipping rule's sensitivity (``max_grad_norm`` for flat and automatic clipping). Methods that change
one stage override it (``step``'s template): ``pre_step``, ``release`` (itself ``clipped_sums`` -> ``add_noise`` ->
``scale_grad``), ``account``, ``update``, ``after_step``.
"""
from __future__ import annotations

import enum
import math
import warnings
from typing import Optional, Sequence, Union

import torch
from torch import nn

from fastdp.accounting import epsilon_of, get_noise_multiplier, make_accountant
from fastdp.clipping import make_clip_rule
from fastdp.distributed import data_parallel
from fastdp.engine import GradSampleEngine
from fastdp.fused_sgd import FusedSGDStep
from fastdp.grad_buffer import GradBuffer
from fastdp.kernels._backend import backend_for_op
from fastdp.kernels.masked_noise import masked_noise
from fastdp.masks import FlatMasks
from fastdp.noise import NoiseSeeds, gaussian_noise
from fastdp.optimizer_checks import STATE_VERSION, check_arguments, checked_state
from fastdp.tap import UnsupportedLayerError


class Released(enum.Enum):
    """What ``DPOptimizer.release`` released: the noisy mean gradient in ``.grad`` (the wrapped optimizer then
    steps), the same with SGD's update already applied by the fused kernel, or nothing but what a method released
    itself (SPARTA's selection scores: no update)."""

    GRADIENT = "gradient"
    FUSED_UPDATE = "fused update"
    NOTHING = "nothing"


class DPOptimizer(torch.optim.Optimizer):
    """Differentially private wrapper of ``optimizer`` for ``model`` (flat clipping by default).

    Args:
        model: the module being trained. Hooks are attached to it; ``detach()`` removes them.
        optimizer: any ``torch.optim.Optimizer`` over (a subset of) the model's trainable parameters.
        noise_multiplier: sigma. Or leave None and give ``target_epsilon``, ``target_delta`` and
            ``epochs`` (or ``steps``) to calibrate it with the chosen accountant.
        max_grad_norm: clipping threshold R (a list/dict of one per trainable parameter for
            ``clipping="per_layer"``).
        expected_batch_size: the expected (Poisson) batch size; the noisy sum is divided by it. Under
            DistributedDataParallel it is the GLOBAL expected batch, all ranks together (Opacus takes the per-rank
            size), the same on every rank.
        sample_size: dataset size; ``sample_rate = expected_batch_size / sample_size``. Under DDP the whole dataset's
            size (not a rank's shard), the same on every rank.
        loss_reduction: "mean" or "sum", how the loss reduces over the batch (the per-sample gradients are B times
            the mean loss's, or the sum's). Either way ``.grad`` holds the noisy sum divided by
            ``expected_batch_size`` (Opacus does not divide for "sum": scale the learning rate by B to match it).
        accountant: "prv" (default) or "rdp".
        generator: ``torch.Generator`` for the noise (reproducible runs).
        secure_mode: draw noise from the OS CSPRNG (``fastdp.noise``); excludes ``generator``.
        clipping: "flat" (default), "automatic" (``R / (||g|| + gamma)``) or "per_layer".
        gamma: automatic clipping's stabiliser.
        fused_per_layer: with ``clipping="per_layer"``, clip and accumulate each parameter inside backward as
            soon as its gradient is complete, freeing its activations there (memory of non-private training).
            False defers it to the end of backward, as flat clipping must (needed only to backpropagate a
            retained graph together with a new one).
        sample_rate: Poisson sampling rate, when it is not exactly ``expected_batch_size / sample_size``
            (``make_private`` passes its loader's rate).
        distributed: None (default): a model wrapped in ``DistributedDataParallel`` trains data-parallel (each rank
            clips its samples, fastdp all-reduces the clipped sums once per step and rank 0 adds the noise once:
            ``fastdp.distributed``), and a plain model in a process group of several ranks is refused. False: train
            each rank's plain model alone, knowingly.
        batch_first: True (default): the samples are dim 0 of the model input and of every layer input. False:
            a sequence-first model (Opacus' ``GradSampleModule(batch_first=False)``): dim 1 of the model input and
            of every [T, B, ...] layer input ([B, d] inputs after pooling over time, and channel-first layers such
            as convolutions, keep them in dim 0).

    Examples:
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = DPOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=1.0,
        ...                   max_grad_norm=1.0, expected_batch_size=8, sample_size=800,
        ...                   generator=torch.Generator().manual_seed(0))
        >>> loss = model(torch.randn(8, 4)).pow(2).mean()
        >>> loss.backward(); opt.step(); opt.zero_grad()
        >>> 0 < opt.epsilon(delta=1e-5) < 1
        True

    Fused SGD step: when the wrapped optimizer is exactly ``torch.optim.SGD`` (plain-number hyper-parameters, not
    ``differentiable``, no step hooks), the ``noisy_sgd`` kernel backend is active (CUDA once that op is in
    ``GPU_VALIDATED``, or ``FASTDP_BACKEND=triton``), ``secure_mode`` is off and ``add_noise`` / ``scale_grad`` are
    this class's own, ``step()`` adds the noise, scales and applies SGD's update in one launch per flat buffer
    (``fastdp.kernels.noisy_sgd``) instead of ``add_noise``, ``scale_grad`` and ``optimizer.step()``. The maths is
    the same: Philox noise from a per-step seed (the masked kernel's stream, not ``gaussian_noise``'s values), the
    gradient left in ``p.grad``, the momentum buffers in ``optimizer.state[p]["momentum_buffer"]`` as torch keeps
    them (views of one fp32 tensor per flat buffer). A step that the kernel would compute differently falls back to
    the unfused path: parameters of one flat buffer in param groups with different settings, non-fp32 or
    non-contiguous parameters (torch keeps a bf16 parameter's gradient and momentum in bf16), masked coordinates
    that torch's SGD would move (weight decay, or momentum left on them), buffers missing for some parameters only
    with dampening. ``last_step_fused`` says which path the last step took and ``fused_fallback_reason`` why;
    set ``fuse_sgd = False`` on an instance to always take the unfused path.
    """

    fuse_sgd: bool = True

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *,
                 noise_multiplier: Optional[float] = None, max_grad_norm: Union[float, Sequence[float], dict] = 1.0,
                 expected_batch_size: int, sample_size: int,
                 target_epsilon: Optional[float] = None, target_delta: Optional[float] = None,
                 epochs: Optional[float] = None, steps: Optional[int] = None,
                 loss_reduction: str = "mean", accountant: str = "prv",
                 generator: Optional[torch.Generator] = None, secure_mode: bool = False,
                 clipping: str = "flat", gamma: float = 0.01, sample_rate: Optional[float] = None,
                 fused_per_layer: bool = True, distributed: Optional[bool] = None, batch_first: bool = True):
        if isinstance(optimizer, DPOptimizer):
            raise TypeError("optimizer is already a DPOptimizer")
        check_arguments(optimizer, expected_batch_size, sample_size, max_grad_norm, target_delta, secure_mode, generator)
        self.original_optimizer = optimizer
        self.model = model
        self.expected_batch_size = int(expected_batch_size)
        self.sample_size = int(sample_size)
        self.sample_rate = expected_batch_size / sample_size if sample_rate is None else float(sample_rate)
        if not 0 < self.sample_rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1], got {self.sample_rate}")
        self.accountant_name = accountant
        self.accountant = make_accountant(accountant)
        self.seeds = NoiseSeeds(generator)  # the noise generator, and per-launch seeds of the counter-based kernels
        self.secure_mode = secure_mode
        self.noise_multiplier = self._resolve_sigma(noise_multiplier, target_epsilon, target_delta, epochs, steps)
        self.target_delta = target_delta
        named = _trainable_named(model)
        self._check_params(named)
        self.clip_rule = make_clip_rule(clipping, max_grad_norm, named, gamma)
        noise_std = self.noise_multiplier * self.clip_rule.sensitivity
        if not (math.isfinite(noise_std) and 8 * noise_std < torch.finfo(torch.float32).max):
            raise ValueError(f"noise_multiplier * max_grad_norm = {self.noise_multiplier:g} * "
                             f"{self.clip_rule.sensitivity:g}: the noise's standard deviation would overflow float32 "
                             "(the step would write non-finite weights); use a smaller max_grad_norm")
        self.clipping = clipping
        self.max_grad_norm = max_grad_norm
        self.engine = GradSampleEngine(model, self.clip_rule, loss_reduction=loss_reduction,
                                       fused_per_layer=fused_per_layer and self.clip_rule.per_param,
                                       batch_first=batch_first)
        self.flat_masks = FlatMasks(self.engine)  # the engine's masks laid out as the flat buffers
        try:
            # DDP / FSDP2: the all-reduce of the clipped sums (None: one process)
            self.comm = data_parallel(model, distributed, self.engine)
            if self.comm is not None and not self.comm.supports(type(self)):
                raise UnsupportedLayerError(f"{type(self).__name__} is not supported on an FSDP2 (fully_shard) model "
                                            "yet: use DPOptimizer, or DistributedDataParallel")
        except BaseException:
            self.engine.detach()
            raise
        if self.comm is not None:
            self.comm.check_same_config(self._config())
        self.steps_taken = 0
        self._fused_sgd = FusedSGDStep()
        self._fused_at = -1  # steps_taken after the last fused step
        self.fused_fallback_reason: Optional[str] = None  # why the last step through DPOptimizer.step was not fused
        self._step_skip_queue: list = []  # Opacus' virtual-step signals (signal_skip_step), consumed one per step()
        self._last_step_skipped = False

    @property
    def generator(self) -> Optional[torch.Generator]:
        """The noise's ``torch.Generator`` (None: torch's default generator)."""
        return self.seeds.generator

    @generator.setter
    def generator(self, value: Optional[torch.Generator]) -> None:
        self.seeds.generator = value

    # torch.optim.Optimizer interface, shared with the wrapped optimizer
    @property
    def param_groups(self):
        return self.original_optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value):
        self.original_optimizer.param_groups = value

    @property
    def state(self):
        return self.original_optimizer.state

    @state.setter
    def state(self, value):
        self.original_optimizer.state = value

    @property
    def defaults(self):
        return self.original_optimizer.defaults

    @defaults.setter
    def defaults(self, value):
        self.original_optimizer.defaults = value

    def __repr__(self):
        return (f"DPOptimizer(noise_multiplier={self.noise_multiplier:.4g}, clip={self.clip_rule!r}, "
                f"expected_batch_size={self.expected_batch_size}, sample_rate={self.sample_rate:.4g}, "
                f"accountant={self.accountant_name!r}, wrapping {type(self.original_optimizer).__name__})")

    # ------------------------------------------------------------------ setup
    def _resolve_sigma(self, sigma, target_epsilon, target_delta, epochs, steps) -> float:
        if sigma is not None:
            if target_epsilon is not None:
                raise ValueError("give noise_multiplier or target_epsilon, not both")
            if not (isinstance(sigma, (int, float)) and not isinstance(sigma, bool) and math.isfinite(sigma)
                    and sigma >= 0):
                raise ValueError(f"noise_multiplier must be a finite number >= 0, got {sigma!r}")
            if sigma == 0:
                warnings.warn("noise_multiplier=0: gradients are clipped but not noised; this run is NOT "
                              "differentially private (epsilon is infinite)", UserWarning, stacklevel=3)
            return float(sigma)
        if target_epsilon is None or target_delta is None:
            raise ValueError("give noise_multiplier, or target_epsilon with target_delta and epochs (or steps)")
        return get_noise_multiplier(target_epsilon=target_epsilon, target_delta=target_delta,
                                    sample_rate=self.sample_rate, epochs=epochs, steps=steps,
                                    accountant=self.accountant_name)

    def _check_params(self, named):
        trainable = {p for _, p in named}
        for group in self.original_optimizer.param_groups:
            for p in group["params"]:
                if p.requires_grad and p not in trainable:
                    raise ValueError("the optimizer holds a trainable parameter that is not in the model "
                                     f"(shape {tuple(p.shape)}): its gradient would not be privatised")
        if self.generator is not None:
            devices = {p.device.type for p in trainable}
            if devices and self.generator.device.type not in devices:
                raise ValueError(f"generator is on {self.generator.device} but the parameters are on {devices}")

    def _config(self) -> dict:
        """What must be equal on every rank (checked once under DDP)."""
        return {"class": type(self).__qualname__, "noise_multiplier": self.noise_multiplier,
                "expected_batch_size": self.expected_batch_size, "sample_size": self.sample_size,
                "sample_rate": self.sample_rate, "clipping": self.clipping, "max_grad_norm": repr(self.max_grad_norm),
                "accountant": self.accountant_name, "loss_reduction": self.engine.loss_reduction,
                "secure_mode": self.secure_mode,
                "trainable": [(n, tuple(p.shape), str(p.dtype)) for n, p in _trainable_named(self.model)]}

    # ------------------------------------------------------------------- step
    def pre_step(self) -> bool:
        """Checks before privatising; returns False to skip the step."""
        if self.engine.sums.poisoned:
            raise RuntimeError("a backward pass failed after part of its clipped gradients were added to the sums of "
                               "earlier micro-batches; call optimizer.zero_grad() and redo the step's micro-batches")
        if self.engine.num_backward == 0:
            raise RuntimeError("optimizer.step() without a backward pass since the last step. With Poisson "
                               "sampling, run forward/backward on the (possibly empty) batch first.")
        for group in self.original_optimizer.param_groups:
            for p in group["params"]:
                if p.requires_grad and p not in self.engine.param_names:
                    raise RuntimeError(f"the optimizer holds a trainable parameter (shape {tuple(p.shape)}) the DP "
                                       "engine does not track (added to the model after the DPOptimizer was built?)")
        return True

    def clipped_sums(self) -> GradBuffer:
        """The flat buffer holding ``sum_i c_i g_i`` for every trainable parameter (zeros where untouched)."""
        return self.engine.buffer

    def noise_std(self) -> float:
        """Standard deviation of the noise added to the clipped sum: sigma * sensitivity."""
        return self.noise_multiplier * self.clip_rule.sensitivity

    def add_noise(self, grads: GradBuffer) -> None:
        """Add N(0, noise_std^2) to every trainable coordinate that trains: all of them, except the coordinates
        outside ``engine.masks``, which stay exactly zero.

        Unmasked: one draw per flat buffer. Masked, not in ``secure_mode``, on fp32 buffers for which
        ``backend_for_op("masked_noise", ...)`` picks Triton: counter-based Philox noise written only on the kept
        coordinates (no full-size noise tensor; the per-step seed comes from ``generator``). Triton is picked under
        ``FASTDP_BACKEND=triton`` (CUDA, or CPU with ``TRITON_INTERPRET=1``), and under the default backend on CUDA
        only once ``"masked_noise"`` is in ``fastdp.kernels._backend.GPU_VALIDATED`` (it is not yet: on CUDA the default
        is the fallback). Otherwise a full draw whose masked coordinates are then zeroed. The distributions are the
        same."""
        std = self.noise_std()
        masks = self.engine.masks
        if masks and not self.secure_mode:
            kernel = [f.dtype == torch.float32 and backend_for_op("masked_noise", f) == "triton" for f in grads.flats]
            if any(kernel):
                flat_masks = self.flat_masks.get(grads)
                for flat, fmask, k in zip(grads.flats, flat_masks, kernel):
                    if k:
                        masked_noise(flat, std, self.seeds.next(), mask=fmask)
                    else:
                        flat += gaussian_noise(flat, std, generator=self.generator) * fmask
                return
        for flat in grads.flats:
            flat += gaussian_noise(flat, std, generator=self.generator, secure=self.secure_mode)
        for p, mask in masks.items():
            if p in grads.views:
                grads.views[p].mul_(mask.dense)

    def scale_grad(self, grads: GradBuffer) -> None:
        for flat in grads.flats:
            flat /= self.expected_batch_size

    def step(self, closure=None):
        """One DP step, as stages a method overrides one of: ``pre_step`` (checks) -> ``release`` (the privatised
        gradient in ``.grad``) -> ``account`` -> ``update`` (the wrapped optimizer) -> ``after_step``."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._step_skip_queue and self._step_skip_queue.pop(0):
            self._last_step_skipped = True  # not the last physical batch of its logical batch: keep accumulating
            return loss
        self._last_step_skipped = False
        if not self.pre_step():
            return loss
        released = self.release()
        self.account()
        self.update(released)
        self.after_step()
        return loss

    def release(self) -> Released:
        """Privatise the clipped sums and release them: noise (``add_noise``) and the division by the expected batch
        size (``scale_grad``) in place, then the buffer's views as ``.grad``; or, where ``fused_plan`` allows, the
        fused kernel, which also applies SGD's update. The engine's sums are consumed."""
        grads = self.clipped_sums()
        plan, self.fused_fallback_reason = self.fused_plan(grads)
        if plan is None:
            if self.comm is None or self.comm.adds_noise:
                self.add_noise(grads)  # under DDP rank 0's noise only, before the sum over ranks: exactly once
            if self.comm is not None:  # DDP: all-reduce; FSDP2: reduce-scatter unless the whole release is needed
                self.comm.reduce_release_(grads, full=self.needs_full_release)
            self.scale_grad(grads)
        else:
            self._fused_sgd.run(self.original_optimizer, plan, self.noise_std(), 1.0 / self.expected_batch_size,
                                self.seeds)
        if self.comm is not None:
            self.comm.set_grads(grads.views)  # (FSDP2: each rank's shard, as a DTensor)
        else:
            for p, g in grads.views.items():
                p.grad = g if g.dtype == p.dtype else g.to(p.dtype)
        self.engine.reset()
        self.engine.sums.released = True
        return Released.GRADIENT if plan is None else Released.FUSED_UPDATE

    @property
    def needs_full_release(self) -> bool:
        """Whether this optimizer reads the whole released gradient after the reduction (``scale_grad`` overridden, or
        ``released``): on an FSDP2 model the step then all-reduces instead of reduce-scattering (``fastdp.fsdp``)."""
        return type(self).scale_grad is not DPOptimizer.scale_grad

    def released(self, p: nn.Parameter) -> torch.Tensor:
        """The whole gradient of ``p`` released by the last step (its ``.grad``; on an FSDP2 model, where ``.grad`` is
        this rank's shard, the full reduced gradient, read from the buffer before the next backward reuses it: the
        optimizer must say so with ``needs_full_release``)."""
        if self.comm is not None and getattr(self.comm, "shards_grads", False):
            if self.comm.scattered:
                raise RuntimeError(f"{type(self).__name__}.released: the last step reduce-scattered the gradient (each "
                                   "rank holds its shard only); set needs_full_release to read the whole of it")
            return self.engine.buffer.views[p]
        return p.grad

    def fused_plan(self, grads: GradBuffer):
        """``(plan, None)`` when noise, scaling and SGD's update can run as one fused launch per flat buffer, else
        ``(None, reason)`` (``fastdp.fused_sgd``)."""
        if not self.fuse_sgd:
            return None, "fuse_sgd is off"
        if self.comm is not None:
            return None, "distributed: the clipped sums are all-reduced between the noise and the update"
        cls, dp_reason = type(self), None
        if self.secure_mode:
            dp_reason = "secure_mode draws its noise from the OS CSPRNG"
        elif (cls.add_noise is not DPOptimizer.add_noise or cls.scale_grad is not DPOptimizer.scale_grad
              or "add_noise" in vars(self) or "scale_grad" in vars(self)):
            dp_reason = "add_noise or scale_grad is overridden"
        return self._fused_sgd.plan(self.original_optimizer, grads, self.engine.masks, self.flat_masks, dp_reason)

    def account(self) -> None:
        """One step of the accountant at this step's noise multiplier and sample rate."""
        self.accountant.step(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate)
        self.steps_taken += 1

    def update(self, released: Released) -> None:
        """The wrapped optimizer's step on the released ``.grad`` (a fused release has applied it already)."""
        if released is Released.GRADIENT:
            self.original_optimizer.step()
            self._fused_sgd.after_unfused_step()
        elif released is Released.FUSED_UPDATE:
            if getattr(self.original_optimizer.step, "_wrapped_by_lr_sched", False):
                self.original_optimizer._opt_called = True  # what the LR scheduler's wrapper of step() records
            self._fused_at = self.steps_taken

    def after_step(self) -> None:
        """Called after every step (methods change phase or masks here)."""

    @property
    def last_step_fused(self) -> bool:
        """Whether the last step ran the fused noise + SGD kernel (False after a step a method took on its own,
        e.g. SPARTA's selection steps, and before any step)."""
        return self._fused_at == self.steps_taken

    def signal_skip_step(self, do_skip: bool = True) -> None:
        """Opacus' virtual-step signal, which ``opacus.utils.batch_memory_manager.BatchMemoryManager`` sends once per
        physical batch it yields: ``do_skip=True`` makes the next ``step()`` a no-op that keeps the clipped sums (and
        the ``zero_grad()`` after it keep them too), so the physical batches of one Poisson batch make one step and
        one accountant step. Signals are consumed in order, one per ``step()``."""
        self._step_skip_queue.append(bool(do_skip))

    def zero_grad(self, set_to_none: bool = True):
        """Clear gradients. ``.grad`` is always set to None (``set_to_none=False`` included): the step's
        gradients are views of the engine's buffer, which the next backward reuses for un-noised sums."""
        if self._last_step_skipped:
            return  # after a skipped (virtual) step the clipped sums carry over to the next physical batch
        self.original_optimizer.zero_grad(set_to_none=set_to_none)
        for p in self.engine.param_names:  # parameters outside the optimizer were given a .grad too
            p.grad = None
        self.engine.reset()
        self.engine.sums.released = False

    def _no_hooks(self, *args, **kwargs):
        raise NotImplementedError(
            "DPOptimizer runs no torch.optim hooks (the fused noise + SGD step bypasses the wrapped optimizer's "
            "step()): call the code before / after optimizer.step() or state_dict() yourself")

    register_step_pre_hook = register_step_post_hook = _no_hooks
    register_state_dict_pre_hook = register_state_dict_post_hook = _no_hooks
    register_load_state_dict_pre_hook = register_load_state_dict_post_hook = _no_hooks

    def detach(self) -> torch.optim.Optimizer:
        """Remove the engine's hooks (and give a DDP model its own gradient synchronisation back); returns the wrapped
        optimizer."""
        self.engine.detach()
        if self.comm is not None and hasattr(self.comm, "restore"):
            self.comm.restore()
        return self.original_optimizer

    def __deepcopy__(self, memo):
        # torch.optim.Optimizer's unpickling rewraps the class's step before failing on this wrapper, which would
        # break step() of every DPOptimizer in the process: refuse early and clearly instead.
        raise TypeError("a DPOptimizer cannot be copied or pickled; save state_dict() and load it into a new one")

    def __reduce_ex__(self, protocol):  # pickling: same reason
        raise TypeError("a DPOptimizer cannot be copied or pickled; save state_dict() and load it into a new one")

    # ------------------------------------------------------------- accounting
    def epsilon(self, delta: Optional[float] = None) -> float:
        """Epsilon spent so far at ``delta`` (default: the ``target_delta`` given at construction)."""
        delta = self.target_delta if delta is None else delta
        if delta is None:
            raise ValueError("epsilon() needs a delta")
        return epsilon_of(self.accountant, delta)

    # --------------------------------------------------------------- state
    def state_dict(self):
        """The wrapped optimizer's state plus the privacy state (accountant history, steps, noise RNG)."""
        return {
            "optimizer": self.original_optimizer.state_dict(),
            "fastdp": {
                "version": STATE_VERSION,
                "accountant": self.accountant_name,
                "accountant_state": self.accountant.state_dict(),
                "steps_taken": self.steps_taken,
                "noise_multiplier": self.noise_multiplier,
                "sample_rate": self.sample_rate,
                "generator_state": self.generator.get_state() if self.generator is not None else None,
                "seed_base": self.seeds.base,
                "seed_count": self.seeds.count,
            },
        }

    def load_state_dict(self, state_dict):
        """Load ``state_dict()``'s output: all or nothing. Every part is checked first (the step count against the
        accountant's history included: an inconsistent state could under-report epsilon); on any error nothing of
        this optimizer, nor of the wrapped one, has changed."""
        if not isinstance(state_dict, dict) or "fastdp" not in state_dict:
            raise ValueError("not a DPOptimizer state dict (no 'fastdp' entry): loading a plain optimizer state "
                             "would lose the privacy accounting history")
        if "optimizer" not in state_dict:
            raise ValueError("DPOptimizer state dict without the wrapped optimizer's state ('optimizer' entry)")
        history, steps_taken, generator_state, seed_base, seed_count = checked_state(state_dict["fastdp"], self.accountant_name)
        generator_backup = None
        if self.generator is not None and generator_state is not None:
            generator_backup = self.generator.get_state()
            try:
                self.generator.set_state(generator_state)
            except Exception as err:
                raise ValueError(f"DPOptimizer state: generator_state does not fit this optimizer's noise generator "
                                 f"({self.generator.device}): {err}") from None
        backup = self.original_optimizer.state_dict()
        try:
            self.original_optimizer.load_state_dict(state_dict["optimizer"])
        except Exception:  # a failed load leaves the wrapped optimizer and the generator as they were
            self.original_optimizer.load_state_dict(backup)
            if generator_backup is not None:
                self.generator.set_state(generator_backup)
            raise
        self.accountant.history = history
        self.steps_taken = steps_taken
        self._fused_at = -1
        self.seeds.base, self.seeds.count = seed_base, seed_count

def _trainable_named(model: nn.Module):
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]
