"""Word overlap of samples under different sampler settings, on one trained run.

    python bench/sampler_settings.py runs/tiny [--seeds 4] [--png bench/sampler_settings.png]

For each setting: seeds 0..S-1, prompt "ROMEO:", 128 new tokens; prints JSON with the
fraction of words found in the training text per seed and pooled.
"""

from __future__ import annotations

import argparse
import json

import torch

from dimba.loading import load_for_inference
from dimba.config import load_run_config
from dimba.evaluation.words import training_vocabulary, word_overlap
from dimba.generation import completions, sample_from_model

SETTINGS = {
    "default": {},
    "temperature 0.5": {"temperature": 0.5},
    "steps 100": {"num_steps": 100},
    "clamp hard": {"clamp": "hard"},
    "clamp soft": {"clamp": "soft"},
    "top-k 20": {"top_k": 20},
    "eta 1": {"eta": 1.0},
    "guidance 2": {"guidance_scale": 2.0},
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--png", default=None)
    args = ap.parse_args()
    model, tok = load_for_inference(args.run)
    cfg = load_run_config(f"{args.run}/config.yaml")
    vocab = training_vocabulary(cfg.data.corpus, cfg.data.val_fraction)
    prompt = tok.encode("ROMEO:")
    context = model.config.context_length
    results = {}
    for name, kw in SETTINGS.items():
        texts = []
        for seed in range(args.seeds):
            ids = sample_from_model(model, prompt, seq_len=context - len(prompt),
                                    generator=torch.Generator().manual_seed(seed), **kw)  # 50 steps unless kw says
            texts += completions(ids, tok, len(prompt), args.length)
        results[name] = {"per_seed": [round(word_overlap(t, vocab), 3) for t in texts],
                         "pooled": round(word_overlap("\n".join(texts), vocab), 3)}
    print(json.dumps(results, indent=2))
    if args.png:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 3.2))
        ax.bar(list(results), [r["pooled"] for r in results.values()])
        ax.axhline(0.7, color="gray", linestyle="--", linewidth=1)
        ax.set_ylim(0, 1)
        ax.set_ylabel("words found in training text")
        ax.tick_params(axis="x", rotation=30)
        fig.tight_layout()
        fig.savefig(args.png, dpi=120)


if __name__ == "__main__":
    main()
