"""`dimba finetune METHOD` (fit from a run with another loss) and `dimba task` (write a built-in task's rows,
measure exact-match accuracy); `dimba.cli` adds them with `add_finetune`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from dimba.config import FINETUNE_METHODS, FinetuneConfig, apply_overrides, describe, load_run_config
from dimba.cli_sampling import sample_settings, sampler_flags
from dimba.cli_runs import MODEL_HELP
from dimba.errors import UsageError

_FLAGS = {"max_steps": "train.max_steps", "lr": "train.lr", "batch_size": "train.batch_size",
          "lora_rank": "finetune.lora_rank", "beta": "finetune.beta", "group_size": "finetune.group_size",
          "updates": "finetune.grpo_updates", "template": "finetune.template", "reward": "finetune.reward",
          "seed": "train.seed"}


def _overrides(args: argparse.Namespace) -> list[str]:
    given = [f"{key}={getattr(args, flag)}" for flag, key in _FLAGS.items() if getattr(args, flag) is not None]
    return given + list(args.overrides)


def cmd_finetune(args: argparse.Namespace) -> int:
    """`dimba finetune METHOD --init RUN --data FILE|task:NAME --out RUN` (or ``--resume RUN``)."""
    from dimba.cli_runs import launch, resolve_run_dir
    from dimba.training.finetune import finetune_config

    run_dir, resume = resolve_run_dir(args)
    if resume:
        saved = load_run_config(run_dir / "config.yaml")
        if saved.finetune.method != args.method:
            raise UsageError(f"--resume: {str(run_dir)!r} is a {saved.finetune.method} run, not {args.method}: "
                             f"continue it with its own verb (dimba finetune {saved.finetune.method} --resume ...)"
                             if saved.finetune.method != "none" else
                             f"--resume: {str(run_dir)!r} is a pre-training run: continue it with dimba train --resume")
        cfg = apply_overrides(saved, _overrides(args))
    else:
        if not args.init or not args.data:
            raise UsageError(f"dimba finetune {args.method} needs --init RUN (the run to start from) and --data "
                             "(a .jsonl file or task:NAME)")
        cfg = finetune_config(args.init, args.method, args.data, _overrides(args))
    return launch(cfg, args, run_dir, resume)


def _refuse_existing(out: Path) -> None:
    """A `UsageError` when the output file ``out`` exists: it is never overwritten."""
    if out.exists():
        raise UsageError(f"--out {str(out)!r} already exists: choose another file name or delete it")


def _write_jsonl(out: Path, rows: list[dict]) -> None:
    """``rows`` as JSON lines in ``out``, written atomically (a disk error: one line, nothing half-written)."""
    from dimba.io import atomic_write_text, disk_errors

    with disk_errors(out.parent if str(out.parent) else Path(".")):
        atomic_write_text(out, "".join(json.dumps(row) + "\n" for row in rows))


def _problems(task: str, n: int, seed: int, split: str) -> tuple[str, list[dict[str, str]]]:
    """The task spec of ``--task`` (a built-in task's name, task:NAME or a .jsonl file) and ``n`` of its
    ``{prompt, answer}`` problems: of ``split`` for a built-in task, the first rows of a file."""
    from dimba.data.finetune import load_rows, task_rows
    from dimba.data.tasks import TASK_PREFIX, task_of

    spec = task if task.startswith(TASK_PREFIX) or task.endswith(".jsonl") else TASK_PREFIX + task
    if task_of(spec):
        return spec, task_rows(spec, "answer", n, seed, split)
    return spec, load_rows(spec, "answer", n, seed)[:n]


def cmd_task_write(args: argparse.Namespace) -> int:
    """`dimba task write NAME --kind KIND --out FILE.jsonl`: rows of a built-in task as JSON lines."""
    from dimba.data.finetune import task_rows
    from dimba.data.tasks import TASK_PREFIX, task_of

    spec = args.name if args.name.startswith(TASK_PREFIX) else TASK_PREFIX + args.name
    task_of(spec)
    out = Path(args.out)
    _refuse_existing(out)
    rows = task_rows(spec, args.kind, args.n, args.seed, args.split)
    _write_jsonl(out, rows)
    print(f"wrote {len(rows)} {args.kind} rows of {spec} ({args.split}) to {out}")
    return 0


def cmd_task_eval(args: argparse.Namespace) -> int:
    """`dimba task eval MODEL --task NAME`: exact-match accuracy on held-out problems (or a .jsonl of answers)."""
    from dimba.evaluation.exact_match import exact_match
    from dimba.loading import load_for_inference

    spec, rows = _problems(args.task, args.problems, args.seed, "test")
    model, tokenizer = load_for_inference(args.model)
    sample = sample_settings(args)
    result = exact_match(model, tokenizer, rows, sample, args.best_of, args.seed, args.mc_samples)
    result.update(model=str(args.model), task=spec, temperature=sample.temperature)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{spec}: exact match {result['accuracy']:.3f} ({result['correct']}/{result['n']}), "
              f"best of {args.best_of} at temperature {sample.temperature:g}")
    return 0


def cmd_task_pairs(args: argparse.Namespace) -> int:
    """`dimba task pairs MODEL --task NAME --out FILE.jsonl`: preference rows from the model's own wrong answers."""
    from dimba.evaluation.exact_match import self_preference_rows
    from dimba.evaluation.rewards import get_reward
    from dimba.loading import load_for_inference

    out = Path(args.out)
    _refuse_existing(out)
    if args.samples < 1 or args.n < 1:
        raise UsageError(f"--samples and --n must be at least 1, got {args.samples} and {args.n}")
    _, rows = _problems(args.task, args.n, args.seed, "train")
    reward = get_reward(args.reward)
    model, tokenizer = load_for_inference(args.model)
    pairs = self_preference_rows(model, tokenizer, rows, sample_settings(args), args.samples, args.seed, reward)
    _write_jsonl(out, pairs)
    print(f"wrote {len(pairs)} preference rows to {out}: {len(rows) - len(pairs)} of {len(rows)} problems had no "
          f"wrong answer in {args.samples} samples")
    return 0


def _finetune_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--init", help="the run to start from (its EMA weights; also the DPO / GRPO reference), or one of "
                   "its checkpoints (RUN/checkpoints/best.ckpt)")
    p.add_argument("--data", help="JSON lines ({prompt, response} for sft; {prompt, chosen, rejected} for dpo / ipo "
                   "/ simpo; {prompt, answer} for grpo) or task:NAME (task:arithmetic, task:reverse)")
    p.add_argument("--out", help="the new run directory (default runs/<timestamp>)")
    p.add_argument("--resume", nargs="?", const=True, help="continue a fine-tuning run: --resume RUN")
    p.add_argument("--max-steps", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--batch-size", type=int, help="rows per micro-batch (grpo: prompts)")
    p.add_argument("--lora-rank", type=int, help=describe(FinetuneConfig, "lora_rank"))
    p.add_argument("--beta", type=float, help=describe(FinetuneConfig, "beta"))
    p.add_argument("--group-size", type=int, help=describe(FinetuneConfig, "group_size"))
    p.add_argument("--updates", type=int, help=describe(FinetuneConfig, "grpo_updates"))
    p.add_argument("--reward", help=describe(FinetuneConfig, "reward"))
    p.add_argument("--template", help=describe(FinetuneConfig, "template"))
    p.add_argument("--seed", type=int, help="the run's seed (data order, noise)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. finetune.kl_coef=0.1")


_METHOD_HELP = {"sft": "supervised: the response's likelihood given the prompt",
                "dpo": "direct preference optimisation, plus the chosen answers' NLL (finetune.nll_weight, 1; 0: the "
                "bare DPO loss)", "ipo": "identity preference optimisation",
                "simpo": "simple preference optimisation (no reference)",
                "grpo": "group relative policy optimisation with a reward"}


def _add_finetune_verb(sub) -> None:
    p = sub.add_parser("finetune", help="fine-tune a run: sft, dpo, ipo, simpo or grpo (dimba train's loop from the "
                       "run's weights, with another loss)",
                       description="A new run (--out) starts from the EMA weights, tokenizer and model of --init; "
                       "checkpoints, --resume, metrics.csv and the progress bar work as in dimba train.")
    msub = p.add_subparsers(dest="method", required=True)
    for method in FINETUNE_METHODS:
        m = msub.add_parser(method, help=_METHOD_HELP[method])
        _finetune_flags(m)
        m.set_defaults(func=cmd_finetune)


def add_finetune(sub) -> None:
    """The finetune and task subcommands."""
    _add_finetune_verb(sub)
    p = sub.add_parser("task", help="built-in verifiable tasks: write their rows, measure exact-match accuracy")
    tsub = p.add_subparsers(dest="tverb", required=True)
    t = tsub.add_parser("write", help="write rows of a built-in task (generated from --seed) as JSON lines")
    t.add_argument("name", help="arithmetic or reverse")
    t.add_argument("--kind", choices=["sft", "preference", "answer"], default="sft")
    t.add_argument("--n", type=int, default=1000, help="rows")
    t.add_argument("--split", choices=["train", "test"], default="train", help="test: held-out problems only")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--out", required=True, help="the .jsonl file to write (never overwritten)")
    t.set_defaults(func=cmd_task_write)
    t = tsub.add_parser("eval", help="exact-match accuracy of a model on held-out problems")
    t.add_argument("model", help=MODEL_HELP)
    t.add_argument("--task", required=True, help="arithmetic, reverse, or a .jsonl file of {prompt, answer}")
    t.add_argument("--problems", type=int, default=200, help="held-out problems")
    t.add_argument("--best-of", type=int, default=1, help="keep the most likely of K samples (the model's own "
                   "likelihood: exact for ar, an ELBO estimate for diffusion)")
    t.add_argument("--mc-samples", type=int, help="--best-of, diffusion families: ELBO samples per answer (default: "
                   "the family's, 16 for continuous and hybrid, 8 for masked)")
    sampler_flags(t)  # the model's own sampler settings where left out
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--json", action="store_true", help="print one JSON object")
    t.set_defaults(func=cmd_task_eval)
    t = tsub.add_parser("pairs", help="preference rows (for dpo / ipo / simpo) from a model's own wrong answers")
    t.add_argument("model", help=MODEL_HELP)
    t.add_argument("--task", required=True, help="arithmetic, reverse (training problems), or a .jsonl file of "
                   "{prompt, answer}")
    t.add_argument("--n", type=int, default=2000, help="problems to try")
    t.add_argument("--samples", type=int, default=4, help="answers drawn per problem; the first wrong one is kept")
    t.add_argument("--reward", default="exact_match", help="what counts as wrong: a reward below the reference "
                   "answer's (by name or module:function)")
    sampler_flags(t)  # the model's own sampler settings where left out
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--out", required=True, help="the .jsonl file to write (never overwritten)")
    t.set_defaults(func=cmd_task_pairs)
