"""The continuous family's recipe, one part at a time (issue 16's ablation): train each recipe at the tiny preset's
budget, then score 16 samples of 256 tokens with an ar judge and the likelihood bound on the held-out split.

    python bench/continuous_recipes.py --runs runs/recipes --judge runs/ar [--data shakespeare] \
        [--only base,C] [--vae runs/vae64] [--png bench/continuous_recipes.png] > bench/continuous_recipes.json

A run folder that already holds a finished run (its last checkpoint) is scored, not trained again, so the
table can be built up over several sessions. Every recipe is ``dimba train`` with these overrides (the tiny
preset, 650 steps, seed 0); its samples come from the family's default sampler at 64 steps, at temperature 1 and
at each score temperature of ``--score-temperatures`` (logits models only). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

OLD = ("model.prediction_type=x0 model.logit_skip=false model.self_conditioning=false model.time_warping=false "
       "diffusion.objective=mse_ce")  # the previous default: min-SNR-5 x0 regression + rounding CE, uniform times
C = ("model.prediction_type=logits model.logit_skip=true model.self_conditioning=true model.time_warping=true "
     "diffusion.objective=ce")  # the presets' recipe since issue 16
RECIPES = {  # name -> KEY=VALUE overrides of `dimba train` (later ones win)
    "base": OLD,
    "E": f"{OLD} model.self_conditioning=true",
    "A": f"{C} model.self_conditioning=false model.time_warping=false",
    "B": f"{C} model.self_conditioning=false",
    "D": f"{C} model.time_warping=false",
    "C": C,
    "G": f"{C} model.logit_skip=false",
    "F": f"{C} model.prediction_type=x0 model.logit_skip=false",
    "C64": f"{C} model.latent_diffusion=true model.d_latent=64",
}


def dimba(*args: str) -> str:
    """Run the dimba CLI; its stdout (raises with its last stderr line on failure)."""
    done = subprocess.run([sys.executable, "-m", "dimba", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"dimba {' '.join(args[:2])} failed: {done.stderr.strip().splitlines()[-1:]}")
    return done.stdout


def score(run: Path, judge: str, steps: int, samples: int, score_temperatures: list[float]) -> dict:
    """Sample quality (at temperature 1 and each score temperature) and the bound of one finished run."""
    logits = "prediction_type: logits" in (run / "config.yaml").read_text()
    rows = {}
    for st in [1.0, *(score_temperatures if logits else [])]:
        sq = json.loads(dimba("sample-quality", str(run), "--judge", judge, "--samples", str(samples), "--steps",
                              str(steps), "--score-temperature", str(st), "--json"))
        rows[str(st)] = {k: sq[k] for k in ("gen_ppl", "entropy", "train_word_fraction")} | {"text": sq["texts"][0]}
    bound = json.loads(dimba("eval", str(run), "--json", "--max-tokens", "16384", "--mc-samples", "4"))
    return {"samples": rows, "bits_per_byte": bound["bits_per_byte"], "bound_stderr_nats": bound.get(
        "stderr_nats_per_token"), "t0": bound.get("t0"), "clamp": bound.get("clamp")}


def plot_frontier(curves: dict[str, list[dict]], judge: dict, path: str, title: str = "",
                  target_box: bool = False) -> None:
    """gen-PPL (log) against unigram entropy: one line per curve (points with ``entropy`` and ``gen_ppl``), the
    judge's own samples as a star, and with ``target_box`` issue 16's target (<= 2.5x its gen-PPL at >= 0.9x its
    entropy)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    for name, points in curves.items():
        pts = sorted(points, key=lambda p: p["entropy"])
        ax.plot([p["entropy"] for p in pts], [p["gen_ppl"] for p in pts], "o-", label=name)
    ax.plot([judge["entropy"]], [judge["gen_ppl"]], "k*", markersize=12, label="ar judge, its own samples")
    if target_box:
        ax.fill_between([0.9 * judge["entropy"], 1.05 * judge["entropy"]], 1, 2.5 * judge["gen_ppl"], color="g",
                        alpha=0.12, label="target: <= 2.5x judge, entropy >= 0.9x")
    ax.set(yscale="log", xlabel="unigram entropy of the samples (nats)", ylabel="gen-PPL under the ar judge",
           title=title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", required=True, help="folder of the recipe runs (one subfolder each)")
    p.add_argument("--judge", required=True, help="an ar run trained on the same corpus")
    p.add_argument("--data", default="shakespeare")
    p.add_argument("--only", help="comma-separated recipe names (default: all)")
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--score-temperatures", default="0.5", help="comma-separated, for logits models")
    p.add_argument("--vae", help="a `dimba vae train --latent-dim 64` folder: adds recipe CV (C on its latent)")
    p.add_argument("--png")
    args = p.parse_args()
    if args.vae:
        RECIPES["CV"] = f"{RECIPES['C64']} model.use_vae_latent=true model.vae_checkpoint_path={args.vae}"
    names = args.only.split(",") if args.only else list(RECIPES)
    temps = [float(x) for x in args.score_temperatures.split(",") if x]
    results = {}
    for name in names:
        run = Path(args.runs) / name
        if not (run / "checkpoints" / "last.ckpt").is_file():
            dimba("train", "--out", str(run), "--data", args.data, "--quiet", *RECIPES[name].split())
        results[name] = score(run, args.judge, args.steps, args.samples, temps) | {"overrides": RECIPES[name]}
    judge = json.loads(dimba("sample-quality", args.judge, "--judge", args.judge, "--samples", str(args.samples),
                             "--json"))
    judge_row = {k: judge[k] for k in ("gen_ppl", "entropy", "train_word_fraction")}
    judge_row["bits_per_byte"] = json.loads(dimba("eval", args.judge, "--json", "--max-tokens", "16384"))[
        "bits_per_byte"]
    if args.png:  # one point per (recipe, score temperature)
        curves = {f"{n} ({r['bits_per_byte']:.3f} bits/B)": list(r["samples"].values()) for n, r in results.items()}
        plot_frontier(curves, judge_row, args.png, "continuous recipes at 650 steps (tiny preset); lines: score "
                      "temperature")
    print(json.dumps({"judge": judge_row, "recipes": results}, indent=1))


if __name__ == "__main__":
    main()
