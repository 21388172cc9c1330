"""The hybrid family: a per-token mix of the two corruptions at a shared t.

Each response token is absorbed with probability 1 - alpha(t) of the mask schedule (its latent is zeroed and a
learned "masked" flag is added to its input), and every other token gets the Gaussian noise of the continuous
family at the same t. At t = 1 everything is absorbed, at t = 0 everything is clean. The objective is the
continuous one on all response positions (not a likelihood bound); sampling is `dimba.samplers.hybrid`; the
likelihood is the bound of `dimba.families.gaussian_bound` with the absorbing reveal term.
"""

from __future__ import annotations

import torch

from dimba.diffusion.masked import mask_tokens
from dimba.families.continuous import ContinuousFamily
from dimba.samplers.hybrid import HybridSampler


class HybridFamily(ContinuousFamily):
    """The continuous family whose tokens may also be absorbed (see the module docstring)."""

    name = "hybrid"
    description = "A hybrid (per-token masked or Gaussian) diffusion language model"
    input_flags = 3
    absorbing = True
    # no commit: the hybrid sampler reveals absorbed tokens itself
    sample_settings = tuple(s for s in ContinuousFamily.sample_settings if s != "commit")

    def check_config(self, cfg) -> None:
        if cfg.prediction_type == "v":
            raise ValueError("family=hybrid needs prediction_type=x0 or logits (a masked position has no noisy latent "
                             "to form v from)")

    def draw_absorbed(self, model, input_ids: torch.Tensor, t: torch.Tensor,
                      generator: torch.Generator | None = None) -> torch.Tensor:
        """Each token absorbed with probability 1 - alpha(t) of the mask schedule: (B, L) bool."""
        return mask_tokens(input_ids, model.mask_schedule.alpha(t), model.mask_id, generator=generator)[1]

    def sampler(self, model, settings, codebook: torch.Tensor | None):
        """Ancestral unmasking + x0-DDIM, revealed positions starting from tokens drawn with the settings."""
        return HybridSampler(model.schedule, model.mask_schedule, codebook, settings.eta, settings.temperature,
                             settings.top_k, settings.top_p, model.time_warp)
