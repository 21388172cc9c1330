"""The continuous family (DIMBA proper): Gaussian diffusion on token latents.

z_0 = encode(tokens) (RMS-normalised embeddings, or a learned projection, times a calibrated latent scale) is
noised to z_t = sqrt(alpha_bar(t)) z_0 + sqrt(1 - alpha_bar(t)) eps; the denoiser predicts x0 or v; the output
head decodes x0 estimates to tokens. Generation is x0-DDIM from pure noise after a clean prompt; the likelihood
is the VDM-style variational bound of `dimba.families.gaussian_bound`.
"""

from __future__ import annotations

import torch

from dimba.diffusion.gaussian import min_snr_weight, q_sample, v_target
from dimba.diffusion.schedules import stratified_times
from dimba.families import gaussian_bound
from dimba.families.base import Family, Generation, LikelihoodEstimate, masked_mean, token_nll
from dimba.samplers.categorical import sample_tokens
from dimba.samplers.commit import CommitSampler
from dimba.samplers.ddim import DDIMSampler
from dimba.samplers.state import ModelOutput, SamplerState

CLAMPS = ("none", "soft", "hard")  # how generation moves x0 estimates onto the token latents


def compute_dimba_losses(model, input_ids: torch.Tensor, t: torch.Tensor | None = None, ce_loss_weight: float = 1.0,
                         min_snr_gamma: float = 5.0, prompt_mask: torch.Tensor | None = None,
                         recon_loss_weight: float = 1.0, self_cond_prob: float = 0.5,
                         drop_cond: bool | torch.Tensor = False, noise: torch.Tensor | None = None,
                         generator: torch.Generator | None = None, objective: str = "mse_ce"):
    """The continuous-family objective; returns ``(loss, parts)``.

    - ``mse``: min-SNR-gamma weighted regression of the x0 or v target (per ``prediction_type``),
      mean over latent dimensions and scored (non-prompt) positions;
    - ``ce``: cross-entropy of the output head on the x0 estimate (the rounding term), or of the predicted
      logits (``prediction_type="logits"``);
    - ``recon``: cross-entropy of the head on the CLEAN latent z_0 (latent consistency: the
      latent must keep every token decodable, which also prevents embedding collapse), estimated on
      the first quarter of the batch.
    With self-conditioning, a first no-grad pass supplies x_self_cond with probability
    ``self_cond_prob`` (Chen et al. 2022); at the clean (prompt) positions it is their clean latent, as the sampler
    and the likelihood bound feed it back. ``objective="mse_ce"``: ``loss = mse + ce_w * ce + recon_w * recon``;
    ``objective="ce"``: ``loss = ce_w * ce + recon_w * recon`` (CDCD; ``mse`` is still reported).

    The hybrid family uses the same objective: its absorbed positions are scored like the noisy
    ones (x0 regression and rounding CE from no latent information at all). ``generator``
    draws t, noise and the hybrid masks when they are not given.
    """
    b = input_ids.shape[0]
    dev = input_ids.device
    warp = model.time_warp if t is None else None  # a time warp learns from the times it draws
    if t is None:
        t = stratified_times(b, dev, generator)
        if warp is not None:
            t = warp(t).clamp_min(1e-4)  # (B,) where the cross-entropy changes fastest
    if noise is None:
        noise = torch.randn(input_ids.shape + (model.d_x,), device=dev, generator=generator)
    t_cont = model.schedule.to_continuous(torch.as_tensor(t, device=dev)).expand(b)  # (B,)
    masked = model.family.draw_absorbed(model, input_ids, t_cont, generator)  # (B, L) or None
    x_sc = None
    if model.config.self_conditioning and torch.rand((), generator=generator) < self_cond_prob:
        with torch.no_grad():
            _, _, info = model(input_ids, t, noise=noise, prompt_mask=prompt_mask, drop_cond=drop_cond, masked=masked)
            x_sc = info["x0_hat"].detach()  # (B, L, d_x)
            if info["prompt_mask"] is not None:  # clean positions feed back their own latent, as in generation
                x_sc = torch.where(info["prompt_mask"][..., None], info["z0"], x_sc)
    x_pred, noise, info = model(input_ids, t, noise=noise, prompt_mask=prompt_mask, x_self_cond=x_sc, drop_cond=drop_cond,
                                masked=masked, estimate_x0=False)  # the loss reads the logits, not the x0 estimate
    scored = torch.ones_like(input_ids, dtype=torch.float32)  # (B, L)
    if info["prompt_mask"] is not None:
        scored = (~info["prompt_mask"]).float()

    z0, ab = info["z0"], info["alpha_bar"]
    target = v_target(z0, noise, ab) if model.config.prediction_type == "v" else z0
    logits = model.decode(info["x0_hat"]) if info["logits"] is None else info["logits"]  # (B, L, V)
    if model.onehot:  # the network output is the head's input: regress its score-interpolated x0 estimate
        x_pred = model.score_interpolate(logits)  # (B, L, V)
    w = min_snr_weight(model.schedule.snr(info["t"]), min_snr_gamma, model.config.prediction_type)  # (B,)
    sq = (x_pred.float() - target.float()).pow(2).mean(-1)  # (B, L)
    mse = masked_mean(sq * w[:, None], scored)

    ce_tok = token_nll(logits, input_ids)  # (B, L)
    ce = masked_mean(ce_tok, scored)
    if warp is not None and model.training:
        warp.update(info["t"], (ce_tok.detach() * scored).sum(1) / scored.sum(1).clamp_min(1))
    n_rec = max(1, b // 4)  # the clean-latent term is easy: a quarter of the batch estimates it at a quarter of the cost
    recon = token_nll(model.decode(z0[:n_rec]), input_ids[:n_rec]).mean()

    if objective == "mse_ce":
        loss = mse + ce_loss_weight * ce + recon_loss_weight * recon
    else:  # the regression is reported, not trained
        loss = ce_loss_weight * ce + recon_loss_weight * recon
    acc = masked_mean((logits.argmax(-1) == input_ids).float(), scored)
    parts = {"loss": loss.detach(), "mse": mse.detach(), "ce": ce.detach(), "recon": recon.detach(), "acc": acc.detach()}
    return loss, parts


class ContinuousGeneration(Generation):
    """x0-DDIM from pure noise with a clean prompt (`ContinuousFamily.generation`).

    The prompt is kept clean in the canvas and conditions the denoiser. With
    ``guidance_scale`` w != 1 the x0 estimate is x0_u + w (x0_c - x0_u) (classifier-free
    guidance), x0_u coming from a pass with the prompt dropped (its positions noised to t).
    With self-conditioning the previous x0 estimate is fed back. The tokens are sampled with temperature /
    top-k / top-p in float64 from the model's token distribution at the last step: the predicted logits of a
    logits model (guided like the x0 estimate, in log space), the output head on the final x0 estimate
    otherwise.
    ``clamp`` moves each x0 estimate onto the token embeddings before the step: ``soft``
    to the probability-weighted mean of the codebook under the head's logits (score
    interpolation, Dieleman et al. 2022), ``hard`` to the most likely token's latent (the
    clamping trick of Li et al. 2022), ``none`` keeps the regression output. A logits model estimates x0 as
    the codebook latents averaged under softmax(logits / ``score_temperature``). ``commit`` (confidence or
    random) commits tokens while denoising (`dimba.samplers.commit`).
    """

    def __init__(self, family: "ContinuousFamily", model, prompt: torch.Tensor, seq_len: int, settings,
                 generator: torch.Generator | None):
        if settings.clamp not in CLAMPS:
            raise ValueError(f"clamp must be one of {', '.join(CLAMPS)}, got {settings.clamp!r}")
        n, p = prompt.shape
        self.model, self.settings, self.absorbing = model, settings, family.absorbing
        self.ids = torch.cat([prompt, prompt.new_zeros(n, seq_len)], dim=1)  # (N, L)
        self.prompt_mask = torch.arange(p + seq_len, device=prompt.device)[None].expand(n, -1) < p  # (N, L)
        self.z_prompt = model.encode(self.ids)  # (N, L, d): only the prompt positions are used
        self.committing = settings.commit != "none"
        needs_book = settings.clamp != "none" or family.absorbing or self.committing
        self.book = model.codebook() if needs_book else None  # (V, d)
        self.guided = settings.guidance_scale != 1.0 and p > 0
        shape = (n, p + seq_len, model.d_x)
        z = torch.randn(shape, device=prompt.device, generator=generator)  # z_1: alpha_bar(1) = 0
        self.prompt_noise = torch.randn(shape, device=prompt.device, generator=generator)
        state = SamplerState(x=torch.where(self.prompt_mask[..., None], self.z_prompt, z), gen_start=p,
                             masked=~self.prompt_mask if family.absorbing else None,  # hybrid: all absorbed
                             clean=self.prompt_mask if self.committing else None,
                             tokens=self.ids if self.committing else None)
        sampler = family.sampler(model, settings, self.book)
        sampler.set_timesteps(settings.num_steps, state)
        super().__init__(sampler, state)
        self._logits: torch.Tensor | None = None  # the predicted logits of the last step (logits models)

    def predict(self, state: SamplerState, i: int) -> ModelOutput:
        """The (guided, clamped) x0 estimate at step i, the prompt's latent at its positions; the absorbing
        families and committing samplers add the token logits. Committed tokens condition like the prompt."""
        if state.clean is not None:  # the committed tokens join the clean prompt
            self.prompt_mask, self.ids = state.clean, state.tokens
            self.z_prompt = self.model.encode(self.ids)  # (N, L, d)
        model, s, keep = self.model, self.settings, self.prompt_mask[..., None]
        z, x_sc, masked = state.x, state.x0, state.masked
        tb = self.sampler.timesteps[i].expand(z.shape[0])  # (N,)
        ab = model.schedule.alpha_bar(tb)  # (N,)
        cond = model.condition(self.ids, tb, self.prompt_mask)
        x0, self._logits = model.interpret(model.denoise(z, tb, cond, self.prompt_mask, x_sc, masked), z, ab, masked,
                                           s.score_temperature)
        if self.guided:
            z_u = torch.where(keep, q_sample(self.z_prompt, ab, self.prompt_noise), z)
            cond_u = model.condition(self.ids, tb, None, drop_cond=True)
            x0_u, logits_u = model.interpret(model.denoise(z_u, tb, cond_u, None, x_sc, masked), z_u, ab, masked)
            if logits_u is None:
                x0 = x0_u + s.guidance_scale * (x0 - x0_u)  # (N, L, d)
            else:  # guided in log space, then interpolated
                self._logits = logits_u + s.guidance_scale * (self._logits - logits_u)  # (N, L, V)
                x0 = model.score_interpolate(self._logits, s.score_temperature)  # (N, L, d)
        if s.clamp != "none":
            logits = model.decode(x0)  # (N, L, V)
            soft = s.clamp == "soft"
            x0 = model.score_interpolate(logits, 1.0, self.book) if soft else self.book[logits.argmax(-1)]  # (N, L, d)
        x0 = torch.where(keep, self.z_prompt, x0)
        if self.absorbing:
            return ModelOutput(x0=x0, logits=self._clean_token_logits(model.decode(x0)))
        if self.committing:
            return ModelOutput(x0=x0, logits=self._clean_token_logits(model.decode(x0) if self._logits is None
                                                                      else self._logits))
        return ModelOutput(x0=x0)

    def finish(self, state: SamplerState, generator: torch.Generator | None) -> torch.Tensor:
        """Tokens sampled from the model's distribution at the last step, the prompt kept: (N, L)."""
        if state.clean is not None and bool(state.clean.all()):  # every token committed
            return state.tokens
        s = self.settings
        logits = self.model.decode(state.x0) if self._logits is None else self._logits  # (N, L, V)
        out = sample_tokens(self._clean_token_logits(logits), s.temperature, s.top_k, s.top_p, generator)  # (N, L)
        return torch.where(self.prompt_mask, self.ids, out)

    def _clean_token_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """The token logits (N, L, V) with [MASK] at -inf: it is never a clean token, so never drawn (the
        final tokens, the hybrid sampler's revealed tokens, the committed ones), nor the argmax."""
        mask_id = self.model.mask_id
        if mask_id >= logits.shape[-1]:
            return logits
        return logits.index_fill(-1, torch.tensor([mask_id], device=logits.device), float("-inf"))  # (N, L, V)


class ContinuousFamily(Family):
    """Gaussian diffusion on token latents (see the module docstring)."""

    name = "continuous"
    description = "A continuous (Gaussian latent) diffusion language model"
    latent = True
    input_flags = 2
    time_conditioned = True
    metrics = ("loss", "mse", "ce", "recon", "acc")
    likelihood_options = ("t0", "clamp")
    sample_settings = Family.sample_settings + ("eta", "clamp", "score_temperature", "commit")
    absorbing = False  # whether tokens may also be absorbed ([MASK], no latent): the hybrid process
    ranking_mc_samples = 16  # its bound is noisier per sample than masked's: best-of-8 gains +7.5 at 8, +11.2 at 16
    preference_t0 = 0.8  # the DPO margin's signal-to-noise per pair: 6.6 at t0 = 0.8, 0.33 at 1e-4

    def draw_absorbed(self, model, input_ids: torch.Tensor, t: torch.Tensor,
                      generator: torch.Generator | None = None) -> torch.Tensor | None:
        """The absorbed positions (B, L) of ``input_ids`` at times t (B,): none in the continuous process."""
        return None

    def loss(self, model, input_ids, dc, t=None, prompt_mask=None, drop_cond=False, self_cond_prob=None, noise=None,
             generator=None):
        sc = dc.self_cond_prob if self_cond_prob is None else self_cond_prob
        return compute_dimba_losses(model, input_ids, t, dc.ce_loss_weight, dc.min_snr_gamma, prompt_mask,
                                    dc.recon_loss_weight, sc, drop_cond, noise, generator, dc.objective)

    def sft_loss(self, model, rows, dc, generator=None):
        """The family's own training objective (`compute_dimba_losses`) on the response given the clean prompt: a
        continuous model is fine-tuned as it was trained, not on its bound (whose low-noise terms make a noisy
        gradient); returns the loss and the response's cross-entropy."""
        loss, parts = self.loss(model, rows.ids, dc, prompt_mask=rows.prompt, generator=generator)
        return loss, parts["ce"]

    def response_noise(self, rows, generator=None, full=False, t0=None):
        """One bound sample's randomness per row: u (B,) stratified across the batch (None with ``full``), the
        seed of its noise and the bound's last time ``t0`` (`dimba.families.gaussian_bound.response_terms`)."""
        seed = int(torch.randint(2 ** 62, (1,), generator=generator))
        t0 = gaussian_bound.T_MIN if t0 is None else t0
        if full:
            return None, seed, t0
        b = len(rows)
        u = (torch.arange(b, dtype=torch.float64) + torch.rand(1, generator=generator, dtype=torch.float64)) / b  # (B,)
        return u[torch.randperm(b, generator=generator)], seed, t0

    def response_nll(self, model, rows, noise):
        """Per position, one Monte Carlo sample of the variational bound on -log p(response | prompt)
        (`dimba.families.gaussian_bound.response_terms`; with the ``full`` noise, the d1 surrogate at t = 1)."""
        u, seed, t0 = noise
        return gaussian_bound.response_terms(model, rows, u, seed, t0).float()  # (B, L)

    def forward(self, model, input_ids: torch.Tensor, t, noise: torch.Tensor | None = None,
                prompt_mask: torch.Tensor | None = None, x_self_cond: torch.Tensor | None = None,
                drop_cond: bool | torch.Tensor = False, masked: torch.Tensor | None = None, estimate_x0: bool = True):
        """`DIMBA.forward`: noise the latents of ``input_ids`` to time t, keep the prompt clean, and denoise."""
        b = input_ids.shape[0]
        t = model.time_of(t, b, input_ids.device)  # (B,)
        drop = torch.as_tensor(drop_cond, device=input_ids.device).expand(b)  # (B,)
        if prompt_mask is not None:
            prompt_mask = prompt_mask & ~drop[:, None]  # (B, L)
        z0 = model.encode(input_ids)  # (B, L, d_x)
        noise = torch.randn_like(z0) if noise is None else noise
        alpha_bar = model.schedule.alpha_bar(t)  # (B,)
        z_t = q_sample(z0, alpha_bar, noise)
        if prompt_mask is not None:
            z_t = torch.where(prompt_mask[..., None], z0, z_t)
        if self.absorbing:
            if masked is None:
                masked = self.draw_absorbed(model, input_ids, t)  # (B, L)
            if prompt_mask is not None:
                masked = masked & ~prompt_mask  # the clean prompt is never absorbed
        cond = model.condition(input_ids, t, prompt_mask, drop)
        x_pred = model.denoise(z_t, t, cond, prompt_mask, x_self_cond, masked)
        x0_hat, logits = model.interpret(x_pred, z_t, alpha_bar, masked, estimate_x0=estimate_x0)
        info = {"z0": z0, "z_t": z_t, "alpha_bar": alpha_bar, "t": t, "x0_hat": x0_hat, "logits": logits,
                "prompt_mask": prompt_mask, "masked": masked}
        return x_pred, noise, info

    def predict_token_logits(self, model, input_ids, t=None, **kwargs):
        """Logits (B, L, V) of the x0 estimate of ``input_ids`` noised to time t."""
        _, _, info = model(input_ids, t, **kwargs)
        return model.decode(info["x0_hat"])

    def sampler(self, model, settings, codebook: torch.Tensor | None):
        """The sampler of `generation`: x0-DDIM with ``settings.eta``, its steps placed by the model's time warp;
        with ``settings.commit``, committing tokens as it goes (`CommitSampler`)."""
        ddim = DDIMSampler(model.schedule, settings.eta, model.time_warp)
        if settings.commit == "none":
            return ddim
        return CommitSampler(ddim, codebook, settings.commit, settings.temperature, settings.top_k, settings.top_p)

    def generation(self, model, prompt, seq_len, settings, generator, eos_id, use_cache):
        return ContinuousGeneration(self, model, prompt, seq_len, settings, generator)

    def likelihood(self, model, blocks, mc_samples, batch_size, generator, progress, calibration_blocks=None,
                   context=0, t0=None, clamp=None) -> LikelihoodEstimate:
        """The variational bound (`dimba.families.gaussian_bound.estimate`) with the reverse process's ``t0`` and
        ``clamp``, each chosen on ``calibration_blocks`` when not given; given a ``context``, of the tokens after it."""
        return gaussian_bound.estimate(model, blocks, mc_samples, batch_size, generator, progress, t0, clamp,
                                       calibration_blocks, context)
