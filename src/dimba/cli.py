"""`dimba train | generate | eval | sample-quality | bench | export | tokenizer | serve`: a thin map from verbs to
library functions. Choices and help of the config-backed flags come from the config (`dimba.config.choices`)."""

from __future__ import annotations

import argparse
import json
import sys

import torch

from dimba.config import (SAMPLE_NAMES, Config, ModelConfig, SampleConfig, TrainConfig, apply_overrides, choices,
                          describe, load_config, load_run_config)
from dimba.errors import CheckpointError, DataError, DimbaError, UsageError
from dimba.cli_finetune import add_finetune
from dimba.cli_publish import add_publish
from dimba.cli_runs import HUB_MODEL_HELP, MODEL_HELP, launch, resolve_run_dir
from dimba.cli_sampling import sample_settings, sampler_flags
from dimba.io import as_disk_error
from dimba.loading import load_for_inference, model_folder, sample_defaults
from dimba.malloc import keep_freed_memory
from dimba.subnormals import flushed_subnormals


def _train_overrides(args: argparse.Namespace) -> list[str]:
    flags = {"data.corpus": args.data, "model.family": args.family, "model.backbone": args.backbone,
             "train.max_steps": args.max_steps, "train.max_time": args.max_time,
             "train.devices": args.devices, "train.num_nodes": args.num_nodes, "train.strategy": args.strategy}
    return [f"{k}={v}" for k, v in flags.items() if v is not None] + list(args.overrides)


def _check_same_model(saved: ModelConfig, new: ModelConfig) -> None:
    """A resumed run keeps its model: its checkpoint holds weights of exactly that shape and family."""
    for name in ModelConfig.model_fields:
        old, value = getattr(saved, name), getattr(new, name)
        if old != value:
            raise UsageError(f"--resume cannot change model.{name} ({old!r} -> {value!r}): the run's checkpoint holds "
                             "the old model; drop that setting, or start a new run with another --out")


def cmd_train(args: argparse.Namespace) -> int:
    run_dir, resume = resolve_run_dir(args)
    if resume:  # the run's own config, plus any new overrides (e.g. a larger --max-steps)
        saved = load_run_config(run_dir / "config.yaml")
        cfg = apply_overrides(saved, _train_overrides(args))
        _check_same_model(saved.model, cfg.model)
    elif args.init:  # adaptation: the init run's config and tokenizer, another family or loss from its weights
        from dimba.training.finetune import adaptation_config

        cfg = adaptation_config(args.init, _train_overrides(args))
    else:
        cfg = load_config(args.preset, args.config, _train_overrides(args))
    return launch(cfg, args, run_dir, resume)


def _run_config(model_path: str) -> Config | None:
    """The config.yaml of a run directory (or of the run of a checkpoint path); None for an export folder."""
    run_cfg = model_folder(model_path) / "config.yaml"
    return load_run_config(run_cfg) if run_cfg.is_file() else None


def _prompt_and_length(args: argparse.Namespace, model, tokenizer) -> tuple[list[int], int]:
    """The ids of ``--prompt`` and ``--length`` (default: fill the context); one line if they do not fit the context."""
    from dimba.evaluation.sample_quality import check_fits

    context = model.config.context_length or 256
    prompt = tokenizer.encode(args.prompt) if getattr(args, "prompt", None) else []
    if len(prompt) >= context:
        raise UsageError(f"the prompt is {len(prompt)} tokens, not shorter than the model context of {context} tokens: "
                         "shorten --prompt")
    length = args.length if args.length is not None else context - len(prompt)
    check_fits(context, len(prompt), length, "the prompt")
    return prompt, length


def cmd_generate(args: argparse.Namespace) -> int:
    from contextlib import nullcontext

    from dimba.generation import completions, generate_ids

    sc = sample_settings(args)
    model, tokenizer = load_for_inference(args.model)
    prompt, length = _prompt_and_length(args, model, tokenizer)
    gen = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    view = None
    if args.show:  # the canvas at every step on stderr; stdout stays the text alone
        from dimba.live import LiveView

        view = LiveView(model, tokenizer, args.prompt, length, args.num_samples)
    if args.best_of > 1:
        if view is not None:
            raise UsageError("--show draws one generation; it does not combine with --best-of: drop one of them")
        from dimba.evaluation.exact_match import best_of_generations

        texts = best_of_generations(model, tokenizer, prompt, length, sc, args.num_samples, args.best_of, gen,
                                    args.mc_samples)
    else:
        with view if view is not None else nullcontext():
            ids = generate_ids(model, prompt, length, sc, args.num_samples, gen, tokenizer.eos_id, on_step=view)
            if view is not None:
                view.finish(ids, len(prompt))
        texts = completions(ids, tokenizer, len(prompt), length)
    for i, text in enumerate(texts):
        if args.num_samples > 1:
            print(f"===== sample {i} =====")
        print(text)
    return 0


def _eval_blocks(args: argparse.Namespace, tokenizer, context: int):
    """The (N, L) blocks of ``--split`` of ``--data``, cut like training (the run's seq_len and val_fraction),
    and 8 training blocks to calibrate on."""
    import math

    from dimba.data import prepare_data

    run_cfg = _run_config(args.model)
    data_cfg = run_cfg.data if run_cfg is not None else None
    seq_len = data_cfg.seq_len if data_cfg else context
    val_fraction = data_cfg.val_fraction if data_cfg else 0.05
    corpus = args.data or (data_cfg.corpus if data_cfg else "shakespeare")
    prepared = prepare_data(corpus, seq_len, val_fraction, tokenizer, tokenizer.vocab_size)
    blocks = prepared.val if args.split == "val" else prepared.train  # (N, L)
    if args.max_tokens is not None:
        blocks = blocks[: max(1, math.ceil(args.max_tokens / blocks.shape[1]))]
    # a bound's reverse process is chosen on training blocks (the last ones, never the evaluated ones)
    return blocks, prepared.train[-8:]


def _load_judge(path: str):
    """(model, tokenizer) of the ``--judge`` folder, refused in one line unless it is an ar model."""
    from dimba.evaluation.sample_quality import check_judge

    try:
        judge, judge_tokenizer = load_for_inference(path)
    except CheckpointError as exc:
        raise CheckpointError(f"--judge: {exc}") from None
    check_judge(judge)
    return judge, judge_tokenizer


def _vocabulary(model_path: str, corpus: str | None = None) -> set[str] | None:
    """The training words of a run's corpus, or of ``corpus`` for an export folder; None for a streamed
    corpus or an export folder without ``corpus``."""
    from dimba.evaluation.words import training_vocabulary

    run_cfg = _run_config(model_path)
    val_fraction = 0.05
    if run_cfg is not None:
        data = run_cfg.data
        corpus, val_fraction = (None, None) if data.streaming else (data.corpus, data.val_fraction)
    if corpus is None:
        return None
    try:
        return training_vocabulary(corpus, val_fraction)
    except DataError as exc:
        raise UsageError(f"the training-word fraction reads the training corpus, which failed: {exc}") from None


def cmd_sample_quality(args: argparse.Namespace) -> int:
    """`dimba sample-quality MODEL --judge AR_MODEL`: `sample_quality` as a table or one JSON object."""
    from dimba.evaluation.sample_quality import format_report, load_references, sample_quality, warm_up

    if args.judge is None:
        raise UsageError("--samples needs --judge AR_MODEL: an ar-family run or export folder that scores gen-PPL")
    references = load_references(args.references) if args.references is not None else None
    sc = sample_settings(args)
    judge, judge_tokenizer = _load_judge(args.judge)
    model, tokenizer = load_for_inference(args.model)
    prompt, length = _prompt_and_length(args, model, tokenizer)
    warm_up(model, sc, length)
    torch.manual_seed(args.seed)
    result = sample_quality(model, tokenizer, judge, judge_tokenizer, args.samples, sc, length, prompt,
                            torch.Generator().manual_seed(args.seed), _vocabulary(args.model, args.data), references)
    print(json.dumps(result) if args.json else format_report(result))
    return 0


# eval flags of the old `eval --samples` spelling, meaningful with --samples only
_SAMPLE_QUALITY_FLAGS = ("judge", "references", "prompt", "length", *(f for f in SAMPLE_NAMES if f != "clamp"))


def _print_likelihood(result: dict, split: str) -> None:
    kind = f"upper bound (K={result['mc_samples']})" if result["is_bound"] else "exact NLL"
    print(f"{'family':<22}{result['family']}")
    print(f"{'estimate':<22}{kind}")
    for name, value in result.get("parts_nats_per_token", {}).items():
        print(f"{'  ' + name:<22}{value:.4f} nats/token")
    if "t0" in result:
        print(f"{'t0 (SNR), clamp':<22}{result['t0']:.4g} ({result['snr_t0']:.3g}), {result['clamp']}")
    print(f"{'nats/token':<22}{result['nll_nats_per_token']:.4f} ± {result['stderr_nats_per_token']:.4f}")
    print(f"{'bits/byte':<22}{result['bits_per_byte']:.4f} ± {result['stderr_bits_per_byte']:.4f}")
    print(f"{'tokens / bytes':<22}{result['tokens']} / {result['bytes']} ({split}, {result['blocks']} blocks)")
    print(f"{'seconds':<22}{result['seconds']:.1f}")


def cmd_eval(args: argparse.Namespace) -> int:
    from dimba.evaluation.likelihood import evaluate_likelihood

    if args.samples is not None:  # the spelling of the previous release
        code = cmd_sample_quality(args)
        print("dimba: note: `dimba eval MODEL --samples N` is now `dimba sample-quality MODEL --samples N`; the old "
              "spelling will be removed in the next release", file=sys.stderr)
        return code
    given = [flag for flag in _SAMPLE_QUALITY_FLAGS if getattr(args, flag) is not None]
    if given:
        raise UsageError(f"--{given[0]} is a sample-quality flag: use `dimba sample-quality MODEL --judge AR_MODEL`")
    model, tokenizer = load_for_inference(args.model)
    options = {"t0": args.t0, "clamp": args.clamp}
    model.family.check_likelihood_options(options)
    blocks, calibration = _eval_blocks(args, tokenizer, model.config.context_length or 256)  # (N, L), (8, L)
    result = evaluate_likelihood(model, blocks, tokenizer, mc_samples=args.mc_samples,
                                 generator=torch.Generator().manual_seed(args.seed), batch_size=args.batch_size,
                                 progress=not args.json, calibration_blocks=calibration, **options)
    result["split"] = args.split
    if args.json:
        print(json.dumps(result))
    else:
        _print_likelihood(result, args.split)
    return 0


def cmd_bench_sweep(args: argparse.Namespace) -> int:
    """`dimba bench sweep MODEL --judge AR_MODEL --steps 8,16,...`: one JSON object; with --out, PREFIX.json and .png."""
    from dimba.evaluation.bench_sweep import check_sweepable, parse_steps, sweep, write_sweep
    from dimba.evaluation.plots import check_out

    steps = parse_steps(args.steps)
    paths = check_out(args.out) if args.out is not None else None
    judge, judge_tokenizer = _load_judge(args.judge)
    model, tokenizer = load_for_inference(args.model)
    check_sweepable(model)
    _, length = _prompt_and_length(args, model, tokenizer)
    torch.manual_seed(args.seed)
    result = sweep(model, tokenizer, judge, judge_tokenizer, steps, sample_defaults(args.model),
                   sample_defaults(args.judge), args.samples, length, args.seed, _vocabulary(args.model))
    result = {"model": args.model, "judge": args.judge, **result}
    print(json.dumps(result))
    if paths is not None:
        write_sweep(result, paths)
    return 0


def cmd_bench_train(args: argparse.Namespace) -> int:
    """`dimba bench train --preset P`: one JSON object; with --out, PREFIX.json and PREFIX.png."""
    from dimba.evaluation.bench_train import draw, measure_training
    from dimba.evaluation.plots import check_out
    from dimba.io import atomic_write_text

    if args.steps < 1 or args.warmup < 0:
        raise UsageError(f"--steps must be at least 1 and --warmup at least 0, got {args.steps} and {args.warmup}")
    paths = check_out(args.out) if args.out is not None else None
    flags = {"data.corpus": args.data, "model.family": args.family, "model.backbone": args.backbone}
    cfg = load_config(args.preset, args.config, [f"{k}={v}" for k, v in flags.items() if v is not None] + args.overrides)
    result = {"preset": args.preset, **measure_training(cfg, args.steps, args.warmup)}
    print(json.dumps(result))
    if paths is not None:
        atomic_write_text(paths[0], json.dumps(result, indent=1) + "\n")
        draw(result, paths[1])
    return 0


def cmd_vae_train(args: argparse.Namespace) -> int:
    """`dimba vae train`: pre-train a TokenVAE; prints its validation ELBO parts as JSON."""
    from dimba.training.vae import train_vae

    if args.kl_weight < 0:
        raise UsageError(f"--kl-weight must be at least 0, got {args.kl_weight}")
    metrics = train_vae(args.data, args.out, args.latent_dim, args.d_model, args.kl_weight, args.steps,
                        vocab_size=args.vocab_size, seed=args.seed)
    print(json.dumps({"out": args.out, **metrics}))
    return 0


def cmd_tokenizer_train(args: argparse.Namespace) -> int:
    from dimba.data.packing import train_tokenizer_on

    path = train_tokenizer_on(args.data, args.vocab_size, args.out)
    print(f"tokenizer written to {path}")
    return 0


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one-line `UsageError`s (exit status 2 through `main`)."""

    def error(self, message: str):
        raise UsageError(f"{message}: see '{self.prog} --help'")


def _setting(p: argparse.ArgumentParser, flag: str, section, name: str, help: str | None = None, **kwargs) -> None:
    """A flag for config setting ``section.name``: its choices (a Literal's values) and help (its description)
    come from the config."""
    p.add_argument(flag, choices=choices(section, name) or None, help=help or describe(section, name), **kwargs)


def _model_flags(p: argparse.ArgumentParser) -> None:
    """--preset, --config, --data, --family, --backbone and KEY=VALUE overrides (train, bench train)."""
    from dimba.config import preset_names

    p.add_argument("--preset", default="tiny", help=f"named preset ({', '.join(preset_names())})")
    p.add_argument("--config", help="YAML file merged over the preset")
    p.add_argument("--data", help="corpus: 'shakespeare', a .txt/.jsonl file or a folder")
    _setting(p, "--family", ModelConfig, "family")
    _setting(p, "--backbone", ModelConfig, "backbone", help="the denoiser network")


def _sample_quality_flags(p: argparse.ArgumentParser, hidden: bool = False) -> None:
    """The flags of `dimba sample-quality` (hidden: `dimba eval --samples`, the old spelling)."""
    h = (lambda text: argparse.SUPPRESS) if hidden else (lambda text: text)
    p.add_argument("--samples", type=int, default=None if hidden else 16, help=h("samples to generate"))
    p.add_argument("--judge", required=not hidden, help=h("an ar-family run or export folder that scores gen-PPL"))
    p.add_argument("--references", help=h('JSON lines {"prompt": ..., "reference": ...}, one completion each, scored '
                                          "with BLEU and ROUGE (pip install 'dimba[eval]')"))
    p.add_argument("--prompt", help=h("the prompt of the samples (default: none)"))
    p.add_argument("--length", type=int, help=h("new tokens per sample (default: fill the context)"))


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train a model (default: tiny preset on the built-in Shakespeare corpus)")
    _model_flags(p)
    p.add_argument("--max-steps", type=int)
    p.add_argument("--max-time", type=float, help=describe(TrainConfig, "max_time"))
    p.add_argument("--devices", type=int, help=describe(TrainConfig, "devices"))
    p.add_argument("--num-nodes", type=int, help=describe(TrainConfig, "num_nodes"))
    _setting(p, "--strategy", TrainConfig, "strategy")
    p.add_argument("--out", help="run directory (default runs/<timestamp>)")
    p.add_argument("--resume", nargs="?", const=True, help="continue a run: --resume RUN, or --resume with --out RUN")
    p.add_argument("--init", help="start from the weights (and config, tokenizer) of this run or one of its "
                   "checkpoints (RUN/checkpoints/best.ckpt), e.g. an ar run adapted into --family masked; tensors "
                   "whose name and shape match are copied, a causal Mamba-2 mixer into the bidirectional block's "
                   "forward direction")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. train.lr=3e-4")
    p.set_defaults(func=cmd_train)


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate text from a run or an export folder",
                       description="Sampler flags left out take the run's `sample` config (an export folder's "
                       "sample_config.json).")
    p.add_argument("model", help=HUB_MODEL_HELP)
    p.add_argument("--prompt", default="")
    p.add_argument("--length", type=int, help="new tokens (default: fill the context)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--best-of", type=int, default=1, help="draw K samples per output and keep the one the model finds "
                   "most likely (exact log-probability for ar, an ELBO estimate for diffusion)")
    p.add_argument("--mc-samples", type=int, help="--best-of, diffusion families: ELBO samples per candidate "
                   "(default: the family's, 16 for continuous and hybrid, 8 for masked)")
    p.add_argument("--show", action="store_true", help="draw the canvas at every step on stderr (masks, newly "
                   "committed tokens, confidence as colour); needs pip install 'dimba[serve]'")
    sampler_flags(p)
    _setting(p, "--clamp", SampleConfig, "clamp",
             help="continuous: move x0 estimates onto the token embeddings at every step")
    p.set_defaults(func=cmd_generate)


def cmd_serve(args: argparse.Namespace) -> int:
    """`dimba serve MODEL`: the HTTP API and the live page, until interrupted."""
    try:
        from dimba.serve.server import Options, run_server
    except ImportError as exc:
        raise UsageError(f"dimba serve needs the {exc.name} package: pip install 'dimba[serve]'") from None
    if args.request_timeout <= 0 or args.batch_wait < 0:
        raise UsageError("--request-timeout must be above 0 and --batch-wait at least 0")
    options = Options(args.host, args.port, args.max_batch, args.max_queue, args.max_tokens, args.max_steps,
                      args.request_timeout, args.batch_wait, args.allow_remote, args.name, args.threads)
    run_server(args.model, sample_defaults(args.model), options)
    return 0


def _add_serve(sub) -> None:
    p = sub.add_parser("serve", help="serve a model over HTTP: an OpenAI-style completions API and a live page of "
                       "the denoising", description="Listens on loopback unless --allow-remote; the page is at /, "
                       "the API at /v1/completions and /v1/models. Sampler fields left out take the run's `sample` "
                       "config (defaults for an export folder).")
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    p.add_argument("--allow-remote", action="store_true", help="allow a --host other than loopback (no authentication)")
    p.add_argument("--max-batch", type=int, default=32, help="rows generated together in one batch (1: one request "
                   "at a time); also the most completions (n) one request may ask")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting at most; more are answered 503")
    p.add_argument("--max-tokens", type=int, help="new tokens one request may ask at most (default: the context)")
    p.add_argument("--max-steps", type=int, default=1024, help="denoising steps one request may ask at most")
    p.add_argument("--request-timeout", type=float, default=120.0, help="seconds from arrival to answer; past it 503")
    p.add_argument("--batch-wait", type=float, default=0.01, help="seconds the oldest request waits for others to "
                   "join its batch")
    p.add_argument("--name", help="the model id of the API (default: the folder name)")
    p.add_argument("--threads", type=int, help="torch threads for the model (default: one per core; on a machine "
                   "shared with other work, fewer avoid oversubscription)")
    p.set_defaults(func=cmd_serve)


def _add_eval(sub) -> None:
    from dimba.families.gaussian_bound import CLAMPS

    p = sub.add_parser("eval", help="likelihood in bits per byte: exact NLL (ar) or an upper bound (diffusion "
                       "families)", description="The likelihood of --data (sample quality: dimba sample-quality).")
    p.add_argument("model", help=HUB_MODEL_HELP)
    p.add_argument("--data", help="corpus: 'shakespeare', a .txt/.jsonl file or a folder (default: a run's own "
                   "corpus; shakespeare for an export folder)")
    p.add_argument("--split", choices=["val", "train"], default="val")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--mc-samples", type=int, default=8, help="diffusion families: Monte Carlo samples per block")
    p.add_argument("--t0", type=float, help="continuous / hybrid: where the reverse process stops and rounds "
                   "(default: chosen on training blocks)")
    p.add_argument("--clamp", choices=CLAMPS, help="continuous / hybrid: the x0 estimate the reverse process steps "
                   "with, the network's or the codebook mean under the head (default: chosen on training blocks)")
    p.add_argument("--max-tokens", type=int, help="evaluate only the first blocks holding this many tokens")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16, help="rows per forward pass")
    _sample_quality_flags(p, hidden=True)
    sampler_flags(p, hidden=True)
    p.set_defaults(func=cmd_eval)


def _add_sample_quality(sub) -> None:
    p = sub.add_parser("sample-quality", help="sample quality: gen-PPL under an ar judge, entropy, distinct-n, the "
                       "training-word fraction, BLEU / ROUGE", description="Generate samples with the run's `sample` "
                       "settings (sampler flags override them) and score them.")
    p.add_argument("model", help=MODEL_HELP)
    _sample_quality_flags(p)
    p.add_argument("--data", help="the training text of the word fraction (default: a run's own corpus)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--seed", type=int, default=0)
    sampler_flags(p)
    _setting(p, "--clamp", SampleConfig, "clamp", help="continuous: move x0 estimates onto the token embeddings")
    p.set_defaults(func=cmd_sample_quality)


def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks that print one JSON object and draw plots")
    bsub = p.add_subparsers(dest="bverb", required=True)
    b = bsub.add_parser("sweep", help="gen-PPL and latency against denoising steps, with the ar judge as yardstick",
                        description="For each step count: N unconditional samples from MODEL (its `sample` settings), "
                        "their gen-PPL under the ar judge, entropy and latency; then the judge's own samples.")
    b.add_argument("model", help="a diffusion run directory or export folder")
    b.add_argument("--judge", required=True, help="an ar-family run or export folder: scores gen-PPL, and is the baseline")
    b.add_argument("--steps", default="8,16,32,64,128,256", help="comma-separated step counts")
    b.add_argument("--samples", type=int, default=16, help="samples per point")
    b.add_argument("--length", type=int, help="new tokens per sample (default: the model context)")
    b.add_argument("--out", help="write PREFIX.json and PREFIX.png (gen-PPL against seconds per sample)")
    b.add_argument("--seed", type=int, default=0)
    b.set_defaults(func=cmd_bench_sweep)
    b = bsub.add_parser("train", help="training tokens/s, achieved GFLOP/s, MFU against the measured matmul peak, "
                        "peak memory", description="Times training steps of a preset (the `dimba train` step, one "
                        "device) after a warm-up; FLOPs counted by torch's FlopCounterMode.")
    _model_flags(b)
    b.add_argument("--steps", type=int, default=20, help="timed steps")
    b.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    b.add_argument("--out", help="write PREFIX.json and PREFIX.png")
    b.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. train.batch_size=16")
    b.set_defaults(func=cmd_bench_train)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dimba", description="Diffusion language models with bidirectional Mamba denoisers.")
    sub = parser.add_subparsers(dest="verb", required=True)
    for add in (_add_train, _add_generate, _add_eval, _add_sample_quality, _add_bench, _add_serve, add_publish,
                add_finetune):
        add(sub)
    p = sub.add_parser("vae", help="the TokenVAE latent of the continuous family")
    v = p.add_subparsers(dest="vverb", required=True).add_parser(
        "train", help="pre-train a TokenVAE on the tokens of a corpus",
        description="Writes OUT/model.safetensors, config.json and tokenizer.json; a model then uses it with "
                    "model.latent_diffusion=true model.use_vae_latent=true model.vae_checkpoint_path=OUT (and the same "
                    "model.d_model and model.d_latent).")
    v.add_argument("--data", default="shakespeare")
    v.add_argument("--latent-dim", type=int, default=64, help="d_latent")
    v.add_argument("--d-model", type=int, default=256, help="the embedding width (the diffusion model's d_model)")
    v.add_argument("--kl-weight", type=float, default=1e-3, help="beta of the KL term")
    v.add_argument("--steps", type=int, default=2000)
    v.add_argument("--vocab-size", type=int, default=4096)
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--out", required=True)
    v.set_defaults(func=cmd_vae_train)
    p = sub.add_parser("tokenizer", help="tokenizer tools")
    t = p.add_subparsers(dest="tverb", required=True).add_parser("train", help="train a byte-level BPE tokenizer on "
                                                                  "a corpus")
    t.add_argument("--data", default="shakespeare")
    t.add_argument("--vocab-size", type=int, default=4096)
    t.add_argument("--out", required=True)
    t.set_defaults(func=cmd_tokenizer_train)
    return parser


def _check_ranges(args: argparse.Namespace) -> None:
    for name in ("length", "num_samples", "vocab_size", "max_steps", "block_length", "mc_samples", "max_tokens",
                 "batch_size", "samples", "latent_dim", "d_model", "max_batch", "max_queue", "threads", "best_of",
                 "problems", "n", "group_size"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {value}")


def parse_cli(argv: list[str] | None = None) -> argparse.Namespace:
    """The parsed command line. ``KEY=VALUE`` overrides may sit among the options in any groups (argparse takes
    only the first group of a positional list; the later ones are added in order); anything else unknown stops
    with the parser's one-line error."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and (not hasattr(args, "overrides") or any(e.startswith("-") or "=" not in e for e in extra)):
        parser.parse_args(argv)  # a one-line UsageError naming what it does not know
    if extra:
        args.overrides = [*args.overrides, *extra]
    return args


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``dimba`` console script; user errors exit with status 2."""
    keep_freed_memory()
    try:
        with flushed_subnormals():  # a trained continuous scan's subnormal products, ~2x its speed on CPU
            args = parse_cli(argv)
            _check_ranges(args)
            return args.func(args)
    except DimbaError as exc:
        print(f"dimba: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a write no dimba code expected to fail: a full disk, a read-only folder
        error = as_disk_error(exc)
        if error is None:
            raise
        print(f"dimba: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dimba: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
