"""The absorbing-state ([MASK]) process of masked diffusion (MDLM, Sahoo et al. 2024; MD4, Shi et al. 2024).

A token stays clean at time t with probability alpha(t) and is replaced by [MASK] otherwise.
With alpha(0) = 1 and alpha(1) = 0, the continuous-time negative ELBO is (MDLM eq. 10)

    NELBO = E_t [ w(t) * sum_{l masked in x_t} -log p_theta(x_0^l | x_t) ],   w(t) = -alpha'(t) / (1 - alpha(t)),

under the SUBS parameterisation: the model never predicts [MASK] and carries unmasked tokens over.
"""

from __future__ import annotations

import math

import torch

MASK_SCHEDULES = ("loglinear", "cosine")


class MaskSchedule:
    """alpha(t), the probability that a token is still clean at time t in [0, 1], and the ELBO weight.

    - ``loglinear``: alpha(t) = 1 - t, w(t) = 1 / t (MDLM's log-linear noise sigma(t) = -log(1 - t));
    - ``cosine``: alpha(t) = 1 - sin(pi t / 2) (MD4's cosine), w(t) = (pi/2) cos(pi t / 2) / sin(pi t / 2).
    """

    def __init__(self, kind: str = "loglinear"):
        if kind not in MASK_SCHEDULES:
            raise ValueError(f"unknown mask schedule {kind!r}: choose one of {', '.join(MASK_SCHEDULES)}")
        self.kind = kind

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        if self.kind == "loglinear":
            return 1 - t
        return 1 - torch.sin(0.5 * math.pi * t)

    def weight(self, t: torch.Tensor) -> torch.Tensor:
        """The NELBO weight -alpha'(t) / (1 - alpha(t)), for t in (0, 1]."""
        if self.kind == "loglinear":
            return 1 / t
        half = 0.5 * math.pi * t
        return 0.5 * math.pi * torch.cos(half) / torch.sin(half)


def mask_tokens(input_ids: torch.Tensor, alpha: torch.Tensor, mask_id: int, keep: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample x_t ~ q(x_t | x_0): each token is masked with probability 1 - alpha, alpha (B,) per row or (B, L)
    per position.

    ``keep`` (B, L) bool marks positions never masked (a clean prompt). Returns (x_t, masked),
    both (B, L).
    """
    u = torch.rand(input_ids.shape, device=input_ids.device, generator=generator)  # (B, L)
    masked = u >= (alpha if alpha.dim() == 2 else alpha[:, None])  # (B, L)
    if keep is not None:
        masked = masked & ~keep
    return torch.where(masked, torch.full_like(input_ids, mask_id), input_ids), masked


def subs_log_probs(logits: torch.Tensor, x_t: torch.Tensor, mask_id: int) -> torch.Tensor:
    """SUBS parameterisation: log p(x_0 | x_t), (B, L, V), in float32 (float64 for float64 logits).

    [MASK] gets probability zero everywhere; an unmasked position puts all its mass on its own token.
    """
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32), copy=True)
    logits[..., mask_id] = float("-inf")
    logp = logits.log_softmax(-1)  # (B, L, V)
    clean = (x_t != mask_id)[..., None]  # (B, L, 1)
    carried = torch.full_like(logp, float("-inf")).scatter(-1, x_t[..., None], 0.0)  # (B, L, V)
    return torch.where(clean, carried, logp)
