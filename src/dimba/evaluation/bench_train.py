"""`dimba bench train`: training throughput, achieved FLOP/s, the fraction of the machine's measured
matmul peak (MFU) and peak memory, for a preset, through `dimba.training.train_step` (the step of `dimba train`:
forward and backward of the family's objective, clipping, AdamW and the EMA update) on one device.

The FLOPs of a training step are counted by
`torch.utils.flop_counter.FlopCounterMode` on one step: matrix products (the pure-PyTorch Mamba-2
scan's included) and attention, not elementwise work, which is how MFU is usually defined. The
Mamba-2 mixer's depthwise convolution is elementwise work (4 taps) and is not counted; note that
FlopCounterMode counts an ``nn.Conv1d`` with ``groups=C`` as a dense convolution, C times its work.
On CUDA, the fused ``mamba_ssm`` / ``causal_conv1d`` kernels are invisible to it, so the scan's
FLOPs are missing there and MFU is understated. The peak is the median rate of a large square
matmul (2048 on CPU, 8192 on CUDA) in the run's precision (fp32 on CPU, bf16 under bf16-mixed),
measured in the same process at the same thread count, before and after the timed steps.
"""

from __future__ import annotations

import resource
import statistics
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from dimba.config import Config
from dimba.io import atomic_save_figure
from dimba.training.setup import setup
from dimba.training.step import train_step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def product_gflops(a: torch.Tensor, b: torch.Tensor, repeats: int = 10) -> float:
    """Median GFLOP/s of ``a @ b``: (..., m, k) @ (..., k, n), 2 m k n FLOPs per matrix, after two warm-up products."""
    times = []
    for i in range(repeats + 2):
        _sync(a.device)
        start = time.perf_counter()
        a @ b
        _sync(a.device)
        if i >= 2:
            times.append(time.perf_counter() - start)
    return 2 * a.numel() * b.shape[-1] / statistics.median(times) / 1e9


def matmul_peak_gflops(device: torch.device, dtype: torch.dtype = torch.float32, n: int | None = None,
                       repeats: int = 10) -> float:
    """Median GFLOP/s of an n x n matmul (2 n^3 FLOPs) on ``device`` in ``dtype``; by default n is 8192 on CUDA
    (a GPU needs a large product to reach its peak, and a short one cannot be timed by the host clock), else 2048."""
    if n is None:
        n = 8192 if device.type == "cuda" else 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return product_gflops(a, b, repeats)


def _peak_memory_mib(device: torch.device) -> dict:
    if device.type == "cuda":
        return {"peak_gpu_memory_mib": torch.cuda.max_memory_allocated(device) / 2**20}
    return {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # Linux: KiB


def measure_training(cfg: Config, steps: int = 20, warmup: int = 3) -> dict:
    """Time ``steps`` training steps (after ``warmup``) of the model and data of ``cfg`` on one device.

    Returns a dict: family, backbone, parameters, device, threads, precision, tokens_per_step,
    step_seconds (each), median_step_s, tokens_per_s, flops_per_step, achieved_gflops,
    matmul_peak_gflops (before, after), mfu (achieved / the larger peak), and peak memory.
    """
    one = cfg.train.model_copy(update={"devices": 1, "num_nodes": 1, "strategy": "auto"})
    ts = setup(cfg.model_copy(update={"train": one}), run_dir=None)
    device, precision, tc = ts.fabric.device, ts.precision, ts.cfg.train
    peak_dtype = torch.bfloat16 if precision.startswith("bf16") else torch.float16 if precision.startswith("16") \
        else torch.float32
    peak_before = matmul_peak_gflops(device, peak_dtype)
    for _ in range(warmup):
        train_step(ts)
    counter = FlopCounterMode(display=False)
    with counter:
        train_step(ts)
    flops = counter.get_total_flops()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(steps):
        _sync(device)
        start = time.perf_counter()
        train_step(ts)
        _sync(device)
        times.append(time.perf_counter() - start)
    peak_after = matmul_peak_gflops(device, peak_dtype)
    median = statistics.median(times)
    tokens = tc.batch_size * tc.grad_accum * ts.cfg.data.seq_len
    achieved = flops / median / 1e9
    return {
        "family": ts.cfg.model.family, "backbone": ts.cfg.model.backbone, "parameters": ts.model.num_parameters(),
        "device": str(device), "threads": torch.get_num_threads(), "precision": precision,
        "batch_size": tc.batch_size * tc.grad_accum, "seq_len": ts.cfg.data.seq_len, "tokens_per_step": tokens,
        "steps": steps, "step_seconds": times, "median_step_s": median, "tokens_per_s": tokens / median,
        "flops_per_step": flops, "achieved_gflops": achieved,
        "matmul_peak_gflops": [peak_before, peak_after], "mfu": achieved / max(peak_before, peak_after),
        **_peak_memory_mib(device),
    }


def draw(result: dict, path: Path) -> None:
    """PNG (written atomically): step times, and achieved GFLOP/s against the matmul peak."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    left.plot(range(1, len(result["step_seconds"]) + 1), result["step_seconds"], marker="o")
    left.axhline(result["median_step_s"], color="gray", linestyle="--", label="median")
    left.set(xlabel="timed step", ylabel="seconds", title=f"{result['family']} / {result['backbone']}: step time")
    left.legend()
    peak = max(result["matmul_peak_gflops"])
    right.bar(["training step", "matmul peak"], [result["achieved_gflops"], peak], color=["tab:blue", "tab:gray"])
    right.set(ylabel="GFLOP/s", title=f"MFU {100 * result['mfu']:.1f}% ({result['threads']} threads, {result['device']})")
    fig.tight_layout()
    atomic_save_figure(fig, path)
