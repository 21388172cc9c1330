"""The cost of subnormal floats on the CPU: trained and fresh models, with subnormals flushed to zero and kept.

    python bench/subnormals.py RUN [RUN ...] [--threads 2] [--steps 6] [--rounds 2] [--png bench/subnormals.png]

For each run (its EMA weights, as saved) and for a fresh model of the same config, and for each mode (flushed:
what importing dimba sets; kept: ``DIMBA_KEEP_SUBNORMALS=1``), a child process times ``steps`` training passes
(the family's loss, forward and backward, under bf16 autocast, batch 8 x 256 validation-like tokens, after one
warm-up pass) and one generation of 256 tokens at 64 steps. The mode must be set before torch starts its
intra-op threads, hence one process per measurement. The rounds alternate the modes, so that machine noise hits
both alike; medians are reported. Prints one JSON object and draws step seconds per model and mode.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

def time_child(run: str, fresh: bool, threads: int, steps: int) -> dict:
    """In a child process (the mode is already set): the median training step and one generation's seconds."""
    import torch

    from dimba.config import load_config
    from dimba.families import compute_losses
    from dimba.generation import sample_from_model
    from dimba.loading import load_for_inference
    from dimba.model import DIMBA

    torch.set_num_threads(threads)
    model, _ = load_for_inference(run)
    cfg = model.config
    if fresh:
        scale = model.latent_scale.clone()
        torch.manual_seed(0)
        model = DIMBA(**dict(cfg))
        model.latent_scale.copy_(scale)
    dc = load_config(None, os.path.join(run, "config.yaml"), []).diffusion
    ids = torch.randint(4, cfg.vocab_size, (8, 256), generator=torch.Generator().manual_seed(0))  # (B, L)
    model.train()

    def step() -> float:
        start = time.perf_counter()
        with torch.autocast("cpu", torch.bfloat16):
            loss, _ = compute_losses(model, ids, dc, generator=torch.Generator().manual_seed(1))
        loss.backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    step()
    times = [step() for _ in range(steps)]
    model.eval()
    start = time.perf_counter()
    sample_from_model(model, [], seq_len=256, num_steps=64, generator=torch.Generator().manual_seed(0))
    return {"step_s": statistics.median(times), "generate_s": time.perf_counter() - start}


def measure(run: str, fresh: bool, keep: bool, threads: int, steps: int) -> dict:
    """One child process's timings (see the module docstring)."""
    env = {**os.environ, "DIMBA_KEEP_SUBNORMALS": "1" if keep else "0"}
    argv = [sys.executable, __file__, "--child", run, "fresh" if fresh else "trained", str(threads), str(steps)]
    out = subprocess.run(argv, capture_output=True, text=True, check=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def child() -> None:
    """``--child RUN fresh|trained THREADS STEPS``: the whole process runs in the mode, as the dimba command does."""
    from dimba.subnormals import flushed_subnormals

    run, kind, threads, steps = sys.argv[2:6]
    with flushed_subnormals() as flushed:
        print(json.dumps({"flushed": flushed, **time_child(run, kind == "fresh", int(threads), int(steps))}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--png", default=None)
    args = ap.parse_args()
    cells: dict[tuple, list] = {}
    for _ in range(args.rounds):
        for run in args.runs:
            for fresh in (False, True):
                for keep in (True, False):
                    r = measure(run, fresh, keep, args.threads, args.steps)
                    assert r["flushed"] == (not keep), r
                    cells.setdefault((run, fresh, keep), []).append(r)
    rows = [{"run": run, "model": "fresh" if fresh else "trained", "subnormals": "kept" if keep else "flushed",
             "step_s": statistics.median(r["step_s"] for r in rs),
             "generate_s": statistics.median(r["generate_s"] for r in rs)}
            for (run, fresh, keep), rs in cells.items()]
    result = {"threads": args.threads, "steps": args.steps, "rounds": args.rounds, "rows": rows}
    print(json.dumps(result, indent=1))
    if args.png:
        draw(result, args.png)


def draw(result: dict, path: str) -> None:
    """Bars of the median step seconds of every (run, model, mode) row of ``result``, saved to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    labels = [f"{os.path.basename(r['run'].rstrip('/'))}, {r['model']}, {r['subnormals']}" for r in rows]
    ax.bar(range(len(rows)), [r["step_s"] for r in rows],
           color=["tab:red" if r["subnormals"] == "kept" else "tab:green" for r in rows])
    ax.set_xticks(range(len(rows)), labels, fontsize=7, rotation=30, ha="right")
    ax.set_ylabel(f"training step, s (median, {result['threads']} threads)")
    ax.set_title("Subnormal floats on the CPU: kept (red) against flushed (green)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)

if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        child()
    else:
        main()
