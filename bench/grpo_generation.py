"""GRPO's groups: generating each prompt's group alone against the prompts of one length together.

A GRPO step samples ``--group`` answers to each of ``--prompts`` training prompts of a task; most of the step is
that generation (about 70 % of a masked step at 8 x 8, by py-spy). This times one batch of groups both ways,
alternating the two in one process for ``--rounds`` rounds, with the run's sampler settings at temperature 1 (as GRPO
samples its groups), and prints the medians as JSON (and draws a PNG):

    python bench/grpo_generation.py --run runs/sft3k --out bench/grpo_generation

"per_prompt" is one `generate_responses` call per prompt (the groups before `generate_groups`); "by_length" is
`generate_groups` (one call per prompt length). Each round draws a new batch of prompts.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from dimba.data.finetune import encode_rows, task_rows
from dimba.generation import generate_groups, generate_responses
from dimba.loading import load_for_inference, sample_defaults


def one_batch(model, prompts, sample, group: int, seed: int) -> dict[str, float]:
    """Seconds for one batch of groups: per prompt, then by length (the same prompts and seed)."""
    times = {}
    start = time.perf_counter()
    for prompt in prompts:
        generate_responses(model, prompt, sample, group, torch.Generator().manual_seed(seed))
    times["per_prompt"] = time.perf_counter() - start
    start = time.perf_counter()
    generate_groups(model, prompts, sample, group, torch.Generator().manual_seed(seed))
    times["by_length"] = time.perf_counter() - start
    return times


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["per_prompt", "by_length"]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.bar(names, [result[n]["median_s"] for n in names], color=["#999999", "#3366cc"])
    ax.set_ylabel("seconds per batch of groups (median)")
    ax.set_title(f"{result['family']}: {result['prompts']} prompts x {result['group']} samples, "
                 f"{result['steps']} steps")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="a run fine-tuned on the task (e.g. an SFT run)")
    parser.add_argument("--task", default="task:arithmetic")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--steps", type=int, help="sampler steps (default: the run's own, which GRPO uses)")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, help="write OUT.json and OUT.png")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_for_inference(args.run)
    sample = sample_defaults(args.run).model_copy(update={"temperature": 1.0})
    if args.steps is not None:
        sample = sample.model_copy(update={"num_steps": args.steps})
    rows = encode_rows(task_rows(args.task, "answer", args.prompts * args.rounds, 0), tok)
    rounds = []
    for r in range(args.rounds):
        prompts = [row["prompt"] for row in rows[r * args.prompts:(r + 1) * args.prompts]]
        rounds.append({**one_batch(model, prompts, sample, args.group, r), "lengths": len({len(p) for p in prompts})})
    result = {"run": str(args.run), "family": model.family.name, "prompts": args.prompts, "group": args.group,
              "steps": sample.num_steps, "threads": args.threads, "rounds": rounds}
    for name in ("per_prompt", "by_length"):
        result[name] = {"median_s": statistics.median(r[name] for r in rounds)}
    result["speedup"] = statistics.median(r["per_prompt"] / r["by_length"] for r in rounds)
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.with_suffix(".json").write_text(json.dumps(result, indent=1))
        plot(result, args.out.with_suffix(".png"))


if __name__ == "__main__":
    main()
