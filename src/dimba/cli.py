"""`dimba train | generate | eval | export | tokenizer`: a thin map from verbs to library functions."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

from dimba.config import Config, ModelConfig, SampleConfig
from dimba.errors import DimbaError, UsageError


def _train_overrides(args: argparse.Namespace) -> list[str]:
    flags = {"data.corpus": args.data, "model.family": args.family, "model.backbone": args.backbone,
             "train.max_steps": args.max_steps, "train.max_time": args.max_time,
             "train.devices": args.devices, "train.num_nodes": args.num_nodes, "train.strategy": args.strategy}
    return [f"{k}={v}" for k, v in flags.items() if v is not None] + list(args.overrides)


def _resolve_run_dir(args: argparse.Namespace) -> tuple[Path, bool]:
    if args.resume is not None:
        given = args.resume if isinstance(args.resume, str) else args.out
        if not given or not (Path(given) / "config.yaml").is_file():
            raise UsageError(f"--resume: {given or '(no run given)'!r} is not a dimba run directory: "
                             "pass --resume runs/NAME (a folder with config.yaml and checkpoints/)")
        run = Path(given)
        return run, True
    run = Path(args.out) if args.out else Path("runs") / time.strftime("%Y%m%d-%H%M%S")
    if run.exists() and not run.is_dir():
        raise UsageError(f"--out {str(run)!r} is a file: choose a folder path for the run")
    if run.exists() and any(run.iterdir()):
        what = "another run" if (run / "config.yaml").exists() else "other files"
        raise UsageError(f"--out {str(run)!r} already holds {what}: pass --resume {run} to continue it or choose another --out")
    return run, False


def _check_same_model(saved: ModelConfig, new: ModelConfig) -> None:
    """A resumed run keeps its model: its checkpoint holds weights of exactly that shape and family."""
    for name in ModelConfig.model_fields:
        old, value = getattr(saved, name), getattr(new, name)
        if old != value:
            raise UsageError(f"--resume cannot change model.{name} ({old!r} -> {value!r}): the run's checkpoint holds "
                             "the old model; drop that setting, or start a new run with another --out")


def _check_devices(cfg: Config, run_named: bool = True) -> None:
    """Refuse a device request this machine cannot serve, before Fabric starts one process per device; with
    several processes the run needs a named folder (each process re-runs the command, a default name would differ)."""
    import torch

    tc = cfg.train
    mps = torch.backends.mps.is_available()
    kind = tc.accelerator
    if kind == "auto":
        kind = "cuda" if torch.cuda.is_available() else "mps" if mps else "cpu"
    available = {"cuda": torch.cuda.device_count(), "mps": int(mps), "cpu": os.cpu_count() or 1}[kind]
    if available == 0:
        raise UsageError(f"train.accelerator={kind} but this machine has no {kind} device: "
                         "set train.accelerator=auto (or cpu)")
    if tc.devices > available:
        raise UsageError(f"train.devices={tc.devices} but this machine has {available} {kind} device(s) "
                         f"({'cores' if kind == 'cpu' else 'GPUs'}): set train.devices={available} or fewer")
    if tc.devices * tc.num_nodes > 1 and not run_named:
        raise UsageError(f"training on {tc.devices * tc.num_nodes} devices needs a named run folder: pass --out RUN")


def _fit_new_run(cfg: Config, run_dir: Path, progress: bool) -> None:
    """`fit` a new run; if a user error stops it before its first checkpoint, remove what it wrote."""
    from dimba.checkpoint import CKPT_SUBDIR, LAST_CKPT
    from dimba.train import fit

    created = None if run_dir.exists() else run_dir  # the top-most folder that fit will create
    while created is not None and not created.parent.exists():
        created = created.parent
    try:
        fit(cfg, run_dir, resume=False, progress=progress)
    except DimbaError:
        if not (run_dir / CKPT_SUBDIR / LAST_CKPT).exists():
            if created is not None:
                shutil.rmtree(created, ignore_errors=True)
            else:  # the folder was there, empty: empty it again
                for child in run_dir.iterdir():
                    if child.is_dir() and not child.is_symlink():
                        shutil.rmtree(child)
                    else:
                        child.unlink()
        raise


def cmd_train(args: argparse.Namespace) -> int:
    from dimba.config import apply_overrides, dump_yaml, load_config, load_run_config

    run_dir, resume = _resolve_run_dir(args)
    if resume:  # the run's own config, plus any new overrides (e.g. a larger --max-steps)
        saved = load_run_config(run_dir / "config.yaml")
        cfg = apply_overrides(saved, _train_overrides(args))
        _check_same_model(saved.model, cfg.model)
    else:
        cfg = load_config(args.preset, args.config, _train_overrides(args))
    if args.print_config:
        print(dump_yaml(cfg), end="")
        return 0
    _check_devices(cfg, run_named=resume or args.out is not None)
    if resume:
        from dimba.train import fit

        fit(cfg, run_dir, resume=True, progress=not args.quiet)
    else:
        _fit_new_run(cfg, run_dir, progress=not args.quiet)
    return 0


_SAMPLE_FLAGS = {"steps": "num_steps", "temperature": "temperature", "top_k": "top_k", "top_p": "top_p",
                 "guidance": "guidance_scale", "eta": "eta", "clamp": "clamp", "remasking": "remasking",
                 "block_length": "block_length"}


def _sample_settings(args: argparse.Namespace) -> SampleConfig:
    """The run's `sample` config (defaults for an export folder), overridden by the flags given."""
    from pydantic import ValidationError

    from dimba.config import load_run_config

    run_cfg = Path(args.model) / "config.yaml"
    base = load_run_config(run_cfg).sample if run_cfg.is_file() else SampleConfig()
    given = {field: getattr(args, flag) for flag, field in _SAMPLE_FLAGS.items() if getattr(args, flag) is not None}
    try:
        return SampleConfig(**{**base.model_dump(), **given})
    except ValidationError as err:
        first = err.errors()[0]
        flag = next(f for f, field in _SAMPLE_FLAGS.items() if field == first["loc"][0])
        raise UsageError(f"--{flag.replace('_', '-')} {first['input']!r}: {first['msg']}") from None


def _prompt_ids(tokenizer, prompt: str) -> list[int]:
    return tokenizer.encode(prompt) if prompt else []


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from dimba.checkpoint import load_for_inference
    from dimba.generate import generate_texts

    sc = _sample_settings(args)
    model, tokenizer = load_for_inference(args.model)
    context = model.config.context_length or 256
    prompt = _prompt_ids(tokenizer, args.prompt)
    if len(prompt) >= context:
        raise UsageError(f"the prompt is {len(prompt)} tokens, not shorter than the model context of {context} tokens: "
                         "shorten --prompt")
    length = args.length if args.length is not None else context - len(prompt)
    if len(prompt) + length > context:
        raise UsageError(f"prompt ({len(prompt)} tokens) + --length {length} exceeds the model context of {context} "
                         f"tokens: use --length {context - len(prompt)} or less")
    gen = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    texts = generate_texts(model, tokenizer, prompt, length, sc, num_samples=args.num_samples, generator=gen)
    for i, text in enumerate(texts):
        if args.num_samples > 1:
            print(f"===== sample {i} =====")
        print(text)
    return 0


def _eval_blocks(args: argparse.Namespace, tokenizer, context: int):
    """The (N, L) blocks of ``--split`` of ``--data``, cut like training (the run's seq_len and val_fraction)."""
    import math

    from dimba.config import load_run_config
    from dimba.data import prepare_data

    run_cfg = Path(args.model) / "config.yaml"
    data_cfg = load_run_config(run_cfg).data if run_cfg.is_file() else None
    seq_len = data_cfg.seq_len if data_cfg else context
    val_fraction = data_cfg.val_fraction if data_cfg else 0.05
    prepared = prepare_data(args.data, seq_len, val_fraction, tokenizer, tokenizer.vocab_size)
    blocks = prepared.val if args.split == "val" else prepared.train  # (N, L)
    if args.max_tokens is not None:
        blocks = blocks[: max(1, math.ceil(args.max_tokens / blocks.shape[1]))]
    return blocks


def cmd_eval(args: argparse.Namespace) -> int:
    import json

    import torch

    from dimba.checkpoint import load_for_inference
    from dimba.likelihood import FAMILIES, evaluate_likelihood

    model, tokenizer = load_for_inference(args.model)
    if model.family not in FAMILIES:
        raise UsageError(f"not yet: likelihood of the {model.family} family (issue 5 adds the continuous bound); "
                         f"dimba eval supports {' and '.join(FAMILIES)} models")
    blocks = _eval_blocks(args, tokenizer, model.config.context_length or 256)  # (N, L)
    gen = torch.Generator().manual_seed(args.seed)
    result = evaluate_likelihood(model, blocks, tokenizer, mc_samples=args.mc_samples, generator=gen,
                                 batch_size=args.batch_size, progress=not args.json)
    result["split"] = args.split
    if args.json:
        print(json.dumps(result))
        return 0
    kind = f"NELBO (upper bound, K={result['mc_samples']})" if result["is_bound"] else "exact NLL"
    print(f"{'family':<22}{result['family']}")
    print(f"{'estimate':<22}{kind}")
    print(f"{'nats/token':<22}{result['nll_nats_per_token']:.4f} ± {result['stderr_nats_per_token']:.4f}")
    print(f"{'bits/byte':<22}{result['bits_per_byte']:.4f} ± {result['stderr_bits_per_byte']:.4f}")
    print(f"{'tokens / bytes':<22}{result['tokens']} / {result['bytes']} ({args.split}, {result['blocks']} blocks)")
    print(f"{'seconds':<22}{result['seconds']:.1f}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from dimba.checkpoint import load_for_inference, save_pretrained

    model, tokenizer = load_for_inference(args.run)
    out = save_pretrained(model, args.out, tokenizer=tokenizer)
    print(f"exported to {out}")
    return 0


def cmd_tokenizer_train(args: argparse.Namespace) -> int:
    from dimba.tokenizer import train_tokenizer_cli

    path = train_tokenizer_cli(args.data, args.vocab_size, args.out)
    print(f"tokenizer written to {path}")
    return 0


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one-line `UsageError`s (exit status 2 through `main`)."""

    def error(self, message: str):
        raise UsageError(f"{message}: see '{self.prog} --help'")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dimba", description="Diffusion language models with bidirectional Mamba denoisers.")
    sub = parser.add_subparsers(dest="verb", required=True)

    p = sub.add_parser("train", help="train a model (default: tiny preset on the built-in Shakespeare corpus)")
    p.add_argument("--preset", default="tiny", help="named preset (tiny, small, base)")
    p.add_argument("--config", help="YAML file merged over the preset")
    p.add_argument("--data", help="corpus: 'shakespeare', a .txt/.jsonl file or a folder")
    p.add_argument("--family", choices=["continuous", "masked", "hybrid", "ar"],
                   help="continuous (default), masked ([MASK] diffusion), hybrid, or ar (the autoregressive yardstick)")
    p.add_argument("--backbone", choices=["mamba2", "transformer"])
    p.add_argument("--max-steps", type=int)
    p.add_argument("--max-time", type=float, help="wall-clock budget in minutes")
    p.add_argument("--devices", type=int, help="processes (CPU) or GPUs per node; train.batch_size is per device")
    p.add_argument("--num-nodes", type=int, help="machines (launched by torchrun or SLURM, each with --devices)")
    p.add_argument("--strategy", choices=["auto", "ddp", "fsdp"], help="multi-device strategy (default auto: DDP)")
    p.add_argument("--out", help="run directory (default runs/<timestamp>)")
    p.add_argument("--resume", nargs="?", const=True, help="continue a run: --resume RUN, or --resume with --out RUN")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. train.lr=3e-4")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("generate", help="generate text from a run or an export folder",
                       description="Sampler flags left out take the run's `sample` config (defaults for an export folder).")
    p.add_argument("model", help="run directory or export folder")
    p.add_argument("--prompt", default="")
    p.add_argument("--length", type=int, help="new tokens (default: fill the context)")
    p.add_argument("--steps", type=int, help="denoising steps (diffusion families)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale")
    p.add_argument("--temperature", type=float)
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--eta", type=float, help="0 = DDIM, 1 = ancestral")
    p.add_argument("--clamp", choices=["none", "soft", "hard"],
                   help="continuous: move x0 estimates onto the token embeddings at every step")
    p.add_argument("--remasking", choices=["ancestral", "low_confidence", "random"],
                   help="masked: which masked tokens each step commits")
    p.add_argument("--block-length", type=int, help="masked: semi-autoregressive blocks of this many tokens")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("eval", help="likelihood in bits per byte: exact NLL (ar) or NELBO upper bound (masked)")
    p.add_argument("model", help="run directory or export folder")
    p.add_argument("--data", default="shakespeare", help="corpus: 'shakespeare', a .txt/.jsonl file or a folder")
    p.add_argument("--split", choices=["val", "train"], default="val")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--mc-samples", type=int, default=8, help="masked: Monte Carlo samples per block")
    p.add_argument("--max-tokens", type=int, help="evaluate only the first blocks holding this many tokens")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16, help="rows per forward pass")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("export", help="write config.json + model.safetensors + tokenizer.json from a run (EMA weights)")
    p.add_argument("run")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("tokenizer", help="tokenizer tools")
    tsub = p.add_subparsers(dest="tverb", required=True)
    t = tsub.add_parser("train", help="train a byte-level BPE tokenizer on a corpus")
    t.add_argument("--data", default="shakespeare")
    t.add_argument("--vocab-size", type=int, default=4096)
    t.add_argument("--out", required=True)
    t.set_defaults(func=cmd_tokenizer_train)
    return parser


def _check_ranges(args: argparse.Namespace) -> None:
    for name in ("length", "num_samples", "vocab_size", "max_steps", "block_length", "mc_samples", "max_tokens",
                 "batch_size"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {value}")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``dimba`` console script; user errors exit with status 2."""
    try:
        args = build_parser().parse_args(argv)
        _check_ranges(args)
        return args.func(args)
    except DimbaError as exc:
        print(f"dimba: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dimba: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
