"""Issue 17's likelihood over the block size: block masked models against an ar model (and the full-sequence masked
one) at equal steps or equal training time, and the block model's training step with and without gradients through
its clean stream (`diffusion.block_clean_grad`).

    python bench/block_bound.py \
        --group "500 steps:ar=runs/ar500,full=runs/M500,B64=runs/B64,B16=runs/B16,B4=runs/B4,B16ng=runs/B16ng" \
        --group "10 minutes:ar=runs/ar/checkpoints/best.ckpt,full=runs/M10,B16=runs/B16g10,B16ng=runs/B16ng10" \
        --time 4,16,64 [--time-steps 10] [--mc-samples 8] [--max-tokens 16384] [--png bench/block_bound.png] \
        > bench/block_bound.json
    python bench/block_bound.py --from-json bench/block_bound.json --png bench/block_bound.png   # redraw only

A group's run names are ``ar`` (its reference: the ratios are to its bits per byte), ``full`` (the full-sequence
masked model) and ``B<size>`` for a block model, ``B<size>ng`` for one trained with ``block_clean_grad=false``.
Every bound is `dimba eval RUN --json` (ar: exact). ``--time`` runs `dimba bench train --preset tiny --family
masked` for the full model and, for each block size, with and without the clean stream's gradients: two passes,
the second in reverse order, each config's median step time per pass.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
from pathlib import Path

# the CLI in a subprocess (this folder is on the path of a script run here)
from budget_curve import add_common_args, bound, redrawn
from continuous_recipes import dimba

NAME = re.compile(r"^(ar|full|B(\d+)(ng)?)$")
SEQ_LEN = 256  # the tiny preset's: the full-sequence model is one block of it
TARGET = 1.12  # issue 17: the best block model's bits per byte / ar's


def steps_of(run: str) -> int | None:
    """The last training step in a run folder's metrics.csv (None for a checkpoint file)."""
    path = Path(run) / "metrics.csv"
    if not path.is_file():
        return None
    with path.open() as f:
        return max(int(row["step"]) for row in csv.DictReader(f))


def score_group(runs: dict[str, str], args) -> dict:
    """Every run's bound and its ratio to the group's ar run."""
    ref = bound(runs["ar"], args.mc_samples, args.max_tokens)
    out = {}
    for name, run in runs.items():
        b = ref if name == "ar" else bound(run, args.mc_samples, args.max_tokens)
        out[name] = {"run": run, "steps": steps_of(run), **b, "ratio_to_ar": b["bits_per_byte"] / ref["bits_per_byte"]}
    return out


def time_steps(sizes: list[int], steps: int) -> dict:
    """Median training-step seconds of each config, two passes (the second reversed)."""
    configs = {"full": []}
    for b in sizes:
        configs[f"B{b}"] = [f"model.block_size={b}"]
        configs[f"B{b}ng"] = [f"model.block_size={b}", "diffusion.block_clean_grad=false"]
    out = {name: [] for name in configs}
    for order in (list(configs), list(configs)[::-1]):
        for name in order:
            res = json.loads(dimba("bench", "train", "--preset", "tiny", "--family", "masked", "--steps", str(steps),
                                   "--warmup", "3", *configs[name]))
            out[name].append(res["median_step_s"])
    return {name: {"median_step_s": t, "mean_over_passes": sum(t) / len(t)} for name, t in out.items()}


def size_of(name: str) -> int:
    return SEQ_LEN if name == "full" else int(NAME.match(name).group(2))


def plot(result: dict, path: str) -> None:
    """Left: each group's ratio to ar over the block size (with and without the clean stream's gradients);
    right, when the result holds timings: the training step's time over the block size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timing = result.get("timing") or {}
    fig, axes = plt.subplots(1, 2 if timing else 1, figsize=(11 if timing else 6, 4), squeeze=False)
    left = axes[0, 0]
    for i, (group, runs) in enumerate(result["groups"].items()):
        for ng, marker in ((False, "o-"), (True, "s--")):
            names = sorted((n for n in runs if n != "ar" and (n.endswith("ng") == ng)), key=size_of)
            if names:
                left.plot([size_of(n) for n in names], [runs[n]["ratio_to_ar"] for n in names], marker, color=f"C{i}",
                          label=f"{group}{' (no clean-stream gradients)' if ng else ''}")
    left.axhline(TARGET, color="g", ls="--", label=f"target {TARGET}x")
    left.set(xscale="log", xlabel="block size (256: the full-sequence model)", ylabel="bits per byte / ar's")
    if timing:
        plot_timing(axes[0, 1], timing)
    for ax in axes[0]:
        ax.set_xticks([4, 16, 64, 256], ["4", "16", "64", "256"])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot_timing(ax, timing: dict) -> None:
    """The training step's time over the block size, with and without the clean stream's gradients."""
    for ng, marker in ((False, "o-"), (True, "s--")):
        names = sorted((n for n in timing if n != "full" and n.endswith("ng") == ng), key=size_of)
        if names:
            ax.plot([size_of(n) for n in names], [timing[n]["mean_over_passes"] for n in names], marker,
                    label="without clean-stream gradients" if ng else "block model")
    if "full" in timing:
        ax.axhline(timing["full"]["mean_over_passes"], color="k", ls=":", label="full-sequence model")
    ax.set(xscale="log", xlabel="block size", ylabel="training step, s (tiny, batch 8, 2 threads)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--group", action="append", default=[], help="LABEL:ar=RUN,full=RUN,B16=RUN,... (repeatable)")
    ap.add_argument("--time", help="block sizes whose training step to time, e.g. 4,16,64")
    ap.add_argument("--time-steps", type=int, default=10)
    add_common_args(ap)
    args = ap.parse_args()
    if redrawn(args, plot):
        return
    result = {"mc_samples": args.mc_samples, "max_tokens": args.max_tokens, "groups": {}}
    for spec in args.group:
        label, runs = spec.split(":", 1)
        named = dict(r.split("=", 1) for r in runs.split(","))
        bad = [n for n in named if not NAME.match(n)]
        if bad or "ar" not in named:
            raise SystemExit(f"--group {label!r}: names are ar (required), full, B<size> or B<size>ng; got {bad}")
        result["groups"][label] = score_group(named, args)
    if args.time:
        result["timing"] = time_steps([int(b) for b in args.time.split(",")], args.time_steps)
    if args.png:
        plot(result, args.png)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
