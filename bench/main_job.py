"""Figures of README command 1: validation loss at start and end, training speed, word overlap of a sample.

    python bench/main_job.py runs/tiny sample.txt [--png bench/main_job.png]

Prints one JSON object; draws the validation-loss curve.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

from dimba.config import load_run_config
from dimba.evaluation.words import training_vocabulary, word_overlap


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("sample", help="text printed by dimba generate")
    ap.add_argument("--png", default=None)
    args = ap.parse_args()
    rows = list(csv.DictReader(open(Path(args.run) / "metrics.csv")))
    val = [(int(r["step"]), float(r["val_loss"])) for r in rows if r["val_loss"]]
    train = [r for r in rows if r["tokens_per_s"]]
    cfg = load_run_config(Path(args.run) / "config.yaml")
    text = Path(args.sample).read_text()
    out = {
        "steps": val[-1][0],
        "val_loss_start": val[0][1],
        "val_loss_end": val[-1][1],
        "train_tokens_per_s": float(train[-1]["tokens_per_s"]),
        "train_seconds": float(train[-1]["elapsed_s"]),
        "sample_words": len(text.split()),
        "sample_word_overlap": word_overlap(text, training_vocabulary(cfg.data.corpus, cfg.data.val_fraction)),
    }
    print(json.dumps(out, indent=2))
    if args.png:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 3.2))
        ax.plot(*zip(*val), marker="o")
        ax.set_xlabel("step")
        ax.set_ylabel("validation loss (EMA weights)")
        ax.set_title(f"dimba train (preset tiny, {cfg.model.backbone})")
        fig.tight_layout()
        fig.savefig(args.png, dpi=120)


if __name__ == "__main__":
    main()
