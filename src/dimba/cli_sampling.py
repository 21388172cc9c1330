"""The sampler flags shared by the verbs that generate (`dimba generate`, `sample-quality`, `task eval`, and `eval`'s
hidden old spelling of `sample-quality`) and the `SampleConfig` they give: a run's own `sample` config, overridden by
the flags given. (`dimba serve` takes the same settings per request: `dimba.serve.schema`.)"""

from __future__ import annotations

import argparse

from dimba.config import SAMPLE_NAMES, SampleConfig, choices, describe
from dimba.errors import UsageError
from dimba.loading import sample_defaults


def sample_settings(args: argparse.Namespace) -> SampleConfig:
    """The run's `sample` config (an export folder's sampler defaults), overridden by the flags given."""
    from pydantic import ValidationError

    base = sample_defaults(args.model)
    given = {field: getattr(args, flag) for flag, field in SAMPLE_NAMES.items() if getattr(args, flag, None) is not None}
    try:
        return SampleConfig(**{**base.model_dump(), **given})
    except ValidationError as err:
        first = err.errors()[0]
        flag = next(f for f, field in SAMPLE_NAMES.items() if field == first["loc"][0])
        raise UsageError(f"--{flag.replace('_', '-')} {first['input']!r}: {first['msg']}") from None


def sampler_flags(p: argparse.ArgumentParser, hidden: bool = False) -> None:
    """The sampler settings of `SampleConfig` a run's `sample` config provides when left out."""
    h = (lambda text: argparse.SUPPRESS) if hidden else (lambda text: text)
    p.add_argument("--steps", type=int, help=h("denoising steps (diffusion families)"))
    p.add_argument("--guidance", type=float, help=h("classifier-free guidance scale"))
    p.add_argument("--temperature", type=float, help=h("0 = greedy"))
    p.add_argument("--top-k", type=int, help=h("sample among the k most likely tokens"))
    p.add_argument("--top-p", type=float, help=h("sample within the nucleus of this mass"))
    p.add_argument("--eta", type=float, help=h("0 = DDIM, 1 = ancestral"))
    p.add_argument("--remasking", choices=choices(SampleConfig, "remasking"),
                   help=h(describe(SampleConfig, "remasking")))
    p.add_argument("--block-length", type=int, help=h(describe(SampleConfig, "block_length")))
    p.add_argument("--unmask-threshold", type=float, help=h(describe(SampleConfig, "unmask_threshold")))
    p.add_argument("--unmask-entropy", type=float, help=h(describe(SampleConfig, "unmask_entropy")))
    p.add_argument("--dual-cache", action="store_true", default=None, help=h(describe(SampleConfig, "dual_cache")))
    p.add_argument("--guide-model", help=h(describe(SampleConfig, "guide_model")))
    p.add_argument("--score-temperature", type=float, help=h(describe(SampleConfig, "score_temperature")))
    p.add_argument("--commit", choices=choices(SampleConfig, "commit"), help=h(describe(SampleConfig, "commit")))
