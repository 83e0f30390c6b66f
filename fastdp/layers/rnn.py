"""Recurrent layers: ``torch.lstm``, ``torch.gru``, ``torch.rnn_tanh``, ``torch.rnn_relu`` (``nn.LSTM``, ``nn.GRU``,
``nn.RNN``), padded or packed (``PackedSequence``), any number of layers, one or two directions; and their cells
(``torch.lstm_cell`` ... : ``nn.LSTMCell``, ``nn.GRUCell``, ``nn.RNNCell``, one step and one use per call).

``nn.LSTM.forward`` re-reads its parameter slots when they change, so the taps reach the fused op in its list of flat
weights. The handler runs the recurrence itself, on the weights' values, with the same ops in the same order as
PyTorch's CPU implementation:

* the input-to-hidden projection of a layer and direction is one matmul over every time step; its weight's per-sample
  gradient is one ``LinearGrad`` over ``X`` [B, T, in] and ``dZ`` [B, T, gates];
* the hidden-to-hidden projection ``h_{t-1} W_hh^T + b_hh`` (and LSTM's projection ``W_hr``) runs once per step
  through ``_StepLinearFn``, whose backward returns ``dh_{t-1}`` only and hands ``(h_{t-1}, dZ_t)`` to a
  ``_UseRecorder``. Backward reaches the steps from the last one processed to the first (every later step depends
  on the first); when the first step's gradient arrives the recorder hands the engine one ``LinearGrad`` over the
  stacked [B, T, H] x [B, T, gates] (one use of the weight, not T: cross terms between uses cost O(uses^2)) and one
  ``DenseGrad`` for the bias (``sum_t dZ_t`` per sample);
* the gate nonlinearities and the cell state are plain autograd ops on plain tensors (no parameter in them).

``b_ih`` and ``b_hh`` get the same per-sample gradient for LSTM and RNN; GRU's ``b_hn`` sits inside
``r * (W_hn h + b_hn)`` and differs, which the recording captures as it records ``dZ`` of each projection.

Packed sequences: at step t only the first ``batch_sizes[t]`` samples (sorted by length) are active; a sample's
recorded rows stop at its own length (zeros beyond it contribute nothing to norms or sums). The per-sample gradients
are put back in the model input's sample order with the ``unsorted_indices`` of the ``PackedSequence`` (read from the
calling ``nn.RNN/LSTM/GRU.forward``; a packed call from elsewhere is refused, its sample order being unknown).

Dropout between layers (training mode) is drawn as PyTorch's CPU implementation draws it (``torch.dropout`` on the
[T, B, D*H] or packed layer output, layer by layer), so on the CPU the masks equal the native op's at the same seed.
Under autocast the matmuls run in the autocast dtype (per-sample norms from those operands, fp32 accumulation, as for
``nn.Linear``) and the gates and cell state in the input's dtype; the outputs keep the input's dtype.
"""
from __future__ import annotations

import sys
from typing import List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastdp.grad_sample import DenseGrad, LinearGrad
from fastdp.kernels._common import cast, upcast
from fastdp.tap import BatchSizeError, ParamTap, UnsupportedLayerError, register_op, unwrap

from ._common import anchor_of, compute_operands, open_uses, taps_of

_PADDED_ARGS = ("input", "hx", "params", "has_biases", "num_layers", "dropout", "train", "bidirectional",
                "batch_first")
_PACKED_ARGS = ("data", "batch_sizes", "hx", "params", "has_biases", "num_layers", "dropout", "train",
                "bidirectional")
# the module forwards that call the packed op: their locals hold the PackedSequence's sample order
_RNN_FORWARDS = {nn.RNN.forward.__code__, nn.LSTM.forward.__code__, nn.GRU.forward.__code__}


class _Layout:
    """Where the rows of a layer's input lie in time and batch.

    Padded: time-major [T, B, d] (``batch_sizes`` all B). Packed: [N, d] rows grouped by time step, step t holding the
    first ``batch_sizes[t]`` samples in length order. ``unsort``: [B] index putting sorted samples back in the model
    input's order (None: already in order).
    """

    def __init__(self, batch_sizes: List[int], packed: bool, unsort: Optional[torch.Tensor]):
        self.batch_sizes, self.packed, self.unsort = batch_sizes, packed, unsort
        self.T, self.B = len(batch_sizes), batch_sizes[0]
        self._pad_index = None

    def steps(self, rows: torch.Tensor) -> List[torch.Tensor]:
        """A layer-input-shaped tensor split into its time steps ([n_t, d] each)."""
        return list(rows.split(self.batch_sizes, 0)) if self.packed else list(rows.unbind(0))

    def join(self, outs: List[torch.Tensor]) -> torch.Tensor:
        """Per-step outputs (time order) back into the layout: [T, B, d] or packed [N, d]."""
        return torch.cat(outs, 0) if self.packed else torch.stack(outs, 0)

    def pad_index(self, device) -> torch.Tensor:
        """[N] position ``b * T + t`` of each packed row in a batch-major [B, T] grid."""
        if self._pad_index is None:
            idx = [b * self.T + t for t, n in enumerate(self.batch_sizes) for b in range(n)]
            self._pad_index = torch.tensor(idx, dtype=torch.long, device=device)
        return self._pad_index

    def rows_to_btd(self, rows: torch.Tensor) -> torch.Tensor:
        """A whole layer's rows as [B, T, d], zeros past each sample's length (sorted sample order)."""
        if not self.packed:
            return rows.transpose(0, 1)
        out = rows.new_zeros(self.B * self.T, rows.shape[-1])
        out.index_copy_(0, self.pad_index(rows.device), rows)
        return out.view(self.B, self.T, -1)

    def steps_to_btd(self, parts: dict, width: int, like: torch.Tensor) -> torch.Tensor:
        """{t: [n_t, d]} per-step rows as [B, T, d]; zeros for steps absent (not reached by backward) and past each
        sample's length."""
        if len(parts) == self.T and all(parts[t].shape[0] == self.B for t in parts):
            return torch.stack([parts[t] for t in range(self.T)], 1)
        out = like.new_zeros(self.B, self.T, width)
        for t, v in parts.items():
            out[: v.shape[0], t] = v
        return out

    def in_model_order(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.unsort is None else t.index_select(0, self.unsort.to(t.device))


class _UseRecorder:
    """One use of a weight (and its bias) across the steps of one recurrence: collects each step's input and output
    gradient in backward, and hands the engine one ``LinearGrad`` / ``DenseGrad`` when the step that closes it
    (the first processed in forward, so the last reached in backward) arrives."""

    def __init__(self, wtap: Optional[ParamTap], btap: Optional[ParamTap], layout: _Layout, whole_layer: bool):
        self.wtap, self.btap, self.layout, self.whole_layer = wtap, btap, layout, whole_layer
        self.uses = open_uses(wtap, btap)
        self.engine = next(t for t in (wtap, btap) if t is not None)._fdp_ctx.engine
        self.xs: dict = {}
        self.dys: dict = {}
        self.task = None

    def add(self, t: int, x: Optional[torch.Tensor], dy: torch.Tensor, closes: bool) -> None:
        if not self.engine.recording():  # autograd.grad(loss, x): nothing to record
            return
        task = torch._C._current_graph_task_id()
        if task != self.task:  # a new backward pass (a failed one may have left parts behind)
            self.xs, self.dys, self.task = {}, {}, task
        if x is not None:
            self.xs[t] = x
        self.dys[t] = dy
        if closes:
            self._finish()

    def _finish(self) -> None:
        xs, dys = self.xs, self.dys
        self.xs, self.dys, self.task = {}, {}, None
        lay = self.layout
        if self.whole_layer:
            dy = lay.rows_to_btd(dys[0])
            x = lay.rows_to_btd(xs[0]) if xs else None
        else:
            any_dy = next(iter(dys.values()))
            dy = lay.steps_to_btd(dys, any_dy.shape[-1], any_dy)
            x = None
            if xs:
                any_x = next(iter(xs.values()))
                x = lay.steps_to_btd(xs, any_x.shape[-1], any_x)
        dy = lay.in_model_order(dy)
        wtap, btap = self.wtap, self.btap
        if wtap is not None:
            g = LinearGrad(wtap._fdp_param, wtap._fdp_ctx.owner)
            g.set(lay.in_model_order(x), dy)
            wtap.finish(g, self.uses[0])
        if btap is not None:
            btap.finish(DenseGrad(btap._fdp_param, btap._fdp_ctx.owner, upcast(dy).sum(1)), self.uses[1])


class _StepLinearFn(torch.autograd.Function):
    """``y = x W^T + b`` for one step (or a whole layer's rows) of a recurrence. meta: (recorder, step, closes).

    Backward returns the input gradient only and hands ``(x, dy)`` to the recorder (the parameters never get an
    autograd gradient). Under autocast the product runs in the autocast dtype; ``y`` keeps ``x``'s dtype.
    """

    @staticmethod
    def forward(ctx, x, w, b, anchor, meta):
        recorder = meta[0]
        (xc, wc, bc), dt = compute_operands(x.device.type, x, w, b)
        if dt is None:
            y = F.linear(xc, wc, bc)
        else:
            with torch.autocast(x.device.type, enabled=False):
                y = F.linear(xc, wc, bc)
        ctx.save_for_backward(xc if recorder.wtap is not None else None, wc)
        ctx.meta, ctx.x_dtype = meta, x.dtype
        return cast(y, x.dtype)

    @staticmethod
    def backward(ctx, dy):
        xc, wc = ctx.saved_tensors
        recorder, t, closes = ctx.meta
        dy = cast(dy, wc.dtype)
        gx = cast(dy @ wc, ctx.x_dtype) if ctx.needs_input_grad[0] else None
        recorder.add(t, xc, dy, closes)
        return gx, None, None, None, None


def _project(x, w, b, recorder: Optional[_UseRecorder], anchor, t: int, closes: bool) -> torch.Tensor:
    """``x W^T + b``: recorded when the weight or the bias trains, else a plain (constant-parameter) linear."""
    if recorder is None:
        return F.linear(x, unwrap(w), unwrap(b))
    return _StepLinearFn.apply(x, unwrap(w), unwrap(b), anchor, (recorder, t, closes))


def _recorder(w, b, layout: _Layout, whole_layer: bool) -> Optional[_UseRecorder]:
    wtap, btap = taps_of(w, b)
    if wtap is None and btap is None:
        return None
    return _UseRecorder(wtap, btap, layout, whole_layer)


def _cell(mode: str, z: torch.Tensor, p: torch.Tensor, h: torch.Tensor, c: Optional[torch.Tensor]):
    """One step from the input projection ``z`` and the hidden projection ``p`` ([n, gates]); returns (h, c).

    The ops and their order follow PyTorch's CPU cells (``aten/src/ATen/native/RNN.cpp``)."""
    if mode == "LSTM":
        i, f, g, o = (p + z).chunk(4, 1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c
    if mode == "GRU":
        zr, zu, zn = z.chunk(3, 1)
        pr, pu, pn = p.chunk(3, 1)
        r = torch.sigmoid(pr + zr)
        u = torch.sigmoid(pu + zu)
        n = torch.tanh(zn + pn * r)
        return (h - n) * u + n, None
    pre = p + z
    return (torch.tanh(pre) if mode == "RNN_TANH" else torch.relu(pre)), None


def _direction(mode, layout: _Layout, z, h0, c0, w_hh, b_hh, w_hr, reverse: bool, anchor):
    """One layer, one direction. z: [T, B, gates] or packed [N, gates] input projections; h0 [B, H_out], c0 [B, H]
    (LSTM) in sorted sample order. Returns (per-step outputs in time order, h_n, c_n)."""
    T, bs = layout.T, layout.batch_sizes
    zs = layout.steps(z)
    hh = _recorder(w_hh, b_hh, layout, whole_layer=False)
    hr = _recorder(w_hr, None, layout, whole_layer=False) if w_hr is not None else None
    outs: List[Optional[torch.Tensor]] = [None] * T
    h, c = h0, c0
    done_h, done_c = [], []  # forward direction: states of samples whose sequence ended (higher indices first)
    for k, t in enumerate(range(T - 1, -1, -1) if reverse else range(T)):
        n = bs[t]
        if reverse and (k == 0 or n > h.shape[0]):  # samples whose sequence ends here start from their h0
            start = 0 if k == 0 else h.shape[0]
            h = h0[:n] if k == 0 else torch.cat([h, h0[start:n]], 0)
            if c0 is not None:
                c = c0[:n] if k == 0 else torch.cat([c, c0[start:n]], 0)
        elif not reverse and n < h.shape[0]:
            done_h.append(h[n:])
            h = h[:n]
            if c is not None:
                done_c.append(c[n:])
                c = c[:n]
        p = _project(h, w_hh, b_hh, hh, anchor, t, closes=k == 0)
        h, c = _cell(mode, zs[t], p, h, c)
        if w_hr is not None:
            h = _project(h, w_hr, None, hr, anchor, t, closes=k == 0)
        outs[t] = h
    h_n = torch.cat([h] + done_h[::-1], 0) if done_h else h
    c_n = (torch.cat([c] + done_c[::-1], 0) if done_c else c) if c is not None else None
    return outs, h_n, c_n


def _unsorted_indices(batch_sizes: torch.Tensor, op: str, label: str) -> Optional[torch.Tensor]:
    """The ``unsorted_indices`` of the PackedSequence whose data reached the packed op, from the calling module's
    forward (the op itself is not given the samples' order)."""
    f = sys._getframe(2)
    while f is not None:
        if f.f_code in _RNN_FORWARDS:
            loc = f.f_locals
            if loc.get("batch_sizes") is batch_sizes:
                return loc.get("unsorted_indices")
            break
        f = f.f_back
    raise UnsupportedLayerError(
        f"{op} on a packed sequence was called outside nn.RNN/nn.LSTM/nn.GRU.forward (while handling {label}): the op "
        "is not given the PackedSequence's sample order (unsorted_indices), so per-sample gradients could not be put "
        "back in the batch's order. Call the nn module on the PackedSequence.")


def _bind(args, kwargs):
    """The op's arguments by name, for the padded or the packed signature."""
    packed = len(args) > 1 and isinstance(args[1], torch.Tensor) and not args[1].is_floating_point()
    names = _PACKED_ARGS if packed else _PADDED_ARGS
    bound = dict(zip(names, args))
    bound.update(kwargs)
    missing = [n for n in names if n not in bound]
    if missing:
        raise TypeError(f"recurrent op: missing arguments {missing}")
    return packed, bound


def _run(mode: str, op: str, args, kwargs):
    packed, a = _bind(args, kwargs)
    params = list(a["params"])
    taps = [t for t in taps_of(*params) if t is not None]
    label = taps[0].label
    ctx = taps[0]._fdp_ctx
    L, D = int(a["num_layers"]), 2 if a["bidirectional"] else 1
    x = a["data"] if packed else a["input"]
    hx = a["hx"]
    hx = list(hx) if isinstance(hx, (list, tuple)) else [hx]
    for t in [x, *hx]:
        if isinstance(t, ParamTap):
            raise UnsupportedLayerError(
                f"{op}: a trainable parameter as the input or initial state ({t.label}) is not supported (while "
                f"handling {label}); per-sample gradients need a per-sample initial state. Pass a plain tensor "
                "(e.g. an nn.Linear of a per-sample feature) or freeze the parameter.")
    per, extra = divmod(len(params), L * D)
    bias = bool(a["has_biases"])
    proj = per - 2 - 2 * bias
    if extra or proj not in (0, 1) or (proj and mode != "LSTM"):
        raise UnsupportedLayerError(f"{op}: {len(params)} weights for {L} layers x {D} directions is not a layout "
                                    f"fastdp knows (while handling {label})")
    if packed:
        bs = [int(n) for n in a["batch_sizes"].tolist()]
        unsort = _unsorted_indices(a["batch_sizes"], op, label)
        layout = _Layout(bs, True, unsort)
        rows = x
    else:
        if x.dim() != 3:
            raise UnsupportedLayerError(f"{op}: expected a 3-D input, got shape {tuple(x.shape)} ({label})")
        rows = x.transpose(0, 1) if a["batch_first"] else x
        layout = _Layout([rows.shape[1]] * rows.shape[0], False, None)
    B = layout.B
    if ctx.batch_size is not None and B != ctx.batch_size:
        where = "batch_sizes[0] of the packed sequence" if packed else \
            f"dim {0 if a['batch_first'] else 1} of the input (batch_first={bool(a['batch_first'])})"
        raise BatchSizeError(
            f"module '{ctx.owner}' ({ctx.owner_type}): the model input has batch size {ctx.batch_size} but this {op} "
            f"op has {B} samples ({where}, input shape {tuple(x.shape)}); per-sample gradients need the recurrent "
            "layer's samples to be the model input's samples (dim 0 of the model input)")
    anchor = anchor_of(*taps)
    h0_all, c0_all = hx[0], (hx[1] if mode == "LSTM" else None)
    p_rate, train = float(a["dropout"]), bool(a["train"])
    h_n, c_n = [], []
    layer_in = rows
    for layer in range(L):
        dir_outs = []
        for d in range(D):
            k = layer * D + d
            w = params[k * per:(k + 1) * per]
            w_ih, w_hh = w[0], w[1]
            b_ih, b_hh = (w[2], w[3]) if bias else (None, None)
            w_hr = w[-1] if proj else None
            rec_ih = _recorder(w_ih, b_ih, layout, whole_layer=True)
            z = _project(layer_in, w_ih, b_ih, rec_ih, anchor, 0, closes=True)
            outs, hn, cn = _direction(mode, layout, z, h0_all[k], c0_all[k] if c0_all is not None else None,
                                      w_hh, b_hh, w_hr, reverse=d == 1, anchor=anchor)
            dir_outs.append(layout.join(outs))
            h_n.append(hn)
            c_n.append(cn)
        layer_out = dir_outs[0] if D == 1 else torch.cat(dir_outs, -1)
        if p_rate != 0 and train and layer < L - 1:
            layer_out = torch.dropout(layer_out, p_rate, True)
        layer_in = layer_out
    out = layer_in.transpose(0, 1) if (not packed and a["batch_first"]) else layer_in
    if mode == "LSTM":
        return out, torch.stack(h_n, 0), torch.stack(c_n, 0)
    return out, torch.stack(h_n, 0)


def _handler(mode: str, op: str):
    def handle(*args, **kwargs):
        return _run(mode, op, args, kwargs)
    handle.__name__ = f"recurrent_{mode.lower()}"
    return handle


def _run_cell(mode: str, op: str, input, hx, w_ih, w_hh, b_ih=None, b_hh=None):
    """One step of nn.LSTMCell / GRUCell / RNNCell: x [B, in], hx [B, H] (LSTM: (h, c)). Each call is one use of each
    weight (a loop of T cell calls gives T uses: the engine's cross terms between them cost O(T^2) per weight)."""
    taps = [t for t in taps_of(w_ih, w_hh, b_ih, b_hh) if t is not None]
    label, ctx = taps[0].label, taps[0]._fdp_ctx
    states = list(hx) if isinstance(hx, (list, tuple)) else [hx]
    for t in [input, *states]:
        if isinstance(t, ParamTap):
            raise UnsupportedLayerError(
                f"{op}: a trainable parameter as the input or state ({t.label}) is not supported (while handling "
                f"{label}); pass a plain tensor or freeze the parameter.")
    B = input.shape[0]
    if input.dim() != 2 or (ctx.batch_size is not None and B != ctx.batch_size):
        raise BatchSizeError(
            f"module '{ctx.owner}' ({ctx.owner_type}): the model input has batch size {ctx.batch_size} but this {op} "
            f"op's input has shape {tuple(input.shape)}; per-sample gradients need its dim 0 to be the samples")
    layout = _Layout([B], False, None)
    anchor = anchor_of(*taps)
    z = _project(input.unsqueeze(0), w_ih, b_ih, _recorder(w_ih, b_ih, layout, True), anchor, 0, True)[0]
    p = _project(states[0].unsqueeze(0), w_hh, b_hh, _recorder(w_hh, b_hh, layout, True), anchor, 0, True)[0]
    h, c = _cell(mode, z, p, states[0], states[1] if mode == "LSTM" else None)
    return (h, c) if mode == "LSTM" else h


def _cell_handler(mode: str, op: str):
    def handle(*args, **kwargs):
        return _run_cell(mode, op, *args, **kwargs)
    handle.__name__ = f"recurrent_cell_{mode.lower()}"
    return handle


register_op(torch.lstm_cell)(_cell_handler("LSTM", "torch.lstm_cell"))
register_op(torch.gru_cell)(_cell_handler("GRU", "torch.gru_cell"))
register_op(torch.rnn_tanh_cell)(_cell_handler("RNN_TANH", "torch.rnn_tanh_cell"))
register_op(torch.rnn_relu_cell)(_cell_handler("RNN_RELU", "torch.rnn_relu_cell"))
register_op(torch.lstm)(_handler("LSTM", "torch.lstm"))
register_op(torch.gru)(_handler("GRU", "torch.gru"))
register_op(torch.rnn_tanh)(_handler("RNN_TANH", "torch.rnn_tanh"))
register_op(torch.rnn_relu)(_handler("RNN_RELU", "torch.rnn_relu"))
