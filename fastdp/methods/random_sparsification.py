"""DP-SGD with random sparsification (Zhu & Blaschko, TMLR 2023).

A uniformly random coordinate mask over all trainable parameters together (biases included) keeps
``d (1 - r)`` coordinates; it applies before clipping (the per-sample norm is taken after masking) and
to the noise. Gradual cooling: ``r(e) = r* e / (E - 1)``; with ``refresh_per_epoch = R`` the mask is
redrawn R times per epoch with ``r = clip(r* (e R + j) / (R E - 1), 0, r*)``. The wrapped optimizer's
momentum keeps moving masked coordinates (the paper's heavy ball). The mask is data-independent, so RS
costs no privacy beyond DP-SGD. Masks are regenerated from ``(seed, epoch, j)``: checkpoints store no
d-sized mask.

``ranked=True`` (Appendix I): after the first epoch, the coordinates with the smallest ``|z|`` are masked,
where ``z`` accumulates the released noisy gradients plus fresh noise ``(1/B) (1 - m) N(0, sigma^2 C^2)`` on
masked coordinates (post-processing of released values, so also free). The ranking uses ``z`` as it stands
when the mask is drawn, so a ranked checkpoint stores ``z`` and the current mask (a resumed run cannot re-rank
with the ``z`` of later steps).
"""
from __future__ import annotations

import torch

from fastdp.accounting import is_int
from fastdp.masks import Mask
from fastdp.methods.base import PhasedDPOptimizer, split_by_params
from fastdp.noise import gaussian_noise


class RandomSparsification(PhasedDPOptimizer):
    """RS (see module docstring). ``final_rate``: r*, the fraction masked in the last epoch; ``epochs``: E."""

    def __init__(self, model, optimizer, *, final_rate: float = 0.9, refresh_per_epoch: int = 1,
                 ranked: bool = False, epochs: int = None, seed: int = 0, **dp):
        if not 0 <= final_rate < 1:
            raise ValueError(f"final_rate must be in [0, 1), got {final_rate}")
        if not (is_int(refresh_per_epoch) and refresh_per_epoch >= 1):
            raise ValueError("refresh_per_epoch must be a positive int")
        if not (is_int(epochs) and epochs >= 1):
            raise ValueError("RandomSparsification needs the total number of epochs (epochs=E) for its cooling")
        if dp.get("steps") is None:
            dp["epochs"] = epochs  # also the calibration horizon when a target epsilon is given
        super().__init__(model, optimizer, **dp)
        self.final_rate, self.refresh, self.ranked, self.total_epochs, self.seed = (
            final_rate, refresh_per_epoch, ranked, epochs, seed)
        self.params = [p for p in self.engine.param_names if p.requires_grad]
        # (full-shape plain tensors, also for an FSDP2 model's sharded parameters)
        self.z = [torch.zeros(p.shape, dtype=torch.float32, device=p.device) for p in self.params] if ranked else None
        self._slot = None
        self._install()

    phase = "sparse"
    needs_epochs = True

    def rate(self, epoch: int, j: int = 0) -> float:
        """Fraction of coordinates masked during refresh ``j`` of ``epoch``."""
        R, E = self.refresh, self.total_epochs
        if R * E == 1:
            return self.final_rate
        return min(max(self.final_rate * (epoch * R + j) / (R * E - 1), 0.0), self.final_rate)

    def _slot_now(self):
        within = self.steps_taken % self.steps_per_epoch
        return self.epoch, min(self.refresh - 1, within * self.refresh // self.steps_per_epoch)

    def _install(self) -> None:
        slot = self._slot_now()
        if slot == self._slot:
            return
        self._slot = slot
        epoch, j = slot
        d = sum(p.numel() for p in self.params)
        n_mask = int(self.rate(epoch, j) * d)
        keep = torch.ones(d, dtype=torch.bool)
        if n_mask:
            if self.ranked and epoch > 0:
                z = torch.cat([t.flatten().cpu() for t in self.z]).abs()
                keep[torch.argsort(z, stable=True)[:n_mask]] = False
            else:
                gen = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) * 1_009 + j)
                keep[torch.randperm(d, generator=gen)[:n_mask]] = False
        for p, m in split_by_params(keep, self.params):
            self.engine.set_mask(p, Mask.from_coords(m.to(p.device)))

    def after_step(self) -> None:
        """Ranked RS: add the released gradient (and fresh noise off the mask) to the ranking accumulators."""
        super().after_step()
        if self.ranked:
            std = self.noise_std() / self.expected_batch_size
            gen, secure = self.generator, self.secure_mode
            if self.comm is not None:  # the ranks' rankings (hence masks) must agree: noise from a shared stream
                gen, secure = self._shared_generator(), False
            for z, p in zip(self.z, self.params):
                fresh = gaussian_noise(z, std, generator=gen, secure=secure)
                z += self.released(p).float() + fresh * (~self.engine.masks[p].dense)
        self._install()

    @property
    def needs_full_release(self) -> bool:
        return self.ranked or super().needs_full_release  # ranked RS ranks by the whole released gradient

    def _shared_generator(self) -> torch.Generator:
        """Under DDP: the generator of the off-mask ranking noise, the same stream on every rank (seeded from the
        public ``seed`` and the step). That noise is independent of the data (it is added where nothing was
        released), so sharing it costs no privacy; it only has to be the same on every rank."""
        device = self.z[0].device if self.z else torch.device("cpu")
        return torch.Generator(device).manual_seed((self.seed * 1_000_003 + self.steps_taken) * 7_919 + 17)

    def _method_state(self) -> dict:
        if not self.ranked:
            return {}
        return {"z": self.z, "slot": self._slot,
                "keep": [self.engine.masks[p].dense.clone() for p in self.params]}

    def _load_method_state(self, state: dict) -> None:
        self._slot = None
        if self.ranked and "z" in state:
            self.z = [z.to(p.device, torch.float32, copy=True) for z, p in zip(state["z"], self.params)]
            if state.get("keep") is not None and tuple(state.get("slot") or ()) == self._slot_now():
                for p, m in zip(self.params, state["keep"]):  # the mask ranked at the slot's start
                    self.engine.set_mask(p, Mask.from_coords(m.to(p.device, torch.bool)))
                self._slot = self._slot_now()
        self._install()
