"""Gen-PPL against unigram entropy: where each run's sampler settings land under one ar judge.

    python bench/quality_frontier.py --judge runs/ar --run continuous=runs/C --run masked=runs/M \
        --setting continuous="--score-temperature 0.7" --setting masked="--temperature 2.0" \
        [--steps 64] [--samples 16] [--png bench/quality_frontier.png] > bench/quality_frontier.json
    python bench/quality_frontier.py --merge a.json b.json [--png both.png] > both.json   # one table, no scoring

Each point is one `dimba sample-quality RUN --judge JUDGE --json` call with the run's own sampler settings plus
the point's flags (16 unconditional samples of 256 tokens at 64 steps by default). The judge's own samples give
the reference point; the issue-16 target box (gen-PPL <= 2.5x the judge's at entropy >= 0.9x the judge's) is
drawn over it, and ``at_bar`` holds each run's gen-PPL at that entropy bar, interpolated along its points. A
sampler that buys gen-PPL with repetition moves left on the plot, so runs are compared along their whole curve,
not at one setting. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex

# the CLI in a subprocess and the entropy plot (this folder is on the path of a script run here)
from continuous_recipes import dimba, plot_frontier

ENTROPY_BAR = 0.9  # the samples' unigram entropy must reach this share of the judge's own
KEYS = ("gen_ppl", "entropy", "train_word_fraction", "distinct_2", "seconds_per_sample")


def sample_quality(model: str, judge: str, steps: int, samples: int, flags: str) -> dict:
    """One `dimba sample-quality` call: its JSON figures (``KEYS``) and first sample."""
    out = json.loads(dimba("sample-quality", model, "--judge", judge, "--json", "--samples", str(samples),
                           "--steps", str(steps), *shlex.split(flags)))
    return {**{k: out.get(k) for k in KEYS}, "first_sample": out["texts"][0][:300]}


def at_entropy(points: list[dict], bar: float) -> dict:
    """gen-PPL at unigram entropy ``bar``, log-linear between the two points bracketing it (else the nearest two:
    ``extrapolated``)."""
    pts = sorted(points, key=lambda p: p["entropy"])
    if len(pts) < 2:
        return {"gen_ppl": None, "extrapolated": True}
    above = next((i for i, p in enumerate(pts) if p["entropy"] >= bar), len(pts))
    i = min(max(above, 1), len(pts) - 1)
    lo, hi = pts[i - 1], pts[i]
    frac = (bar - lo["entropy"]) / max(hi["entropy"] - lo["entropy"], 1e-9)
    log_ppl = math.log(lo["gen_ppl"]) + frac * (math.log(hi["gen_ppl"]) - math.log(lo["gen_ppl"]))
    return {"gen_ppl": math.exp(log_ppl), "extrapolated": not 0.0 <= frac <= 1.0}


def merge(paths: list[str]) -> dict:
    """Earlier outputs of this script under one judge as one result: their runs side by side (a run in several of
    them with the settings of all), each run's ``at_bar`` recomputed. They must agree on the steps, the samples and
    the judge's own figures (the same judge model gives the same own samples, wherever its path was written from)."""
    parts = []
    for path in paths:
        with open(path) as f:
            parts.append(json.load(f))
        if not {"steps", "samples", "judge_own", "runs"} <= parts[-1].keys():
            raise SystemExit(f"{path} is not an output of this script")
    first = parts[0]
    for part, path in zip(parts, paths):
        same = [part[k] == first[k] for k in ("steps", "samples")] + [
            part["judge_own"][k] == first["judge_own"][k] for k in ("gen_ppl", "entropy")]
        if not all(same):
            raise SystemExit(f"{path}: another judge, step count or sample count than {paths[0]}")
    result = {k: first[k] for k in ("judge", "steps", "samples", "judge_own", "entropy_bar")}
    result["models"], result["runs"] = {}, {}
    for part, path in zip(parts, paths):  # one name, one model (outputs before "models" was written say nothing)
        for name, model in part.get("models", {}).items():
            if result["models"].setdefault(name, model) != model:
                raise SystemExit(f"{path}: run {name!r} is {model}, another file's {name!r} is "
                                 f"{result['models'][name]}: score one of them under another name")
    for part in parts:  # a run scored in several calls keeps each setting once
        for name, points in part["runs"].items():
            known = result["runs"].setdefault(name, [])
            seen = {k["flags"] for k in known}
            known += [p for p in points if p["flags"] not in seen]
    result["at_bar"] = {name: at_entropy(points, result["entropy_bar"]) for name, points in result["runs"].items()}
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--merge", nargs="+", help="earlier outputs of this script to join (nothing is scored)")
    ap.add_argument("--judge", help="an ar run or export folder")
    ap.add_argument("--run", action="append", help="NAME=RUN_DIR (repeatable)")
    ap.add_argument("--setting", action="append", default=[],
                    help='NAME="sample-quality flags": one point of run NAME (repeatable; none: its defaults)')
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--png", default=None)
    args = ap.parse_args()
    result = merge(args.merge) if args.merge else score(args)
    if args.png:
        plot_frontier(result["runs"], result["judge_own"], args.png, target_box=True)
    print(json.dumps(result, indent=1))


def score(args: argparse.Namespace) -> dict:
    """The points of every ``--run`` and the judge's own, each run's ``at_bar`` among them."""
    if not (args.judge and args.run):
        raise SystemExit("give --judge and --run NAME=RUN_DIR (or --merge with earlier outputs)")
    runs = dict(r.split("=", 1) for r in args.run)
    settings: dict[str, list[str]] = {name: [] for name in runs}
    for s in args.setting:
        name, flags = s.split("=", 1)
        if name not in runs:
            raise SystemExit(f"--setting names run {name!r}, which no --run gives")
        settings[name].append(flags)
    result = {"judge": args.judge, "steps": args.steps, "samples": args.samples, "models": runs, "runs": {}}
    for name, model in runs.items():
        result["runs"][name] = [{"flags": f, **sample_quality(model, args.judge, args.steps, args.samples, f)}
                                for f in settings[name] or [""]]
    result["judge_own"] = sample_quality(args.judge, args.judge, args.steps, args.samples, "")
    bar = ENTROPY_BAR * result["judge_own"]["entropy"]
    result["entropy_bar"] = bar
    result["at_bar"] = {name: at_entropy(points, bar) for name, points in result["runs"].items()}
    return result


if __name__ == "__main__":
    main()
