"""One bidirectional Mamba-2 layer against one bidirectional transformer layer, forward+backward on CPU.

    python bench/backbone.py [--png bench/backbone.png] [--lengths 512 2048] [--threads 1] [--warmup 1] [--breakdown]

Layers are ``dimba.backbones.Block``s at d_model 256 with the default mixer settings (d_state 32,
headdim 64, expand 2): ``mamba`` (SharedBiMamba2, the default bidirectional block), ``mamba-hydra``
(SharedBiMamba2 in Hydra's quasiseparable form), ``mamba-separate`` (BiMamba2 with untied
directions, the block before it) and ``transformer`` (Attention, 4 heads, +
SwiGLU MLP). Batch 8; L = 128, 512, 2048, 8192; 1 thread (``--threads``). Every (layer, L) point runs in its own
subprocess, one after the other, which reports its median time (after ``--warmup`` untimed passes) and its peak RSS (``ru_maxrss``)
together with the RSS just before the first forward pass, so that one point's allocations cannot
inflate another's. Each point also gets its FLOPs (products only: matmuls, the scans' batched
products, attention), counted by ``torch.utils.flop_counter`` on one untimed pass.

The ``api`` points time the same comparison as a library user meets it: a fresh Python process
with an empty environment that builds ``DIMBA(vocab_size=4096, d_model=256, num_denoiser_layers=1,
backbone=...)`` (the continuous family) and times ``model(ids, t)`` forward+backward; this script
sets nothing in those processes but the thread count. ``--breakdown`` splits the new block's time
into its projections, its scan (products and the rest) and its other elementwise work with the
profiler. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from dimba.backbones import Block
from dimba.backbones.bimamba import SharedBiMamba2
from dimba.backbones.mamba import BiMamba2
from dimba.backbones.transformer import Attention
from dimba.malloc import freed_memory_kept, keep_freed_memory

D_MODEL, BATCH, COND, VOCAB = 256, 8, 256, 4096
LENGTHS = (128, 512, 2048, 8192)
REPEATS = {128: 10, 512: 5, 2048: 3, 8192: 3}  # after one warm-up pass; at 8192 the second pass still grows the heap
KINDS = ("mamba", "mamba-hydra", "mamba-separate", "transformer")
API_BACKBONES = {"mamba": "mamba2", "transformer": "transformer"}  # api point -> DIMBA(backbone=...)


def make_layer(kind: str) -> Block:
    """The benchmarked layer: one of `KINDS`."""
    if kind == "mamba":
        return Block(SharedBiMamba2(D_MODEL), D_MODEL, COND, "film", mlp=False)
    if kind == "mamba-hydra":
        return Block(SharedBiMamba2(D_MODEL, hydra=True), D_MODEL, COND, "film", mlp=False)
    if kind == "mamba-separate":
        return Block(BiMamba2(D_MODEL), D_MODEL, COND, "film", mlp=False)
    return Block(Attention(D_MODEL, num_heads=4), D_MODEL, COND, "film", mlp=True)


def make_api_model(kind: str):
    """The one-layer model a user builds through the public API: ``dimba.DIMBA`` with the chosen backbone."""
    from dimba import DIMBA

    return DIMBA(vocab_size=VOCAB, d_model=D_MODEL, num_denoiser_layers=1, backbone=API_BACKBONES[kind])


# PyTorch's counter knows the CUDA attention kernels only; CPU SDPA uses the same formulas
# (its backward counts the recomputed scores, 2.5x the forward). The counter passes shapes.
_CPU_SDPA_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:
        lambda q, k, v, *args, **kwargs: sdpa_flop_count(q, k, v),
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward:
        lambda grad, q, k, v, *args, **kwargs: sdpa_backward_flop_count(grad, q, k, v),
}


def layer_pass(kind: str, length: int, batch: int, api: bool):
    """(module, a function running one forward+backward pass of it) on fixed random inputs."""
    torch.manual_seed(0)
    if api:
        model = make_api_model(kind)
        ids = torch.randint(4, VOCAB, (batch, length))  # (B, L)
        t = torch.rand(batch)  # (B,)
        return model, lambda: model(ids, t)[0].square().mean().backward()
    layer = make_layer(kind)
    h = torch.randn(batch, length, D_MODEL, requires_grad=True)  # (B, L, D)
    c = torch.randn(batch, COND)  # (B, C)
    return layer, lambda: layer(h, c).square().mean().backward()


def count_flops(kind: str, length: int, api: bool) -> int:
    """FLOPs of one forward+backward pass at batch ``BATCH`` (counted at batch 1, times BATCH)."""
    _, run = layer_pass(kind, length, 1, api)
    with FlopCounterMode(display=False, custom_mapping=_CPU_SDPA_FLOPS) as counter:
        run()
    return counter.get_total_flops() * BATCH


def _rss_mib() -> float:
    """Current resident set size of this process in MiB (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def run_point(kind: str, length: int, repeats: int, api: bool = False, threads: int = 1, warmup: int = 1) -> dict:
    """Times forward+backward of one layer (or one-layer model) at one length, inside a fresh subprocess."""
    torch.set_num_threads(threads)
    module, run = layer_pass(kind, length, BATCH, api)
    rss_before = _rss_mib()
    times = []
    for i in range(repeats + warmup):  # the first passes are warm-ups
        module.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        run()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # before the counting pass
    flops = count_flops(kind, length, api)
    return {
        "median_s": statistics.median(times),
        "gflop": round(flops / 1e9, 3),
        "gflop_per_s": round(flops / 1e9 / statistics.median(times), 1),
        "min_s": min(times),
        "repeats": repeats,
        "warmup": warmup,
        "params": sum(p.numel() for p in module.parameters()),
        "rss_before_mib": round(rss_before, 1),
        "peak_rss_mib": round(peak_rss, 1),
        "threads": torch.get_num_threads(),
        "malloc_keeps_freed_memory": freed_memory_kept(),
        "environment_variables": len(os.environ),
    }


def breakdown(length: int, passes: int = 3, threads: int = 1) -> dict:
    """Seconds per forward+backward pass of the new block, by kind of work (profiler self times).

    projections: the dense matmuls (in_proj, out_proj, the modulation); scan: the bidirectional scan's
    forward and backward Functions, split into their batched products and the rest; elementwise: the
    remainder (conv, gated norm, softplus, the block's norm and modulation, the loss).
    """
    from torch.profiler import profile

    torch.set_num_threads(threads)
    _, run = layer_pass("mamba", length, BATCH, api=False)
    run()
    with profile() as prof:
        for _ in range(passes):
            run()
    events = prof.key_averages()
    self_s = {e.key: e.self_cpu_time_total / 1e6 / passes for e in events}
    total_s = {e.key: e.cpu_time_total / 1e6 / passes for e in events}
    scan = sum(total_s.get(k, 0.0) for k in ("_BidirectionalChunkedScan", "_BidirectionalChunkedScanBackward"))
    scan_products = sum(self_s.get(k, 0.0) for k in ("aten::bmm", "aten::baddbmm", "aten::baddbmm_"))
    projections = sum(self_s.get(k, 0.0) for k in ("aten::mm", "aten::addmm"))
    everything = sum(self_s.values())
    return {"L": length, "pass_s": round(everything, 4), "projections_s": round(projections, 4),
            "scan_s": round(scan, 4), "scan_products_s": round(scan_products, 4),
            "scan_rest_s": round(scan - scan_products, 4),
            "elementwise_s": round(everything - projections - scan, 4),
            "products_only_s": round(projections + scan_products, 4)}


def _subprocess(args: list[str], clean_env: bool) -> dict:
    """Run this script with ``args`` in a fresh process (with an empty environment if ``clean_env``); its JSON."""
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=True,
                          env={} if clean_env else None)
    return json.loads(proc.stdout)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--png", default="bench/backbone.png")
    ap.add_argument("--lengths", nargs="*", type=int, default=list(LENGTHS))
    ap.add_argument("--point", nargs=2, metavar=("KIND", "L"), help=argparse.SUPPRESS)
    ap.add_argument("--api-point", nargs=2, metavar=("KIND", "L"), help=argparse.SUPPRESS)
    ap.add_argument("--breakdown-point", type=int, metavar="L", help=argparse.SUPPRESS)
    ap.add_argument("--skip", nargs="*", default=[], metavar="KIND:L", help="points not to run, e.g. transformer:8192")
    ap.add_argument("--breakdown", action="store_true", help="also profile the new block at L = 512 and 2048")
    ap.add_argument("--threads", type=int, default=1, help="torch threads in every timed process")
    ap.add_argument("--warmup", type=int, default=1, help="untimed passes before the timed ones in every point")
    args = ap.parse_args()
    if args.api_point:  # a user's process: dimba sets the allocator itself, if it does
        kind, length = args.api_point[0], int(args.api_point[1])
        print(json.dumps(run_point(kind, length, REPEATS[length], api=True, threads=args.threads, warmup=args.warmup)))
        return
    keep_freed_memory()  # as importing dimba.backbones does (DIMBA_SYSTEM_MALLOC=1: glibc defaults)
    if args.point:
        kind, length = args.point[0], int(args.point[1])
        print(json.dumps(run_point(kind, length, REPEATS[length], threads=args.threads, warmup=args.warmup)))
        return
    if args.breakdown_point:
        print(json.dumps(breakdown(args.breakdown_point, threads=args.threads)))
        return

    threads = ["--threads", str(args.threads), "--warmup", str(args.warmup)]
    groups = {"layer": (KINDS, "--point", False), "api": (tuple(API_BACKBONES), "--api-point", True)}
    points: dict[str, dict[str, dict[int, dict]]] = {g: {k: {} for k in kinds} for g, (kinds, _, _) in groups.items()}
    for length in args.lengths:
        for group, (kinds, flag, clean_env) in groups.items():
            for kind in kinds:
                if f"{kind}:{length}" in args.skip or f"{group}:{kind}:{length}" in args.skip:
                    continue
                points[group][kind][length] = _subprocess([flag, kind, str(length), *threads], clean_env)
                print(group, kind, length, points[group][kind][length], file=sys.stderr, flush=True)
    out = {"batch": BATCH, "d_model": D_MODEL, "threads": args.threads, "warmup": args.warmup, "points": points, "skipped": args.skip,
           "median_s": {g: {k: {L: round(v["median_s"], 4) for L, v in pts.items()} for k, pts in kinds.items()}
                        for g, kinds in points.items()},
           "speedup_over_transformer": {g: _speedups(kinds) for g, kinds in points.items()}}
    if args.breakdown:
        out["breakdown"] = [_subprocess(["--breakdown-point", str(L), *threads], False) for L in (512, 2048)]
    print(json.dumps(out, indent=2))
    if args.png:
        draw(out, args.png)


def _speedups(kinds: dict[str, dict[int, dict]]) -> dict[str, dict[int, float]]:
    """Transformer time / each other layer's time, at every L where both ran."""
    tf = kinds["transformer"]
    return {k: {L: round(tf[L]["median_s"] / p["median_s"], 2) for L, p in pts.items() if L in tf}
            for k, pts in kinds.items() if k != "transformer"}


def draw(out: dict, path: str) -> None:
    """Forward+backward time, peak RSS and FLOP rate of the layers (and the one-layer models) against L."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(14, 4))
    for group, style in (("layer", "o-"), ("api", "s--")):
        for kind, pts in out["points"][group].items():
            if not pts:
                continue
            params = next(iter(pts.values()))["params"]
            label = f"{kind} {'layer' if group == 'layer' else 'DIMBA, 1 layer'} ({params / 1e6:.2f}M)"
            Ls = list(pts)
            ax1.plot(Ls, [pts[L]["median_s"] for L in Ls], style, label=label)
            ax2.plot(Ls, [pts[L]["peak_rss_mib"] for L in Ls], style, label=label)
            ax3.plot(Ls, [pts[L]["gflop_per_s"] for L in Ls], style, label=label)
    ax1.set(xscale="log", yscale="log", xlabel="L", ylabel="forward+backward, median s",
            title=f"batch {out['batch']}, d_model {out['d_model']}, {out['threads']} thread(s)")
    ax2.set(xscale="log", yscale="log", xlabel="L", ylabel="peak RSS, MiB", title="peak RSS of the subprocess")
    ax3.set(xscale="log", xlabel="L", ylabel="GFLOP/s (counted products)", ylim=(0, None),
            title="rate of the counted matmul, scan and attention FLOPs")
    for ax in (ax1, ax2, ax3):
        ax.legend(fontsize=7)
        ax.title.set_fontsize(9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
