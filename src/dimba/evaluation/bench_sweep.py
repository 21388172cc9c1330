"""`dimba bench sweep`: sample quality against sampling cost across denoising step counts, with the
autoregressive judge's own samples as the yardstick.

Every point generates the same number of unconditional samples of the same length from the same seed,
so points differ only in the step count; the judge's point is the judge sampling left to right with its
cache (its own `sample` settings) and scored by itself.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch

from dimba.errors import UsageError
from dimba.evaluation.sample_quality import check_judge, sample_quality, warm_up
from dimba.io import atomic_save_figure, atomic_write_text


def parse_steps(text: str) -> list[int]:
    """Sorted distinct step counts of a comma-separated list such as ``"8,16,32"``; a one-line `UsageError` otherwise."""
    try:
        steps = sorted({int(part) for part in text.split(",")})
    except ValueError:
        raise UsageError(f"--steps {text!r} is not a comma-separated list of integers: e.g. --steps 8,16,32") from None
    if steps[0] < 1:
        raise UsageError(f"--steps {text!r}: every step count must be at least 1")
    return steps


def check_sweepable(model) -> None:
    """Raise a one-line `UsageError` for a model without denoising steps to sweep (ar)."""
    if not model.family.has_steps:
        raise UsageError(f"the {model.family} family has no denoising steps to sweep: pass a diffusion model "
                         "(continuous, masked or hybrid) as MODEL; the ar judge is the sweep's yardstick")


def sweep(model, tokenizer, judge, judge_tokenizer, steps: Sequence[int], sample_cfg, judge_cfg, num_samples: int,
          length: int, seed: int = 0, vocabulary: set[str] | None = None) -> dict:
    """`sample_quality` of the diffusion ``model`` at each step count of ``steps`` (``sample_cfg`` otherwise),
    and of the ar ``judge`` itself (sampling with ``judge_cfg``).

    Returns a dict: family, samples, length, seed, steps, points (one `sample_quality` result per step
    count, without the texts) and ar (the judge's point, its gen-PPL under itself).
    """
    check_sweepable(model)
    check_judge(judge)
    warm_up(model, sample_cfg.model_copy(update={"num_steps": steps[0]}), length)
    warm_up(judge, judge_cfg, length)
    points = []
    for num_steps in steps:
        cfg = sample_cfg.model_copy(update={"num_steps": num_steps})
        r = sample_quality(model, tokenizer, judge, judge_tokenizer, num_samples, cfg, length,
                           generator=torch.Generator().manual_seed(seed), vocabulary=vocabulary)
        r.pop("texts")
        points.append(r)
    ar = sample_quality(judge, judge_tokenizer, judge, judge_tokenizer, num_samples, judge_cfg, length,
                        generator=torch.Generator().manual_seed(seed), vocabulary=vocabulary)
    ar.pop("texts")
    return {"family": model.family.name, "samples": num_samples, "length": length, "seed": seed, "steps": list(steps),
            "points": points, "ar": ar}


def plot_sweep(result: dict, path: Path) -> None:
    """gen-PPL against seconds per sample, one point per step count (labelled), the ar judge's point marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    points = [p for p in result["points"] if p["gen_ppl"] is not None]
    ax.plot([p["seconds_per_sample"] for p in points], [p["gen_ppl"] for p in points], marker="o",
            label=f"{result['family']} (steps)")
    for p in points:
        ax.annotate(str(p["steps"]), (p["seconds_per_sample"], p["gen_ppl"]), textcoords="offset points", xytext=(4, 4))
    ar = result["ar"]
    if ar["gen_ppl"] is not None:
        ax.plot([ar["seconds_per_sample"]], [ar["gen_ppl"]], marker="*", markersize=14, linestyle="none",
                color="tab:red", label="ar judge (cache)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("seconds per sample")
    ax.set_ylabel("gen-PPL under the ar judge")
    ax.set_title(f"{result['samples']} samples x {result['length']} tokens")
    ax.legend()
    fig.tight_layout()
    atomic_save_figure(fig, path)


def write_sweep(result: dict, paths: tuple[Path, Path]) -> None:
    """Write a `sweep` result to the JSON and PNG paths of `dimba.evaluation.plots.check_out` (each atomically)."""
    atomic_write_text(paths[0], json.dumps(result, indent=2) + "\n")
    plot_sweep(result, paths[1])
