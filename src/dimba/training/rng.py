"""Every global random generator's state (torch CPU and CUDA, Python ``random``, NumPy), saved in checkpoints so
that a resumed run draws exactly what an uninterrupted one would; and the seed of a model's initial weights."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def rng_state() -> dict[str, Any]:
    """Every global RNG state as tensors, lists and numbers, so that ``torch.load(weights_only=True)`` reads it
    back."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(gauss)]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any] | torch.Tensor) -> None:
    """Restore what `rng_state` captured (CUDA only where as many devices are visible)."""
    if isinstance(state, torch.Tensor):  # a checkpoint from before the other generators were saved
        torch.set_rng_state(state)
        return
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def init_seed(seed: int) -> int:
    """The seed of a model's initial weights in a run seeded ``seed``: a splitmix64 mix of it, never a seed a user
    types. Initialised from ``seed`` itself, a model's weights would be the stream that
    ``torch.Generator().manual_seed(seed)`` draws when the same seed samples from it: a continuous sampler's initial
    noise would replay the initial embedding table (rows of the codebook in id order, decoded as word salad)."""
    z = (seed + 0x9E3779B97F4A7C15) % 2**64
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9 % 2**64
    z = (z ^ (z >> 27)) * 0x94D049BB133111EB % 2**64
    return (z ^ (z >> 31)) % 2**63
