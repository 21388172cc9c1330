"""Issue 16's figures over the training budget: does the diffusion families' gap to ar close with more training?

    python bench/budget_curve.py --point 10:ar=runs/ar,continuous=runs/C,masked=runs/M10 \
        --point 20:ar=runs/ar20,continuous=runs/C20,masked=runs/M20 \
        --setting continuous="--score-temperature 0.7" --setting continuous="--score-temperature 0.8" \
        --setting masked="--temperature 2.0" --setting masked="--temperature 2.6" \
        [--steps 64] [--samples 16] [--mc-samples 8] [--max-tokens 16384] [--png bench/budget_curve.png] \
        > bench/budget_curve.json
    python bench/budget_curve.py --from-json bench/budget_curve.json --png bench/budget_curve.png   # redraw only

Each ``--point MINUTES:NAME=RUN,...`` holds runs trained that many minutes; its ``ar`` run is the judge of that
budget ("an ar model trained by the same code for the same time"). For every diffusion run and each of its
``--setting`` flags, one `dimba sample-quality` call (`quality_frontier.sample_quality`); its gen-PPL at the
judge's entropy bar (0.9x the judge's own samples' unigram entropy) is interpolated log-linearly between the two
settings whose entropies bracket the bar (extrapolated from the nearest two otherwise, and flagged). The bound is
`dimba eval --json` (ar: exact). Prints one JSON object; the PNG draws both ratios to ar against the budget, with
issue 16's targets (gen-PPL <= 2.5x at the bar, bound <= 1.25x).
"""

from __future__ import annotations

import argparse
import json

# the CLI in a subprocess and one sample-quality point (this folder is on the path of a script run here)
from continuous_recipes import dimba
from quality_frontier import ENTROPY_BAR, at_entropy, sample_quality

# the plot's panels: (ratio key, axis label, issue 16's target ratio to ar, y scale)
PANELS = (("gen_ppl_ratio", "gen-PPL at the entropy bar / judge's own", 2.5, "log"),
          ("bound_ratio", "bits per byte / ar's", 1.25, "linear"))


def bound(run: str, mc_samples: int, max_tokens: int) -> dict:
    """`dimba eval RUN --json`: bits per byte and its standard error."""
    out = json.loads(dimba("eval", run, "--json", "--max-tokens", str(max_tokens), "--mc-samples", str(mc_samples)))
    return {"bits_per_byte": out["bits_per_byte"], "stderr_bits_per_byte": out.get("stderr_bits_per_byte"),
            "is_bound": out.get("is_bound")}


def score_point(runs: dict[str, str], settings: dict[str, list[str]], args) -> dict:
    """Every run of one budget scored against that budget's ar run: samples, gen-PPL at the bar, bound, ratios."""
    judge = runs["ar"]
    own = sample_quality(judge, judge, args.steps, args.samples, "")
    bar = ENTROPY_BAR * own["entropy"]
    ar_bound = bound(judge, args.mc_samples, args.max_tokens)
    out = {"judge": judge, "judge_own": own, "entropy_bar": bar, "ar": ar_bound, "runs": {}}
    for name, run in runs.items():
        if name == "ar":
            continue
        points = [{"flags": f, **sample_quality(run, judge, args.steps, args.samples, f)}
                  for f in settings.get(name) or [""]]
        at_bar = at_entropy(points, bar)
        b = bound(run, args.mc_samples, args.max_tokens)
        ratio = None if at_bar["gen_ppl"] is None else at_bar["gen_ppl"] / own["gen_ppl"]
        out["runs"][name] = {"run": run, "points": points, "at_bar": at_bar, "gen_ppl_ratio": ratio, **b,
                             "bound_ratio": b["bits_per_byte"] / ar_bound["bits_per_byte"]}
    return out


def plot(result: dict, path: str) -> None:
    """Both ratios to ar against the budget, one line per family, the targets dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    minutes = sorted(result["points"], key=float)
    names = sorted({n for m in minutes for n in result["points"][m]["runs"]})
    for ax, (key, label, target, yscale) in zip(axes, PANELS):
        for name in names:
            scored = [m for m in minutes if name in result["points"][m]["runs"]]
            ax.plot([float(m) for m in scored], [result["points"][m]["runs"][name][key] for m in scored], "o-",
                    label=name)
        ax.axhline(target, color="g", ls="--", label=f"target {target}x")
        ax.set(xlabel="training minutes (each run alone, 2 threads)", ylabel=label, yscale=yscale)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("ratios to an ar model trained the same time")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def add_common_args(ap: argparse.ArgumentParser) -> None:
    """The options of the bench scripts that score bounds and draw: --from-json, --mc-samples, --max-tokens, --png."""
    ap.add_argument("--from-json", help="draw --png from this script's earlier JSON instead of measuring")
    ap.add_argument("--mc-samples", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=16384)
    ap.add_argument("--png")


def redrawn(args: argparse.Namespace, plot) -> bool:
    """With --from-json, draw --png from that JSON by ``plot(result, path)`` and say so."""
    if not args.from_json:
        return False
    with open(args.from_json) as f:
        plot(json.load(f), args.png)
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--point", action="append", default=[], help="MINUTES:ar=RUN,NAME=RUN,... (repeatable)")
    ap.add_argument("--setting", action="append", default=[],
                    help='NAME="sample-quality flags": one sampler setting of family NAME (repeatable)')
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--samples", type=int, default=16)
    add_common_args(ap)
    args = ap.parse_args()
    if redrawn(args, plot):
        return
    if not args.point:
        raise SystemExit("give --point MINUTES:ar=RUN,... (or --from-json with --png)")
    settings: dict[str, list[str]] = {}
    for s in args.setting:
        name, flags = s.split("=", 1)
        settings.setdefault(name, []).append(flags)
    result = {"steps": args.steps, "samples": args.samples, "mc_samples": args.mc_samples,
              "max_tokens": args.max_tokens, "points": {}}
    for spec in args.point:
        minutes, runs = spec.split(":", 1)
        named = dict(r.split("=", 1) for r in runs.split(","))
        if "ar" not in named:
            raise SystemExit(f"--point {spec!r} names no ar run: each budget's judge is its ar run")
        result["points"][minutes] = score_point(named, settings, args)
    if args.png:
        plot(result, args.png)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
