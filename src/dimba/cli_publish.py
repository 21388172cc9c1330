"""The `dimba export`, `dimba push` and `dimba lm-eval` verbs: sharing a model and comparing it (`dimba.cli` adds
them with `add_publish`)."""

from __future__ import annotations

import argparse

from dimba.cli_runs import MODEL_HELP
from dimba.errors import UsageError


def _export_options(args: argparse.Namespace) -> dict:
    return {"evaluate": args.eval, "mc_samples": args.mc_samples, "seed": args.seed, "max_tokens": args.max_tokens}


def cmd_export(args: argparse.Namespace) -> int:
    """`dimba export RUN --out DIR`: an export folder with its model card (`dimba.publish.export_model`)."""
    from dimba.publish import export_model

    out = export_model(args.run, args.out, **_export_options(args))
    print(f"exported to {out}")
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    """`dimba push RUN_OR_EXPORT --repo-id OWNER/NAME`: upload an export folder (a run is exported first)."""
    from dimba.publish import push_model

    url = push_model(args.model, args.repo_id, args.private, **_export_options(args))
    print(f"pushed to {url}")
    return 0


def cmd_lm_eval(args: argparse.Namespace) -> int:
    """`dimba lm-eval ARGS`: lm_eval's command line with the dimba model and tasks (`dimba.evaluation.harness`)."""
    try:
        from dimba.evaluation.harness import run_cli
    except ImportError as exc:
        raise UsageError(f"dimba lm-eval needs lm-evaluation-harness ({exc}): pip install 'dimba[lmeval]'") from None
    return run_cli(args.args)


def _card_flags(p: argparse.ArgumentParser) -> None:
    """--eval and its settings: the model card of an exported run records its bits per byte."""
    p.add_argument("--eval", action="store_true", help="measure the likelihood of the run's validation split (as "
                   "dimba eval) and record it in the model card")
    p.add_argument("--mc-samples", type=int, default=8, help="--eval, diffusion families: Monte Carlo samples per block")
    p.add_argument("--seed", type=int, default=0, help="--eval: the seed of the estimator")
    p.add_argument("--max-tokens", type=int, help="--eval: only the first blocks holding this many tokens")


def add_publish(sub) -> None:
    """The export, push and lm-eval subcommands."""
    p = sub.add_parser("export", help="write config.json + model.safetensors + tokenizer.json + sample_config.json + "
                       "README.md (the model card) from a run (EMA weights)")
    p.add_argument("run", help=MODEL_HELP)
    p.add_argument("--out", required=True)
    _card_flags(p)
    p.set_defaults(func=cmd_export)
    p = sub.add_parser("push", help="upload a run (exported first) or an export folder to the Hugging Face Hub",
                       description="Needs a token (`hf auth login` or HF_TOKEN) and the network.")
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("--repo-id", required=True, help="the Hub model repository OWNER/NAME (created if missing)")
    p.add_argument("--private", action="store_true", help="create the repository private")
    _card_flags(p)
    p.set_defaults(func=cmd_push)
    p = sub.add_parser("lm-eval", help="lm-evaluation-harness: lm_eval's command line with the dimba model and "
                       "tasks", add_help=False, prefix_chars="\0",  # every argument goes to lm_eval, --help too
                       description="e.g. dimba lm-eval --model dimba --model_args pretrained=RUN --tasks "
                       "dimba_continuation --device cpu")
    p.add_argument("args", nargs="*", help="lm_eval's arguments")
    p.set_defaults(func=cmd_lm_eval)
