"""The generation loop: prompt -> canvas -> model -> sampler.step, with guidance and self-conditioning."""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from dimba.diffusion.gaussian import q_sample
from dimba.samplers.categorical import sample_tokens
from dimba.samplers.ddim import DDIMSampler


def _prompt_tensor(prompt_ids, num_samples: int, device: torch.device) -> torch.Tensor:
    if prompt_ids is None:
        return torch.zeros(num_samples, 0, dtype=torch.long, device=device)
    p = torch.as_tensor(prompt_ids, dtype=torch.long, device=device)
    if p.dim() == 1:
        p = p[None].expand(num_samples, -1)
    return p  # (N, P)


@torch.no_grad()
def sample_from_model(model, prompt_ids: Sequence[int] | torch.Tensor | None = None, seq_len: int = 100,
                      num_steps: int = 50, temperature: float = 1.0, top_k: int | None = None,
                      top_p: float | None = None, guidance_scale: float = 1.0, eta: float = 0.0,
                      num_samples: int = 1, clamp: str = "none", generator: torch.Generator | None = None,
                      callback: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None) -> torch.Tensor:
    """Generate ``seq_len`` tokens after a clean prompt with x0-DDIM; returns ids (N, P + seq_len).

    The prompt is kept clean in the canvas and conditions the denoiser. With
    ``guidance_scale`` w != 1 the x0 estimate is x0_u + w (x0_c - x0_u) (classifier-free
    guidance), x0_u coming from a pass with the prompt dropped (its positions noised to t).
    With self-conditioning the previous x0 estimate is fed back. The final latent is decoded
    by the output head and sampled with temperature / top-k / top-p in float64.
    ``clamp`` moves each x0 estimate onto the token embeddings before the DDIM step: ``soft``
    to the probability-weighted mean of the codebook under the head's logits (score
    interpolation, Dieleman et al. 2022), ``hard`` to the most likely token's latent (the
    clamping trick of Li et al. 2022), ``none`` keeps the regression output.
    ``callback(i, t, x0_hat)`` is called after every step.
    """
    if clamp not in ("none", "soft", "hard"):
        raise ValueError(f"clamp must be 'none', 'soft' or 'hard', got {clamp!r}")
    model.eval()
    device = next(model.parameters()).device
    prompt = _prompt_tensor(prompt_ids, num_samples, device)  # (N, P)
    n, p = prompt.shape
    length = p + seq_len
    ids = torch.cat([prompt, torch.zeros(n, seq_len, dtype=torch.long, device=device)], dim=1)  # (N, L)
    prompt_mask = torch.arange(length, device=device)[None].expand(n, -1) < p  # (N, L)
    z_prompt = model.encode(ids)  # (N, L, d): only the prompt positions are used

    book = model.codebook() if clamp != "none" else None  # (V, d)
    sampler = DDIMSampler(model.schedule, eta=eta)
    times = sampler.set_timesteps(num_steps, device)
    shape = (n, length, model.d_x)
    z = torch.randn(shape, device=device, generator=generator)  # z_1: alpha_bar(1) = 0
    prompt_noise = torch.randn(shape, device=device, generator=generator)
    keep = prompt_mask[..., None]  # (N, L, 1)
    z = torch.where(keep, z_prompt, z)
    guided = guidance_scale != 1.0 and p > 0
    x_sc = None
    x0 = z
    for i, t in enumerate(times):
        tb = t.expand(n)  # (N,)
        ab = model.schedule.alpha_bar(tb)  # (N,)
        cond = model.condition(ids, tb, prompt_mask)
        x0 = model.x0_from_output(model.denoise(z, tb, cond, prompt_mask, x_sc), z, ab)  # (N, L, d)
        if guided:
            z_u = torch.where(keep, q_sample(z_prompt, ab, prompt_noise), z)
            cond_u = model.condition(ids, tb, None, drop_cond=True)
            x0_u = model.x0_from_output(model.denoise(z_u, tb, cond_u, None, x_sc), z_u, ab)
            x0 = x0_u + guidance_scale * (x0 - x0_u)
        if book is not None:
            logits = model.decode(x0)  # (N, L, V)
            x0 = logits.softmax(-1) @ book if clamp == "soft" else book[logits.argmax(-1)]  # (N, L, d)
        x0 = torch.where(keep, z_prompt, x0)
        x_sc = x0
        z = torch.where(keep, z_prompt, sampler.step(x0, i, z, generator))
        if callback is not None:
            callback(i, t, x0)
    out = sample_tokens(model.decode(x0), temperature, top_k, top_p, generator)  # (N, L)
    return torch.where(prompt_mask, ids, out)


def completions(ids: torch.Tensor, tokenizer, prompt_len: int, length: int) -> list[str]:
    """Texts of generated rows (N, L): the prompt plus at most ``length`` new tokens, cut at the first EOS."""
    texts = []
    for row in ids[:, : prompt_len + length].tolist():
        new = row[prompt_len:]
        if tokenizer.eos_id in new:
            new = new[: new.index(tokenizer.eos_id)]
        texts.append(tokenizer.decode(row[:prompt_len] + new))
    return texts
