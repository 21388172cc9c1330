"""Training losses per family: (model, batch) -> (loss, parts); `compute_losses` dispatches."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dimba.diffusion.gaussian import min_snr_weight, v_target
from dimba.diffusion.masked import mask_tokens, subs_log_probs


def stratified_times(batch: int, device: torch.device, generator: torch.Generator | None = None,
                     t_min: float = 1e-4) -> torch.Tensor:
    """Low-discrepancy t in [t_min, 1]: one uniform offset, then evenly spaced across the batch."""
    u = torch.rand((), device=device, generator=generator)
    t = (u + torch.arange(batch, device=device) / batch) % 1.0  # (B,)
    return t_min + (1 - t_min) * t


def random_prompt_mask(batch: int, length: int, prob: float, device: torch.device,
                       generator: torch.Generator | None = None) -> torch.Tensor | None:
    """Per-sequence clean prompt prefixes: with probability ``prob`` a prefix of 1..L/2 tokens."""
    if prob <= 0:
        return None
    has = torch.rand(batch, device=device, generator=generator) < prob  # (B,)
    n = torch.randint(1, max(2, length // 2 + 1), (batch,), device=device, generator=generator)  # (B,)
    pos = torch.arange(length, device=device)[None]  # (1, L)
    return (pos < n[:, None]) & has[:, None]  # (B, L)


def _masked_mean(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return (x * weight).sum() / weight.sum().clamp_min(1)


def compute_dimba_losses(model, input_ids: torch.Tensor, t: torch.Tensor | None = None, ce_loss_weight: float = 1.0,
                         min_snr_gamma: float = 5.0, prompt_mask: torch.Tensor | None = None,
                         recon_loss_weight: float = 1.0, self_cond_prob: float = 0.5,
                         drop_cond: bool | torch.Tensor = False, noise: torch.Tensor | None = None,
                         generator: torch.Generator | None = None):
    """The continuous-family objective; returns ``(loss, parts)``.

    - ``mse``: min-SNR-gamma weighted regression of the x0 or v target (per ``prediction_type``),
      mean over latent dimensions and scored (non-prompt) positions;
    - ``ce``: cross-entropy of the output head on the x0 estimate (the rounding term);
    - ``recon``: cross-entropy of the head on the CLEAN latent z_0 (latent consistency: the
      latent must keep every token decodable, which also prevents embedding collapse), estimated on
      the first quarter of the batch.
    With self-conditioning, a first no-grad pass supplies x_self_cond with probability
    ``self_cond_prob`` (Chen et al. 2022). ``loss = mse + ce_w * ce + recon_w * recon``.

    The hybrid family uses the same objective: its absorbed positions are scored like the noisy
    ones (x0 regression and rounding CE from no latent information at all). ``generator``
    draws t, noise and the hybrid masks when they are not given.
    """
    b = input_ids.shape[0]
    dev = input_ids.device
    if t is None:
        t = stratified_times(b, dev, generator)
    if noise is None:
        noise = torch.randn(input_ids.shape + (model.d_x,), device=dev, generator=generator)
    masked = None
    if model.family == "hybrid":
        alpha = model.mask_schedule.alpha(model.schedule.to_continuous(torch.as_tensor(t, device=dev)).expand(b))
        masked = mask_tokens(input_ids, alpha, model.mask_id, generator=generator)[1]  # (B, L)
    x_sc = None
    if model.config.self_conditioning and torch.rand((), generator=generator) < self_cond_prob:
        with torch.no_grad():
            _, _, info = model(input_ids, t, noise=noise, prompt_mask=prompt_mask, drop_cond=drop_cond, masked=masked)
            x_sc = info["x0_hat"].detach()
    x_pred, noise, info = model(input_ids, t, noise=noise, prompt_mask=prompt_mask, x_self_cond=x_sc, drop_cond=drop_cond,
                                masked=masked)
    scored = torch.ones_like(input_ids, dtype=torch.float32)  # (B, L)
    if info["prompt_mask"] is not None:
        scored = (~info["prompt_mask"]).float()

    z0, ab = info["z0"], info["alpha_bar"]
    target = v_target(z0, noise, ab) if model.config.prediction_type == "v" else z0
    w = min_snr_weight(model.schedule.snr(info["t"]), min_snr_gamma, model.config.prediction_type)  # (B,)
    sq = (x_pred.float() - target.float()).pow(2).mean(-1)  # (B, L)
    mse = _masked_mean(sq * w[:, None], scored)

    logits = model.decode(info["x0_hat"])  # (B, L, V)
    ce_tok = F.cross_entropy(logits.transpose(1, 2), input_ids, reduction="none")  # (B, L)
    ce = _masked_mean(ce_tok, scored)
    n_rec = max(1, b // 4)  # the clean-latent term is easy: a quarter of the batch estimates it at a quarter of the cost
    recon = F.cross_entropy(model.decode(z0[:n_rec]).transpose(1, 2), input_ids[:n_rec])

    loss = mse + ce_loss_weight * ce + recon_loss_weight * recon
    acc = _masked_mean((logits.argmax(-1) == input_ids).float(), scored)
    parts = {"loss": loss.detach(), "mse": mse.detach(), "ce": ce.detach(), "recon": recon.detach(), "acc": acc.detach()}
    return loss, parts


def compute_masked_losses(model, input_ids: torch.Tensor, t: torch.Tensor | None = None,
                          prompt_mask: torch.Tensor | None = None, drop_cond: bool | torch.Tensor = False,
                          generator: torch.Generator | None = None, t_min: float = 1e-3):
    """The continuous-time MDLM objective (masked family); returns ``(loss, parts)``.

    Tokens outside the clean prompt are masked with probability 1 - alpha(t) (t stratified across
    the batch: antithetic / low-discrepancy), and ``loss`` = sum over masked positions of
    w(t) * (-log p_SUBS(x_0 | x_t)) divided by the number of scored (non-prompt) tokens: the
    NELBO per token, in nats. ``ce`` is the unweighted mean CE on masked positions.
    """
    b = input_ids.shape[0]
    dev = input_ids.device
    if t is None:
        t = stratified_times(b, dev, generator, t_min=t_min)
    drop = torch.as_tensor(drop_cond, device=dev).expand(b)  # (B,)
    if prompt_mask is not None:
        prompt_mask = prompt_mask & ~drop[:, None]  # (B, L)
    x_t, masked = mask_tokens(input_ids, model.mask_schedule.alpha(t), model.mask_id, keep=prompt_mask,
                              generator=generator)  # (B, L) each
    logp = subs_log_probs(model.token_logits(x_t, prompt_mask, drop), x_t, model.mask_id)  # (B, L, V)
    nll = -logp.gather(-1, input_ids[..., None])[..., 0].masked_fill(~masked, 0.0)  # (B, L)
    scored = torch.ones_like(nll) if prompt_mask is None else (~prompt_mask).float()  # (B, L)
    loss = (nll * model.mask_schedule.weight(t)[:, None]).sum() / scored.sum().clamp_min(1)
    m = masked.float()
    ce = _masked_mean(nll, m)
    acc = _masked_mean((logp.argmax(-1) == input_ids).float(), m)
    return loss, {"loss": loss.detach(), "ce": ce.detach(), "acc": acc.detach()}


def compute_ar_losses(model, input_ids: torch.Tensor):
    """Next-token cross-entropy on every position (ar family); returns ``(loss, parts)``."""
    logits = model.token_logits(input_ids)[:, :-1]  # (B, L-1, V)
    target = input_ids[:, 1:]  # (B, L-1)
    loss = F.cross_entropy(logits.transpose(1, 2), target)
    acc = (logits.argmax(-1) == target).float().mean()
    return loss, {"loss": loss.detach(), "ce": loss.detach(), "acc": acc.detach()}


def compute_losses(model, input_ids: torch.Tensor, dc, t: torch.Tensor | None = None,
                   prompt_mask: torch.Tensor | None = None, drop_cond: bool | torch.Tensor = False,
                   self_cond_prob: float | None = None, noise: torch.Tensor | None = None,
                   generator: torch.Generator | None = None):
    """The training objective of ``model.family`` with the settings of a `DiffusionConfig` ``dc``.

    The ar family ignores the prompt: every next token is scored.
    """
    if model.family == "ar":
        return compute_ar_losses(model, input_ids)
    if model.family == "masked":
        return compute_masked_losses(model, input_ids, t, prompt_mask, drop_cond, generator)
    sc = dc.self_cond_prob if self_cond_prob is None else self_cond_prob
    return compute_dimba_losses(model, input_ids, t, dc.ce_loss_weight, dc.min_snr_gamma, prompt_mask,
                                dc.recon_loss_weight, sc, drop_cond, noise, generator)
