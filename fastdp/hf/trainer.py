"""``DPTrainer``: ``transformers.Trainer`` training with DP-SGD (Poisson-sampled logical batches, fastdp's engine).

What changes from ``Trainer``, and why:

* **Sampling.** Each logical batch is a Poisson sample (opacus' ``UniformWithReplacementSampler``: every training
  sample joins independently with probability ``q``) of expected size ``L = per_device_train_batch_size x
  gradient_accumulation_steps x world_size``; ``q = L / len(train_dataset)``, ``int(1 / q)`` logical batches per
  epoch (opacus' convention). The accountant assumes exactly this, so Trainer's shuffled fixed-size batches are not
  used, and settings that would change which samples a step sees are refused.
* **Micro-batches.** A logical batch runs as physical batches of at most ``per_device_train_batch_size`` samples;
  their clipped sums accumulate in ``DPOptimizer`` and one optimizer step, one accountant step, follow the last of
  them. Inside DPTrainer ``args.gradient_accumulation_steps`` is 1 (one Trainer step per logical batch) and
  ``args.max_grad_norm`` is 0 (Trainer's clipping of the summed gradient is replaced by per-sample clipping at
  DPTrainer's ``max_grad_norm``): ``trainer.args`` is a copy; the ``TrainingArguments`` you passed are unchanged.
* **Loss.** Each sample's own loss (``fastdp.hf.losses``): HF's built-in losses average over the batch's tokens,
  which ties one sample's weight to the others'. ``per_sample_loss=`` overrides it.
* **Optimizer.** Trainer's optimizer (from ``args.optim``, or the plain optimizer passed in ``optimizers=``) is
  wrapped in ``fastdp.DPOptimizer``; Trainer's learning-rate schedulers keep working (they act on the same param
  groups, once per logical batch).
* **Logs and checkpoints.** ``epsilon`` is logged with the loss at every logging step and with the final metrics.
  Checkpoints hold the accountant history and the noise generator (in ``optimizer.pt``) and the sampling seed
  (``fastdp_dp_state.pt``): ``resume_from_checkpoint`` continues with the batches, noise and epsilon of the
  uninterrupted run. Both files are as secret as the data: the seed tells which samples formed each batch.

* **Several processes** (torchrun, one process per device; gloo or NCCL). Rank ``r`` Poisson-samples its shard
  (samples ``r, r + world_size, ...``) at the global rate ``q`` with its own generator, and runs its part of the
  logical batch as physical batches. DPTrainer wraps the model in ``DistributedDataParallel`` itself (before
  accelerate would) and builds the ``DPOptimizer`` on that wrapper: DDP's own gradient all-reduce is switched off,
  fastdp all-reduces the clipped sums once per step and rank 0 adds the noise (``fastdp.distributed``). Every rank
  takes ``int(1 / q)`` steps per epoch (a rank with an empty local batch still steps), the accountant counts the
  global rate, so epsilon is the same on every rank.

The loss Trainer logs is the mean of the per-sample losses of the logical batch: computed from the private data and
not privatised, it is outside the reported epsilon (as in ``fastdp train``).
"""
from __future__ import annotations

import copy
import functools
import math
import numbers
import os
import secrets
from collections.abc import Mapping
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import IterableDataset
from transformers import Trainer
from transformers.trainer_utils import has_length
from transformers.training_args import ParallelMode
from transformers.utils import is_datasets_available

from fastdp.accounting import get_noise_multiplier
from fastdp.atomic import atomic_write
from fastdp.hf.losses import HEADS, head_of, per_sample_losses
from fastdp.hf.sampling import EpochPoissonSampler, LogicalBatch, LogicalBatchLoader, LogicalCollator, collate_one
from fastdp.optimizer import DPOptimizer
from fastdp.virtual_batches import leading_sizes

DP_STATE_NAME = "fastdp_dp_state.pt"
OPTIMIZER_NAME = "optimizer.pt"
DP_STATE_VERSION = 1
# What a resumed run must share with the checkpoint for its epsilon and its batches to continue the first run's.
_RESUME_KEYS = ("sample_size", "expected_batch_size", "max_physical_batch_size", "sample_rate", "steps_per_epoch",
                "noise_multiplier", "max_grad_norm", "clipping", "accountant", "world_size")
# A state saved before multi-process support lacks some keys: their value then.
_RESUME_DEFAULTS = {"world_size": 1}


class DPTrainer(Trainer):
    """``transformers.Trainer`` with differentially private training (module docstring: what changes and why).

    Args (DP; keyword only, everything else as ``Trainer``):
        target_epsilon: calibrate the noise multiplier so that the whole run (``args.max_steps``, else
            ``args.num_train_epochs`` epochs of ``int(1 / q)`` logical batches) spends this epsilon at
            ``target_delta``. Or give ``noise_multiplier``.
        noise_multiplier: sigma (the noise's standard deviation over the clipping bound).
        target_delta: delta of the reported epsilon (required).
        max_grad_norm: per-sample clipping bound R (a list / dict per trainable parameter for ``clipping="per_layer"``).
        clipping: "flat" (default), "automatic" or "per_layer" (``fastdp.DPOptimizer``).
        accountant: "prv" (default) or "rdp".
        per_sample_loss: ``fn(model, inputs) -> [B]`` tensor of each sample's own loss, for models whose head
            DPTrainer does not know (it knows causal LM, masked LM, token and sequence classification heads of
            transformers, plain or under peft) or for a custom loss.
        sampling_seed / noise_seed: secret seeds of the Poisson sampling and of the noise (default: fresh OS entropy
            per run). Give both, distinct and secret, for reproducible runs.
        secure_mode: draw the noise from the OS CSPRNG (``noise_seed`` must then be None).
        gamma: automatic clipping's stabiliser.

    Attributes: ``noise_multiplier``, ``sample_rate``, ``expected_batch_size`` (L), ``steps_per_epoch``,
    ``dp_optimizer`` (the ``DPOptimizer``, once training has started) and ``epsilon(delta=None)``.

    Refused (ValueError / NotImplementedError naming the setting): ``train_sampling_strategy`` other than
    "random" (length-grouped, rebalanced or sequential batches), ``dataloader_drop_last``, ``auto_find_batch_size``,
    ``ignore_data_skip`` (a resume would replay the epoch's first batches), an ``IterableDataset`` or a dataset
    without ``len``, ``fp16`` (its GradScaler scales the loss that is clipped: use ``bf16``), ``label_smoothing_factor``,
    ``compute_loss_func`` (use ``per_sample_loss``), ``torch_compile``, ``args.max_grad_norm`` other than 1.0 (the
    default) or 0, a ``DPOptimizer`` in ``optimizers=`` (pass the plain optimizer), several GPUs in one process
    (``nn.DataParallel``), several processes other than torch.distributed's (TPU / XLA, SageMaker),
    ``ddp_static_graph``, DeepSpeed and FSDP. Several processes under torchrun are supported (module docstring).
    ``gradient_checkpointing=True`` goes through fastdp's engine as any activation checkpointing:
    exact where the engine supports it, refused by the engine with its own message where it does not. Evaluation on
    any data is unaffected.
    """

    def __init__(self, model=None, args=None, *trainer_args, target_epsilon: Optional[float] = None,
                 noise_multiplier: Optional[float] = None, target_delta: Optional[float] = None,
                 max_grad_norm=1.0, clipping: str = "flat", accountant: str = "prv",
                 per_sample_loss: Optional[Callable] = None, sampling_seed: Optional[int] = None,
                 noise_seed: Optional[int] = None, secure_mode: bool = False, gamma: float = 0.01, **trainer_kwargs):
        if args is not None:
            _check_training_arguments(args)
            gradient_accumulation_steps = int(args.gradient_accumulation_steps)
            args = copy.deepcopy(args)
            args.gradient_accumulation_steps = 1  # one Trainer step = one logical (Poisson) batch
            args.max_grad_norm = 0.0  # per-sample clipping replaces Trainer's clipping of the summed gradient
        else:
            gradient_accumulation_steps = 1
        super().__init__(model, args, *trainer_args, **trainer_kwargs)
        if args is None:
            _check_training_arguments(self.args)
            self.args.max_grad_norm = 0.0
        self._check_setup(per_sample_loss)
        if target_delta is None:
            raise ValueError("DPTrainer needs target_delta (the delta of the reported epsilon)")
        if (noise_multiplier is None) == (target_epsilon is None):
            raise ValueError("give DPTrainer noise_multiplier or target_epsilon (with target_delta), exactly one")
        if sampling_seed is not None and noise_seed is not None and sampling_seed == noise_seed:
            raise ValueError("sampling_seed and noise_seed must differ (one seed for both would tie the noise to the "
                             "batches' membership)")
        if secure_mode and noise_seed is not None:
            raise ValueError("secure_mode draws the noise from the OS CSPRNG: noise_seed must be None")

        self.per_sample_loss_fn = per_sample_loss
        self.head = None if per_sample_loss is not None else head_of(self.model)
        self.sample_size = len(self.train_dataset)
        self.max_physical_batch_size = int(self.args.per_device_train_batch_size)
        self.gradient_accumulation_steps = gradient_accumulation_steps
        self.world_size = max(1, int(self.args.world_size))
        self.rank = int(self.args.process_index) if self.world_size > 1 else 0
        self.expected_batch_size = self.max_physical_batch_size * gradient_accumulation_steps * self.world_size
        if self.expected_batch_size > self.sample_size:
            raise ValueError(f"the expected logical batch (per_device_train_batch_size x gradient_accumulation_steps x "
                             f"world_size = {self.expected_batch_size}) exceeds the training set ({self.sample_size} "
                             "samples)")
        self.sample_rate = self.expected_batch_size / self.sample_size
        self.steps_per_epoch = int(1 / self.sample_rate)  # opacus' UniformWithReplacementSampler
        self.total_steps = (int(self.args.max_steps) if self.args.max_steps > 0
                            else math.ceil(self.args.num_train_epochs * self.steps_per_epoch))
        if noise_multiplier is None:
            noise_multiplier = get_noise_multiplier(target_epsilon=target_epsilon, target_delta=target_delta,
                                                    sample_rate=self.sample_rate, steps=self.total_steps,
                                                    accountant=accountant)
        if not (isinstance(noise_multiplier, numbers.Real) and not isinstance(noise_multiplier, bool)
                and math.isfinite(noise_multiplier) and noise_multiplier >= 0):
            raise ValueError(f"noise_multiplier must be a finite number >= 0, got {noise_multiplier!r}")
        self.noise_multiplier = float(noise_multiplier)
        self.target_epsilon, self.target_delta = target_epsilon, target_delta
        self.max_grad_norm, self.clipping, self.accountant_name, self.gamma = max_grad_norm, clipping, accountant, gamma
        self.secure_mode = secure_mode
        self.sampling_seed = secrets.randbits(62) if sampling_seed is None else int(sampling_seed)
        if self.world_size > 1:
            # One run seed (rank 0's): each rank derives its own shard's generator from it and its rank, so the
            # ranks' draws differ, and a checkpoint (saved by rank 0) resumes every rank's sampling.
            box = [self.sampling_seed]
            dist.broadcast_object_list(box, src=0)
            self.sampling_seed = int(box[0])
        self.noise_seed = None if secure_mode else (secrets.randbits(62) if noise_seed is None else int(noise_seed))
        self.dp_optimizer: Optional[DPOptimizer] = None
        self._ddp_model: Optional[nn.parallel.DistributedDataParallel] = None
        self._poisson_sampler: Optional[EpochPoissonSampler] = None
        self._epsilon_cache = (None, None, None)

    # ----------------------------------------------------------------- checks
    def _check_setup(self, per_sample_loss) -> None:
        args = self.args
        if args.n_gpu > 1:
            raise NotImplementedError(
                f"DPTrainer uses one device per process (n_gpu={args.n_gpu}: Trainer would replicate the model with "
                "nn.DataParallel, which fastdp does not support): launch one process per GPU with torchrun")
        if args.world_size > 1 and args.parallel_mode != ParallelMode.DISTRIBUTED:
            raise NotImplementedError(
                f"DPTrainer runs several processes only under torch.distributed (torchrun), not {args.parallel_mode} "
                f"(world_size={args.world_size})")
        if args.world_size > 1 and getattr(args, "ddp_static_graph", False):
            raise NotImplementedError("ddp_static_graph=True is not supported by DPTrainer: DDP's static graph "
                                      "all-reduces the parameters' gradients itself (fastdp reduces the clipped sums)")
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            raise NotImplementedError("DPTrainer does not support DeepSpeed or FSDP")
        if self.train_dataset is None:
            raise ValueError("DPTrainer needs a train_dataset (its size sets the sampling rate)")
        if isinstance(self.train_dataset, IterableDataset) or not has_length(self.train_dataset):
            raise ValueError("DPTrainer needs a map-style train_dataset with len(): Poisson sampling draws each sample "
                             "independently, which an IterableDataset cannot do")
        if self.compute_loss_func is not None:
            raise ValueError("DPTrainer clips each sample's own loss: pass per_sample_loss=fn(model, inputs) -> [B] "
                             "instead of compute_loss_func (a batch-reduced loss)")
        if isinstance(self.optimizer, DPOptimizer) or isinstance(getattr(self.optimizer, "optimizer", None), DPOptimizer):
            raise ValueError("pass DPTrainer the plain optimizer in optimizers=(optimizer, scheduler): DPTrainer wraps it "
                             "in its own DPOptimizer (the sampling rate and batch size come from the Trainer)")
        if per_sample_loss is None and head_of(self.model) is None:
            base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
            raise NotImplementedError(
                f"DPTrainer does not know the head of {type(base).__name__} (it knows {', '.join(HEADS)}): pass "
                "per_sample_loss=fn(model, inputs) returning each sample's own loss as a [B] tensor")

    # ------------------------------------------------------------------- data
    def get_train_dataloader(self):
        """A loader of ``LogicalBatch`` items: Poisson batches, each collated as physical batches."""
        dataset, collate = self.train_dataset, self.data_collator
        if is_datasets_available():
            import datasets
            if isinstance(dataset, datasets.Dataset):
                dataset = self._remove_unused_columns(dataset, description="training")
            else:
                collate = self._get_collator_with_removed_columns(collate, description="training")
        else:
            collate = self._get_collator_with_removed_columns(collate, description="training")
        self._poisson_sampler = EpochPoissonSampler(len(dataset), self.sample_rate, self.steps_per_epoch,
                                                    self.sampling_seed, rank=self.rank, world_size=self.world_size)
        collator = LogicalCollator(collate, self.max_physical_batch_size,
                                   functools.partial(collate_one, collate, dataset[0]))
        kwargs = {}
        if self.args.dataloader_num_workers > 0:
            kwargs = {"prefetch_factor": self.args.dataloader_prefetch_factor,
                      "persistent_workers": self.args.dataloader_persistent_workers}
        return LogicalBatchLoader(dataset, batch_sampler=self._poisson_sampler, collate_fn=collator,
                                  num_workers=self.args.dataloader_num_workers,
                                  pin_memory=self.args.dataloader_pin_memory, **kwargs)

    def get_resumed_dataloader(self, dataloader, num_batches: int):
        """Resuming mid-epoch: the epoch's first ``num_batches`` logical batches are drawn again and dropped."""
        self._poisson_sampler.skip_next(num_batches)
        return dataloader

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batches = []
        for _ in range(num_batches):
            try:
                batches.append(next(epoch_iterator))
            except StopIteration:
                break
        return batches, None  # each sample's loss is normalised on its own: no count across the batch

    # ------------------------------------------------------------------- step
    def per_sample_loss(self, model, inputs) -> torch.Tensor:
        """[B] each sample's own loss on one physical batch (``per_sample_loss=`` if given, else by the model's
        head: ``fastdp.hf.losses``)."""
        if self.per_sample_loss_fn is not None:
            return self.per_sample_loss_fn(model, inputs)
        inputs = dict(inputs)
        if "labels" not in inputs:
            raise ValueError(f"the training batch has no 'labels' (keys: {sorted(inputs)}): DPTrainer's {self.head} "
                             "loss needs them (or pass per_sample_loss=)")
        labels = inputs.pop("labels")
        outputs = model(**inputs)
        logits = outputs["logits"] if isinstance(outputs, Mapping) else outputs[0]
        config = getattr(self.model, "config", None)
        return per_sample_losses(self.head, logits, labels, config)

    def training_step(self, model, inputs, num_items_in_batch=None):
        """Forward / backward of every physical batch of one logical batch (their clipped sums accumulate in the
        ``DPOptimizer``); returns the mean per-sample loss (not privatised: outside epsilon)."""
        if not isinstance(inputs, LogicalBatch):
            raise TypeError(f"DPTrainer.training_step takes a LogicalBatch from its own train loader, got "
                            f"{type(inputs).__name__} (an overridden get_train_dataloader must keep DPTrainer's)")
        model.train()
        total = torch.zeros((), device=self.args.device)
        for batch in inputs.physical:
            batch = self._prepare_inputs(batch)
            sizes = leading_sizes(batch)
            with self.compute_loss_context_manager():
                losses = self.per_sample_loss(model, batch)
            if not (isinstance(losses, torch.Tensor) and losses.dim() == 1 and {losses.shape[0]} == sizes):
                shape = tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__
                raise ValueError(f"per_sample_loss must return one loss per sample of the physical batch ([B] with "
                                 f"B in {sorted(sizes)}), got {shape}")
            if inputs.num_samples == 0:
                losses = losses * 0.0  # the stand-in of an empty Poisson batch: its clipped gradient is exactly 0
            losses.sum().backward()  # loss_reduction="sum": each sample's gradient is its own loss's
            total = total + losses.detach().sum().to(total.device)
        return total / max(1, inputs.num_samples)

    def _track_num_input_tokens(self, inputs):
        for batch in inputs.physical if isinstance(inputs, LogicalBatch) else [inputs]:
            super()._track_num_input_tokens(batch)

    def floating_point_ops(self, inputs) -> int:
        if isinstance(inputs, LogicalBatch):
            return sum(super(DPTrainer, self).floating_point_ops(b) for b in inputs.physical)
        return super().floating_point_ops(inputs)

    def _get_grad_norm(self, model, grad_norm=None):
        return None  # the gradient is released inside step(): before it there is no .grad to measure

    # -------------------------------------------------------------- optimizer
    def _ddp_wrap(self) -> nn.parallel.DistributedDataParallel:
        """``self.model`` in ``DistributedDataParallel`` (once; Trainer's DDP settings), for fastdp's DPOptimizer.

        DPTrainer wraps it itself because the DPOptimizer must be built on the DDP wrapper (it switches DDP's
        gradient all-reduce off and all-reduces the clipped sums), and Trainer builds its optimizer before accelerate
        wraps the model; ``_wrap_model`` then hands Trainer this wrapper, so accelerate does not wrap it again."""
        if self._ddp_model is None:
            kwargs = {}
            if self.args.ddp_broadcast_buffers is not None:
                kwargs["broadcast_buffers"] = self.args.ddp_broadcast_buffers
            if self.args.ddp_bucket_cap_mb is not None:
                kwargs["bucket_cap_mb"] = self.args.ddp_bucket_cap_mb
            device = self.args.device
            if device.type != "cpu":
                kwargs["device_ids"] = [device.index if device.index is not None else self.args.local_process_index]
                kwargs["output_device"] = kwargs["device_ids"][0]
            self._ddp_model = nn.parallel.DistributedDataParallel(self.model, **kwargs)
        return self._ddp_model

    def _wrap_model(self, model, training: bool = True, dataloader=None):
        if training and getattr(self, "world_size", 1) > 1:
            if self._ddp_model is None:
                raise RuntimeError("DPTrainer: the model is being wrapped for training before DPTrainer built its "
                                   "DPOptimizer on the DDP wrapper (create_optimizer); an overridden "
                                   "create_optimizer must call DPTrainer's")
            return self._ddp_model  # Trainer then skips accelerator.prepare(model): no second DDP wrapper
        return super()._wrap_model(model, training, dataloader)

    def create_optimizer(self, model=None):
        """Trainer's optimizer wrapped in ``DPOptimizer`` (once); on several processes the DPOptimizer is built on
        the model's ``DistributedDataParallel`` wrapper (``_ddp_wrap``)."""
        if self.dp_optimizer is not None:
            return self.optimizer
        base = super().create_optimizer(model)
        opt_model = self.model if model is None else model
        if self.world_size > 1:
            if opt_model is not self.model:
                raise NotImplementedError(f"DPTrainer on several processes builds its optimizer on self.model, got "
                                          f"{type(opt_model).__name__}")
            opt_model = self._ddp_wrap()
        generator = None
        if self.noise_seed is not None:
            devices = {p.device for p in opt_model.parameters() if p.requires_grad}
            device = next(iter(devices)) if len(devices) == 1 else torch.device("cpu")
            generator = torch.Generator(device).manual_seed(self.noise_seed)
        self.dp_optimizer = DPOptimizer(
            opt_model, base, noise_multiplier=self.noise_multiplier, max_grad_norm=self.max_grad_norm,
            expected_batch_size=self.expected_batch_size, sample_size=self.sample_size, loss_reduction="sum",
            accountant=self.accountant_name, generator=generator, secure_mode=self.secure_mode,
            clipping=self.clipping, gamma=self.gamma, sample_rate=self.sample_rate)
        self.optimizer = self.dp_optimizer
        return self.optimizer

    # ------------------------------------------------------------- accounting
    def epsilon(self, delta: Optional[float] = None) -> float:
        """Epsilon spent so far at ``delta`` (default ``target_delta``); 0 before the first step."""
        delta = self.target_delta if delta is None else delta
        if self.dp_optimizer is None or self.dp_optimizer.steps_taken == 0:
            return 0.0
        key = (self.dp_optimizer.steps_taken, delta)
        if self._epsilon_cache[:2] != key:
            self._epsilon_cache = (*key, self.dp_optimizer.epsilon(delta))
        return self._epsilon_cache[2]

    def log(self, logs, *args, **kwargs):
        if "loss" in logs or "train_loss" in logs:
            logs["epsilon"] = self.epsilon()
        return super().log(logs, *args, **kwargs)

    # ------------------------------------------------------------ checkpoints
    def _dp_state(self) -> dict:
        return {"version": DP_STATE_VERSION, "sampling_seed": self.sampling_seed,
                **{k: _plain(getattr(self, k if k != "accountant" else "accountant_name")) for k in _RESUME_KEYS}}

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        if self.args.should_save:
            with atomic_write(os.path.join(output_dir, DP_STATE_NAME), "wb", private=True) as f:
                torch.save(self._dp_state(), f)

    def _load_optimizer_and_scheduler(self, checkpoint) -> None:
        if checkpoint is None:
            return super()._load_optimizer_and_scheduler(checkpoint)
        path = os.path.join(checkpoint, DP_STATE_NAME)
        if not (os.path.isfile(path) and os.path.isfile(os.path.join(checkpoint, OPTIMIZER_NAME))):
            raise ValueError(f"{checkpoint} lacks DPTrainer's state ({DP_STATE_NAME} and {OPTIMIZER_NAME}; saved with "
                             "save_only_model=True, or by another Trainer?): resuming from it would restart the "
                             "privacy accounting and the sampling")
        state = torch.load(path, weights_only=True)
        if not isinstance(state, dict) or state.get("version") != DP_STATE_VERSION:
            raise ValueError(f"{path}: not a DPTrainer state of version {DP_STATE_VERSION}")
        mine = self._dp_state()
        saved = {k: state.get(k, _RESUME_DEFAULTS.get(k)) for k in _RESUME_KEYS}
        differ = [f"{k}: checkpoint {saved[k]!r}, now {mine[k]!r}" for k in _RESUME_KEYS if saved[k] != mine[k]]
        if differ:
            raise ValueError("resume_from_checkpoint: the checkpoint's DP setting differs from this DPTrainer's ("
                             + "; ".join(differ) + "): its epsilon would not continue the first run's")
        super()._load_optimizer_and_scheduler(checkpoint)
        if self.dp_optimizer is not None and self.dp_optimizer.steps_taken != self.state.global_step:
            raise ValueError(f"{checkpoint}: the optimizer has taken {self.dp_optimizer.steps_taken} DP steps but the "
                             f"trainer state says {self.state.global_step}")
        self.sampling_seed = int(state["sampling_seed"])
        if self._poisson_sampler is not None:
            self._poisson_sampler.seed = self.sampling_seed


def _plain(value):
    """A value torch.load(weights_only=True) reads back and ``==`` compares (dicts / lists of numbers, strings)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _check_training_arguments(args) -> None:
    """Refuse TrainingArguments that would change which samples a step sees, or the loss that is clipped."""
    strategy = getattr(args, "train_sampling_strategy", "random")
    if strategy != "random" or getattr(args, "group_by_length", False):
        raise ValueError(f"train_sampling_strategy={strategy!r}: DPTrainer draws each logical batch by Poisson "
                         "sampling (the accountant assumes it); length-grouped, rebalanced or sequential batches "
                         "would void the reported epsilon. Leave it at 'random' (it is ignored: batches are Poisson)")
    refused = {
        "dataloader_drop_last": "drops samples from the sampled batches",
        "auto_find_batch_size": "changes the batch size, hence the sampling rate, during the run",
        "ignore_data_skip": "a resumed run would replay the epoch's first logical batches",
        "fp16": "its GradScaler scales the loss, and the scaled per-sample gradients would be clipped; use bf16=True",
        "torch_compile": "fastdp's engine is not validated under torch.compile",
    }
    for name, why in refused.items():
        if getattr(args, name, False):
            raise ValueError(f"{name}=True is not supported by DPTrainer: {why}")
    if getattr(args, "label_smoothing_factor", 0.0):
        raise ValueError("label_smoothing_factor is not supported by DPTrainer (its per-sample losses are plain "
                         "cross-entropy); pass per_sample_loss= for a smoothed loss")
    if args.max_grad_norm not in (None, 0, 0.0, 1.0):
        raise ValueError(f"TrainingArguments.max_grad_norm={args.max_grad_norm}: Trainer's clipping of the summed "
                         "gradient is turned off in DPTrainer; the per-sample clipping bound is DPTrainer(max_grad_norm=...)")
