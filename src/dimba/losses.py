"""Training losses of the continuous family: (model, batch) -> (loss, parts)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dimba.diffusion.gaussian import min_snr_weight, v_target


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
                         drop_cond: bool | torch.Tensor = False, noise: torch.Tensor | None = None):
    """The continuous-family objective; returns ``(loss, parts)``.

    - ``mse``: min-SNR-gamma weighted regression of the x0 or v target (per ``prediction_type``),
      mean over latent dimensions and scored (non-prompt) positions;
    - ``ce``: cross-entropy of the output head on the x0 estimate (the rounding term);
    - ``recon``: cross-entropy of the head on the CLEAN latent z_0 (latent consistency: the
      latent must keep every token decodable, which also prevents embedding collapse), estimated on
      the first quarter of the batch.
    With self-conditioning, a first no-grad pass supplies x_self_cond with probability
    ``self_cond_prob`` (Chen et al. 2022). ``loss = mse + ce_w * ce + recon_w * recon``.
    """
    b = input_ids.shape[0]
    if t is None:
        t = stratified_times(b, input_ids.device)
    if noise is None:
        noise = torch.randn(input_ids.shape + (model.d_x,), device=input_ids.device)
    x_sc = None
    if model.config.self_conditioning and torch.rand(()) < self_cond_prob:
        with torch.no_grad():
            _, _, info = model(input_ids, t, noise=noise, prompt_mask=prompt_mask, drop_cond=drop_cond)
            x_sc = info["x0_hat"].detach()
    x_pred, noise, info = model(input_ids, t, noise=noise, prompt_mask=prompt_mask, x_self_cond=x_sc, drop_cond=drop_cond)
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
