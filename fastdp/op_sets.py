"""Categories of torch functions, as the parameter taps and shared lookups route them (``fastdp.tap``,
``fastdp.shared_activation``), and predicates on a call of one."""
from __future__ import annotations

import torch

_T = torch.Tensor
ELEMENTWISE = {
    torch.add, _T.add, _T.__add__, _T.__radd__, _T.add_, _T.__iadd__,
    torch.sub, _T.sub, _T.__sub__, _T.__rsub__, _T.sub_, _T.__isub__, torch.rsub,
    torch.mul, _T.mul, _T.__mul__, _T.__rmul__, _T.mul_, _T.__imul__,
    torch.div, _T.div, _T.__truediv__, _T.__rtruediv__, _T.div_, _T.__itruediv__, torch.true_divide,
    torch.where, _T.where, torch.addcmul, _T.addcmul, torch.addcdiv, _T.addcdiv, torch.lerp, _T.lerp,
    torch.maximum, torch.minimum, torch.pow, _T.pow, _T.__pow__, _T.__rpow__,
}
# Queries of a tensor's metadata: answered from the tap's value (models ask ``weight.dtype`` or ``weight.shape``).
METADATA = {
    _T.dim, _T.ndimension, _T.size, _T.numel, _T.nelement, _T.stride, _T.is_contiguous, _T.element_size,
    _T.get_device, _T.is_floating_point, _T.is_complex, _T.shape.__get__, _T.dtype.__get__, _T.device.__get__,
    _T.ndim.__get__, _T.is_cuda.__get__, _T.layout.__get__, _T.is_sparse.__get__,
}
# Ops on a parameter alone that replicate it along a new or size-1 leading (batch) dim.
EXPANDERS = {_T.expand, _T.expand_as, torch.broadcast_to, _T.broadcast_to, _T.repeat}
CASTS = {_T.to, _T.float, _T.half, _T.bfloat16, _T.double, _T.type_as, _T.type, _T.contiguous, _T.cuda, _T.cpu}
# ops that move no element: the lookup's per-sample gradient is a reshape of the broadcast's
RESHAPES = {_T.view, _T.view_as, _T.reshape, _T.reshape_as, _T.unsqueeze, _T.squeeze, _T.flatten, _T.unflatten,
            torch.reshape, torch.unsqueeze, torch.squeeze, torch.flatten, torch.unflatten, _T.clone, torch.clone,
            _T.__getitem__}
# other data-independent ops on the value alone: pulled back exactly through their vjp
SHAPE_OPS = {_T.permute, torch.permute, _T.transpose, torch.transpose, _T.swapaxes, _T.swapdims, _T.t, torch.t,
             _T.T.__get__, _T.mT.__get__, _T.movedim, torch.movedim, _T.moveaxis, _T.narrow, torch.narrow, _T.select,
             torch.select, _T.flip, torch.flip, _T.roll, torch.roll, _T.tril, _T.triu, torch.tril, torch.triu}
# ops that read only the shape / dtype / device of their tensor arguments other than the first
SHAPE_ONLY = EXPANDERS | CASTS | {_T.view_as, _T.reshape_as}
_F = torch.nn.functional
F_dropout = _F.dropout
# random ops: replaying them to pull gradients back would draw again (F.dropout alone is handled, with its mask)
RANDOM = {_F.dropout, _F.dropout1d, _F.dropout2d, _F.dropout3d, _F.alpha_dropout, _F.feature_alpha_dropout,
          torch.dropout, torch.alpha_dropout, torch.feature_dropout, torch.feature_alpha_dropout, _F.rrelu,
          torch.rrelu, torch.bernoulli, _T.bernoulli, torch.normal, torch.poisson}


def is_inplace(func) -> bool:
    name = getattr(func, "__name__", "")
    return (name.endswith("_") and not name.startswith("__")) or name in ("__iadd__", "__isub__", "__imul__",
                                                                          "__itruediv__", "__ipow__", "__setitem__")


def inactive_dropout(func, args, kwargs) -> bool:
    """A dropout call that is the identity (eval mode or p = 0)."""
    if func in (torch.dropout, torch.alpha_dropout, torch.feature_dropout, torch.feature_alpha_dropout):
        p, training = (args[1] if len(args) > 1 else 0.5), (args[2] if len(args) > 2 else True)
    elif func in (_F.dropout, _F.dropout1d, _F.dropout2d, _F.dropout3d, _F.alpha_dropout, _F.feature_alpha_dropout):
        default = func not in (_F.alpha_dropout, _F.feature_alpha_dropout)  # their training defaults to False
        p = args[1] if len(args) > 1 else kwargs.get("p", 0.5)
        training = args[2] if len(args) > 2 else kwargs.get("training", default)
    else:
        return False
    return not training or p == 0
