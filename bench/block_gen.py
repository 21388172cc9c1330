"""Block diffusion on a cached state against the ar model with its cache: speed (batch 1, 256 new tokens, CPU)
and sample quality (gen-PPL under the ar judge, unigram entropy), with each unmasking rule.

    python bench/block_gen.py runs/ar runs/block16 [runs/masked ...] [--rules count:256,count:64,threshold:0.9,...]
                              [--judge runs/judge] [--repeats 3] [--samples 16] [--block-length 32]
                              [--png bench/block_gen.png]
    python bench/block_gen.py --redraw bench/block_gen.json --png bench/block_gen.png

A run without ``model.block_size`` (a full-sequence masked model) is sampled in semi-autoregressive blocks of
``--block-length``, each rule twice: without a cache (every step reads the whole canvas) and with the DualCache
(`dimba.backbones.dualcache`: the canvas read at each block's first step, the block alone at the others).

Speed: every configuration generates 256 tokens with no EOS stop, ``repeats`` times interleaved (round robin,
so machine noise hits all alike) after one warm-up round; median seconds, tokens/s and model calls per token
(ar: ``ar_step`` calls; block: ``block_step`` calls, the denoising steps plus one read of each finished block;
full-sequence: whole-canvas reads plus DualCache block reads).
Quality: ``samples`` samples of 256 tokens per configuration, batched, scored by `dimba.evaluation.sample_quality`
with the ar model as the judge (or ``--judge``, another ar run). A rule is ``count:S`` (S steps in all, an even
share per step, LLaDA's low confidence order), ``threshold:P`` (Fast-dLLM, at most 256 steps) or ``entropy:G`` (EB-sampler, at most 256 steps).
Prints one JSON object; draws gen-PPL against seconds per sample.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from dimba.config import SampleConfig
from dimba.evaluation.sample_quality import sample_quality
from dimba.generation import generate
from dimba.loading import load_for_inference
from gen_speed import counting  # bench/ is the script's folder: on sys.path

NEW_TOKENS = 256
RULES = {"count": lambda v: {"num_steps": int(v)},
         "threshold": lambda v: {"num_steps": NEW_TOKENS, "unmask_threshold": float(v)},
         "entropy": lambda v: {"num_steps": NEW_TOKENS, "unmask_entropy": float(v)}}


def configurations(ar, runs: list[str], rules: list[str], block_length: int) -> dict:
    """name -> (model, tokenizer, call counter, SampleConfig)."""
    model, tok = ar
    configs = {"ar (cache)": (model, tok, counting(model, "ar_step"), SampleConfig())}
    for run in runs:
        model, tok = load_for_inference(run)
        if model.config.block_size is not None:
            calls = counting(model, "block_step")
            for rule in rules:
                kind, value = rule.split(":")
                configs[f"block {model.config.block_size} {kind} {value}"] = (
                    model, tok, calls, SampleConfig(**RULES[kind](value)))
            continue
        calls = counting(model, "token_logits", "dual_forward", "dual_step")
        for rule in rules:
            kind, value = rule.split(":")
            for dual, label in ((False, "no cache"), (True, "DualCache")):
                settings = SampleConfig(**RULES[kind](value), block_length=block_length, dual_cache=dual)
                configs[f"full, blocks of {block_length}, {label}, {kind} {value}"] = (model, tok, calls, settings)
    return configs


def time_all(configs: dict, repeats: int) -> dict:
    """Median seconds and model calls per configuration, round robin."""
    times = {k: [] for k in configs}
    calls = {}
    for rep in range(repeats + 1):
        for name, (model, _, counter, cfg) in configs.items():
            counter["n"] = 0
            start = time.perf_counter()
            generate(model, None, NEW_TOKENS, cfg, 1, torch.Generator().manual_seed(rep))
            if rep > 0:  # the first round warms up
                times[name].append(time.perf_counter() - start)
            calls[name] = counter["n"]
    return {name: {"median_s": round(statistics.median(ts), 3),
                   "tokens_per_s": round(NEW_TOKENS / statistics.median(ts), 1),
                   "model_calls_per_token": round(calls[name] / NEW_TOKENS, 3), "all_s": [round(t, 3) for t in ts]}
            for name, ts in times.items()}


def quality_all(configs: dict, judge, judge_tok, samples: int) -> dict:
    """gen-PPL and unigram entropy of ``samples`` samples per configuration."""
    out = {}
    for name, (model, tok, _, cfg) in configs.items():
        q = sample_quality(model, tok, judge, judge_tok, samples, cfg, NEW_TOKENS, generator=torch.Generator().manual_seed(0))
        out[name] = {"gen_ppl": round(q["gen_ppl"], 1), "entropy": round(q["entropy"], 3),
                     f"seconds_batch_{samples}": round(q["seconds"], 2),
                     f"tokens_per_s_batch_{samples}": round(q["tokens_per_second"], 1),
                     "sample": q["texts"][0][:160]}
    return out


def _kind_and_rule(name: str) -> tuple[str, str]:
    """("ar", "") / ("block 16", "count 64") / ("full, blocks of 32, DualCache", "count 64") from a configuration name."""
    if name.startswith("ar"):
        return "ar (cache)", ""
    if name.startswith("block"):
        size, kind, value = name.split()[1:]
        return f"block {size}", f"{kind} {value}"
    head, rule = name.rsplit(", ", 1)
    return head, rule


def draw(results: dict, png: str) -> None:
    """gen-PPL against seconds per sample, one marker per kind of configuration, each point named by its rule."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    markers = iter("*osD^vP")
    groups: dict[str, list] = {}
    for name, r in results.items():
        kind, rule = _kind_and_rule(name)
        groups.setdefault(kind, []).append((r["median_s"], r["gen_ppl"], rule))
    for kind, points in groups.items():
        xs, ys, rules = zip(*points)
        ax.scatter(xs, ys, marker=next(markers), s=60, label=kind)
        for x, y, rule in points:
            ax.annotate(rule, (x, y), fontsize=7, xytext=(4, 2), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(f"seconds per sample of {NEW_TOKENS} tokens (batch 1, median)")
    ax.set_ylabel("gen-PPL under the ar judge")
    ax.set_title("block diffusion, DualCache and ar, CPU")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("ar_run", nargs="?")
    ap.add_argument("runs", nargs="*", help="block-diffusion runs and / or full-sequence masked runs")
    ap.add_argument("--rules", default="count:256,count:128,count:64,threshold:0.9,threshold:0.7,entropy:0.5,entropy:2")
    ap.add_argument("--judge", default=None, help="the ar run that scores gen-PPL (default: ar_run)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--png", default=None)
    ap.add_argument("--block-length", type=int, default=32, help="the sampler's blocks on a full-sequence run")
    ap.add_argument("--redraw", help="draw --png from this JSON of an earlier run instead of measuring")
    args = ap.parse_args()
    if args.redraw:
        with open(args.redraw) as f:
            draw(json.load(f)["results"], args.png)
        return
    if not args.ar_run or not args.runs:
        ap.error("give the ar run and at least one block-diffusion or masked run (or --redraw JSON)")
    ar = load_for_inference(args.ar_run)
    configs = configurations(ar, args.runs, args.rules.split(","), args.block_length)
    speed = time_all(configs, args.repeats)
    quality = quality_all(configs, *(load_for_inference(args.judge) if args.judge else ar), args.samples)
    results = {name: {**speed[name], **quality[name]} for name in configs}
    print(json.dumps({"threads": torch.get_num_threads(), "new_tokens": NEW_TOKENS, "repeats": args.repeats,
                      "block_length": args.block_length,
                      "samples": args.samples, "results": results}, indent=2))
    if args.png:
        draw(results, args.png)


if __name__ == "__main__":
    main()
