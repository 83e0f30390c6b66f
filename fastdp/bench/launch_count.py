"""Kernel launches per training step, counted on the CPU: an estimate of what a GPU step launches.

Host overhead decides bf16 step time on a GPU (issue: fused kernels, "count launches per step and keep them close to
non-private"). This counts, for one step of each variant after warm-up steps:

* ``aten``: operators that reach the kernel level (a ``TorchDispatchMode`` below autograd, so autograd's own
  backward ops count; view-like ops, which launch nothing, and ops inside a Triton launch are left out); on CUDA
  each launches about one kernel (a few launch more: ``topk``, ``foreach`` over many tensors);
* ``triton``: Triton kernel launches, with ``FASTDP_BACKEND=triton`` (run through the interpreter here, counted as
  one launch each).

The real models' layer structure at tiny batch and sequence sizes: the counts depend on layers and tensors, not on
B or T. Not a GPU measurement: ``fastdp bench`` counts the CUDA kernels of a profiled step on the device.

    python -m fastdp.bench.launch_count [--workloads gpt2,wrn] [--variants nonprivate,fastdp,fastdp-per-layer]
        [--backend reference|triton] [--out benchmarks/results/launch_count_<date>.json]
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import os
import warnings

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fastdp.bench.run_env import write_result

VIEW_OPS = {
    "view", "_unsafe_view", "reshape", "_reshape_alias", "t", "transpose", "permute", "expand", "expand_as",
    "slice", "select", "narrow", "split", "split_with_sizes", "chunk", "unbind", "squeeze", "unsqueeze", "flatten",
    "unflatten", "as_strided", "alias", "detach", "view_as", "lift_fresh", "_to_copy_view", "diagonal", "movedim",
    "result_type", "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "_local_scalar_dense",
    "is_same_size", "is_nonzero", "set_", "resolve_conj", "resolve_neg", "_has_compatible_shallow_copy_type",
}
SIZES = {"gpt2": dict(B=2, T=16), "vit": dict(B=2), "wrn": dict(B=2)}


class _Counter(TorchDispatchMode):
    """Counts kernel-level aten ops outside Triton launches (see the module docstring)."""

    def __init__(self):
        super().__init__()
        self.aten, self.triton, self.in_triton = {}, 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        no_op_cast = name == "_to_copy" and _same(args, kwargs)
        if not self.in_triton and name not in VIEW_OPS and not no_op_cast:
            self.aten[name] = self.aten.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def _same(args, kwargs):
    """A ``_to_copy`` that changes nothing (no kernel)."""
    t = args[0] if args else None
    kw = kwargs or {}
    return isinstance(t, torch.Tensor) and kw.get("dtype", t.dtype) == t.dtype and kw.get("device", t.device) == t.device


@contextlib.contextmanager
def _counting_triton(counter: _Counter):
    """Count Triton launches (compiled or interpreted) and pause aten counting inside them."""
    patched = []
    try:
        from triton.runtime.interpreter import InterpretedFunction
        from triton.runtime.jit import JITFunction
        classes = (InterpretedFunction, JITFunction)
    except ImportError:  # no Triton: nothing to count
        classes = ()
    for cls in classes:
        orig = cls.run

        def run(self, *args, _orig=orig, **kwargs):
            if kwargs.get("warmup"):
                return _orig(self, *args, **kwargs)
            counter.triton += 1
            counter.in_triton += 1
            try:
                return _orig(self, *args, **kwargs)
            finally:
                counter.in_triton -= 1
        cls.run = run
        patched.append((cls, orig))
    try:
        yield
    finally:
        for cls, orig in patched:
            cls.run = orig


def _build(workload: str, narrow: bool = False, tiny: bool = False):
    """The real model with tiny inputs: (model, batch, loss_fn). ``narrow``: GPT-2 at width 64 and vocabulary 500
    (same 12 blocks and tied head, same ghost/direct and batching decisions: the reference backend counts 730 / 1141 /
    1346 ops at both widths), so the Triton interpreter finishes in minutes. ``tiny``: the workloads' ``--tiny`` models
    (fewer blocks: smaller counts; for smoke tests)."""
    from fastdp.bench import workloads
    if workload == "gpt2":
        model, make_batch, loss_fn = workloads.build_gpt2(tiny=tiny, seq_len=SIZES["gpt2"]["T"], narrow=narrow)
    elif narrow:
        raise ValueError(f"--narrow applies to gpt2 only (the {workload} dispatch decisions change with width)")
    else:
        model, make_batch, loss_fn = workloads.build(workload, tiny=tiny)
    return model, make_batch(SIZES[workload]["B"], torch.device("cpu")), loss_fn


def count(workload: str, variant: str, warmup: int = 2, narrow: bool = False, tiny: bool = False) -> dict:
    """Launches of one training step of ``variant`` (``benchmarks.e2e.VARIANTS``) on ``workload``."""
    from fastdp.bench import e2e
    model, batch, loss_fn = _build(workload, narrow, tiny)
    B = SIZES[workload]["B"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prep = e2e.VARIANTS[variant].build(copy.deepcopy(model).train(), workload, loss_fn, B, torch.device("cpu"))
        m, opt, loss_of = prep.model, prep.optimizer, prep.loss

        def step():
            loss_of(m, batch).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        for _ in range(warmup):
            step()
        counter = _Counter()
        with _counting_triton(counter), counter:
            step()
    aten = sum(counter.aten.values())
    return {"workload": workload, "variant": variant, "aten": aten, "triton": counter.triton,
            "total": aten + counter.triton, "ops": dict(sorted(counter.aten.items(), key=lambda kv: -kv[1]))}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workloads", default="gpt2,wrn")
    ap.add_argument("--variants", default="nonprivate,fastdp,fastdp-per-layer")
    ap.add_argument("--backend", choices=("reference", "triton"), default="triton",
                    help="FASTDP_BACKEND for the run (triton: the kernels through the interpreter on the CPU)")
    ap.add_argument("--narrow", action="store_true", help="GPT-2 at width 64, vocabulary 500 (same counts, faster "
                    "through the interpreter; see _build)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    os.environ["FASTDP_BACKEND"] = args.backend
    if args.backend == "triton" and not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    torch.set_num_threads(1)
    rows = []
    for w in args.workloads.split(","):
        base = None
        for v in args.variants.split(","):
            try:
                r = count(w, v, narrow=args.narrow and w == "gpt2")
            except Exception as err:  # a failure is a row (e.g. the vit workload without timm)
                rows.append({"workload": w, "variant": v, "error": f"{type(err).__name__}: {err}"[:300]})
                print(f"{w:5s} {v:18s} error: {rows[-1]['error']}")
                continue
            base = r["total"] if v == "nonprivate" else base
            r["x_nonprivate"] = r["total"] / base if base else None
            rows.append(r)
            ratio = f"{r['x_nonprivate']:.2f}x" if base else ""
            print(f"{w:5s} {v:18s} aten {r['aten']:5d}  triton {r['triton']:4d}  total {r['total']:5d}  {ratio}")
    result = {"what": "kernel-level aten ops + Triton launches per training step, counted on the CPU",
              "backend": args.backend, "sizes": SIZES, "narrow_gpt2": args.narrow, "torch": torch.__version__,
              "date": datetime.date.today().isoformat(), "rows": rows}
    return write_result(result, args.out)


if __name__ == "__main__":
    main()
