"""Gen-PPL against unigram entropy: where each run's sampler settings land under one ar judge.

    python bench/quality_frontier.py --judge runs/ar --run continuous=runs/C --run masked=runs/M \
        --setting continuous="--score-temperature 0.7" --setting masked="--temperature 2.0" \
        [--steps 64] [--samples 16] [--png bench/quality_frontier.png] > bench/quality_frontier.json

Each point is one `dimba sample-quality RUN --judge JUDGE --json` call with the run's own sampler settings plus
the point's flags (16 unconditional samples of 256 tokens at 64 steps by default). The judge's own samples give
the reference point; the issue-16 target box (gen-PPL <= 2.5x the judge's at entropy >= 0.9x the judge's) is
drawn over it. A sampler that buys gen-PPL with repetition moves left on the plot, so runs are compared along
their whole curve, not at one setting. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import shlex

from continuous_recipes import dimba  # the CLI in a subprocess (this folder is on the path of a script run here)

KEYS = ("gen_ppl", "entropy", "train_word_fraction", "distinct_2", "seconds_per_sample")


def sample_quality(model: str, judge: str, steps: int, samples: int, flags: str) -> dict:
    """One `dimba sample-quality` call: its JSON figures (``KEYS``) and first sample."""
    out = json.loads(dimba("sample-quality", model, "--judge", judge, "--json", "--samples", str(samples),
                           "--steps", str(steps), *shlex.split(flags)))
    return {**{k: out.get(k) for k in KEYS}, "first_sample": out["texts"][0][:300]}


def plot(result: dict, path: str) -> None:
    """gen-PPL (log) against entropy per run, the judge's point and the target box."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, points in result["runs"].items():
        pts = sorted(points, key=lambda p: p["entropy"])
        ax.plot([p["entropy"] for p in pts], [p["gen_ppl"] for p in pts], "o-", label=name)
    judge = result["judge_own"]
    ax.plot([judge["entropy"]], [judge["gen_ppl"]], "k*", markersize=12, label="ar judge's own samples")
    ax.fill_between([0.9 * judge["entropy"], 1.05 * judge["entropy"]], 1, 2.5 * judge["gen_ppl"], color="g",
                    alpha=0.12, label="target: <= 2.5x judge, entropy >= 0.9x")
    ax.set_yscale("log")
    ax.set_xlabel("unigram entropy of the samples (nats)")
    ax.set_ylabel("gen-PPL under the ar judge")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--judge", required=True, help="an ar run or export folder")
    ap.add_argument("--run", action="append", required=True, help="NAME=RUN_DIR (repeatable)")
    ap.add_argument("--setting", action="append", default=[],
                    help='NAME="sample-quality flags": one point of run NAME (repeatable; none: its defaults)')
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--png", default=None)
    args = ap.parse_args()
    runs = dict(r.split("=", 1) for r in args.run)
    settings: dict[str, list[str]] = {name: [] for name in runs}
    for s in args.setting:
        name, flags = s.split("=", 1)
        if name not in runs:
            raise SystemExit(f"--setting names run {name!r}, which no --run gives")
        settings[name].append(flags)
    result = {"judge": args.judge, "steps": args.steps, "samples": args.samples, "runs": {}}
    for name, model in runs.items():
        result["runs"][name] = [{"flags": f, **sample_quality(model, args.judge, args.steps, args.samples, f)}
                                for f in settings[name] or [""]]
    result["judge_own"] = sample_quality(args.judge, args.judge, args.steps, args.samples, "")
    if args.png:
        plot(result, args.png)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
