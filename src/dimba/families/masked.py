"""The masked family (MDLM / LLaDA): absorbing-state [MASK] diffusion on token ids.

Tokens are replaced by [MASK] with probability 1 - alpha(t); the network reads the ids and returns logits with the
SUBS parameterisation ([MASK] never predicted, unmasked tokens carried over). The model is not conditioned on t
(the masks show the noise level), so a sampler step that changed no token reuses the last model output. The loss
is the continuous-time NELBO per token; generation is `dimba.samplers.masked.MaskedSampler`; the likelihood is the
NELBO estimated by Monte Carlo.
"""

from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

from dimba.diffusion.masked import mask_tokens, subs_log_probs
from dimba.diffusion.schedules import stratified_times
from dimba.errors import UsageError
from dimba.families.block_generation import BlockMaskedGeneration
from dimba.families.base import Family, Generation, LikelihoodEstimate, masked_mean, mc_stderr, model_device
from dimba.samplers.masked import MaskedSampler
from dimba.samplers.state import ModelOutput, SamplerState


def block_size_of(model) -> int | None:
    """The model's ``block_size`` (block diffusion), None for a full-sequence model."""
    return getattr(getattr(model, "config", None), "block_size", None)


def denoiser_logits(model, x_t: torch.Tensor, x_0: torch.Tensor, prompt_mask: torch.Tensor | None = None,
                    drop_cond: bool | torch.Tensor = False, clean_grad: bool = True) -> torch.Tensor:
    """Raw logits (B, L, V) of the denoiser on x_t (B, L): a block-diffusion model also reads the clean x_0 (its
    blocks before each noisy block; `DIMBA.block_logits`, with or without gradients through it), a full-sequence
    model x_t alone."""
    if block_size_of(model) is None:
        return model.token_logits(x_t, prompt_mask, drop_cond)
    return model.block_logits(x_t, x_0, prompt_mask, drop_cond, clean_grad)


def compute_masked_losses(model, input_ids: torch.Tensor, t: torch.Tensor | None = None,
                          prompt_mask: torch.Tensor | None = None, drop_cond: bool | torch.Tensor = False,
                          generator: torch.Generator | None = None, t_min: float = 1e-3, clean_grad: bool = True):
    """The continuous-time MDLM objective; returns ``(loss, parts)``.

    Tokens outside the clean prompt are masked with probability 1 - alpha(t) (t stratified across
    the batch: antithetic / low-discrepancy), and ``loss`` = sum over masked positions of
    w(t) * (-log p_SUBS(x_0 | x_t)) divided by the number of scored (non-prompt) tokens: the
    NELBO per token, in nats. ``ce`` is the unweighted mean CE on masked positions.

    A block-diffusion model (``block_size``) draws one t per block (BD3-LM): the loss is then the sum of the
    blocks' NELBOs, each block denoised given the clean blocks before it. ``t`` (B,) gives every block of a row
    the same time; ``clean_grad=False`` stops the gradients through the clean stream (`Backbone.forward_blocks`).
    """
    b, length = input_ids.shape
    dev = input_ids.device
    block = block_size_of(model) or length
    if t is None:
        nb = length // block
        t = stratified_times(b * nb, dev, generator, t_min=t_min).view(nb, b).T  # (B, nb): spread over each row
    t_pos = t[:, None].expand(b, length) if t.dim() == 1 else t.repeat_interleave(block, dim=1)  # (B, L)
    drop = torch.as_tensor(drop_cond, device=dev).expand(b)  # (B,)
    if prompt_mask is not None:
        prompt_mask = prompt_mask & ~drop[:, None]  # (B, L)
    x_t, masked = mask_tokens(input_ids, model.mask_schedule.alpha(t_pos), model.mask_id, keep=prompt_mask,
                              generator=generator)  # (B, L) each
    logits = denoiser_logits(model, x_t, input_ids, prompt_mask, drop, clean_grad)  # (B, L, V)
    logp = subs_log_probs(logits, x_t, model.mask_id)  # (B, L, V)
    nll = -logp.gather(-1, input_ids[..., None])[..., 0].masked_fill(~masked, 0.0)  # (B, L)
    scored = torch.ones_like(nll) if prompt_mask is None else (~prompt_mask).float()  # (B, L)
    loss = (nll * model.mask_schedule.weight(t_pos)).sum() / scored.sum().clamp_min(1)
    m = masked.float()
    ce = masked_mean(nll, m)
    acc = masked_mean((logp.argmax(-1) == input_ids).float(), m)
    return loss, {"loss": loss.detach(), "ce": ce.detach(), "acc": acc.detach()}


def nelbo_terms(model, blocks: torch.Tensor, mc_samples: int, batch_size: int,
                generator: torch.Generator | None, progress: bool, context: int = 0) -> np.ndarray:
    """Monte Carlo terms X[i, k] of the masked-diffusion NELBO of each block, float64 (N, K).

    The continuous-time NELBO is  E_t [ w(t) sum_{l masked in x_t} -log p_SUBS(x_0^l | x_t) ]  with
    w(t) = -alpha'(t) / (1 - alpha(t)). The dimba masked denoiser does not see t, so substituting
    s = 1 - alpha(t) makes the bound the same for every schedule (MDLM §3.2, MD4), and integrating s
    out given the number m of masked tokens (the integral of C(L, m) s^(m-1) (1-s)^(L-m) ds is 1/m)
    gives the exactly equal form

        NELBO(x) = E_{m ~ U{1..L}} E_{S: |S| = m, uniform} [ (L / m) sum_{l in S} -log p_SUBS(x^l | x_S masked) ].

    This form is estimated rather than the t-form: its weight L/m is at most L, whereas the
    t-form's w(t) ~ 1/t gives it infinite variance near t = 0. Per block, the K samples are
    stratified: s_k = (k + u) / K with one u ~ U(0, 1) per block, and m_k = max(1, ceil(L s_k)),
    so m is uniform on {1..L} in each stratum average. Sums accumulate in float64.

    With ``context`` = c > 0 the first c tokens are a clean prompt (flagged to the network as in generation):
    L becomes the L - c tokens after it and the masked subsets are drawn among those, which bounds
    -log p(x_c.. | x_..c) (LLaDA's conditional likelihood, their eq. 6).

    A block-diffusion model (``block_size`` = b) factorises p(x) = prod_j p(x_j | x_<j) over its blocks, and
    bounds each factor by the NELBO above on the block (L -> its scored tokens, the clean blocks before it
    given): the sum of the blocks' NELBOs (BD3-LM eq. 4), a bound on -log p(x). Every block of a sample draws its
    own m and subset (from the sample's shared stratum s), and one two-stream call scores all blocks at once.
    """
    n, length = blocks.shape
    block = block_size_of(model) or length
    dev = model_device(model)
    u = torch.rand(n, 1, generator=generator, dtype=torch.float64)  # (N, 1)
    s = (torch.arange(mc_samples, dtype=torch.float64)[None] + u) / mc_samples  # (N, K)
    scored = (torch.arange(length) >= context).view(-1, block).sum(-1)  # (nb,) scored tokens of each block
    m = (s.flatten()[:, None] * scored).ceil().clamp_min(1).minimum(scored.clamp_min(1)).long()  # (N*K, nb)
    prompt = (torch.arange(length, device=dev) < context)[None] if context else None  # (1, L)
    rows = torch.arange(n).repeat_interleave(mc_samples)  # (N*K,) block of each row
    terms = []
    for start in tqdm(range(0, n * mc_samples, batch_size), desc="eval masked", disable=not progress, leave=False):
        x0 = blocks[rows[start:start + batch_size]]  # (B, L)
        mb = m[start:start + batch_size]  # (B, nb)
        # a uniform subset of m positions of each block: the m smallest of its uniform keys
        keys = torch.rand(x0.shape, generator=generator)  # (B, L)
        keys[:, :context] = 2.0  # the prompt is never among the m smallest
        rank = keys.view(len(x0), -1, block).argsort(-1).argsort(-1)  # (B, nb, b)
        masked = (rank < mb[..., None]).view(x0.shape) & (keys < 2.0)  # (B, L)
        x0, masked = x0.to(dev), masked.to(dev)
        x_t = torch.where(masked, torch.full_like(x0, model.mask_id), x0)  # (B, L)
        prompt_mask = None if prompt is None else prompt.expand(len(x_t), -1)  # (B, L)
        logp = subs_log_probs(denoiser_logits(model, x_t, x0, prompt_mask).double(), x_t, model.mask_id)  # (B, L, V) float64
        nll = -logp.gather(-1, x0[..., None])[..., 0]  # (B, L)
        nll = torch.where(masked, nll, torch.zeros_like(nll)).view(len(x0), -1, block).sum(-1)  # (B, nb)
        terms.append((nll * (scored.double() / mb.double()).to(dev)).sum(-1).cpu().numpy())
    return np.concatenate(terms).reshape(n, mc_samples)  # (N, K)


def response_masks(rows, generator: torch.Generator | None = None, full: bool = False):
    """The [MASK] positions (B, L) and weights (B,) of one NELBO sample per row of ``rows`` (`TokenRows`), among
    its n scored positions: m uniform on {1..n}, stratified across the batch (m_b = ceil(n s_b), s_b = (b + u) / B),
    a uniform subset of m positions, weight n / m (the m-form of `nelbo_terms`). ``full``: every scored position,
    weight 1 (the one-pass per-token surrogate of diffu-GRPO / d1)."""
    scored = rows.scored  # (B, L)
    if full:
        return scored, torch.ones(len(scored), device=scored.device)
    b = len(scored)
    n = scored.sum(-1).double().cpu()  # (B,)
    u = torch.rand(1, generator=generator, dtype=torch.float64)
    s = (torch.arange(b, dtype=torch.float64) + u) / b  # (B,)
    s = s[torch.randperm(b, generator=generator)]
    m = (s * n).ceil().clamp_min(1)  # (B,)
    keys = torch.rand(scored.shape, generator=generator).to(scored.device).masked_fill(~scored, 2.0)  # (B, L)
    rank = keys.argsort(-1).argsort(-1)  # (B, L)
    masked = (rank < m.to(scored.device)[:, None]) & scored  # (B, L)
    return masked, (n / m).float().to(scored.device)


class MaskedGeneration(Generation):
    """An all-[MASK] canvas after the clean prompt, unmasked by `MaskedSampler` (`MaskedFamily.generation`).

    The model is not conditioned on t, so its output is a function of the canvas alone: with
    ``use_cache`` a step whose canvas did not change since the last model call reuses the logits
    (MDLM's caching). Guidance: log p_u + w (log p_c - log p_u), p_u from the canvas with the
    prompt replaced by [MASK] and the prompt conditioning dropped; with ``guide`` (autoguidance,
    `SampleConfig.guide_model`) p_u is instead the weaker model's on the same canvas, with or without a prompt.

    With ``settings.dual_cache`` (Fast-dLLM's DualCache) the first step of each block reads the whole canvas and
    keeps what every layer needs of the positions outside the block (`DIMBA.dual_forward`); the block's other
    steps read the block alone with it (`DIMBA.dual_step`), an approximation: the rest of the canvas as it was
    at the block's first step.
    """

    def __init__(self, model, prompt: torch.Tensor, seq_len: int, settings, eos_id: int | None, use_cache: bool,
                 guide=None):
        n, p = prompt.shape
        sampler = MaskedSampler(model.mask_id, settings.remasking, settings.block_length, settings.temperature,
                                settings.top_k, settings.top_p, eos_id, threshold=settings.unmask_threshold,
                                entropy_bound=settings.unmask_entropy)
        state = sampler.initial_state(prompt, seq_len)  # (N, L)
        sampler.set_timesteps(settings.num_steps, state)
        super().__init__(sampler, state)
        self.model, self.use_cache = model, use_cache
        self.guide = guide
        if guide is not None and settings.guidance_scale == 1.0:
            raise UsageError("--guide-model has no effect at --guidance 1: give the autoguidance scale, e.g. "
                             "--guidance 1.5")
        guided = settings.guidance_scale != 1.0 and (p > 0 or guide is not None)
        self.guidance = settings.guidance_scale if guided else None
        self.prompt_mask = torch.arange(p + seq_len, device=prompt.device)[None].expand(n, -1) < p  # (N, L)
        self._logits: torch.Tensor | None = None
        self._seen: torch.Tensor | None = None
        self.dual = settings.dual_cache
        if self.dual and self.guidance is not None:
            raise UsageError("guidance is not available with the DualCache (--dual-cache): leave --guidance at 1")
        if self.dual:
            self.cond = model.condition(state.x, torch.zeros((), device=prompt.device), self.prompt_mask)  # (N, D)
        self._dual: tuple[tuple[int, int], list] | None = None  # (the block, its DualCache)

    def predict(self, state: SamplerState, i: int) -> ModelOutput:
        """Log-probabilities (N, L, V) of the (guided) model on the canvas, reused while it is unchanged."""
        x, model = state.x, self.model
        if self.dual:
            return self._dual_predict(state, i)
        if self._logits is None or not self.use_cache or not torch.equal(x, self._seen):
            logits = model.token_logits(x, self.prompt_mask).log_softmax(-1)  # (N, L, V)
            if self.guide is not None:
                logits_u = self.guide.token_logits(x, self.prompt_mask).log_softmax(-1)  # (N, L, V)
            elif self.guidance is not None:
                x_u = x.masked_fill(self.prompt_mask, model.mask_id)  # (N, L)
                logits_u = model.token_logits(x_u, None, drop_cond=True).log_softmax(-1)  # (N, L, V)
            if self.guidance is not None:
                logits = logits_u + self.guidance * (logits - logits_u)  # (N, L, V)
            self._logits, self._seen = logits, x
        return ModelOutput(logits=self._logits)

    def _dual_predict(self, state: SamplerState, i: int) -> ModelOutput:
        """Step ``i`` with the DualCache: the whole canvas at a block's first step (making the cache), then the
        block alone, (N, Bk, V) from its ``start``."""
        block = self.sampler.active_block(state, i)
        start, end = block
        if self._dual is None or self._dual[0] != block:
            logits, cache = self.model.dual_forward(state.x, self.cond, start, end)  # (N, L, V)
            self._dual = (block, cache)
            return ModelOutput(logits=logits.log_softmax(-1))
        logits = self.model.dual_step(state.x[:, start:end], self.cond, self._dual[1], start)  # (N, Bk, V)
        return ModelOutput(logits=logits.log_softmax(-1), start=start)


class MaskedFamily(Family):
    """Absorbing-state [MASK] diffusion (see the module docstring)."""

    name = "masked"
    block_diffusion = True
    description = "A masked ([MASK] absorbing-state) diffusion language model"
    sample_settings = Family.sample_settings + ("remasking", "block_length", "unmask_threshold", "unmask_entropy",
                                                "dual_cache", "guide_model")

    def loss(self, model, input_ids, dc, t=None, prompt_mask=None, drop_cond=False, self_cond_prob=None, noise=None,
             generator=None):
        return compute_masked_losses(model, input_ids, t, prompt_mask, drop_cond, generator,
                                     clean_grad=dc.block_clean_grad)

    def predict_token_logits(self, model, input_ids, t=None, **kwargs):
        """SUBS log-probabilities (B, L, V) of x_0 given ``input_ids`` holding [MASK] (t is implied by the masks)."""
        return subs_log_probs(model.token_logits(input_ids, **kwargs), input_ids, model.mask_id)

    def generation(self, model, prompt, seq_len, settings, generator, eos_id, use_cache, guide=None):
        if block_size_of(model) is not None:
            if guide is not None:
                raise UsageError("autoguidance (--guide-model) is not available for a block-diffusion model "
                                 "(model.block_size): leave it out")
            return BlockMaskedGeneration(model, prompt, seq_len, settings, eos_id, use_cache)
        return MaskedGeneration(model, prompt, seq_len, settings, eos_id, use_cache, guide)

    def response_noise(self, rows, generator=None, full=False, t0=None):
        """The masks and weights of one NELBO sample per row (`response_masks`); its bound has no ``t0``."""
        return response_masks(rows, generator, full)

    def response_nll(self, model, rows, noise):
        """w * -log p_SUBS(x | x_t) at the masked response positions of x_t (the prompt clean), 0 elsewhere: per
        row, one Monte Carlo sample of the NELBO of the response given the prompt."""
        masked, weight = noise  # (B, L), (B,)
        x_t = rows.ids.masked_fill(masked, model.mask_id)  # (B, L)
        logp = subs_log_probs(model.token_logits(x_t, rows.prompt, lengths=rows.lengths), x_t, model.mask_id)
        nll = -logp.gather(-1, rows.ids[..., None])[..., 0]  # (B, L)
        return torch.where(masked, nll * weight[:, None], torch.zeros_like(nll))

    def model_card(self, cfg) -> str:
        if cfg.block_size is None:
            return ""
        return (f"- Block diffusion (BD3-LM, `block_size` = {cfg.block_size}): each block of {cfg.block_size} tokens is "
                "denoised given the clean blocks before it; generation runs block after block on a cached state "
                "(no length limit) and its bound is the sum of the blocks' NELBOs.\n")

    def likelihood(self, model, blocks, mc_samples, batch_size, generator, progress, calibration_blocks=None,
                   context=0) -> LikelihoodEstimate:
        """The NELBO of the tokens after the ``context`` of each block (`nelbo_terms`; all L tokens without one), an
        upper bound on their NLL."""
        terms = nelbo_terms(model, blocks, mc_samples, batch_size, generator, progress, context)  # (N, K)
        return LikelihoodEstimate(float(terms.mean(axis=1).sum()), mc_stderr(terms), blocks[:, context:], mc_samples)
