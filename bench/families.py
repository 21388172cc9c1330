"""The families side by side after equal wall-clock training: curves, speed, samples.

    python bench/families.py runs/fam-masked runs/fam-ar runs/fam-hybrid [--seeds 4] [--png bench/families.png]
                             [--remasking ancestral|low_confidence|random]

For every run: steps reached, training tokens/s, validation loss at start and end (masked: the
NELBO per token, ar: the next-token NLL, both in nats and comparable; continuous / hybrid: their
training objective, not a likelihood), and samples for prompt "ROMEO:" (128 new tokens, seeds
0..S-1, the run's sample settings) with the fraction of their words found in the training text.
Prints one JSON object; draws validation loss against training wall-clock.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import torch

from dimba.loading import load_for_inference
from dimba.config import load_run_config
from dimba.families import get_family
from dimba.evaluation.words import training_vocabulary, word_overlap
from dimba.generation import generate_texts

PROMPT, LENGTH = "ROMEO:", 128


def curve(run: Path) -> tuple[list[tuple[float, float]], dict, list[str]]:
    """(elapsed seconds, val_loss) points, the last training row and every step of a run's metrics.csv."""
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    elapsed = {int(r["step"]): float(r["elapsed_s"]) for r in rows if r["elapsed_s"]}
    elapsed[0] = 0.0
    val = [(elapsed.get(int(r["step"]), float("nan")), float(r["val_loss"])) for r in rows if r["val_loss"]]
    last = [r for r in rows if r["tokens_per_s"]][-1]
    return val, last, [r["step"] for r in rows]


def samples(run: Path, seeds: int, remasking: str | None = None) -> list[str]:
    model, tok = load_for_inference(run)
    sc = load_run_config(run / "config.yaml").sample
    if remasking:
        sc.remasking = remasking
    prompt = tok.encode(PROMPT)
    texts = []
    for seed in range(seeds):
        texts += generate_texts(model, tok, prompt, LENGTH, sc, generator=torch.Generator().manual_seed(seed))
    return texts


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--png", default=None)
    ap.add_argument("--remasking", default=None, help="masked runs: override the run's sample.remasking")
    args = ap.parse_args()
    out, curves = {}, {}
    vocab = None
    for name in args.runs:
        run = Path(name)
        cfg = load_run_config(run / "config.yaml")
        vocab = vocab or training_vocabulary(cfg.data.corpus, cfg.data.val_fraction)
        val, last, steps = curve(run)
        texts = samples(run, args.seeds, args.remasking)
        fam = cfg.model.family
        curves[fam] = val
        out[fam] = {
            "run": str(run), "backbone": cfg.model.backbone, "steps": max(int(r) for r in steps),
            "train_seconds": float(last["elapsed_s"]), "train_tokens_per_s": float(last["tokens_per_s"]),
            "val_loss_start": val[0][1], "val_loss_end": val[-1][1],
            "word_overlap_per_seed": [round(word_overlap(t, vocab), 3) for t in texts],
            "word_overlap_pooled": word_overlap("\n".join(texts), vocab),
            "sample_seed0": texts[0],
        }
    print(json.dumps(out, indent=2))
    if args.png:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
        for fam, val in curves.items():
            ax = axes[1] if get_family(fam).latent else axes[0]  # the latent families' objective is no likelihood
            ax.plot([e / 60 for e, _ in val[1:]], [v for _, v in val[1:]], marker="o", label=fam)
        axes[0].set_ylabel("nats / token (masked: NELBO bound)")
        axes[1].set_ylabel("training objective (not a likelihood)")
        for ax in axes:
            ax.set_xlabel("training wall-clock (min)")
            ax.legend()
        fig.suptitle("families, tiny preset, equal wall-clock (validation, EMA weights)")
        fig.tight_layout()
        fig.savefig(args.png, dpi=120)


if __name__ == "__main__":
    main()
