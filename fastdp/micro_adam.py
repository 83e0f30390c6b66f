"""MicroAdam (Modoranu et al., 2024) and DP-MicroAdam (Hudisteanu, Kalinin, Cyffers, 2025).

MicroAdam keeps, per parameter tensor, a ring buffer of the last ``window`` sparse gradients (top-k
indices and values of the error-compensated gradient) and the error feedback (what top-k left out, in
fp32 or 4-bit block quantisation). Adam's moments are rebuilt from the ring buffer at every step:

1. ``a = g + EF``; 2. top-k of ``|a|`` (per tensor, or per block of ``topk_block_size`` values with
int16 block-relative indices) into ring row ``t mod window``; 3. ``a[top-k] = 0``, ``EF = a`` (quantised
for ``ef_bits=4``); 4. ``p <- p (1 - lr wd) - lr m / (sqrt(v) + eps)`` with ``m``, ``v`` the bias-corrected
window sums (``fastdp.kernels.microadam_update``).

With ``density=1`` and ``window >= steps`` this is exactly Adam (AdamW with decoupled weight decay).
State per parameter (``ef_bits=4``, ``density=0.01``, ``window=10``, ``topk="block"``): int16 indices
0.2 B + bf16 values 0.2 B + 4-bit EF 0.5 B = 0.9 B, against 8 B for Adam's two fp32 moments.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from fastdp.accounting import is_int
from fastdp.kernels._backend import backend_for
from fastdp.kernels.ef_quant import block_minmax, ef_dequant_add, ef_quant
from fastdp.kernels.microadam_update import microadam_update
from fastdp.kernels.topk_gather import gather_zero
from fastdp.optimizer import DPOptimizer

TOPK_MODES = ("tensor", "block")


class MicroAdam(torch.optim.Optimizer):
    """Memory-frugal Adam with sparse gradient windows and error feedback (usable on its own or under DP).

    Args:
        params: parameters or parameter groups (fp32, bf16 or fp16).
        lr, betas, eps, weight_decay: as ``torch.optim.AdamW`` (decoupled weight decay).
        density: fraction of each tensor's coordinates kept per step (top-k).
        window: number of sparse gradients kept (the ring buffer's rows).
        ef_bits: 32 (fp32 error feedback) or 4 (4-bit asymmetric block quantisation).
        topk: "tensor" (global top-k per tensor, int32 indices, fp32 values) or "block" (top-k per block of
            ``topk_block_size`` values, int16 block-relative indices, bf16 values).
        quant_block_size: values per quantisation block of the 4-bit error feedback.
        topk_block_size: values per top-k block (<= 32768 so indices fit int16).

    Examples:
        >>> w = torch.nn.Parameter(torch.randn(100))
        >>> opt = MicroAdam([w], lr=0.1, density=0.05)
        >>> w.grad = torch.randn(100); opt.step()
        >>> int((opt.state[w]["ring_idx"][0] >= 0).sum())
        5
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 density: float = 0.01, window: int = 10, ef_bits: int = 32, topk: str = "tensor",
                 quant_block_size: int = 100_000, topk_block_size: int = 32_000):
        if not 0.0 < density <= 1.0:
            raise ValueError(f"density must be in (0, 1], got {density}")
        if not (is_int(window) and window >= 1):
            raise ValueError(f"window must be a positive int, got {window!r}")
        if ef_bits not in (32, 4):
            raise ValueError(f"ef_bits must be 32 or 4, got {ef_bits!r}")
        if topk not in TOPK_MODES:
            raise ValueError(f"topk must be one of {TOPK_MODES}, got {topk!r}")
        if not 1 <= topk_block_size <= 32768:
            raise ValueError("topk_block_size must be in [1, 32768] (int16 block-relative indices)")
        if quant_block_size < 1:
            raise ValueError("quant_block_size must be positive")
        if lr < 0 or eps <= 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError("need lr >= 0, eps > 0, weight_decay >= 0 and betas in [0, 1)")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)
        self.density, self.window, self.ef_bits, self.topk = density, window, ef_bits, topk
        self.quant_block_size, self.topk_block_size = quant_block_size, topk_block_size
        self._workspace = {}
        self._weights = {}

    def __repr__(self):
        dev = next((p for g in self.param_groups for p in g["params"]), torch.zeros(()))
        return (f"MicroAdam(density={self.density}, window={self.window}, ef_bits={self.ef_bits}, topk={self.topk!r}, "
                f"backend={backend_for(dev)!r})")

    # ------------------------------------------------------------------ state
    def _layout(self, d: int):
        """(entries per ring row, entries per top-k block (0: per tensor), top-k block size, padded length).

        The last top-k block is padded with zeros to full size; its padding can be selected (value 0,
        index past the tensor) and is skipped by the kernels.
        """
        if self.topk == "tensor":
            return max(1, math.ceil(self.density * d)), 0, 0, d
        bs = min(self.topk_block_size, d)
        n_blocks = math.ceil(d / bs)
        per_block = max(1, math.ceil(self.density * bs))
        return n_blocks * per_block, per_block, bs, n_blocks * bs

    def _state_spec(self, p: torch.Tensor) -> dict:
        """State tensor name -> (shape, dtype, initial value) for parameter ``p``."""
        d = p.numel()
        n = self._layout(d)[0]
        block = self.topk == "block"
        spec = {"ring_idx": ((self.window, n), torch.int16 if block else torch.int32, -1),
                "ring_val": ((self.window, n), torch.bfloat16 if block else torch.float32, 0)}
        if self.ef_bits == 32:
            spec["ef"] = ((d,), torch.float32, 0)
        else:
            nq = math.ceil(d / self.quant_block_size)
            spec["ef_codes"] = ((math.ceil(d / 2),), torch.uint8, 0)  # two 4-bit codes per byte
            spec["ef_min"] = ((nq,), torch.float32, 0)
            spec["ef_max"] = ((nq,), torch.float32, 0)
        return spec

    def _init_state(self, p: torch.Tensor) -> dict:
        st = {"step": 0}
        for k, (shape, dtype, fill) in self._state_spec(p).items():
            st[k] = torch.full(shape, fill, dtype=dtype, device=p.device)
        return st

    def load_state_dict(self, state_dict) -> None:
        """``torch.optim.Optimizer.load_state_dict``, except that every state tensor keeps the dtype it was saved
        with (moved to its parameter's device). Torch casts floating-point state to the parameter's dtype and
        would turn int16/int32 ring indices and uint8 4-bit codes into floats, and the fp32 error feedback of a
        bf16 parameter into bf16."""
        saved_groups = state_dict["param_groups"]
        states = {}
        if [len(g["params"]) for g in saved_groups] == [len(g["params"]) for g in self.param_groups]:
            # (else torch's loader raises) check every parameter's state before anything is replaced
            params = [p for g in self.param_groups for p in g["params"]]
            for pid, p in zip((i for g in saved_groups for i in g["params"]), params):
                saved = state_dict["state"].get(pid)
                if saved:
                    st = {k: v.to(device=p.device, copy=True) if isinstance(v, torch.Tensor) else v
                          for k, v in saved.items()}
                    self._check_state(p, st)
                    states[p] = st
        super().load_state_dict(state_dict)
        for p, st in states.items():
            self.state[p] = st

    def _check_state(self, p: torch.Tensor, st: dict) -> None:
        """Refuse a state saved with another layout (density, window, ef_bits, topk or block sizes)."""
        want = {k: (shape, dtype) for k, (shape, dtype, _) in self._state_spec(p).items()}
        got = {k: (tuple(v.shape), v.dtype) for k, v in st.items() if isinstance(v, torch.Tensor)}
        if got != want or "step" not in st:
            raise ValueError(f"MicroAdam state of a parameter of shape {tuple(p.shape)} does not match this "
                             f"optimizer's layout (density={self.density}, window={self.window}, "
                             f"ef_bits={self.ef_bits}, topk={self.topk!r}): saved {got}, expected {want}")

    def _buffers(self, device, n: int):
        """Shared fp32 workspace: the working gradient (padded) and the moment scratch [2, n]."""
        ws = self._workspace.get(device)
        if ws is None or ws[0].numel() < n:
            ws = (torch.zeros(n, dtype=torch.float32, device=device),
                  torch.zeros(2, n, dtype=torch.float32, device=device))
            self._workspace[device] = ws
        return ws

    def _window_weights(self, rows: int, row: int, beta1: float, beta2: float, device):
        """beta^age per ring row (age 0: the row just written), cached on the device (at most window^2 keys)."""
        key = (rows, row, beta1, beta2, device)
        w = self._weights.get(key)
        if w is None:
            ages = torch.tensor([(row - r) % self.window for r in range(rows)], dtype=torch.float64)
            w = ((beta1 ** ages).float().to(device), (beta2 ** ages).float().to(device))
            self._weights[key] = w
        return w

    def state_bytes(self) -> int:
        """Bytes held in optimizer state tensors (the workspace is shared scratch, not state)."""
        return sum(v.numel() * v.element_size() for st in self.state.values() for v in st.values()
                   if isinstance(v, torch.Tensor))

    # ------------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("MicroAdam does not support sparse gradients")
                st = self.state[p]
                if not st:
                    st.update(self._init_state(p))
                self._step_param(p, st, group)
        return loss

    def _step_param(self, p: torch.Tensor, st: dict, group: dict) -> None:
        beta1, beta2 = group["betas"]
        lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
        d = p.numel()
        n, per_block, bs, padded = self._layout(d)
        work, scratch = self._buffers(p.device, padded)
        a = work[:d]
        a.copy_(p.grad.reshape(-1))  # 1. a = g + EF
        if self.ef_bits == 32:
            a.add_(st["ef"])
        else:
            ef_dequant_add(a, st["ef_codes"], st["ef_min"], st["ef_max"], self.quant_block_size)
        t = st["step"] + 1
        row = (t - 1) % self.window  # 2. top-k into the ring
        if per_block:
            work[d:padded].zero_()
            _, idx = torch.topk(work[:padded].view(-1, bs).abs(), per_block, dim=1, sorted=False)
        else:
            _, idx = torch.topk(a.abs(), n, sorted=False)
        st["ring_idx"][row].copy_(idx.reshape(-1))
        gather_zero(a, st["ring_idx"][row], st["ring_val"][row], per_block, bs)  # 3. a[top-k] = 0
        if self.ef_bits == 32:
            st["ef"].copy_(a)
        else:
            lo, hi = block_minmax(a, self.quant_block_size)
            st["ef_min"].copy_(lo)
            st["ef_max"].copy_(hi)
            st["ef_codes"].copy_(ef_quant(a, lo, hi, self.quant_block_size))
        rows = min(t, self.window)  # 4. window moments over the rows written so far (rows 0..t-1 until full)
        w1, w2 = self._window_weights(rows, row, beta1, beta2, p.device)
        flat = p.data.view(-1) if p.data.is_contiguous() else p.data.reshape(-1).clone()
        microadam_update(flat, st["ring_idx"][:rows], st["ring_val"][:rows], w1, w2, lr=lr, eps=eps,
                         c1=(1 - beta1) / (1 - beta1 ** t), c2=(1 - beta2) / (1 - beta2 ** t),
                         decay=1.0 - lr * wd, per_block=per_block, block_size=bs, workspace=scratch[:, :d])
        if not p.data.is_contiguous():
            p.data.copy_(flat.view_as(p))
        st["step"] = t


class DPMicroAdam(DPOptimizer):
    """DP gradient (``fastdp.DPOptimizer``) followed by MicroAdam: the noise enters once, on the clipped sum,
    before top-k and error feedback, so MicroAdam is post-processing and costs no extra privacy.

    Defaults follow the DP-MicroAdam paper: fp32 error feedback, per-tensor top-k, density 0.01, window 10.
    ``**dp``: ``DPOptimizer``'s arguments (``noise_multiplier`` or ``target_epsilon``..., ``max_grad_norm``,
    ``expected_batch_size``, ``sample_size``, ``accountant``, ``generator``...).
    """

    def __init__(self, model: torch.nn.Module, *, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, density: float = 0.01, window: int = 10, ef_bits: int = 32,
                 topk: str = "tensor", quant_block_size: int = 100_000, topk_block_size: int = 32_000,
                 params: Optional[list] = None, **dp):
        params = [p for p in model.parameters() if p.requires_grad] if params is None else params
        base = MicroAdam(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, density=density,
                         window=window, ef_bits=ef_bits, topk=topk, quant_block_size=quant_block_size,
                         topk_block_size=topk_block_size)
        super().__init__(model, base, **dp)
