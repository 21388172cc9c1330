"""Fine-tuning on a built-in verifiable task: base -> SFT -> (DPO, GRPO), exact match on held-out problems, and
best-of-8 against best-of-1 (for the SFT stages trained from the base), per family and seed; each stage's
wall-clock. Prints one JSON object (and writes it with --out).

    python bench/finetune_tasks.py --base runs/base-masked --seeds 0,1,2 --out bench/ft_masked_sft4k

The SFT stage trains 4,000 steps at lr 2e-3 (the tiny masked model learns the units digit only after about 2,000);
``sft300`` is the first round's 300 steps at lr 5e-4.

The base run is a `dimba train --data task:arithmetic` run; every stage is the library's `finetune` (the CLI's
`dimba finetune`), every score `exact_match` (`dimba task eval`). A stage named in ``ON_POLICY`` trains on the
preference rows of its parent's own wrong answers (`self_preference_rows`, `dimba task pairs`: 2,000 training
problems, 4 samples each at temperature 1), written beside the runs.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from dimba.config import SampleConfig
from dimba.data.tasks import problems, task_of
from dimba.data.finetune import task_rows
from dimba.evaluation.exact_match import exact_match, self_preference_rows
from dimba.loading import load_for_inference, sample_defaults
from dimba.training import finetune

STAGES = {  # method, parent stage, overrides
    "sft": ("sft", "base", ["train.max_steps=4000", "train.lr=2e-3", "train.warmup_steps=50", "train.eval_every=250",
                            "train.save_every=1000"]),
    "sft300": ("sft", "base", ["train.max_steps=300", "train.lr=5e-4"]),
    "dpo": ("dpo", "sft", ["train.max_steps=100", "train.lr=1e-4", "finetune.beta=0.1"]),
    "grpo": ("grpo", "sft", ["train.max_steps=60", "train.lr=1e-4", "train.batch_size=4", "finetune.group_size=8",
                             "finetune.val_rows=16", "train.eval_every=30"]),
    "grpo_base": ("grpo", "base", ["train.max_steps=200", "train.lr=1e-4", "train.batch_size=4", "finetune.group_size=8",
                                   "finetune.val_rows=16", "train.eval_every=50"]),
    "grpo_dr": ("grpo", "sft", ["train.max_steps=200", "train.lr=1e-4", "train.batch_size=4", "finetune.group_size=8",
                                "finetune.val_rows=16", "train.eval_every=50", "finetune.scale_rewards=false"]),
    "sft2k": ("sft", "base", ["train.max_steps=2000", "train.lr=2e-3", "train.warmup_steps=50", "train.eval_every=250",
                              "train.save_every=1000"]),
    "grpo_mid": ("grpo", "sft2k", ["train.max_steps=300", "train.lr=5e-4", "train.batch_size=4", "finetune.group_size=8",
                                   "finetune.val_rows=16", "train.eval_every=100"]),
    "grpo_mid_elbo": ("grpo", "sft2k", ["train.max_steps=300", "train.lr=5e-4", "train.batch_size=4",
                                        "finetune.group_size=8", "finetune.val_rows=16", "train.eval_every=100",
                                        "finetune.grpo_likelihood=elbo"]),
    "grpo_mid_t05": ("grpo", "sft2k", ["train.max_steps=400", "train.lr=1e-4", "train.batch_size=8",
                                       "finetune.group_size=8", "finetune.val_rows=16", "train.eval_every=100",
                                       "finetune.grpo_likelihood=elbo", "finetune.group_temperature=0.5"]),
    "grpo_mid_lr1e3": ("grpo", "sft2k", ["train.max_steps=400", "train.lr=1e-3", "train.batch_size=8",
                                         "finetune.group_size=8", "finetune.val_rows=16", "train.eval_every=100",
                                         "finetune.grpo_likelihood=elbo", "finetune.group_temperature=0.5"]),
    "dpo_mid": ("dpo", "sft2k", ["train.max_steps=100", "train.lr=1e-4", "finetune.beta=0.1"]),
    # from the unfinished SFT: 300 more SFT steps, and DPO / DPO + NLL (RPO) at the same steps and lr
    "sft_mid_more": ("sft", "sft2k", ["train.max_steps=300", "train.lr=5e-4", "train.eval_every=100"]),
    "dpo_mid300": ("dpo", "sft2k", ["train.max_steps=300", "train.lr=5e-4", "train.eval_every=100",
                                    "finetune.beta=0.1"]),
    "rpo_mid300": ("dpo", "sft2k", ["train.max_steps=300", "train.lr=5e-4", "train.eval_every=100", "finetune.beta=0.1",
                                    "finetune.nll_weight=1.0"]),
    "ipo_mid300": ("ipo", "sft2k", ["train.max_steps=300", "train.lr=5e-4", "train.eval_every=100",
                                    "finetune.beta=0.1"]),
    "simpo_mid300": ("simpo", "sft2k", ["train.max_steps=300", "train.lr=5e-4", "train.eval_every=100",
                                        "finetune.beta=2.0", "finetune.simpo_gamma=0.5"]),
    "dpo_mid_self": ("dpo", "sft2k", ["train.max_steps=300", "train.lr=5e-4", "train.eval_every=100",
                                      "finetune.beta=0.1"]),
    "rpo_mid_self": ("dpo", "sft2k", ["train.max_steps=300", "train.lr=5e-4", "train.eval_every=100",
                                      "finetune.beta=0.1", "finetune.nll_weight=1.0"]),
    "grpo_mid_mu4": ("grpo", "sft2k", ["train.max_steps=1200", "train.lr=1e-4", "train.batch_size=4",
                                       "finetune.group_size=8", "finetune.val_rows=16", "train.eval_every=400",
                                       "train.save_every=100", "finetune.grpo_updates=4",
                                       "finetune.group_temperature=0.7"]),
    # from an SFT with room above it (3,000 steps: 69-78 %); GRPO from it for thousands of steps: grpo_3k_N below
    "sft3k": ("sft", "base", ["train.max_steps=3000", "train.lr=2e-3", "train.warmup_steps=50", "train.eval_every=500",
                              "train.save_every=500"]),
    "grpo_long": ("grpo", "sft", ["train.max_steps=200", "train.lr=3e-4", "train.batch_size=4", "finetune.group_size=8",
                                  "finetune.val_rows=16", "train.eval_every=50"]),
}

# the same stages on top of the first round's short SFT (300 steps at lr 5e-4: ar 80 %), e.g. dpo_p300
for _name in ("sft_mid_more", "dpo_mid300", "rpo_mid300", "ipo_mid300", "simpo_mid300", "dpo_mid_self"):
    STAGES[_name.replace("mid300", "p300").replace("mid", "p300")] = (STAGES[_name][0], "sft300", STAGES[_name][2])
for _parent, _tag in (("sft3k", "3k"), ("sft300", "p300"), ("sft2k", "mid")):  # GRPO at a stable lr, long
    for _steps in (1000, 2000, 4000):  # e.g. grpo_3k_2000, grpo_p300_4000, grpo_mid_1000
        STAGES[f"grpo_{_tag}_{_steps}"] = ("grpo", _parent, [f"train.max_steps={_steps}", "train.lr=2e-4",
                                                            "train.batch_size=8", "finetune.group_size=8",
                                                            "finetune.val_rows=16", "train.eval_every=1000",
                                                            "train.save_every=500"])
for _lr in ("1e-5", "5e-5"):  # plain DPO below the lr 5e-4 at which ar lost 16.8 points, e.g. dpo_p300_self_lr1e-5
    for _data in ("", "_self"):
        STAGES[f"dpo_p300{_data}_lr{_lr}"] = ("dpo", "sft300", ["train.max_steps=300", f"train.lr={_lr}",
                                                                "train.eval_every=100", "finetune.beta=0.1"])
for _beta in ("0.5", "2"):  # plain DPO with a larger beta (the margin saturates sooner), e.g. dpo_p300_b2_lr2e-4
    for _lr in ("5e-5", "2e-4"):
        STAGES[f"dpo_p300_b{_beta}_lr{_lr}"] = ("dpo", "sft300", ["train.max_steps=300", f"train.lr={_lr}",
                                                                  "train.eval_every=100", f"finetune.beta={_beta}"])
for _name in ("dpo_mid300", "rpo_mid300", "dpo_mid_self", "rpo_mid_self"):  # scored by the one-pass surrogate
    STAGES[_name.replace("300", "") + "_1p"] = (STAGES[_name][0], "sft2k", STAGES[_name][2] + [
        "finetune.preference_likelihood=one_pass"])  # e.g. dpo_mid_1p, rpo_mid_self_1p
for _name in ("dpo_mid300", "rpo_mid300"):  # the ELBO stopped at t_0 = 0.6 / 0.8 (far less noisy), e.g. rpo_mid_t06
    for _t0 in ("0.6", "0.8"):
        STAGES[_name.replace("300", "") + "_t0" + _t0[-1]] = (STAGES[_name][0], "sft2k", STAGES[_name][2] + [
            f"finetune.preference_t0={_t0}"])
for _method, _parent, _overrides in STAGES.values():  # dpo_* stages: the bare DPO loss (dimba's dpo adds the NLL)
    if _method == "dpo" and not any(o.startswith("finetune.nll_weight") for o in _overrides):
        _overrides.append("finetune.nll_weight=0")
ON_POLICY = tuple(name for name in STAGES if "_self" in name)  # stages whose rejected answers are their parent's own


def run_sample(run: Path, given: dict, steps: int, temperature: float) -> SampleConfig:
    """The run's own sampler settings with the settings ``given`` (``--sample``), ``steps`` and ``temperature``."""
    return SampleConfig.model_validate({**sample_defaults(run).model_dump(), **given, "num_steps": steps,
                                        "temperature": temperature})


def self_pairs(parent: Path, task: str, seed: int, steps: int, given: dict, out: Path) -> str:
    """The file of preference rows from ``parent``'s own wrong answers (written once): the stage's data."""
    if not out.is_file():
        model, tok = load_for_inference(parent)
        rows = self_preference_rows(model, tok, task_rows(task, "answer", 2000, seed, "train"),
                                    run_sample(parent, given, steps, 1.0), 4, seed)
        out.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(out)


def score(run: Path, probs, steps: int, best_of: bool, seed: int, given: dict, mc_samples: int) -> dict:
    """Greedy exact match, and sampled (temperature 1) best-of-1 and best-of-8 (``mc_samples`` likelihood samples
    per candidate) when ``best_of``; the run's own sampler settings otherwise (as `dimba task eval`), with the
    settings ``given`` (``--sample``)."""
    model, tok = load_for_inference(run)
    out = {"greedy": exact_match(model, tok, probs, run_sample(run, given, steps, 0.0), seed=seed)}
    if best_of:
        for k in (1, 8):
            out[f"sampled_best_of_{k}"] = exact_match(model, tok, probs, run_sample(run, given, steps, 1.0),
                                                      best_of=k, seed=seed, mc_samples=mc_samples)
    return {k: v["accuracy"] for k, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", required=True, help="a run trained on task:NAME")
    ap.add_argument("--task", default="task:arithmetic")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--stages", default="sft,dpo,grpo")
    ap.add_argument("--problems", type=int, default=200)
    ap.add_argument("--steps", type=int, default=24, help="denoising steps of generation")
    ap.add_argument("--work", default="/tmp/dimba_ft_bench", help="where the runs are written")
    ap.add_argument("--out", help="write PREFIX.json")
    ap.add_argument("--no-best-of", action="store_true", help="greedy scores only (no best-of-1 / best-of-8)")
    ap.add_argument("--mc-samples", type=int, default=4, help="best-of-8: likelihood samples per candidate "
                    "(diffusion families)")
    ap.add_argument("--sample", default="", help="sampler settings KEY=VALUE,... for scoring and GRPO's groups "
                    "(e.g. commit=none)")
    args = ap.parse_args()
    given = dict(kv.split("=", 1) for kv in args.sample.split(",") if kv)
    torch.set_num_threads(1)
    probs = problems(task_of(args.task), args.problems, 0, "test")
    base = Path(args.base)
    work = Path(args.work) / base.name
    base_scores = score(base, probs, args.steps, not args.no_best_of, 0, given, args.mc_samples)
    result = {"base": str(base), "task": args.task, "problems": args.problems, "stages": STAGES,
              "sample": given, "scores": {"base": base_scores}, "seconds": {}}
    print(json.dumps(result["scores"]["base"]), flush=True)
    for seed in [int(s) for s in args.seeds.split(",")]:
        runs = {"base": base}
        for stage in args.stages.split(","):
            method, parent, overrides = STAGES[stage]
            runs[stage] = work / f"{stage}-s{seed}"
            start = time.perf_counter()
            if not (runs[stage] / "checkpoints" / "last.ckpt").is_file():
                data = args.task if stage not in ON_POLICY else self_pairs(
                    runs[parent], args.task, seed, args.steps, given, work / f"pairs-{parent}-s{seed}.jsonl")
                finetune(runs[parent], method, data, runs[stage], overrides + [f"train.seed={seed}",
                         "train.num_threads=1"] + [f"sample.{k}={v}" for k, v in given.items()], progress=False)
            result["seconds"][f"{stage}-s{seed}"] = round(time.perf_counter() - start, 1)
            result["scores"][f"{stage}-s{seed}"] = score(runs[stage], probs, args.steps, parent == "base" and
                                                         not args.no_best_of, seed, given, args.mc_samples)
            print(stage, seed, json.dumps(result["scores"][f"{stage}-s{seed}"]), result["seconds"][f"{stage}-s{seed}"],
                  flush=True)
    print(json.dumps(result))
    if args.out:
        Path(args.out + ".json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
