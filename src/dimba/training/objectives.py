"""The losses of fine-tuning: supervised fine-tuning and preference optimisation (DPO, IPO, SimPO). `fit` takes a
step with an objective's ``loss`` instead of the family's pre-training loss; GRPO is in `dimba.training.grpo`.

SFT trains with the family's `dimba.families.Family.sft_loss`; the preference losses read the likelihood of a
response given its prompt from the model's family (`dimba.families.Family.response_nll`): exact for ar, a Monte
Carlo NELBO sample for the diffusion families. A preference loss draws that noise once per batch and scores the
policy and the frozen reference with it (VRPO's shared, antithetic noise: the difference of the two estimates has a
far lower variance than either).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class Objective:
    """A fine-tuning loss: ``metrics`` (the parts ``loss`` returns, logged in metrics.csv; ``loss`` and ``ce``
    always), ``loss(model, batch, generator)`` and ``validation(model, val)`` (the same at fixed noise)."""

    metrics: tuple[str, ...] = ("loss", "ce")

    def __init__(self, device: torch.device):
        self.device = device

    def loss(self, model, batch, generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict]:
        """``(loss, parts)`` on one micro-batch."""
        raise NotImplementedError

    @torch.no_grad()
    def validation(self, model, val) -> dict[str, float]:
        """The loss parts on the held-out rows at fixed noise (comparable from step to step), named ``val_*``."""
        was_training = model.training
        model.eval()
        _, parts = self.loss(model, val, torch.Generator().manual_seed(1234))
        model.train(was_training)
        return {f"val_{k}": float(v) for k, v in parts.items()}


class SFT(Objective):
    """Supervised fine-tuning: the family's `sft_loss` of the response given the clean prompt (the NLL for ar, the
    NELBO for masked, the training objective for the continuous families) with the diffusion settings ``dc``; the
    prompt and the padding are never scored."""

    def __init__(self, device: torch.device, dc):
        super().__init__(device)
        self.dc = dc

    def loss(self, model, rows, generator=None):
        loss, ce = model.family.sft_loss(model, rows.to(self.device), self.dc, generator)
        return loss, {"loss": loss.detach(), "ce": ce.detach()}


def response_noises(family, rows, count: int, generator: torch.Generator | None = None, full: bool = False,
                    t0: float | None = None) -> list:
    """``count`` independent draws of `Family.response_noise` on ``rows`` (one, None, when the likelihood is exact):
    the noises of a Monte Carlo likelihood estimate (`sequence_logp`); ``full``: of the one-pass surrogate; ``t0``:
    of the bound that stops at t_0 (continuous families)."""
    first = family.response_noise(rows, generator, full, t0)
    return [first] + ([family.response_noise(rows, generator, full, t0) for _ in range(count - 1)]
                      if first is not None else [])


def sequence_logp(model, rows, noises: list) -> torch.Tensor:
    """log p(response | prompt) of each row (B,), averaged over the noise draws ``noises`` (one estimate each)."""
    family = model.family
    return torch.stack([-family.response_nll(model, rows, noise).sum(-1) for noise in noises]).mean(0)


class Preference(Objective):
    """DPO, IPO or SimPO on batches of chosen rows followed by as many rejected rows.

    h = (log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l)); DPO: -log sigmoid(beta h) (Rafailov et al.
    2023); IPO: (h - 1 / (2 beta))^2 (Azar et al. 2023); SimPO, without a reference: -log sigmoid(beta (log pi(y_w)
    / |y_w| - log pi(y_l) / |y_l|) - gamma) (Meng et al. 2024). ``nll_weight`` adds that weight times ``ce`` (RPO,
    Pang et al. 2024). ``margin`` is h (SimPO: its length-normalised margin), ``acc`` the share of pairs with h > 0,
    ``ce`` the chosen responses' NLL per token. A diffusion family's log pi is ``mc_samples`` NELBO samples, or with
    ``one_pass`` as many per-token surrogates of one pass with the whole response noised each (d1, as GRPO's);
    ``t0``: the continuous families' bound stops at t_0 (a larger one is far less noisy), None: at its smallest time."""

    metrics = ("loss", "ce", "margin", "acc")

    def __init__(self, device, method: str, beta: float, gamma: float, mc_samples: int, reference=None,
                 nll_weight: float = 0.0, one_pass: bool = False, t0: float | None = None):
        super().__init__(device)
        self.method, self.beta, self.gamma, self.mc_samples, self.reference = method, beta, gamma, mc_samples, reference
        self.nll_weight, self.one_pass, self.t0 = nll_weight, one_pass, t0

    def loss(self, model, rows, generator=None):
        rows = rows.to(self.device)
        family, b = model.family, len(rows) // 2
        noises = response_noises(family, rows, self.mc_samples, generator, self.one_pass, self.t0)  # exact: one pass
        logp = sequence_logp(model, rows, noises)  # (2B,)
        tokens = rows.scored.sum(-1).clamp_min(1)  # (2B,)
        if self.method == "simpo":
            avg = logp / tokens  # (2B,)
            h = avg[:b] - avg[b:]  # (B,)
            loss = -F.logsigmoid(self.beta * h - self.gamma).mean()
        else:
            with torch.no_grad():
                ref = sequence_logp(self.reference, rows, noises)  # (2B,)
            ratio = logp - ref  # (2B,)
            h = ratio[:b] - ratio[b:]  # (B,)
            loss = (-F.logsigmoid(self.beta * h) if self.method == "dpo" else (h - 0.5 / self.beta) ** 2).mean()
        ce = -logp[:b].sum() / tokens[:b].sum()
        if self.nll_weight:
            loss = loss + self.nll_weight * ce
        return loss, {"loss": loss.detach(), "ce": ce.detach(), "margin": h.mean().detach(),
                      "acc": (h > 0).float().mean()}
