"""The audit's report: text, a JSON-ready dict, and the score histograms of included vs excluded canaries (a PNG,
with matplotlib; without it the plot is skipped with a note)."""
from __future__ import annotations

import json
import os
from typing import Optional

import torch

__all__ = ["result_dict", "save_report", "text_report"]


def result_dict(result) -> dict:
    """Every number of an ``AuditResult`` (scores and labels as lists)."""
    b = result.bound
    return {
        "eps_lower": result.eps_lower, "epsilon": result.epsilon, "delta": result.delta,
        "confidence": result.confidence, "method": result.method, "threat": result.threat,
        "canaries": result.canaries, "noise_multiplier": result.noise_multiplier, "sample_rate": result.sample_rate,
        "steps": result.steps, "expected_batch_size": result.expected_batch_size,
        "max_grad_norm": result.max_grad_norm, "max_unreleased": result.max_unreleased,
        "seconds": result.seconds, "command": result.command,
        "bound": {"k": b.k, "r": b.r, "v": b.v, "m": b.m, "candidates": b.candidates,
                  "table": [list(row) for row in b.table]},
        "scores": result.scores.tolist(), "included": result.included.tolist(),
        "candidates": result.candidates.tolist(),
        "statistic": None if result.statistic is None else result.statistic.tolist(),
    }


def text_report(result) -> str:
    """The human-readable report: the bound against the claim, the guesses, where the scores lie, how to rerun."""
    b = result.bound
    inc, cand = result.included, result.candidates
    s = result.scores
    lines = [
        f"fastdp privacy audit: {result.method}, threat {result.threat}",
        f"eps_lower: {result.eps_lower:.4f}  (one-run bound, Steinke et al. 2023, confidence {result.confidence})",
        f"epsilon:   {result.epsilon:.4f}  (accountant, delta {result.delta:g}, canaries counted in the dataset)",
        "verdict:   " + ("CONSISTENT (eps_lower <= epsilon)" if result.eps_lower <= result.epsilon else
                         "VIOLATION: the run leaks more than the claimed epsilon"),
        f"run: {result.steps} steps, sample rate {result.sample_rate:.4g}, expected batch {result.expected_batch_size}, "
        f"noise multiplier {result.noise_multiplier:.4g}, max_grad_norm {result.max_grad_norm:g}, "
        f"{result.seconds:.1f} s",
        f"canaries: {result.canaries} ({int(inc.sum())} included), guessed on {int(cand.sum())} "
        f"(the others' coordinates were never released)" if result.threat == "white-box-gradient" else
        f"canaries: {result.canaries} ({int(inc.sum())} included)",
        f"best guesses: k = {b.k} top as in + {b.k} bottom as out: {b.v} of {b.r} correct",
        "guess counts tried (Bonferroni): " + ", ".join(f"k={k}: {v}/{r} -> {e:.3f}" for k, r, v, e in b.table),
    ]
    for name, sel in (("included", inc & cand), ("excluded", ~inc & cand)):
        if sel.any():
            x = s[sel]
            lines.append(f"scores {name}: mean {float(x.mean()):.3f}, std {float(x.std()) if x.numel() > 1 else 0:.3f}"
                         f", n {x.numel()}")
    if result.max_unreleased is not None:
        off = int((~cand).sum())
        lines.append(f"never released: {off} canaries; largest |value| read at unreleased coordinates: "
                     f"{result.max_unreleased:g} (must be 0)")
    if result.command:
        lines.append(f"reproduce: {result.command}")
    return "\n".join(lines)


def save_report(result, out_dir: str, stem: str = "audit") -> dict:
    """Write ``{stem}.json``, ``{stem}.txt`` and ``{stem}_scores.png`` (if matplotlib is installed) to ``out_dir``;
    returns {"json", "txt", "png" (or None), "note"}."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {"json": os.path.join(out_dir, f"{stem}.json"), "txt": os.path.join(out_dir, f"{stem}.txt"),
             "png": None, "note": None}
    with open(paths["json"], "w") as f:
        json.dump(result_dict(result), f, indent=1)
    text = text_report(result)
    png = os.path.join(out_dir, f"{stem}_scores.png")
    note = plot_histograms(result, png)
    if note is None:
        paths["png"] = png
    else:
        paths["note"] = note
        text += f"\nplot: {note}"
    with open(paths["txt"], "w") as f:
        f.write(text + "\n")
    return paths


def plot_histograms(result, path: str) -> Optional[str]:
    """Histograms of the included and excluded canaries' scores (guessed-on canaries only) to ``path``; returns None,
    or why no plot was written."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no histogram (pip install matplotlib)"
    cand = result.candidates
    s_in, s_out = result.scores[result.included & cand], result.scores[~result.included & cand]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    both = torch.cat([s_in, s_out])
    if both.numel():
        lo, hi = float(both.min()), float(both.max())
        bins = torch.linspace(lo, hi if hi > lo else lo + 1, 41).tolist()
        ax.hist(s_out.tolist(), bins=bins, alpha=0.6, label=f"excluded ({s_out.numel()})")
        ax.hist(s_in.tolist(), bins=bins, alpha=0.6, label=f"included ({s_in.numel()})")
    ax.set_xlabel("canary score" + (" (sum over steps of the noisy gradient along the canary, / R)"
                                    if result.threat == "white-box-gradient" else " (loss before - after)"))
    ax.set_ylabel("canaries")
    ax.set_title(f"{result.method}: eps_lower {result.eps_lower:.2f} vs epsilon {result.epsilon:.2f}", fontsize=10)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return None
