"""The exact likelihood of a masked model read left to right, beside its NELBO (BENCHMARKS.md, issue 17).

Each validation block is scored as -sum_i log p(x_i | x_<i, [MASK] at i and after): the exact NLL of the sampler that
unmasks one token per step in order, so no Monte Carlo. Prints JSON (nats per token, bits per byte, blocks, seconds).

    python bench/left_to_right.py runs/M0 --max-tokens 4096 > l2r.json
    dimba eval runs/M0 --json --max-tokens 4096 --mc-samples 32          # the NELBO on the same blocks
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch

from dimba.cli import _eval_blocks
from dimba.diffusion.masked import subs_log_probs
from dimba.evaluation.likelihood import _text_bytes
from dimba.families.masked import denoiser_logits
from dimba.loading import load_for_inference


@torch.no_grad()
def left_to_right_nats(model, block: torch.Tensor, batch: int = 64) -> float:
    """-sum_i log p(x_i | x_<i, the rest masked) of one block (L,), in nats: L canvases, row i masked from i on."""
    length = len(block)
    canvases = block[None].repeat(length, 1)  # (L, L)
    canvases[torch.arange(length)[:, None] <= torch.arange(length)[None]] = model.mask_id
    total = 0.0
    for start in range(0, length, batch):
        x_t = canvases[start:start + batch]  # (b, L)
        logp = subs_log_probs(denoiser_logits(model, x_t, block[None].expand(len(x_t), -1)).double(), x_t,
                              model.mask_id)  # (b, L, V)
        rows = torch.arange(len(x_t))
        total -= logp[rows, start + rows, block[start + rows]].sum().item()
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", help="a masked-family run or export folder")
    ap.add_argument("--max-tokens", type=int, default=4096,
                    help="the first blocks of the validation split, as `dimba eval --max-tokens` takes them")
    args = ap.parse_args()
    torch.set_num_threads(2)
    model, tokenizer = load_for_inference(args.run)
    where = argparse.Namespace(model=args.run, data=None, split="val", max_tokens=args.max_tokens)
    blocks, _ = _eval_blocks(where, tokenizer, model.config.context_length)  # (N, L): `dimba eval`'s blocks
    start = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        nats = sum(left_to_right_nats(model, block) for block in blocks)
    print(json.dumps({"run": args.run, "nats_per_token": nats / blocks.numel(), "bits_per_byte": nats / math.log(2)
                      / _text_bytes(blocks, tokenizer), "tokens": blocks.numel(), "blocks": len(blocks),
                      "seconds": time.perf_counter() - start}, indent=1))


if __name__ == "__main__":
    main()
