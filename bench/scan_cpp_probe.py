"""Probe: would a compiled CPU kernel reach the scan's targets? Times bench/scan_cpp_probe.cpp.

    pip install ninja && OMP_NUM_THREADS=1 python bench/scan_cpp_probe.py

The C++ file steps the recurrence one position at a time in a fused loop per (batch, head),
with a hand-written backward pass that recomputes the states from ones saved every 16 positions.
It is not used by the library: it measures what that design gives against ``selective_scan``
and ``selective_scan_sequential`` at the shape and inputs of bench/scan.py, one thread (interleaved
rounds, medians). Its gradients are first checked against the float64 chunked scan. Needs a C++
compiler and ninja (it is built with ``torch.utils.cpp_extension.load``). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import statistics
import time

import torch
from scan import SHAPE, fwd_bwd, make_inputs

from dimba.backbones.ssm import selective_scan, selective_scan_sequential
from dimba.malloc import keep_freed_memory

NAMES = ("x", "dt", "A", "B", "C", "D")


def build():
    """Compiles the probe (cached by torch in ~/.cache/torch_extensions)."""
    if shutil.which("ninja") is None:
        raise SystemExit("bench/scan_cpp_probe.py needs ninja to build its C++ file: pip install ninja")
    from torch.utils.cpp_extension import load

    src = pathlib.Path(__file__).with_suffix(".cpp")
    return load("dimba_scan_cpp_probe", [str(src)], extra_cflags=["-O3", "-march=native", "-fopenmp"])


def make_scan(ext):
    """The probe with selective_scan's (x, dt, A, B, C, D, *, chunk_size) arguments; chunk_size is ignored."""

    class FusedScan(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, dt, A, B, C, D):
            y, states = ext.forward(x, dt, A, B, C, D)  # (b, L, H, P), (b, H, L / 16, N, P)
            ctx.save_for_backward(x, dt, A, B, C, D, states)
            return y

        @staticmethod
        def backward(ctx, dy):
            return tuple(ext.backward(dy.contiguous(), *ctx.saved_tensors))

    def fused_scan(x, dt, A, B, C, D, *, chunk_size: int = 64):
        return FusedScan.apply(x, dt, A, B, C, D)

    return fused_scan


def output_and_grads(scan, args: list[torch.Tensor]) -> list[torch.Tensor]:
    y = scan(*args)  # (b, L, H, P)
    y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y))
    return [y.detach()] + [a.grad for a in args]


def max_rel_errors(scan, **shape: int) -> dict:
    """Largest error of the probe's output and gradients, relative to each float64 tensor's largest entry."""
    got = output_and_grads(scan, make_inputs(**shape))
    ref = output_and_grads(selective_scan, [t.detach().double().requires_grad_() for t in make_inputs(**shape)])
    return {n: float("%.2e" % ((a.double() - r).abs().max() / r.abs().max())) for n, a, r in zip(("y",) + NAMES, got, ref)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args()
    keep_freed_memory()
    scan = make_scan(build())
    out = {"shape": SHAPE, "threads": torch.get_num_threads(),
           "max_rel_error_vs_float64": {
               "bench_shape": max_rel_errors(scan),
               "small_G2": max_rel_errors(scan, batch=2, length=64, heads=4, d_state=16, groups=2)}}
    inputs = make_inputs()
    dy = torch.randn(inputs[0].shape, generator=torch.Generator().manual_seed(1))  # (b, L, H, P)

    def fwd(f):
        with torch.no_grad():
            t0 = time.perf_counter()
            f(*inputs, chunk_size=SHAPE["chunk"])
            return time.perf_counter() - t0

    impls = {"fused_cpp": scan, "selective_scan": selective_scan, "sequential": selective_scan_sequential}
    times = {f"{k}_{p}": [] for k in impls for p in ("fwd", "fwd_bwd")}
    for _ in range(2):  # warm-up
        fwd_bwd(scan, inputs, dy), fwd_bwd(selective_scan, inputs, dy)
    for r in range(args.repeats):
        for name, f in impls.items():
            if name == "sequential" and r >= 3:
                continue
            times[f"{name}_fwd"].append(fwd(f))
            times[f"{name}_fwd_bwd"].append(fwd_bwd(f, inputs, dy))
    med = {k: round(statistics.median(v) * 1e3, 2) for k, v in times.items()}
    out["median_ms"] = med
    out["sequential_over_fused_cpp"] = round(med["sequential_fwd_bwd"] / med["fused_cpp_fwd_bwd"], 1)
    out["selective_scan_over_fused_cpp"] = round(med["selective_scan_fwd_bwd"] / med["fused_cpp_fwd_bwd"], 2)
    out["sequential_over_selective_scan"] = round(med["sequential_fwd_bwd"] / med["selective_scan_fwd_bwd"], 1)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
