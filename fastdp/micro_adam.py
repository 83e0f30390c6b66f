"""MicroAdam (Modoranu et al., 2024) and DP-MicroAdam (Hudisteanu, Kalinin, Cyffers, 2025).

MicroAdam keeps, per parameter tensor, a ring buffer of the last ``window`` sparse gradients (top-k
indices and values of the error-compensated gradient) and the error feedback (what top-k left out, in
fp32 or 4-bit block quantisation). Adam's moments are rebuilt from the ring buffer at every step:

1. ``a = g + EF``; 2. top-k of ``|a|`` (per tensor, or per block of ``topk_block_size`` values with
int16 block-relative indices) into ring row ``t mod window``; 3. ``a[top-k] = 0``, ``EF = a`` (quantised
for ``ef_bits=4``); 4. ``p <- p (1 - lr wd) - lr m / (sqrt(v) + eps)`` with ``m``, ``v`` the bias-corrected
window sums (``fastdp.kernels.microadam_update``).

With ``density=1`` and ``window >= steps`` this is exactly Adam (AdamW with decoupled weight decay).

The step is horizontally fused (``fused=True``, the default): the tensors of a parameter group that share device,
dtype and step count are stepped together as one flat "chunk" (``_Chunk``) whose state lives in a few flat buffers;
each tensor's ``optimizer.state[p]`` entries are views into them, with the shapes and dtypes of the per-tensor layout
(checkpoints are interchangeable with ``fused=False``). On the CPU with numba installed a chunk's step is one
compiled call (``fastdp.kernels.microadam_cpu``), a torch ``sqrt`` and a second call (``fused_backend``: "numba");
elsewhere, or with ``FASTDP_BACKEND=reference`` ("torch"), it is a fixed number of vectorised PyTorch ops per chunk
(one ``foreach`` add of the gradients, one abs, the top-k of ``rows_topk`` per block geometry, one gather, the
quantisation over 2-D views per tensor size, two scatters of the window and a dense update), not per tensor.
Both compute the same float ops and give the same bits.
``fused=False`` steps tensor by tensor through the kernels of ``fastdp.kernels`` (Triton on CUDA): the reference
the fused step equals bit for bit (``tests/methods/test_micro_adam.py``).
State per parameter (``ef_bits=4``, ``density=0.01``, ``window=10``, ``topk="block"``): int16 indices
0.2 B + bf16 values 0.2 B + 4-bit EF 0.5 B = 0.9 B, against 8 B for Adam's two fp32 moments.
"""
from __future__ import annotations

import math
import sys
from typing import List, Optional

import numpy as np
import torch

from fastdp.accounting import is_int
from fastdp.kernels import microadam_cpu
from fastdp.kernels._backend import backend_for, requested_backend
from fastdp.kernels.ef_quant import block_minmax, ef_dequant_add, ef_quant, quant_affine
from fastdp.kernels.microadam_update import microadam_update
from fastdp.kernels.rows_topk import rows_topk, rows_topk_ref
from fastdp.kernels.topk_gather import gather_zero
from fastdp.optimizer import DPOptimizer
from fastdp.tap import UnsupportedLayerError

TOPK_MODES = ("tensor", "block")


class MicroAdam(torch.optim.Optimizer):
    """Memory-frugal Adam with sparse gradient windows and error feedback (usable on its own or under DP).

    Args:
        params: parameters or parameter groups (fp32, bf16 or fp16).
        lr, betas, eps, weight_decay: as ``torch.optim.AdamW`` (decoupled weight decay).
        density: fraction of each tensor's coordinates kept per step (top-k).
        window: number of sparse gradients kept (the ring buffer's rows).
        ef_bits: 32 (fp32 error feedback) or 4 (4-bit asymmetric block quantisation).
        topk: "tensor" (global top-k per tensor, int32 indices, fp32 values) or "block" (top-k per block of at
            most ``topk_block_size`` values, equal blocks per tensor, int16 block-relative indices, bf16 values).
        quant_block_size: values per quantisation block of the 4-bit error feedback.
        topk_block_size: most values per top-k block (<= 32768 so indices fit int16).
        fused: step the tensors of a group together over flat state buffers (module docstring); False: tensor by
            tensor (the reference).
        chunk_elements: the fused step's chunks hold at most max(this, the largest tensor) values, which bounds
            its scratch, one workspace shared by all chunks: ~18 bytes per value of the largest chunk (|a|, the
            window moments m + iv, a mask; +5 with ``ef_bits=4``: fp32 working gradient, codes) and ~28 bytes per
            window entry (``density * window`` per value).

    Examples:
        >>> w = torch.nn.Parameter(torch.randn(100))
        >>> opt = MicroAdam([w], lr=0.1, density=0.05)
        >>> w.grad = torch.randn(100); opt.step()
        >>> int((opt.state[w]["ring_idx"][0] >= 0).sum())
        5
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 density: float = 0.01, window: int = 10, ef_bits: int = 32, topk: str = "tensor",
                 quant_block_size: int = 100_000, topk_block_size: int = 32_000, fused: bool = True,
                 chunk_elements: int = 1 << 24):
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
        if not (is_int(chunk_elements) and chunk_elements >= 1):
            raise ValueError(f"chunk_elements must be a positive int, got {chunk_elements!r}")
        if lr < 0 or eps <= 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError("need lr >= 0, eps > 0, weight_decay >= 0 and betas in [0, 1)")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)
        self.density, self.window, self.ef_bits, self.topk = density, window, ef_bits, topk
        self.quant_block_size, self.topk_block_size = quant_block_size, topk_block_size
        self.fused, self.chunk_elements = bool(fused), chunk_elements
        self._workspace = {}
        self._weights = {}
        self._chunks = {}  # param group index -> [_Chunk]

    def __repr__(self):
        dev = next((p for g in self.param_groups for p in g["params"]), torch.zeros(()))
        return (f"MicroAdam(density={self.density}, window={self.window}, ef_bits={self.ef_bits}, topk={self.topk!r}, "
                f"fused={self.fused}, backend={backend_for(dev) if not self.fused else fused_backend(dev.device)!r})")

    # ------------------------------------------------------------------ state
    def _layout(self, d: int):
        """(entries per ring row, entries per top-k block (0: per tensor), top-k block size, padded length).

        Blocks are balanced: ``n_blocks = ceil(d / topk_block_size)`` blocks of ``ceil(d / n_blocks)`` values
        (so ``density`` is kept to within rounding, not inflated by a short last block). The last block is padded
        with zeros to full size; its padding can be selected (value 0, index past the tensor) and is skipped by
        the kernels.
        """
        if self.topk == "tensor":
            return max(1, math.ceil(self.density * d)), 0, 0, d
        n_blocks = math.ceil(d / self.topk_block_size)
        bs = math.ceil(d / n_blocks)  # balanced: the padding is < n_blocks values, not up to a whole block
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
        self._chunks = {}  # the fused step re-adopts the loaded tensors into fresh flat buffers
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

    def scratch_bytes(self) -> int:
        """Bytes of scratch: the shared workspace and the fused chunks' working buffers (not state)."""
        shared = sum(t.nbytes if isinstance(t, np.ndarray) else t.numel() * t.element_size()
                     for ws in self._workspace.values() for t in (ws.values() if isinstance(ws, dict) else ws))
        return shared + sum(c.scratch_bytes() for cs in self._chunks.values() for c in cs)

    # ------------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for gi, group in enumerate(self.param_groups):
            params = [p for p in group["params"] if p.grad is not None]
            for p in params:
                if p.grad.is_sparse:
                    raise RuntimeError("MicroAdam does not support sparse gradients")
            if not (self.fused and sys.byteorder == "little"):  # the 4-bit packing reads bytes as int16 pairs
                for p in params:
                    self._step_unfused(p, group)
                continue
            chunks = self._chunks.get(gi)
            if chunks is None or {id(p) for c in chunks for p in c.params} != {id(p) for p in params} or \
                    not all(c.valid(self.state) for c in chunks):
                chunks = self._chunks[gi] = self._build_chunks(params)
            for c in chunks:
                c.step(self, group)
        return loss

    def _step_unfused(self, p: torch.Tensor, group: dict) -> None:
        st = self.state[p]
        if not st:
            st.update(self._init_state(p))
        self._step_param(p, st, group)

    def _build_chunks(self, params: List[torch.Tensor]) -> list:
        """Partition ``params`` by (device, dtype, step count), then greedily into chunks of at most
        max(chunk_elements, largest tensor) padded values; each chunk adopts its tensors' current state."""
        cohorts = {}
        for p in params:
            st = self.state[p]
            if st:
                self._check_state(p, st)
            cohorts.setdefault((p.device, p.dtype, st.get("step", 0)), []).append(p)
        chunks = []
        for members in cohorts.values():
            sizes = [_Chunk.padded(self, p.numel()) for p in members]
            limit = max(self.chunk_elements, max(sizes))
            cur, total = [], 0
            for p, n in zip(members, sizes):
                if cur and total + n > limit:
                    chunks.append(_Chunk(self, cur))
                    cur, total = [], 0
                cur.append(p)
                total += n
            chunks.append(_Chunk(self, cur))
        return chunks

    def _shared(self, device, n: int, n_ring: int) -> dict:
        """The fused step's scratch on ``device``, shared by every chunk (sized by the largest): for n values, fp32
        |a| / deltas, the 4-bit path's fp32 working gradient and uint8 codes, a bool mask, the window moments
        m + iv complex64 (zero between uses); for n_ring window entries, their int64 positions, fp32 values,
        weighted pairs and gathered moments."""
        ws = self._workspace.get(("fused", device))
        if ws is None or ws["absb"].numel() < n or ws["G"].numel() < n_ring:
            n = max(n, ws["absb"].numel() if ws else 0)
            n_ring = max(n_ring, ws["G"].numel() if ws else 0)
            f32 = dict(dtype=torch.float32, device=device)
            ws = dict(absb=torch.zeros(n, **f32), mask=torch.empty(-(-n // 8) * 8, dtype=torch.bool, device=device),
                      mv=torch.zeros(n, dtype=torch.complex64, device=device),
                      G=torch.empty(n_ring, dtype=torch.int64, device=device), vals=torch.empty(n_ring, **f32),
                      pairs=torch.empty(n_ring, 2, **f32), got=torch.empty(n_ring, dtype=torch.complex64, device=device))
            if self.ef_bits == 4:
                ws.update(work=torch.zeros(n, **f32), q=torch.zeros(n, dtype=torch.uint8, device=device))
            self._workspace[("fused", device)] = ws
        return ws

    def _compiled_scratch(self, chunk) -> dict:
        """The compiled CPU step's scratch (numpy), shared by every chunk and grown to the largest: the 4-bit
        path's fp32 working gradient, the top-k candidates, sample, picks and radix histogram, and the update's
        segment moments (``fastdp.kernels.microadam_cpu``)."""
        need = dict(chunk.scratch_rows, work=chunk.max_padded if self.ef_bits == 4 else 0,
                    coord=self.window * chunk.ncols, starts=len(chunk.params) + 1)
        ws = self._workspace.get("compiled")
        if ws is None or any(ws[k].size < v for k, v in need.items()):
            old = ws or {}
            size = {k: max(v, old[k].size if k in old else 0) for k, v in need.items()}
            seg = microadam_cpu.SEGMENT
            ws = dict(work=np.zeros(size["work"], np.float32), cand=np.zeros(size["cand"], np.int64),
                      ckeys=np.zeros(size["cand"], np.int32), sample=np.zeros(size["sample"], np.int32),
                      picks=np.zeros(size["picks"], np.int64), hist=np.zeros(65536, np.int64),
                      mseg=np.zeros(seg, np.float32), vseg=np.zeros(seg, np.float32), seen=np.zeros(seg // 64, np.uint64),
                      lo=np.zeros(self.window, np.int64), hi=np.zeros(self.window, np.int64),
                      mask=np.zeros(microadam_cpu.MASK_PIECE, np.uint8),
                      coord=np.zeros(size["coord"], np.int64), mc=np.zeros(size["coord"], np.float32),
                      vc=np.zeros(size["coord"], np.float32), starts=np.zeros(size["starts"], np.int64),
                      empty_f32=np.zeros(0, np.float32), empty_u8=np.zeros(0, np.uint8),
                      empty_f32_2d=np.zeros((self.window, 0), np.float32),
                      empty_i16_2d=np.zeros((self.window, 0), np.int16))
            self._workspace["compiled"] = ws
        return ws

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
        if per_block:  # indices ascending within each block (tensor): the fused step's canonical order
            work[d:padded].zero_()
            idx = rows_topk_ref(work[:padded].view(-1, bs).abs(), per_block)
        else:
            idx = rows_topk_ref(a.abs().view(1, d), n)
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
        c1, c2 = bias_scales(group["betas"], t)
        flat = p.data.view(-1) if p.data.is_contiguous() else p.data.reshape(-1).clone()
        microadam_update(flat, st["ring_idx"][:rows], st["ring_val"][:rows], w1, w2, lr=lr, eps=eps, c1=c1, c2=c2,
                         decay=1.0 - lr * wd, per_block=per_block, block_size=bs, workspace=scratch[:, :d])
        if not p.data.is_contiguous():
            p.data.copy_(flat.view_as(p))
        st["step"] = t


class _Chunk:
    """Tensors of one parameter group (same device, dtype and step count) stepped together over flat buffers.

    Layout: tensor i owns values ``[o_i, o_i + S_i)`` of the fp32 buffers (its padded length: the top-k blocks'
    padding, rounded up to even so 4-bit pairs never straddle tensors) and ring columns ``[c_i, c_i + n_i)``.
    Tensors are ordered by top-k geometry (row length L, picks per row K, row stride), then by size, so that each
    geometry is one strided [rows, L] view (rows: blocks, or whole tensors with per-tensor top-k) and tensors of
    one size are one [count, S] view (quantisation blocks: [count, n_full, q] and the [count, tail] tails).
    ``optimizer.state[p]`` holds views of the flat state: ring_idx/ring_val [window, n_i] (columns of the flat
    ring), ef [d] or ef_codes [ceil(d/2)] and ef_min/ef_max [ceil(d/q)].
    """

    @staticmethod
    def padded(opt: MicroAdam, d: int) -> int:
        P = opt._layout(d)[3]
        return P + P % 2

    def __init__(self, opt: MicroAdam, params: List[torch.Tensor]):
        self.params_in = params
        self.device, self.dtype = params[0].device, params[0].dtype
        W, q, frugal = opt.window, opt.quant_block_size, opt.ef_bits == 4
        info = []
        for i, p in enumerate(params):
            d = p.numel()
            n, per_block, bs, P = opt._layout(d)
            S = P + P % 2
            L, K = (bs, per_block) if per_block else (d, n)
            nb = P // L
            stride = S if nb == 1 else L  # between rows: tensors (one row each) or blocks of one tensor
            key = (L, K, stride) if (nb == 1 or S == P) else ("solo", i)  # solo: rows would not stay uniform
            info.append((key, d, i, n, S, nb, (L, K, stride)))
        order = {}
        for key, *_ in info:
            order.setdefault(key, len(order))
        info.sort(key=lambda r: (order[r[0]], r[1], r[2]))
        self.params = [params[r[2]] for r in info]
        self.step_count = opt.state[self.params[0]].get("step", 0)
        off = col = cb = qb = 0
        self.groups, self.sizes, rowbase = [], [], []  # geometry views; same-size runs
        self.offsets, self.cols, self.cbytes, self.qblocks = [], [], [], []
        for key, d, i, n, S, nb, (L, K, stride) in info:
            g = self.groups[-1] if self.groups and self.groups[-1]["key"] == key else None
            if g is None:
                g = dict(key=key, offset=off, rows=0, L=L, K=K, stride=stride, col=col)
                self.groups.append(g)
            for j in range(nb):
                rowbase.append(torch.full((K,), off + j * stride, dtype=torch.int64))
            g["rows"] += nb
            r = self.sizes[-1] if self.sizes and self.sizes[-1]["d"] == d and self.sizes[-1]["key"] == key else None
            if r is None:
                r = dict(key=key, d=d, S=S, offset=off, count=0, cbyte=cb, qblock=qb, nq=math.ceil(d / q))
                self.sizes.append(r)
            r["count"] += 1
            self.offsets.append(off)
            self.cols.append(col)
            self.cbytes.append(cb)
            self.qblocks.append(qb)
            off, col, cb, qb = off + S, col + n, cb + math.ceil(d / 2), qb + math.ceil(d / q)
        self.numel, self.ncols = off, col
        dev = self.device
        self.row_base = torch.cat(rowbase).to(dev)
        block = opt.topk == "block"
        self.ring_idx = torch.full((W, col), -1, dtype=torch.int16 if block else torch.int32, device=dev)
        self.ring_val = torch.zeros(W, col, dtype=torch.bfloat16 if block else torch.float32, device=dev)
        self.picks = torch.empty(col, dtype=torch.int64, device=dev)
        self.frugal = frugal
        if frugal:
            self.codes = torch.zeros(cb, dtype=torch.uint8, device=dev)
            self.ef_min = torch.zeros(qb, dtype=torch.float32, device=dev)
            self.ef_max = torch.zeros(qb, dtype=torch.float32, device=dev)
        else:
            self.ef = torch.zeros(off, dtype=torch.float32, device=dev)  # state: the error feedback (padded)
        self._bound = None  # the shared scratch the views below were made on
        self.views = []
        for p, o, c, b, qo in zip(self.params, self.offsets, self.cols, self.cbytes, self.qblocks):
            d, n = p.numel(), opt._layout(p.numel())[0]
            v = {"ring_idx": self.ring_idx[:, c:c + n], "ring_val": self.ring_val[:, c:c + n]}
            if frugal:
                v.update(ef_codes=self.codes[b:b + math.ceil(d / 2)], ef_min=self.ef_min[qo:qo + math.ceil(d / q)],
                         ef_max=self.ef_max[qo:qo + math.ceil(d / q)])
            else:
                v["ef"] = self.ef[o:o + d]
            st = opt.state[p]
            for k, t in v.items():  # adopt the tensor's current state (loaded, or stepped unfused)
                if k in st:
                    t.copy_(st[k])
            st.clear()
            st.update(step=self.step_count, **v)
            self.views.append(dict(v, shape=p.shape))
        self.quant = opt.quant_block_size
        self.meta = np.zeros((len(self.params), len(microadam_cpu.META)), dtype=np.int64)  # the compiled step's
        rows = []
        for i, (p, o, c, b, qo) in enumerate(zip(self.params, self.offsets, self.cols, self.cbytes, self.qblocks)):
            d = p.numel()
            n, per_block, bs, P = opt._layout(d)
            K, L = (per_block, bs) if per_block else (n, d)
            s = microadam_cpu.sample_stride(L, K)
            self.meta[i, microadam_cpu.D:] = (d, o, c, n, K, L, P // L, b, qo, s)
            self.meta[i, microadam_cpu.P_BF16] = p.dtype == torch.bfloat16
            rows.append((L, K, s))
        self.scratch_rows = microadam_cpu.scratch_sizes(rows)
        self.max_padded = max(opt._layout(p.numel())[3] for p in self.params)

    def _bind(self, ws: dict) -> None:
        """Take this step's scratch from the shared workspace (views made again only when it was reallocated)."""
        if self._bound is ws["absb"]:
            return
        n = self.numel
        self.absb = ws["absb"][:n]
        self.work = ws["work"][:n] if self.frugal else self.ef
        self.q = ws["q"][:n] if self.frugal else None
        spans = list(zip(self.params, self.offsets))
        self.work_views = [self.work[o:o + p.numel()] for p, o in spans]
        self.delta_views = [self.absb[o:o + p.numel()].view(p.shape) for p, o in spans]
        self._bound = ws["absb"]

    def scratch_bytes(self) -> int:
        """Bytes of this chunk's own scratch (the shared workspace is counted by the optimizer)."""
        return sum(t.numel() * t.element_size() for t in (self.picks, self.row_base))

    def valid(self, state) -> bool:
        """Every tensor still holds this chunk's views, its dtype, and the chunk's step count."""
        for p, v in zip(self.params, self.views):
            st = state.get(p)
            if not st or st.get("ring_idx") is not v["ring_idx"] or st.get("step") != self.step_count or \
                    p.dtype != self.dtype or p.device != self.device or p.grad is None or p.shape != v["shape"]:
                return False
        return True

    def _run_views(self, buf: torch.Tensor, r: dict, width=None):
        """(full [count, n_full, q], tail [count, t] or None) views of a same-size run in buffer ``buf``."""
        d, S, q = r["d"], r["S"], self.quant
        nf, t = d // q, d % q
        full = buf.as_strided((r["count"], nf, q), (S, q, 1), buf.storage_offset() + r["offset"]) if nf else None
        tail = buf.as_strided((r["count"], t), (S, 1), buf.storage_offset() + r["offset"] + nf * q) if t else None
        return full, tail

    def _run_blocks(self, stat: torch.Tensor, r: dict):
        """(full [count, n_full], tail [count]) views of a run's per-block statistics ``stat`` [Q]."""
        d, q, nq = r["d"], self.quant, r["nq"]
        nf = d // q
        base = stat.as_strided((r["count"], nq), (nq, 1), stat.storage_offset() + r["qblock"])
        return (base[:, :nf] if nf else None), (base[:, nf] if d % q else None)

    def _dequant(self) -> None:
        """work = code * u + lo over every tensor (padding: 0)."""
        q16 = self.q.view(torch.int16)
        for r in self.sizes:
            nbytes = math.ceil(r["d"] / 2)
            dst = q16.as_strided((r["count"], nbytes), (r["S"] // 2, 1), r["offset"] // 2)
            dst.copy_(self.codes.as_strided((r["count"], nbytes), (nbytes, 1), r["cbyte"]))
        t = torch.bitwise_left_shift(q16, 4)  # byte b = lo | hi << 4  ->  int16 lo | hi << 8 (little endian)
        t.bitwise_and_(0x0F00)
        q16.bitwise_and_(0x000F).bitwise_or_(t)
        u = (self.ef_max - self.ef_min) / 15.0
        for r in self.sizes:
            for w, c, uu, lo in zip(self._run_views(self.work, r), self._run_views(self.q, r), self._run_blocks(u, r),
                                    self._run_blocks(self.ef_min, r)):
                if w is not None:
                    torch.mul(c, uu.unsqueeze(-1), out=w).add_(lo.unsqueeze(-1))
            if r["S"] > r["d"]:  # the shared buffer's padding: zeros (top-k may pick them; codes 0)
                self.work.as_strided((r["count"], r["S"] - r["d"]), (r["S"], 1), r["offset"] + r["d"]).zero_()

    def _quant(self, a: torch.Tensor) -> None:
        """Block min / max, then codes of ``a`` (``fastdp.kernels.ef_quant``'s formula), packed two per byte."""
        for r in self.sizes:
            for v, lo, hi in zip(self._run_views(a, r), self._run_blocks(self.ef_min, r),
                                 self._run_blocks(self.ef_max, r)):
                if v is not None:
                    lo.copy_(v.amin(dim=-1))
                    hi.copy_(v.amax(dim=-1))
        scale, offset = quant_affine(self.ef_min, self.ef_max)
        y = self.absb  # its padding holds |0|: codes 0 there
        for r in self.sizes:
            for v, yv, s, o in zip(self._run_views(a, r), self._run_views(y, r), self._run_blocks(scale, r),
                                   self._run_blocks(offset, r)):
                if v is not None:
                    torch.mul(v, s.unsqueeze(-1), out=yv).add_(o.unsqueeze(-1))
        # y in [0.5 - tiny, 15.5 + tiny] for finite values (lo <= x <= hi): the reference's clamp to [0, 15] is
        # then a no-op, and uint8 truncation is its floor
        self.q.copy_(y)
        q16 = self.q.view(torch.int16)
        t = self.absb.view(torch.int16)[:q16.numel()]
        torch.bitwise_right_shift(q16, 4, out=t).bitwise_or_(q16)  # low byte: lo | hi << 4
        for r in self.sizes:
            nbytes = math.ceil(r["d"] / 2)
            self.codes.as_strided((r["count"], nbytes), (nbytes, 1), r["cbyte"]).copy_(
                t.as_strided((r["count"], nbytes), (r["S"] // 2, 1), t.storage_offset() + r["offset"] // 2))

    def compiled(self) -> bool:
        """The compiled CPU step applies: the ``numba`` fused backend, fp32 or bf16 parameters and gradients."""
        ok = (torch.float32, torch.bfloat16)
        return fused_backend(self.device) == "numba" and self.dtype in ok and all(
            p.grad.dtype in ok and p.grad.device == p.device for p in self.params)

    def step(self, opt: MicroAdam, group: dict) -> None:
        """Step ``t = step_count + 1`` of every tensor: compiled (``_step_compiled``) where it applies, else
        vectorised PyTorch ops (``_step_torch``); both give the same bits."""
        t = self.step_count + 1
        if self.compiled():
            self._step_compiled(opt, group, t)
            self.last_impl = "numba"
        else:
            self._step_torch(opt, group, t)
            self.last_impl = "torch"
        self.step_count = t
        for p in self.params:
            opt.state[p]["step"] = t

    def _step_compiled(self, opt: MicroAdam, group: dict, t: int) -> None:
        """``fastdp.kernels.microadam_cpu`` over this chunk (the same results as ``_step_torch``). The kernel reads
        gradients and writes parameters through their addresses: a strided gradient is read from a contiguous
        copy, a strided parameter is updated in a contiguous copy written back after the step."""
        beta1, beta2 = group["betas"]
        lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
        row, rows = (t - 1) % opt.window, min(t, opt.window)
        meta, keep, strided = self.meta, [], []
        for i, p in enumerate(self.params):
            g = p.grad if p.grad.is_contiguous() else p.grad.contiguous()
            q = p.data
            if not q.is_contiguous():
                q = q.contiguous()
                strided.append((p, q))
            keep.append(g)
            meta[i, microadam_cpu.G_ADDR] = g.data_ptr()
            meta[i, microadam_cpu.G_BF16] = g.dtype == torch.bfloat16
            meta[i, microadam_cpu.P_ADDR] = q.data_ptr()
        ws = opt._compiled_scratch(self)
        w1, w2 = opt._window_weights(rows, row, beta1, beta2, self.device)
        hp = np.array([lr, eps, *bias_scales(group["betas"], t), 1.0 - lr * wd],
                      dtype=np.float32)  # each rounded to fp32 once, as torch does with a Python scalar operand
        f32 = ws["empty_f32"]
        if self.frugal:
            ef, codes, lo, hi = f32, self.codes.numpy(), self.ef_min.numpy(), self.ef_max.numpy()
        else:
            ef, codes, lo, hi = self.ef.numpy(), ws["empty_u8"], f32, f32
        if self.ring_val.dtype == torch.bfloat16:
            rv32, rv16 = ws["empty_f32_2d"], self.ring_val.view(torch.int16).numpy()
        else:
            rv32, rv16 = self.ring_val.numpy(), ws["empty_i16_2d"]
        count = microadam_cpu.chunk_select(
            meta, ef, codes, lo, hi, self.ring_idx.numpy(), rv32, rv16, row, rows, w1.numpy(), w2.numpy(), hp,
            self.frugal, self.quant, ws["work"], ws["cand"], ws["ckeys"], ws["sample"], ws["hist"], ws["picks"],
            ws["mseg"], ws["vseg"], ws["seen"], ws["lo"], ws["hi"], ws["coord"], ws["mc"], ws["vc"], ws["starts"],
            ws["mask"])
        torch.from_numpy(ws["vc"][:count]).sqrt_()  # torch's sqrt, as the reference (not always correctly rounded)
        microadam_cpu.chunk_apply(meta, hp, ws["coord"], ws["mc"], ws["vc"], ws["starts"])
        for p, q in strided:
            p.data.copy_(q)

    def _step_torch(self, opt: MicroAdam, group: dict, t: int) -> None:
        """The step as a fixed number of vectorised PyTorch ops over this chunk (module docstring)."""
        beta1, beta2 = group["betas"]
        lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
        row, rows = (t - 1) % opt.window, min(t, opt.window)
        grads = [p.grad.reshape(-1) for p in self.params]
        ws = opt._shared(self.device, self.numel, opt.window * self.ncols)
        self._bind(ws)
        a = self.work  # 1. a = g + EF
        if self.frugal:
            self._dequant()
        torch._foreach_add_(self.work_views, grads)
        mv, mask = ws["mv"][:self.numel], ws["mask"]  # 2. top-k of |a| per row of each geometry
        torch.abs(a, out=self.absb)
        for g in self.groups:
            x = self.absb.as_strided((g["rows"], g["L"]), (g["stride"], 1), g["offset"])
            self.picks[g["col"]:g["col"] + g["rows"] * g["K"]] = rows_topk(x, g["K"], mask=mask).view(-1)
        self.ring_idx[row].copy_(self.picks)
        gidx = self.picks.add_(self.row_base)  # 3. gather into the ring, a[top-k] = 0
        self.ring_val[row].copy_(a.index_select(0, gidx))
        a.index_fill_(0, gidx, 0.0)
        if self.frugal:
            self._quant(a)
        w1, w2 = opt._window_weights(rows, row, beta1, beta2, self.device)  # 4. window moments, update
        n_win = rows * self.ncols
        G = torch.add(self.ring_idx[:rows], self.row_base, out=ws["G"][:n_win].view(rows, self.ncols)).view(-1)
        vals = ws["vals"][:n_win].view(rows, self.ncols).copy_(self.ring_val[:rows])
        # m and v interleaved (complex64 m + iv): one scatter and one gather move both; per coordinate the rows
        # are summed in ring order, as the reference's index_add_ row by row
        pairs = ws["pairs"][:n_win].view(rows, self.ncols, 2)
        torch.mul(w1[:, None], vals, out=pairs[..., 0])
        torch.mul(w2[:, None], vals, out=pairs[..., 1]).mul_(vals)
        mv.scatter_add_(0, G, torch.view_as_complex(pairs).view(-1))
        c1, c2 = bias_scales(group["betas"], t)
        # -(lr * m / (sqrt(v) + eps)) at the window's coordinates only (elsewhere m = 0: the delta is 0); a
        # coordinate listed twice gets the same value twice. (A dense sqrt of the mostly-zero v costs ~10x a copy.)
        got = torch.view_as_real(torch.index_select(mv, 0, G, out=ws["got"][:n_win]))
        mg, vg = got[:, 0], got[:, 1]
        vg.mul_(c2).sqrt_().add_(eps)
        mg.mul_(c1).div_(vg).mul_(-lr)
        mv.zero_()
        delta = self.absb.zero_()  # |a| is spent: the deltas, zero but at G
        delta.scatter_(0, G, mg)
        deltas = self.delta_views
        decay = 1.0 - lr * wd
        # the reference: p <- (p.float() * decay - lr * m / (sqrt(v) + eps)) rounded once to p's dtype
        if self.dtype == torch.float32 or (decay == 1.0 and self.dtype in (torch.bfloat16, torch.float16)):
            if decay != 1.0:
                torch._foreach_mul_(self.params, decay)
            torch._foreach_add_(self.params, deltas)  # bf16 / fp16 += fp32: computed in fp32, rounded once
        else:  # a low-precision p * decay, or fp64 (which the reference updates in fp32): tensor by tensor
            for p, dlt in zip(self.params, deltas):
                p.copy_(p.float().mul_(decay).add_(dlt))


def bias_scales(betas, t: int):
    """(c1, c2): the window sums' bias corrections at step t, ``(1 - beta) / (1 - beta ** t)`` (Python floats)."""
    beta1, beta2 = betas
    return (1 - beta1) / (1 - beta1 ** t), (1 - beta2) / (1 - beta2 ** t)


def fused_backend(device: torch.device) -> str:
    """The fused step's implementation on ``device``: "numba" (``fastdp.kernels.microadam_cpu``, CPU, numba
    importable, ``FASTDP_BACKEND`` not "reference") or "torch" (vectorised PyTorch ops; the same results)."""
    if device.type == "cpu" and microadam_cpu.HAS_NUMBA and requested_backend() != "reference":
        return "numba"
    return "torch"


class DPMicroAdam(DPOptimizer):
    """DP gradient (``fastdp.DPOptimizer``) followed by MicroAdam: the noise enters once, on the clipped sum,
    before top-k and error feedback, so MicroAdam is post-processing and costs no extra privacy.

    Defaults follow the DP-MicroAdam paper: fp32 error feedback, per-tensor top-k, density 0.01, window 10.
    ``**dp``: ``DPOptimizer``'s arguments (``noise_multiplier`` or ``target_epsilon``..., ``max_grad_norm``,
    ``expected_batch_size``, ``sample_size``, ``accountant``, ``generator``...).

    On an FSDP2 (``fully_shard``) model MicroAdam's top-k and state are per whole tensor, so it cannot step on the
    shards: each rank keeps a full-shape plain replica of every trainable parameter (all-gathered at construction,
    identical on every rank), and the wrapped ``MicroAdam``'s param groups hold these replicas. A step runs MicroAdam
    on the replicas with the full released gradient (``released(p)``, the same on every rank: ``needs_full_release``
    makes the step all-reduce the clipped sums instead of reduce-scattering them),
    then copies each rank's rows of the updated replica into its shard (no communication): the result equals one
    process's DP-MicroAdam bit for bit, and the state (and ``state_dict()``) is the full-tensor state, the same on
    every rank and interchangeable with a single-process checkpoint. Before each step every rank compares its shard
    with its rows of the replica and one scalar all-reduce says whether any differs (the model was changed or loaded
    outside the optimizer): then every replica is all-gathered again from the model. Memory: a full copy of the
    trainable parameters per rank (as DDP's replicas) and MicroAdam's state for the full tensors, not sharded.
    """

    def __init__(self, model: torch.nn.Module, *, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, density: float = 0.01, window: int = 10, ef_bits: int = 32,
                 topk: str = "tensor", quant_block_size: int = 100_000, topk_block_size: int = 32_000,
                 fused: bool = True, chunk_elements: int = 1 << 24, params: Optional[list] = None, **dp):
        params = [p for p in model.parameters() if p.requires_grad] if params is None else params
        base = MicroAdam(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, density=density,
                         window=window, ef_bits=ef_bits, topk=topk, quant_block_size=quant_block_size,
                         topk_block_size=topk_block_size, fused=fused, chunk_elements=chunk_elements)
        super().__init__(model, base, **dp)
        self._replicas = {}  # FSDP2: sharded parameter -> its full-shape replica (what MicroAdam steps)
        if self.comm is not None and getattr(self.comm, "shards_grads", False):
            with torch.no_grad():
                for group in base.param_groups:
                    replicas = []
                    for p in group["params"]:
                        if type(p.data).__name__ != "DTensor":
                            self.engine.detach()
                            raise UnsupportedLayerError(
                                f"DPMicroAdam on an FSDP2 model: a parameter of shape {tuple(p.shape)} is not a "
                                "sharded DTensor (every parameter MicroAdam steps must be managed by fully_shard)")
                        self._replicas[p] = p.full_tensor().detach().clone()
                        replicas.append(self._replicas[p])
                    group["params"] = replicas

    @property
    def needs_full_release(self) -> bool:
        """On FSDP2 MicroAdam steps on the whole released gradient: the step all-reduces (``fastdp.fsdp``)."""
        return bool(getattr(self, "_replicas", None)) or super().needs_full_release

    def _rows(self, p: torch.Tensor) -> torch.Tensor:
        """This rank's piece of ``p``'s replica, laid out as ``p``'s shard (a view or a copy; no communication)."""
        from torch.distributed.tensor import distribute_tensor
        return distribute_tensor(self._replicas[p], p.device_mesh, p.placements, src_data_rank=None).to_local()

    @torch.no_grad()
    def update(self, released) -> None:
        """MicroAdam's step; on FSDP2 on the replicas, with the full released gradients, then each rank's rows of the
        replicas copied into its shards (class docstring)."""
        if not self._replicas:
            return super().update(released)
        stale = torch.tensor([float(any(not torch.equal(p.to_local(), self._rows(p)) for p in self._replicas))],
                             device=next(iter(self._replicas.values())).device)
        self.comm.all_reduce_([stale])
        if stale.item() > 0:  # the model changed outside the optimizer (e.g. loaded): every rank re-gathers
            for p, rep in self._replicas.items():
                rep.copy_(p.full_tensor())
        views = self.engine.buffer.views
        for p, rep in self._replicas.items():
            g = self.released(p) if p in views else None
            rep.grad = None if g is None else (g if g.dtype == rep.dtype else g.to(rep.dtype))
        super().update(released)
        for p in self._replicas:
            p.to_local().copy_(self._rows(p))
