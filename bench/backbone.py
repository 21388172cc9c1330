"""One bidirectional Mamba-2 layer against one bidirectional transformer layer, forward+backward on CPU.

    python bench/backbone.py [--png bench/backbone.png]

Layers are ``dimba.backbones.Block``s at d_model 256: BiMamba2 with the default mixer settings
(d_state 64, headdim 64, expand 2, untied directions), and Attention (4 heads) + SwiGLU MLP.
Batch 8; L = 128, 512, 2048, 8192. Every (layer, L) point runs in its own subprocess, which
reports its median time and its peak RSS (``ru_maxrss``) together with the RSS just before the
first forward pass, so that one point's allocations cannot inflate another's. Each point also
gets its FLOPs (products only: matmuls, the scan's batched products, attention), counted by
``torch.utils.flop_counter`` on one untimed pass, so the two layers' rates can be compared.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from dimba.backbones import Block
from dimba.backbones.mamba import BiMamba2
from dimba.backbones.transformer import Attention
from dimba.malloc import keep_freed_memory

D_MODEL, BATCH, COND = 256, 8, 256
LENGTHS = (128, 512, 2048, 8192)
REPEATS = {128: 10, 512: 5, 2048: 3, 8192: 1}


def make_layer(kind: str) -> Block:
    """The benchmarked layer: ``"mamba"`` (BiMamba2 block) or ``"transformer"`` (attention + SwiGLU block)."""
    if kind == "mamba":
        return Block(BiMamba2(D_MODEL), D_MODEL, COND, "film", mlp=False)
    return Block(Attention(D_MODEL, num_heads=4), D_MODEL, COND, "film", mlp=True)


# PyTorch's counter knows the CUDA attention kernels only; CPU SDPA uses the same formulas
# (its backward counts the recomputed scores, 2.5x the forward). The counter passes shapes.
_CPU_SDPA_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:
        lambda q, k, v, *args, **kwargs: sdpa_flop_count(q, k, v),
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward:
        lambda grad, q, k, v, *args, **kwargs: sdpa_backward_flop_count(grad, q, k, v),
}


def layer_flops(kind: str, length: int) -> int:
    """FLOPs of one forward+backward pass of the layer at batch ``BATCH`` (counted at batch 1, times BATCH)."""
    torch.manual_seed(0)
    layer = make_layer(kind)
    h = torch.randn(1, length, D_MODEL, requires_grad=True)  # (1, L, D)
    with FlopCounterMode(display=False, custom_mapping=_CPU_SDPA_FLOPS) as counter:
        layer(h, torch.randn(1, COND)).square().mean().backward()
    return counter.get_total_flops() * BATCH


def _rss_mib() -> float:
    """Current resident set size of this process in MiB (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def run_point(kind: str, length: int, repeats: int, compile_layer: bool = False) -> dict:
    """Times forward+backward of one layer at one length (run inside a fresh subprocess)."""
    torch.manual_seed(0)
    layer = make_layer(kind)
    run = torch.compile(layer, dynamic=False) if compile_layer else layer
    h = torch.randn(BATCH, length, D_MODEL, requires_grad=True)  # (B, L, D)
    c = torch.randn(BATCH, COND)  # (B, C)
    rss_before = _rss_mib()
    times = []
    for i in range(repeats + 1):  # the first pass is a warm-up
        layer.zero_grad(set_to_none=True)
        h.grad = None
        t0 = time.perf_counter()
        run(h, c).square().mean().backward()
        if i:
            times.append(time.perf_counter() - t0)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # before the counting pass
    flops = layer_flops(kind, length)
    return {
        "median_s": statistics.median(times),
        "gflop": round(flops / 1e9, 3),
        "gflop_per_s": round(flops / 1e9 / statistics.median(times), 1),
        "min_s": min(times),
        "repeats": repeats,
        "rss_before_mib": round(rss_before, 1),
        "peak_rss_mib": round(peak_rss, 1),
        "threads": torch.get_num_threads(),
        "malloc_keeps_freed_memory": keep_freed_memory(),
        "compiled": compile_layer,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--png", default="bench/backbone.png")
    ap.add_argument("--point", nargs=2, metavar=("KIND", "L"), help=argparse.SUPPRESS)
    ap.add_argument("--skip", nargs="*", default=[], metavar="KIND:L", help="points not to run, e.g. transformer:8192")
    ap.add_argument("--compile", action="store_true", help="torch.compile each layer (the first, untimed pass compiles)")
    args = ap.parse_args()
    keep_freed_memory()  # as the dimba command does (DIMBA_SYSTEM_MALLOC=1: glibc defaults)
    if args.point:
        kind, length = args.point[0], int(args.point[1])
        print(json.dumps(run_point(kind, length, REPEATS[length], args.compile)))
        return

    params = {k: sum(p.numel() for p in make_layer(k).parameters()) for k in ("mamba", "transformer")}
    points: dict[str, dict[int, dict]] = {"mamba": {}, "transformer": {}}
    for length in LENGTHS:
        for kind in points:
            if f"{kind}:{length}" in args.skip:
                continue
            proc = subprocess.run([sys.executable, __file__, "--point", kind, str(length)] + ["--compile"] * args.compile,
                                  capture_output=True, text=True, check=True)
            points[kind][length] = json.loads(proc.stdout)
            print(kind, length, points[kind][length], file=sys.stderr, flush=True)
    ratio = {L: round(points["transformer"][L]["median_s"] / points["mamba"][L]["median_s"], 2)
             for L in LENGTHS if L in points["transformer"] and L in points["mamba"]}
    flop_ratio = {L: round(points["transformer"][L]["gflop"] / points["mamba"][L]["gflop"], 2) for L in ratio}
    out = {
        "batch": BATCH, "d_model": D_MODEL, "params": params,
        "median_s": {k: {L: round(v["median_s"], 4) for L, v in pts.items()} for k, pts in points.items()},
        "transformer_over_mamba_time": ratio,
        "transformer_over_mamba_flops": flop_ratio,
        "points": points,
        "skipped": args.skip,
    }
    print(json.dumps(out, indent=2))
    if args.png:
        draw(out, args.png)


def draw(out: dict, path: str) -> None:
    """Forward+backward time, peak RSS and FLOP rate of both layers against L."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(13, 3.5))
    for kind, med in out["median_s"].items():
        ax1.plot(list(med), list(med.values()), "o-", label=f"{kind} ({out['params'][kind] / 1e6:.2f}M params)")
    ax1.set(xscale="log", yscale="log", xlabel="L", ylabel="forward+backward, median s",
            title=f"one bidirectional layer, batch {out['batch']}, d_model {out['d_model']}")
    ax1.legend(fontsize=8)
    for kind, pts in out["points"].items():
        ax2.plot(list(pts), [p["peak_rss_mib"] for p in pts.values()], "o-", label=kind)
    ax2.set(xscale="log", yscale="log", xlabel="L", ylabel="peak RSS, MiB", title="peak RSS of the subprocess")
    ax2.legend(fontsize=8)
    for kind, pts in out["points"].items():
        ax3.plot(list(pts), [p["gflop_per_s"] for p in pts.values()], "o-", label=kind)
    ax3.set(xscale="log", xlabel="L", ylabel="GFLOP/s (counted products)", ylim=(0, None),
            title="rate of each layer's matmul, scan and attention FLOPs")
    ax3.legend(fontsize=8)
    for ax in (ax1, ax2, ax3):
        ax.title.set_fontsize(9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
