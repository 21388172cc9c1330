"""The families and their registry. ``ModelConfig.family`` names a registered `Family`; `get_family` finds it and
`register_family` adds one (a new family is a `Family` subclass in one module plus one registration)."""

from __future__ import annotations

from dimba.families.ar import ARFamily
from dimba.families.base import Family, Generation, LikelihoodEstimate
from dimba.families.continuous import ContinuousFamily, compute_dimba_losses
from dimba.families.hybrid import HybridFamily
from dimba.families.masked import MaskedFamily

_REGISTRY: dict[str, Family] = {}


def register_family(family: Family) -> Family:
    """Make ``family`` (an instance of a `Family` subclass) available under ``family.name``; returns it.
    Registering another family under a taken name replaces it."""
    if not isinstance(family, Family) or not family.name:
        raise ValueError(f"register_family takes a Family instance with a name, got {family!r}")
    _REGISTRY[family.name] = family
    return family


def unregister_family(name: str) -> None:
    """Remove the family called ``name`` from the registry (models of it can then no longer be built)."""
    _REGISTRY.pop(name, None)


def get_family(name: str) -> Family:
    """The registered family called ``name``; ValueError naming the registered ones otherwise."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown family {name!r}: choose one of {', '.join(family_names())}") from None


def family_names() -> list[str]:
    """The names of the registered families, built-in first."""
    return list(_REGISTRY)


def compute_losses(model, input_ids, dc, t=None, prompt_mask=None, drop_cond=False, self_cond_prob=None, noise=None,
                   generator=None):
    """The training objective of the model's family with the settings of a `DiffusionConfig` ``dc``:
    ``(loss, parts)`` (see `Family.loss`)."""
    return model.family.loss(model, input_ids, dc, t, prompt_mask, drop_cond, self_cond_prob, noise, generator)


for _family in (ContinuousFamily(), MaskedFamily(), HybridFamily(), ARFamily()):
    register_family(_family)


__all__ = ["Family", "Generation", "LikelihoodEstimate", "compute_dimba_losses", "compute_losses", "family_names",
           "get_family", "register_family", "unregister_family"]
