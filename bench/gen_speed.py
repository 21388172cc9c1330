"""Generation wall-clock: 256 new tokens, batch 1, CPU — the ar model with its cache vs the masked model.

    python bench/gen_speed.py runs/fam-ar runs/fam-masked [--steps 16,32,64,128,256] [--repeats 3]
                              [--png bench/gen_speed.png]

Every configuration runs ``repeats`` times interleaved (round robin, so machine noise hits all
alike) after one warm-up; the median seconds are reported, with the number of model calls
(the masked loop reuses its output when a step changes no token). No EOS stop: every run
produces all 256 tokens. Prints one JSON object and draws seconds against steps.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from dimba.loading import load_for_inference
from dimba.generation import sample_from_model

NEW_TOKENS = 256


def counting(model, *methods: str) -> dict:
    """Wrap each of ``model``'s ``methods`` so that their calls are counted, together, in the returned dict."""
    calls = {"n": 0}

    def wrap(inner):
        def counted(*args, **kwargs):
            calls["n"] += 1
            return inner(*args, **kwargs)
        return counted

    for method in methods:
        setattr(model, method, wrap(getattr(model, method)))
    return calls


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("ar_run")
    ap.add_argument("masked_run")
    ap.add_argument("--steps", default="16,32,64,128,256")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--png", default=None)
    args = ap.parse_args()
    ar, _ = load_for_inference(args.ar_run)
    masked, _ = load_for_inference(args.masked_run)
    ar_calls, masked_calls = counting(ar, "ar_step"), counting(masked, "token_logits")

    configs = {"ar (cache)": (ar, ar_calls, {})}
    for steps in [int(s) for s in args.steps.split(",")]:
        for block in (None, 32):
            if block is not None and steps < NEW_TOKENS // block:
                continue
            name = f"masked {steps} steps" + (f", block {block}" if block else "")
            configs[name] = (masked, masked_calls, {"num_steps": steps, "block_length": block})

    times: dict[str, list[float]] = {k: [] for k in configs}
    calls: dict[str, int] = {}
    for rep in range(args.repeats + 1):
        for name, (model, counter, kw) in configs.items():
            counter["n"] = 0
            start = time.perf_counter()
            sample_from_model(model, None, seq_len=NEW_TOKENS, generator=torch.Generator().manual_seed(rep), **kw)
            if rep > 0:  # the first round warms up
                times[name].append(time.perf_counter() - start)
            calls[name] = counter["n"]
    out = {"threads": torch.get_num_threads(), "new_tokens": NEW_TOKENS, "repeats": args.repeats, "results": {}}
    for name, ts in times.items():
        med = statistics.median(ts)
        out["results"][name] = {"median_s": round(med, 3), "tokens_per_s": round(NEW_TOKENS / med, 1),
                                "model_calls": calls[name], "all_s": [round(t, 3) for t in ts]}
    print(json.dumps(out, indent=2))
    if args.png:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5.5, 3.5))
        for block, marker in ((None, "o"), (32, "s")):
            pts = [(cfg[2]["num_steps"], out["results"][n]["median_s"]) for n, cfg in configs.items()
                   if cfg[2] and cfg[2]["block_length"] == block]
            ax.plot(*zip(*pts), marker=marker, label="masked" + (f", block {block}" if block else ""))
        ax.axhline(out["results"]["ar (cache)"]["median_s"], color="k", ls="--", label="ar with cache")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("masked sampler steps")
        ax.set_ylabel(f"seconds for {NEW_TOKENS} tokens (median)")
        ax.set_title("generation, batch 1, CPU")
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.png, dpi=120)


if __name__ == "__main__":
    main()
