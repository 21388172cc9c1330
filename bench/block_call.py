"""One cached block-diffusion call (`DIMBA.block_step`, batch 1, 2 threads) with the scan's one-chunk path and with
the chunked Function forced, side by side: rounds alternate the two, each the median of 100 calls after 5; the
figure per path is the median over rounds.

    python bench/block_call.py RUN [RUN ...] [--rounds 7] > bench/block_call.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from dimba.backbones import biscan
from dimba.loading import run_model


def call_ms(model, ids, cond, cache, calls: int = 100) -> float:
    """Median milliseconds of one `block_step` on ``ids`` after 5 warm-up calls."""
    for _ in range(5):
        model.block_step(ids, cond, cache, 0)
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        model.block_step(ids, cond, cache, 0)
        times.append(time.perf_counter() - start)
    return sorted(times)[calls // 2] * 1000


def compare(run: str, rounds: int) -> dict:
    """Both paths' median call time for one block model, and the largest difference of their logits."""
    model = run_model(run).eval()
    one_chunk, chunked = biscan._needs_grad, lambda *tensors: True
    ids = torch.randint(100, model.vocab_size - 10, (1, model.config.block_size),
                        generator=torch.Generator().manual_seed(0))
    cond = model.condition(ids, torch.zeros(()), None)  # (1, D)
    cache = model.allocate_block_cache(1, 512)
    times: dict[str, list[float]] = {"one_chunk": [], "chunked": []}
    logits = {}
    try:
        with torch.no_grad():
            for _ in range(rounds):
                for name, rule in (("one_chunk", one_chunk), ("chunked", chunked)):
                    biscan._needs_grad = rule
                    times[name].append(call_ms(model, ids, cond, cache))
                    logits[name] = model.block_step(ids, cond, cache, 0)[0]
    finally:
        biscan._needs_grad = one_chunk
    out = {name: sorted(v)[len(v) // 2] for name, v in times.items()}
    return {"run": run, "block_size": model.config.block_size, "ms_per_call": out,
            "speedup": out["chunked"] / out["one_chunk"],
            "max_logit_difference": (logits["one_chunk"] - logits["chunked"]).abs().max().item()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="block-diffusion runs (model.block_size)")
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    torch.set_num_threads(2)
    print(json.dumps([compare(run, args.rounds) for run in args.runs], indent=1))


if __name__ == "__main__":
    main()
