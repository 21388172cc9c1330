"""The SSD scan and one bidirectional layer on a CUDA GPU: mamba_ssm's fused kernel and the pure-PyTorch scan.

    python bench/gpu.py [--png bench/gpu.png]

Scan: forward+backward of float32 inputs at the shape of ``bench/scan.py`` (batch 8, H 8, P 64, N 64,
G 1, chunk 64) for L = 512, 2048, 8192, 32768, through ``selective_scan`` (which dispatches to
``mamba_ssm``'s ``mamba_chunk_scan_combined``) and ``chunked_selective_scan`` (the pure-PyTorch
algorithm dimba runs on CPU, here on the GPU).

Layer: the two layers of ``bench/backbone.py`` (d_model 256, batch 8; BiMamba2 block against
attention + SwiGLU block) forward+backward under bf16 autocast, for the same lengths, with the
peak CUDA memory each pass allocates beyond what was allocated before it.

Times are medians of CUDA-event timings after a warm-up pass (which also runs Triton's autotuning).
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch
from backbone import BATCH, COND, D_MODEL, make_layer
from scan import SHAPE, make_inputs

from dimba.backbones import ssm
from dimba.backbones.ssm import chunked_selective_scan, selective_scan

LENGTHS = (512, 2048, 8192, 32768)


def median_ms(fn, repeats: int) -> float:
    """Median milliseconds of ``fn()`` on the current CUDA stream, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def scan_point(length: int, repeats: int) -> dict:
    """Forward+backward medians of both scans at one length, and their largest output difference."""
    inputs = make_inputs(length=length, device="cuda")
    dy = torch.randn(inputs[0].shape, device="cuda")  # (b, L, H, P)
    impls = {"mamba_ssm": selective_scan, "chunked_pytorch": chunked_selective_scan}

    def fwd_bwd(fn):
        for t in inputs:
            t.grad = None
        fn(*inputs, chunk_size=SHAPE["chunk"]).backward(dy)

    with torch.no_grad():
        y = {k: fn(*inputs, chunk_size=SHAPE["chunk"]) for k, fn in impls.items()}  # (b, L, H, P) each
    rel_diff = ((y["mamba_ssm"] - y["chunked_pytorch"]).abs().max() / y["chunked_pytorch"].abs().max()).item()
    ms = {k: round(median_ms(lambda fn=fn: fwd_bwd(fn), repeats), 3) for k, fn in impls.items()}
    return {"median_ms": ms, "pytorch_over_mamba_ssm": round(ms["chunked_pytorch"] / ms["mamba_ssm"], 2),
            "max_rel_diff": rel_diff}


def layer_point(kind: str, length: int, repeats: int) -> dict:
    """Forward+backward median and peak extra CUDA memory of one layer under bf16 autocast."""
    torch.manual_seed(0)
    layer = make_layer(kind).cuda()
    h = torch.randn(BATCH, length, D_MODEL, device="cuda", requires_grad=True)  # (B, L, D)
    c = torch.randn(BATCH, COND, device="cuda")  # (B, C)

    def fwd_bwd():
        layer.zero_grad(set_to_none=True)
        h.grad = None
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = layer(h, c)  # (B, L, D)
        y.float().square().mean().backward()

    fwd_bwd()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    ms = median_ms(fwd_bwd, repeats)
    peak = torch.cuda.max_memory_allocated() - base
    return {"median_ms": round(ms, 3), "tokens_per_s": round(BATCH * length / ms * 1e3),
            "peak_extra_mib": round(peak / 2**20, 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--png", default="bench/gpu.png")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--parts", nargs="+", choices=("scan", "layer"), default=["scan", "layer"])
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/gpu.py needs a CUDA GPU")
    if ssm.mamba_chunk_scan_combined is None:
        raise SystemExit("bench/gpu.py compares against mamba_ssm: pip install 'dimba[gpu]'")

    scan = {}
    for length in LENGTHS if "scan" in args.parts else ():
        scan[length] = scan_point(length, args.repeats)
        print("scan", length, scan[length], file=sys.stderr, flush=True)
    layers: dict[str, dict[int, dict]] = {"mamba": {}, "transformer": {}}
    for length in LENGTHS if "layer" in args.parts else ():
        for kind in layers:
            layers[kind][length] = layer_point(kind, length, args.repeats)
            print(kind, length, layers[kind][length], file=sys.stderr, flush=True)
    out = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "causal_conv1d": ssm.causal_conv1d_fn is not None,
        "scan_shape": {k: v for k, v in SHAPE.items() if k != "length"},
        "scan": scan,
        "layer": {"batch": BATCH, "d_model": D_MODEL, "precision": "bf16 autocast", "points": layers,
                  "transformer_over_mamba_time": {
                      L: round(layers["transformer"][L]["median_ms"] / layers["mamba"][L]["median_ms"], 2)
                      for L in layers["mamba"]}},
    }
    print(json.dumps(out, indent=2))
    if args.png:
        draw(out, args.png)


def draw(out: dict, path: str) -> None:
    """Log-log plots of the scan's and the layers' forward+backward time against L."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = {}  # panel title -> {label: (lengths, median ms)}, only for the parts that were run
    if out["scan"]:
        series["SSD scan fwd+bwd, fp32, b 8, H 8, P 64, N 64"] = {
            impl: ([int(L) for L in out["scan"]], [p["median_ms"][impl] for p in out["scan"].values()])
            for impl in ("mamba_ssm", "chunked_pytorch")}
    if out["layer"]["points"]["mamba"]:
        series["one bidirectional layer fwd+bwd, bf16, b 8, d 256"] = {
            kind: ([int(L) for L in pts], [p["median_ms"] for p in pts.values()])
            for kind, pts in out["layer"]["points"].items()}
    fig, axes = plt.subplots(1, len(series), figsize=(4.5 * len(series), 3.5), squeeze=False)
    for ax, (title, lines) in zip(axes[0], series.items()):
        for label, (lengths, ms) in lines.items():
            ax.plot(lengths, ms, "o-", label=label)
        ax.set(title=title, xscale="log", yscale="log", xlabel="L", ylabel="median ms")
        ax.title.set_fontsize(9)
        ax.legend(fontsize=8)
    fig.suptitle(out["device"], fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
