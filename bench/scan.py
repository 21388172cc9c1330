"""Forward+backward speed of the SSD scan on CPU against two yardsticks and the matmul peak.

    python bench/scan.py [--png bench/scan.png] [--repeats 15]

Times ``selective_scan`` (chunked, hand-written backward), ``selective_scan_sequential`` (the
reference loop) and a plain minimal SSD written here from the listing in Dao & Gu (2024),
"Transformers are SSMs" (einsum products, ``segsum`` + exp, plain autograd), interleaved round by
round so that load from other processes hits all three alike. Also measures this CPU's fp32
matmul rate at the same thread count and reports the scan's achieved GFLOP/s against it.

FLOPs of the chunked algorithm are counted analytically, matmul work only (multiply + add = 2):
forward F = 2 b L (G Q N + H Q P + 2 H P N) -- C B^T per group, (CB o Lmat) u, the written state
u^T diag(w) B and the read-out C h_in^T per head -- and the backward pass does twice those
products, so forward+backward = 3 F. All of them are batched products of Q x Q or Q x N by Q x P
matrices, so the rate of one such batched product (``chunk_bmm_gflops``) gives the time the products
alone would take (``products_alone_ms``): a floor for any implementation built on them. Prints one
JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from dimba.backbones.ssm import selective_scan, selective_scan_sequential
from dimba.evaluation.bench_train import matmul_peak_gflops, product_gflops
from dimba.malloc import keep_freed_memory

SHAPE = dict(batch=8, length=512, heads=8, headdim=64, d_state=64, groups=1, chunk=64)


def segsum(a: torch.Tensor) -> torch.Tensor:
    """out[..., t, r] = a[r+1] + ... + a[t] for r <= t, -inf above the diagonal: (..., T) -> (..., T, T)."""
    T = a.shape[-1]
    cs = a.cumsum(-1)  # (..., T)
    out = cs[..., :, None] - cs[..., None, :]  # (..., T, T)
    keep = torch.ones(T, T, dtype=torch.bool, device=a.device).tril()
    return out.masked_fill(~keep, -torch.inf)


def minimal_ssd(x, dt, A, B, C, D, *, chunk_size: int = 64) -> torch.Tensor:
    """Plain minimal SSD after the paper's listing; same arguments as ``selective_scan`` (L a multiple of Q)."""
    b, length, H, P = x.shape
    R, Q = H // B.shape[2], chunk_size
    c = length // Q
    X = (x * dt[..., None]).view(b, c, Q, H, P)  # (b, c, Q, H, P)
    Bh = B.repeat_interleave(R, dim=2).view(b, c, Q, H, -1)  # (b, c, Q, H, N)
    Ch = C.repeat_interleave(R, dim=2).view(b, c, Q, H, -1)  # (b, c, Q, H, N)
    a = (dt * A).view(b, c, Q, H).permute(0, 3, 1, 2)  # (b, H, c, Q)
    a_cs = a.cumsum(-1)  # (b, H, c, Q)
    Lmat = segsum(a).exp()  # (b, H, c, Q, Q)
    y_diag = torch.einsum("bclhn,bcshn,bhcls,bcshp->bclhp", Ch, Bh, Lmat, X)  # (b, c, Q, H, P)
    w = (a_cs[..., -1:] - a_cs).exp()  # (b, H, c, Q)
    states = torch.einsum("bclhn,bhcl,bclhp->bchpn", Bh, w, X)  # (b, c, H, P, N)
    states = torch.cat([torch.zeros_like(states[:, :1]), states], dim=1)  # (b, c+1, H, P, N)
    chunk_decay = segsum(F.pad(a_cs[..., -1], (1, 0))).exp()  # (b, H, c+1, c+1)
    states = torch.einsum("bhzc,bchpn->bzhpn", chunk_decay, states)[:, :-1]  # (b, c, H, P, N)
    y_off = torch.einsum("bclhn,bchpn,bhcl->bclhp", Ch, states, a_cs.exp())  # (b, c, Q, H, P)
    return (y_diag + y_off).reshape(b, length, H, P) + x * D[:, None]  # (b, L, H, P)


def make_inputs(seed: int = 0, length: int = SHAPE["length"], device: str = "cpu", **shape: int) -> list[torch.Tensor]:
    """Random fp32 leaf tensors x, dt, A, B, C, D at the benchmark shape (with sequence length ``length``;
    ``shape`` overrides other entries of ``SHAPE``, e.g. ``groups=2``)."""
    g = torch.Generator().manual_seed(seed)
    s = {**SHAPE, **shape}
    b, L, H, P, N, G = s["batch"], length, s["heads"], s["headdim"], s["d_state"], s["groups"]
    x = torch.randn(b, L, H, P, generator=g)  # (b, L, H, P)
    dt = F.softplus(torch.randn(b, L, H, generator=g) - 2.0)  # (b, L, H)
    A = -torch.rand(H, generator=g).mul(15.0).add(1.0)  # (H,)
    B = torch.randn(b, L, G, N, generator=g) / N**0.5  # (b, L, G, N)
    C = torch.randn(b, L, G, N, generator=g) / N**0.5  # (b, L, G, N)
    D = torch.ones(H)  # (H,)
    return [t.to(device).requires_grad_() for t in (x, dt, A, B, C, D)]


def chunk_bmm_gflops() -> float:
    """Median GFLOP/s of one batched product of the scan's size: b*c*H matrices (Q x Q) @ (Q x P)."""
    s = SHAPE
    batch = s["batch"] * s["length"] // s["chunk"] * s["heads"]
    return product_gflops(torch.randn(batch, s["chunk"], s["chunk"]),  # (b*c*H, Q, Q)
                          torch.randn(batch, s["chunk"], s["headdim"]))  # (b*c*H, Q, P)


def fwd_bwd(fn, inputs, dy) -> float:
    """Seconds for one forward + backward (gradients cleared first)."""
    for t in inputs:
        t.grad = None
    t0 = time.perf_counter()
    fn(*inputs, chunk_size=SHAPE["chunk"]).backward(dy)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--png", default="bench/scan.png")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--seq-repeats", type=int, default=3, help="repeats of the slow sequential loop")
    args = ap.parse_args()
    keep_freed_memory()  # as the dimba command does (DIMBA_SYSTEM_MALLOC=1: glibc defaults)

    impls = {"selective_scan": selective_scan, "sequential": selective_scan_sequential, "minimal_ssd": minimal_ssd}
    inputs = make_inputs()
    dy = torch.randn(inputs[0].shape, generator=torch.Generator().manual_seed(1))  # (b, L, H, P)
    with torch.no_grad():
        ref = selective_scan(*inputs, chunk_size=SHAPE["chunk"])  # (b, L, H, P)
        max_diff = {k: (fn(*inputs, chunk_size=SHAPE["chunk"]) - ref).abs().max().item() for k, fn in impls.items()}

    peak = matmul_peak_gflops(torch.device("cpu"))
    bmm_rate = chunk_bmm_gflops()
    times: dict[str, list[float]] = {k: [] for k in impls}
    for fn in impls.values():  # warm-up
        fwd_bwd(fn, inputs, dy)
    for i in range(args.repeats):
        for k, fn in impls.items():
            if k != "sequential" or i < args.seq_repeats:
                times[k].append(fwd_bwd(fn, inputs, dy))
    peak_after = matmul_peak_gflops(torch.device("cpu"))
    med = {k: statistics.median(v) for k, v in times.items()}

    s = SHAPE
    b, L, H, P, N, G, Q = s["batch"], s["length"], s["heads"], s["headdim"], s["d_state"], s["groups"], s["chunk"]
    flops = 3 * 2 * b * L * (G * Q * N + H * Q * P + 2 * H * P * N)
    gflops = flops / med["selective_scan"] / 1e9
    out = {
        "shape": SHAPE,
        "threads": torch.get_num_threads(),
        "malloc_keeps_freed_memory": keep_freed_memory(),
        "torch": torch.__version__,
        "repeats": {k: len(v) for k, v in times.items()},
        "median_ms": {k: round(v * 1e3, 2) for k, v in med.items()},
        "min_ms": {k: round(min(v) * 1e3, 2) for k, v in times.items()},
        "ratio_sequential_over_ours": round(med["sequential"] / med["selective_scan"], 2),
        "ratio_minimal_over_ours": round(med["minimal_ssd"] / med["selective_scan"], 2),
        "flops_fwd_bwd": flops,
        "flop_formula": "3 * 2*b*L*(G*Q*N + H*Q*P + 2*H*P*N)",
        "ours_gflops": round(gflops, 2),
        "matmul_gflops_before_after": [round(peak, 2), round(peak_after, 2)],
        "fraction_of_matmul_peak": round(gflops / max(peak, peak_after), 3),
        "chunk_bmm_gflops": round(bmm_rate, 2),
        "products_alone_ms": round(flops / bmm_rate / 1e6, 2),
        "sequential_over_products_alone": round(med["sequential"] / (flops / bmm_rate / 1e9), 2),
        "forward_max_abs_diff_vs_ours": max_diff,
    }
    print(json.dumps(out, indent=2))
    if args.png:
        draw(med, out, args.png)


def draw(med: dict[str, float], out: dict, path: str) -> None:
    """Bar chart of the median forward+backward times (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    names = list(med)
    bars = ax.bar(names, [med[k] * 1e3 for k in names], color=["tab:blue", "tab:gray", "tab:orange"])
    ax.bar_label(bars, fmt="%.0f ms")
    ax.set_yscale("log")
    ax.set_ylabel("forward+backward, median ms")
    s = out["shape"]
    ax.set_title(f"SSD scan, b={s['batch']} L={s['length']} H={s['heads']} P={s['headdim']} N={s['d_state']}, "
                 f"{out['threads']} threads", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
