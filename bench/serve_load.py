"""Load on `dimba serve`: concurrent clients against a model on loopback, with dynamic batching and without.

    python bench/serve_load.py MODEL [--clients 32] [--duration 60] [--max-tokens 16] [--steps 16]
                               [--batches 32,1] [--threads 1] [--out bench/serve_load]
    python bench/serve_load.py --tiny runs/serve-tiny ...   # train the tests' tiny masked model first (if absent)

For each ``--max-batch`` in ``--batches`` a fresh `dimba serve MODEL --port 0 --max-batch B` is started; then
``--clients`` threads each send non-streamed completions back to back for ``--duration`` seconds (no seed, so
requests may share a batch). Every request's status, latency and completion tokens are kept: failures (anything
but 200) are counted, latency percentiles and the served tokens/s reported. Then a drop phase: every client
opens a streamed completion and closes it after the first event; the server's /health must come back to an
empty queue with nothing running (the seconds it took and the engine's counts are reported).

Prints one JSON object (also written to OUT.json) and draws OUT.png: throughput and latency per mode.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

PROMPT = "ROMEO:"


def start_server(model: str, max_batch: int, clients: int, threads: int) -> tuple[subprocess.Popen, str]:
    """`dimba serve` on a free loopback port, and its URL once it listens."""
    cmd = [sys.executable, "-m", "dimba.cli", "serve", model, "--port", "0", "--max-batch", str(max_batch),
           "--max-queue", str(4 * clients), "--request-timeout", "600", "--threads", str(threads)]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    line = proc.stderr.readline()
    found = re.search(r"at (http://\S+/)", line)
    if not found:
        proc.kill()
        raise SystemExit(f"the server did not start: {line.strip()} {proc.stderr.read()[-2000:]}")
    threading.Thread(target=proc.stderr.read, daemon=True).start()  # keep its stderr drained
    return proc, found.group(1).rstrip("/")


def client_loop(url: str, body: dict, until: float, out: list) -> None:
    """Send completions back to back until ``until``; append (status, latency s, completion tokens, batch rows)."""
    with httpx.Client(base_url=url, timeout=600) as client:
        while time.monotonic() < until:
            start = time.monotonic()
            try:
                reply = client.post("/v1/completions", json=body)
                status = reply.status_code
                data = reply.json() if status == 200 else {}
            except httpx.HTTPError:
                status, data = -1, {}
            latency = time.monotonic() - start
            out.append((status, latency, data.get("usage", {}).get("completion_tokens", 0),
                        data.get("dimba", {}).get("batch_rows", 0)))


def load_phase(url: str, clients: int, duration: float, body: dict) -> dict:
    """``clients`` concurrent clients for ``duration`` seconds: counts, latency percentiles, throughput."""
    results: list = []
    start = time.monotonic()
    threads = [threading.Thread(target=client_loop, args=(url, body, start + duration, results))
               for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - start
    ok = [r for r in results if r[0] == 200]
    latencies = sorted(r[1] for r in ok)
    q = statistics.quantiles(latencies, n=100, method="inclusive") if len(latencies) > 1 else latencies * 99
    tokens = sum(r[2] for r in ok)
    return {"requests": len(results), "failed": len(results) - len(ok),
            "statuses": sorted({r[0] for r in results}), "wall_s": round(wall, 2),
            "requests_per_s": round(len(ok) / wall, 3), "tokens_per_s": round(tokens / wall, 1),
            "latency_p50_s": round(q[49], 3), "latency_p99_s": round(q[98], 3),
            "latency_max_s": round(latencies[-1], 3) if latencies else None,
            "mean_batch_rows": round(statistics.mean(r[3] for r in ok), 2) if ok else None}


def drop_phase(url: str, clients: int, body: dict) -> dict:
    """Every client opens a stream and drops it after the first event; how long until nothing is queued or
    running, and the engine's counts."""
    def drop():
        with httpx.Client(base_url=url, timeout=600) as client:
            with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as reply:
                next(line for line in reply.iter_lines() if line.startswith("data: "))
    threads = [threading.Thread(target=drop) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    start = time.monotonic()
    with httpx.Client(base_url=url, timeout=30) as client:
        while True:
            health = client.get("/health").json()
            if health["queued"] == 0 and health["running"] == 0:
                break
            if time.monotonic() - start > 120:
                return {"drained": False, "health": health}
            time.sleep(0.05)
    return {"drained": True, "drain_s": round(time.monotonic() - start, 3), "health": health}


def train_tiny(out: Path) -> None:
    """The tests' tiny masked model (tests/conftest.py) on the same synthetic three-speaker corpus."""
    if (out / "checkpoints").is_dir():
        return
    corpus = out.parent / f"{out.name}-corpus.txt"
    corpus.parent.mkdir(parents=True, exist_ok=True)
    corpus.write_text("\n".join(f"{['ROMEO', 'JULIET', 'NURSE'][i % 3]}:\nO gentle night, thou art the "
                                f"{['moon', 'sun', 'star'][i % 3]} of my heart number {i % 7}.\n" for i in range(400)))
    tiny = ["model.d_model=32", "model.num_denoiser_layers=2", "model.d_state=8", "model.headdim=16",
            "model.chunk_size=16", "data.seq_len=32", "data.vocab_size=300", "train.batch_size=4",
            "train.eval_every=10", "train.save_every=10", "train.warmup_steps=2", "train.eval_batches=2",
            "train.log_every=5", "train.num_threads=1"]
    subprocess.run([sys.executable, "-m", "dimba.cli", "train", "--family", "masked", "--data", str(corpus),
                    "--max-steps", "10", "--out", str(out), "--quiet", *tiny], check=True)


def draw(result: dict, png: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = result["modes"]
    names = [f"max batch {m['max_batch']}" for m in modes]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6))
    left.bar(names, [m["load"]["tokens_per_s"] for m in modes], color=["#2680c2", "#9aa5b1"][: len(modes)])
    left.set_ylabel("completion tokens / s")
    left.set_title(f"{result['clients']} clients, {result['duration_s']:g} s")
    for k, key in enumerate(("latency_p50_s", "latency_p99_s")):
        right.bar([i + 0.4 * k for i in range(len(modes))], [m["load"][key] for m in modes], width=0.4,
                  label=key.split("_")[1])
    right.set_xticks([i + 0.2 for i in range(len(modes))], names)
    right.set_ylabel("latency (s)")
    right.legend()
    fig.suptitle(f"dimba serve: {result['model']} ({result['max_tokens']} tokens, {result['steps']} steps)")
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", help="run directory or export folder")
    ap.add_argument("--tiny", help="train the tests' tiny masked model into this folder (if absent) and load it")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--duration", type=float, default=60.0)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--batches", default="32,1", help="--max-batch of each mode")
    ap.add_argument("--threads", type=int, default=1, help="the server's torch threads (the other core runs the "
                    "clients)")
    ap.add_argument("--out", default="bench/serve_load")
    args = ap.parse_args()
    if args.tiny:
        train_tiny(Path(args.tiny))
    model = args.tiny or args.model
    if model is None:
        ap.error("give MODEL or --tiny DIR")
    body = {"prompt": PROMPT, "max_tokens": args.max_tokens, "steps": args.steps}
    result = {"model": os.path.basename(os.path.normpath(model)), "clients": args.clients,
              "duration_s": args.duration, "max_tokens": args.max_tokens, "steps": args.steps,
              "server_threads": args.threads, "modes": []}
    for max_batch in [int(b) for b in args.batches.split(",")]:
        proc, url = start_server(model, max_batch, args.clients, args.threads)
        try:
            load = load_phase(url, args.clients, args.duration, body)
            dropped = drop_phase(url, args.clients, body)
        finally:
            proc.terminate()
            proc.wait(30)
        result["modes"].append({"max_batch": max_batch, "load": load, "drop": dropped})
        print(json.dumps(result["modes"][-1]), file=sys.stderr, flush=True)
    if len(result["modes"]) >= 2:
        first, last = result["modes"][0]["load"], result["modes"][-1]["load"]
        result["throughput_ratio"] = round(first["tokens_per_s"] / max(last["tokens_per_s"], 1e-9), 2)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".json").write_text(json.dumps(result, indent=1) + "\n")
    draw(result, args.out + ".png")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
