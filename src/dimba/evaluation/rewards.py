"""Rewards of generated answers (GRPO, best-of-K): a function ``reward(completion, answer) -> float``, by name or
import path. The built-in rewards check the answer; none rewards token overlap (which teaches copying)."""

from __future__ import annotations

import importlib
import re
from typing import Callable

from dimba.errors import UsageError

Reward = Callable[[str, str], float]
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def exact_match(completion: str, answer: str) -> float:
    """1.0 when the completion, stripped of surrounding whitespace, is the answer exactly, else 0.0."""
    return float(completion.strip() == answer.strip())


def numeric(completion: str, answer: str) -> float:
    """1.0 when the first number in the completion equals the answer's value, else 0.0."""
    found = _NUMBER.search(completion)
    try:
        return float(found is not None and float(found.group()) == float(answer))
    except ValueError:
        return 0.0


REWARDS: dict[str, Reward] = {"exact_match": exact_match, "numeric": numeric}


def get_reward(spec: str) -> Reward:
    """A reward by name (``exact_match``, ``numeric``) or import path ``module:function``."""
    if spec in REWARDS:
        return REWARDS[spec]
    module_name, _, attr = spec.partition(":")
    if not attr:
        raise UsageError(f"unknown reward {spec!r}: choose {', '.join(REWARDS)} or give module:function")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise UsageError(f"reward {spec!r} cannot be imported ({type(exc).__name__}): check the module:function path"
                         ) from None
    if not callable(fn):
        raise UsageError(f"reward {spec!r} is not a function: give module:function of a (completion, answer) -> float")
    return fn
