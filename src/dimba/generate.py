"""The generation loops, one per family: prompt -> canvas -> model -> sampler.step.

The loop owns the model call (guidance, self-conditioning, caching live here); samplers are
pure step functions. `sample_from_model` dispatches on ``model.family``.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from dimba.diffusion.gaussian import q_sample
from dimba.samplers.categorical import sample_tokens
from dimba.samplers.ddim import DDIMSampler
from dimba.samplers.hybrid import HybridSampler
from dimba.samplers.masked import MaskedSampler
from dimba.tokenizer import EOS, SPECIAL_TOKENS

EOS_ID = SPECIAL_TOKENS.index(EOS)  # the document separator of every dimba tokenizer


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
                      callback: Callable[[int, torch.Tensor | float, torch.Tensor], None] | None = None,
                      remasking: str = "low_confidence", block_length: int | None = None,
                      eos_id: int | None = None, use_cache: bool = True) -> torch.Tensor:
    """Generate ``seq_len`` tokens after a prompt; returns ids (N, P + seq_len).

    Per family (``model.family``):

    - continuous: x0-DDIM (``num_steps``, ``eta``, ``clamp``), see `sample_continuous`;
    - hybrid: ancestral unmasking + x0-DDIM (`dimba.samplers.hybrid`);
    - masked: `MaskedSampler` with ``remasking`` (ancestral, low_confidence, random) and
      semi-autoregressive blocks of ``block_length``; the model output is reused while the
      canvas is unchanged (``use_cache``);
    - ar: left to right with the backbone's cache (``use_cache``; without it the whole prefix
      is re-read at every token), ``num_steps`` unused.

    Every family samples tokens in float64 with temperature / top-k / top-p, and applies
    classifier-free guidance with ``guidance_scale`` != 1 (not ar). With ``eos_id`` the masked
    and ar samplers stop a row at its first EOS and fill the rest with EOS.
    ``callback(i, t, x)`` is called after every step, x being the x0 estimate (continuous,
    hybrid) or the canvas of ids (masked, ar).
    """
    model.eval()
    device = next(model.parameters()).device
    prompt = _prompt_tensor(prompt_ids, num_samples, device)  # (N, P)
    if model.family == "ar":
        return sample_ar(model, prompt, seq_len, temperature, top_k, top_p, eos_id, generator, callback, use_cache)
    if model.family == "masked":
        sampler = MaskedSampler(model.mask_id, remasking, block_length, temperature, top_k, top_p, eos_id)
        return sample_masked(model, prompt, seq_len, num_steps, sampler, guidance_scale, generator, callback, use_cache)
    return sample_continuous(model, prompt, seq_len, num_steps, temperature, top_k, top_p, guidance_scale, eta, clamp,
                             generator, callback)


def _canvas(prompt: torch.Tensor, seq_len: int, fill: int) -> tuple[torch.Tensor, torch.Tensor]:
    n, p = prompt.shape
    ids = torch.cat([prompt, torch.full((n, seq_len), fill, dtype=torch.long, device=prompt.device)], dim=1)  # (N, L)
    prompt_mask = torch.arange(p + seq_len, device=prompt.device)[None].expand(n, -1) < p  # (N, L)
    return ids, prompt_mask


def sample_continuous(model, prompt: torch.Tensor, seq_len: int, num_steps: int, temperature: float,
                      top_k: int | None, top_p: float | None, guidance_scale: float, eta: float, clamp: str,
                      generator: torch.Generator | None, callback=None) -> torch.Tensor:
    """Continuous and hybrid families: x0-DDIM from pure noise with a clean prompt.

    The prompt is kept clean in the canvas and conditions the denoiser. With
    ``guidance_scale`` w != 1 the x0 estimate is x0_u + w (x0_c - x0_u) (classifier-free
    guidance), x0_u coming from a pass with the prompt dropped (its positions noised to t).
    With self-conditioning the previous x0 estimate is fed back. The final latent is decoded
    by the output head and sampled with temperature / top-k / top-p in float64.
    ``clamp`` moves each x0 estimate onto the token embeddings before the DDIM step: ``soft``
    to the probability-weighted mean of the codebook under the head's logits (score
    interpolation, Dieleman et al. 2022), ``hard`` to the most likely token's latent (the
    clamping trick of Li et al. 2022), ``none`` keeps the regression output.
    Hybrid: every position starts absorbed; `HybridSampler` reveals positions, starting them
    from the latent of a token drawn (float64, temperature / top-k / top-p) from the head.
    """
    if clamp not in ("none", "soft", "hard"):
        raise ValueError(f"clamp must be 'none', 'soft' or 'hard', got {clamp!r}")
    device = prompt.device
    n, p = prompt.shape
    length = p + seq_len
    ids, prompt_mask = _canvas(prompt, seq_len, 0)
    z_prompt = model.encode(ids)  # (N, L, d): only the prompt positions are used

    hybrid = model.family == "hybrid"
    book = model.codebook() if clamp != "none" or hybrid else None  # (V, d)
    sampler = HybridSampler(model.schedule, model.mask_schedule, eta) if hybrid else DDIMSampler(model.schedule, eta)
    times = sampler.set_timesteps(num_steps, device)
    shape = (n, length, model.d_x)
    z = torch.randn(shape, device=device, generator=generator)  # z_1: alpha_bar(1) = 0
    prompt_noise = torch.randn(shape, device=device, generator=generator)
    masked = ~prompt_mask if hybrid else None  # (N, L): hybrid starts fully absorbed
    keep = prompt_mask[..., None]  # (N, L, 1)
    z = torch.where(keep, z_prompt, z)
    guided = guidance_scale != 1.0 and p > 0
    x_sc = None
    x0 = z
    for i, t in enumerate(times):
        tb = t.expand(n)  # (N,)
        ab = model.schedule.alpha_bar(tb)  # (N,)
        cond = model.condition(ids, tb, prompt_mask)
        x0 = model.x0_from_output(model.denoise(z, tb, cond, prompt_mask, x_sc, masked), z, ab)  # (N, L, d)
        if guided:
            z_u = torch.where(keep, q_sample(z_prompt, ab, prompt_noise), z)
            cond_u = model.condition(ids, tb, None, drop_cond=True)
            x0_u = model.x0_from_output(model.denoise(z_u, tb, cond_u, None, x_sc, masked), z_u, ab)
            x0 = x0_u + guidance_scale * (x0 - x0_u)
        if clamp != "none":
            logits = model.decode(x0)  # (N, L, V)
            x0 = logits.softmax(-1) @ book if clamp == "soft" else book[logits.argmax(-1)]  # (N, L, d)
        x0 = torch.where(keep, z_prompt, x0)
        x_sc = x0
        if hybrid:
            drawn = book[sample_tokens(model.decode(x0), temperature, top_k, top_p, generator)]  # (N, L, d)
            z, masked = sampler.step(x0, drawn, i, z, masked, generator)
        else:
            z = sampler.step(x0, i, z, generator)
        z = torch.where(keep, z_prompt, z)
        if callback is not None:
            callback(i, t, x0)
    out = sample_tokens(model.decode(x0), temperature, top_k, top_p, generator)  # (N, L)
    return torch.where(prompt_mask, ids, out)


def sample_masked(model, prompt: torch.Tensor, seq_len: int, num_steps: int, sampler: MaskedSampler,
                  guidance_scale: float = 1.0, generator: torch.Generator | None = None, callback=None,
                  use_cache: bool = True) -> torch.Tensor:
    """Masked family: start from an all-[MASK] canvas after the clean prompt, let ``sampler`` unmask.

    The model is not conditioned on t, so its output is a function of the canvas alone: with
    ``use_cache`` a step whose canvas did not change since the last model call reuses the logits
    (MDLM's caching). Guidance: log p_u + w (log p_c - log p_u), p_u from the canvas with the
    prompt replaced by [MASK] and the prompt conditioning dropped. Stops early when no [MASK] is left.
    """
    n, p = prompt.shape
    x, prompt_mask = _canvas(prompt, seq_len, model.mask_id)
    sampler.set_timesteps(num_steps, x.shape[1], gen_start=p)
    guided = guidance_scale != 1.0 and p > 0
    logits, seen = None, None
    for i in range(sampler.num_steps):
        if not (x == model.mask_id).any():
            break
        if logits is None or not use_cache or not torch.equal(x, seen):
            logits = model.token_logits(x, prompt_mask).log_softmax(-1)  # (N, L, V)
            if guided:
                x_u = x.masked_fill(prompt_mask, model.mask_id)  # (N, L)
                logits_u = model.token_logits(x_u, None, drop_cond=True).log_softmax(-1)
                logits = logits_u + guidance_scale * (logits - logits_u)
            seen = x
        x = sampler.step(logits, x, i, generator)
        if callback is not None:
            callback(i, 1.0 - i / sampler.num_steps, x)
    return x


def sample_ar(model, prompt: torch.Tensor, seq_len: int, temperature: float = 1.0, top_k: int | None = None,
              top_p: float | None = None, eos_id: int | None = None, generator: torch.Generator | None = None,
              callback=None, use_cache: bool = True) -> torch.Tensor:
    """ar family: left to right, one token per model call, O(1) each with the cache.

    An empty prompt starts from EOS (documents are separated by EOS in training), which is not
    returned. After a row's first EOS the row is filled with EOS; all rows done ends the loop.
    """
    n, p = prompt.shape
    eos = EOS_ID if eos_id is None else eos_id
    ctx = prompt if p > 0 else torch.full((n, 1), eos, dtype=torch.long, device=prompt.device)  # (N, P')
    out = torch.full((n, seq_len), eos, dtype=torch.long, device=prompt.device)  # (N, seq_len)
    done = torch.zeros(n, dtype=torch.bool, device=prompt.device)  # (N,)
    if use_cache:
        logits, cache = model.ar_prefill(ctx, model.allocate_cache(n, ctx.shape[1] + seq_len))  # (N, V)
    for j in range(seq_len):
        if not use_cache:
            logits = model.token_logits(torch.cat([ctx, out[:, :j]], dim=1))[:, -1]  # (N, V)
        tok = sample_tokens(logits, temperature, top_k, top_p, generator)  # (N,)
        tok = torch.where(done, out[:, j], tok)
        out[:, j] = tok
        if callback is not None:
            callback(j, float(j), out[:, : j + 1])
        if eos_id is not None:
            done = done | (tok == eos_id)
            if bool(done.all()):
                break
        if use_cache and j + 1 < seq_len:
            logits, cache = model.ar_step(tok, cache, ctx.shape[1] + j)
    return torch.cat([prompt, out], dim=1)


def generate_ids(model, prompt_ids: Sequence[int], length: int, sample, num_samples: int = 1,
                 generator: torch.Generator | None = None, eos_id: int = EOS_ID) -> torch.Tensor:
    """Ids (N, P + canvas) of ``num_samples`` generations with the settings of a `SampleConfig` ``sample``,
    stopping a row at ``eos_id`` (masked, ar); `generated_ids` keeps the first ``length`` new tokens.

    The diffusion families denoise a canvas of the training context (the only length they were trained
    on), which is cut to ``length`` afterwards; ar generates ``length`` tokens.
    """
    context = model.config.context_length or 256
    canvas = length if model.family == "ar" else context - len(prompt_ids)
    return sample_from_model(model, prompt_ids, seq_len=canvas, num_steps=sample.num_steps,
                             temperature=sample.temperature, top_k=sample.top_k, top_p=sample.top_p,
                             guidance_scale=sample.guidance_scale, eta=sample.eta, num_samples=num_samples,
                             clamp=sample.clamp, generator=generator, remasking=sample.remasking,
                             block_length=sample.block_length, eos_id=eos_id)


def generate_texts(model, tokenizer, prompt_ids: Sequence[int], length: int, sample, num_samples: int = 1,
                   generator: torch.Generator | None = None) -> list[str]:
    """Texts of ``num_samples`` generations with the settings of a `SampleConfig` ``sample``: the prompt
    plus at most ``length`` new tokens, cut at the first EOS (see `generate_ids`)."""
    ids = generate_ids(model, prompt_ids, length, sample, num_samples, generator, tokenizer.eos_id)
    return completions(ids, tokenizer, len(prompt_ids), length)


def generated_ids(ids: torch.Tensor, prompt_len: int, length: int, eos_id: int = EOS_ID) -> list[list[int]]:
    """The new ids of generated rows (N, L): at most ``length`` tokens after the prompt, cut before the first EOS."""
    rows = ids[:, prompt_len: prompt_len + length].tolist()
    return [row[: row.index(eos_id)] if eos_id in row else row for row in rows]


def completions(ids: torch.Tensor, tokenizer, prompt_len: int, length: int) -> list[str]:
    """Texts of generated rows (N, L): the prompt plus at most ``length`` new tokens, cut at the first EOS."""
    new = generated_ids(ids, prompt_len, length, tokenizer.eos_id)
    return [tokenizer.decode(prompt + row) for prompt, row in zip(ids[:, :prompt_len].tolist(), new)]
