"""DIMBA: token embedding + latent encode/decode + prompt conditioning + backbone + output head.

One class serves the four families (``ModelConfig.family``):

- ``continuous`` diffuses z_0 = encode(tokens): RMS-normalised token embeddings (or a learned
  projection of them to ``d_latent``), times a calibrated ``latent_scale`` so that the diffused
  signal has unit variance. The denoiser predicts x0 or v in that latent space; logits come from
  ``decode`` (the output head) applied to the x0 estimate.
- ``hybrid`` is the continuous model whose tokens may also be absorbed: a masked position has a
  zero latent and its own input flag (see `forward`).
- ``masked`` reads token ids that contain [MASK] and returns logits (`token_logits`); it is not
  conditioned on t: with [MASK] tokens in the input the noise level is visible (MDLM), which
  also makes caching the model output between sampler steps exact.
- ``ar`` is the same token model with a causal backbone: next-token logits, and O(1)-per-token
  decoding through the backbone's cache (`allocate_cache`, `ar_step`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from dimba.backbones import Backbone
from dimba.backbones.layers import RMSNorm, TimestepEmbedding
from dimba.config import ModelConfig
from dimba.diffusion.gaussian import q_sample, x0_from_v
from dimba.diffusion.masked import MaskSchedule, mask_tokens, subs_log_probs
from dimba.diffusion.schedules import NoiseSchedule
from dimba.tokenizer import MASK, SPECIAL_TOKENS

MASK_ID = SPECIAL_TOKENS.index(MASK)  # the id every dimba tokenizer gives [MASK]


def _rms_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


class DIMBA(nn.Module):
    """Diffusion LM with a bidirectional Mamba-2 (or transformer) denoiser.

    Keyword arguments are the fields of `dimba.config.ModelConfig`; ``vocab_size`` is required.
    """

    def __init__(self, vocab_size: int, **kwargs: Any):
        super().__init__()
        cfg = ModelConfig(vocab_size=vocab_size, **kwargs)
        self.config = cfg
        self.family = cfg.family
        self.mask_id = MASK_ID
        latent = self.family in ("continuous", "hybrid")
        d, self.d_x = cfg.d_model, (cfg.d_latent if cfg.latent_diffusion and latent else cfg.d_model)
        self.schedule = NoiseSchedule(cfg.schedule, cfg.zero_terminal_snr, cfg.num_diffusion_steps, cfg.noise_shift)
        self.mask_schedule = MaskSchedule(cfg.mask_schedule)

        self.embedding = nn.Embedding(vocab_size, d)
        nn.init.normal_(self.embedding.weight, std=d**-0.5)  # tied head: unit-variance logits at init
        use_proj = cfg.latent_diffusion and latent
        self.latent_in = nn.Linear(d, self.d_x, bias=False) if use_proj else None
        self.latent_out = nn.Linear(self.d_x, d, bias=False) if use_proj else None
        self.register_buffer("latent_scale", torch.ones(()))

        self.time_embed = TimestepEmbedding(d)
        self.null_prompt = nn.Parameter(torch.zeros(d))
        self.prompt_proj = nn.Linear(d, d) if self.family != "ar" else None
        # input flags: 0 = being denoised, 1 = clean prompt, 2 = absorbed ([MASK], hybrid only)
        self.prompt_flag = nn.Embedding(3 if self.family == "hybrid" else 2, d) if latent else None
        if self.prompt_flag is not None:
            nn.init.zeros_(self.prompt_flag.weight)

        self.in_proj = nn.Linear(self.d_x * (2 if cfg.self_conditioning else 1), d) if latent else None
        self.backbone = Backbone(
            cfg.backbone, d, cfg.num_denoiser_layers, cond_dim=d, conditioning_type=cfg.conditioning_type,
            bidirectional=cfg.bidirectional and self.family != "ar", num_heads=cfg.num_heads, d_state=cfg.d_state,
            d_conv=cfg.d_conv, expand=cfg.expand, headdim=cfg.headdim, chunk_size=cfg.chunk_size,
            tie_reverse=cfg.tie_reverse,
        )
        self.out_proj = nn.Linear(d, self.d_x) if latent else None
        self.head_norm = RMSNorm(d)
        self.head = nn.Linear(d, vocab_size, bias=False)
        if cfg.tie_weights:
            self.head.weight = self.embedding.weight

    # ----- latent space -------------------------------------------------------------------
    def _unscaled_latent(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.embedding(input_ids)  # (B, L, D)
        if self.latent_in is not None:
            h = self.latent_in(h)  # (B, L, d_latent)
        return _rms_normalize(h)

    def encode(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Clean latent z_0 of token ids: (B, L) -> (B, L, d_x), about unit variance."""
        return self._unscaled_latent(input_ids) * self.latent_scale

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Token logits (float32) of a latent (an x0 estimate): (B, L, d_x) -> (B, L, V)."""
        h = z / self.latent_scale
        if self.latent_out is not None:
            h = self.latent_out(h)  # (B, L, D)
        return self._head_logits(h)

    def codebook(self) -> torch.Tensor:
        """The latent of every vocabulary token: (V, d_x)."""
        ids = torch.arange(self.config.vocab_size, device=self.embedding.weight.device)
        return self.encode(ids[None])[0]

    def round(self, z: torch.Tensor) -> torch.Tensor:
        """Nearest-codebook token of each latent: (B, L, d_x) -> (B, L). round(encode(x)) == x."""
        book = self.codebook()  # (V, d_x)
        dist = (z.pow(2).sum(-1, keepdim=True) - 2 * z @ book.T + book.pow(2).sum(-1))  # (B, L, V)
        return dist.argmin(-1)

    @torch.no_grad()
    def calibrate_latent_scale(self, input_ids: torch.Tensor) -> float:
        """Set ``latent_scale`` so that encode(input_ids) has unit variance; returns the scale."""
        z = self._unscaled_latent(input_ids).float()
        self.latent_scale.fill_(1.0 / z.std().clamp_min(1e-6).item())
        return float(self.latent_scale)

    # ----- conditioning -------------------------------------------------------------------
    def _time(self, t: torch.Tensor | float, batch: int, device: torch.device) -> torch.Tensor:
        t = torch.as_tensor(t, device=device)
        t = self.schedule.to_continuous(t).float()
        return t.expand(batch) if t.dim() == 0 else t  # (B,)

    def condition(self, input_ids: torch.Tensor, t: torch.Tensor, prompt_mask: torch.Tensor | None = None,
                  drop_cond: bool | torch.Tensor = False) -> torch.Tensor:
        """The conditioning vector (B, D): timestep embedding + a pooled summary of the PROMPT only.

        Positions outside ``prompt_mask`` (the tokens being denoised) never enter it.
        """
        b = input_ids.shape[0]
        if self.family in ("masked", "ar"):
            t = torch.zeros((), device=input_ids.device)  # the token families are not conditioned on t
        c = self.time_embed(self._time(t, b, input_ids.device))  # (B, D)
        null = self.null_prompt.expand(b, -1)  # (B, D)
        if prompt_mask is None or self.prompt_proj is None:
            return c + null
        w = prompt_mask.to(c.dtype)  # (B, L)
        pooled = (self.embedding(input_ids) * w[..., None]).sum(1) / w.sum(1, keepdim=True).clamp_min(1)  # (B, D)
        has_prompt = (w.sum(1) > 0) & ~torch.as_tensor(drop_cond, device=c.device).expand(b)  # (B,)
        return c + torch.where(has_prompt[:, None], self.prompt_proj(pooled), null)

    # ----- denoiser -----------------------------------------------------------------------
    def denoise(self, z_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, prompt_mask: torch.Tensor | None = None,
                x_self_cond: torch.Tensor | None = None, masked: torch.Tensor | None = None) -> torch.Tensor:
        """Raw network output (x0 or v, per ``prediction_type``) for a noisy latent (B, L, d_x).

        ``masked`` (B, L) bool (hybrid family) marks absorbed positions; their latent is ignored.
        """
        if masked is not None:
            z_t = z_t.masked_fill(masked[..., None], 0.0)  # an absorbed token carries no latent
        if self.config.self_conditioning:
            sc = torch.zeros_like(z_t) if x_self_cond is None else x_self_cond
            z_t = torch.cat([z_t, sc], dim=-1)  # (B, L, 2 d_x)
        h = self.in_proj(z_t)  # (B, L, D)
        flags = torch.zeros(h.shape[:2], dtype=torch.long, device=h.device) if prompt_mask is None else prompt_mask.long()
        if masked is not None:
            flags = flags.masked_fill(masked, 2)  # (B, L)
        h = h + self.prompt_flag(flags)  # (B, L, D): which positions hold the clean prompt (or a mask)
        return self.out_proj(self.backbone(h, cond))  # (B, L, d_x)

    def x0_from_output(self, x_pred: torch.Tensor, z_t: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
        """The x0 estimate implied by the network output."""
        if self.config.prediction_type == "v":
            return x0_from_v(z_t, x_pred, alpha_bar)
        return x_pred

    def estimate_x0(self, z_t: torch.Tensor, t: torch.Tensor, alpha_bar: torch.Tensor,
                    masked: torch.Tensor | None = None) -> torch.Tensor:
        """The unconditional x0 estimate (B, L, d_x) at a noisy latent z_t (B, L, d_x), a deterministic function
        of (z_t, t, masked): with self-conditioning, the network's own first estimate at the same z_t is fed back
        (two passes, as in Plaid's likelihood evaluation). ``t``, ``alpha_bar``: (B,)."""
        cond = self.condition(z_t.new_zeros(z_t.shape[:2], dtype=torch.long), t)  # (B, D): no prompt
        x0 = self.x0_from_output(self.denoise(z_t, t, cond, None, None, masked), z_t, alpha_bar)
        if self.config.self_conditioning:
            x0 = self.x0_from_output(self.denoise(z_t, t, cond, None, x0, masked), z_t, alpha_bar)
        return x0  # (B, L, d_x)

    def forward(self, input_ids: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None,
                prompt_mask: torch.Tensor | None = None, x_self_cond: torch.Tensor | None = None,
                drop_cond: bool | torch.Tensor = False, masked: torch.Tensor | None = None):
        """Noise ``input_ids`` to time t and denoise: returns (x_pred, noise, latent_info).

        Continuous and hybrid families. With ``prompt_mask`` (B, L) bool, prompt tokens stay clean
        in the sequence and condition the denoiser; ``drop_cond`` (bool or (B,)) drops the prompt
        for classifier-free guidance: those sequences are noised and scored entirely.
        Hybrid: each non-prompt token is absorbed with probability 1 - alpha(t) of the mask
        schedule (``masked`` (B, L) bool gives the draw), and the others get Gaussian noise at
        the same t. ``latent_info`` holds z0, z_t, alpha_bar, t, x0_hat, the effective
        prompt_mask and masked.
        """
        if self.family not in ("continuous", "hybrid"):
            raise ValueError(f"forward() noises latents (continuous / hybrid families); a {self.family} model "
                             "takes token ids: use token_logits() or predict_token_logits()")
        b = input_ids.shape[0]
        t = self._time(t, b, input_ids.device)  # (B,)
        drop = torch.as_tensor(drop_cond, device=input_ids.device).expand(b)  # (B,)
        if prompt_mask is not None:
            prompt_mask = prompt_mask & ~drop[:, None]  # (B, L)
        z0 = self.encode(input_ids)  # (B, L, d_x)
        noise = torch.randn_like(z0) if noise is None else noise
        alpha_bar = self.schedule.alpha_bar(t)  # (B,)
        z_t = q_sample(z0, alpha_bar, noise)
        if prompt_mask is not None:
            z_t = torch.where(prompt_mask[..., None], z0, z_t)
        if self.family == "hybrid":
            if masked is None:
                masked = mask_tokens(input_ids, self.mask_schedule.alpha(t), self.mask_id)[1]  # (B, L)
            if prompt_mask is not None:
                masked = masked & ~prompt_mask  # the clean prompt is never absorbed
        cond = self.condition(input_ids, t, prompt_mask, drop)
        x_pred = self.denoise(z_t, t, cond, prompt_mask, x_self_cond, masked)
        x0_hat = self.x0_from_output(x_pred, z_t, alpha_bar)
        info = {"z0": z0, "z_t": z_t, "alpha_bar": alpha_bar, "t": t, "x0_hat": x0_hat, "prompt_mask": prompt_mask,
                "masked": masked}
        return x_pred, noise, info

    # ----- token families (masked, ar) -----------------------------------------------------
    def _token_input(self, ids: torch.Tensor) -> torch.Tensor:
        """The backbone input of token ids (...,): their RMS-normalised embeddings (..., D)."""
        return _rms_normalize(self.embedding(ids))

    def _head_logits(self, h: torch.Tensor) -> torch.Tensor:
        """Float32 vocabulary logits of hidden states (..., D) -> (..., V)."""
        return self.head(self.head_norm(h)).float()

    def token_logits(self, input_ids: torch.Tensor, prompt_mask: torch.Tensor | None = None,
                     drop_cond: bool | torch.Tensor = False) -> torch.Tensor:
        """Raw float32 logits (B, L, V) of the token families on ids (B, L) that may hold [MASK].

        masked: the clean prompt (``prompt_mask``) also conditions through the pooled summary;
        ar: position l predicts token l + 1 (causal backbone).
        """
        cond = self.condition(input_ids, torch.zeros((), device=input_ids.device), prompt_mask, drop_cond)  # (B, D)
        return self._head_logits(self.backbone(self._token_input(input_ids), cond))  # (B, L, V)

    def allocate_cache(self, batch: int, max_len: int | None = None) -> list:
        """An empty decoding cache for `ar_step` (ar family), for up to ``max_len`` positions."""
        max_len = max_len or self.config.context_length or 256
        return self.backbone.allocate_cache(batch, max_len, device=self.embedding.weight.device)

    def ar_prefill(self, prompt: torch.Tensor, cache: list) -> tuple[torch.Tensor, list]:
        """Read a prompt (B, P) at positions 0..P-1 into the cache; returns the next-token logits (B, V)."""
        cond = self.condition(prompt, torch.zeros((), device=prompt.device))  # (B, D)
        out, cache = self.backbone.prefill(self._token_input(prompt), cond, cache)  # (B, P, D)
        return self._head_logits(out[:, -1]), cache  # (B, V)

    def ar_step(self, token: torch.Tensor, cache: list, pos: int) -> tuple[torch.Tensor, list]:
        """Feed the token (B,) at position ``pos``; returns next-token logits (B, V) and the cache."""
        cond = self.condition(token[:, None], torch.zeros((), device=token.device))  # (B, D)
        out, cache = self.backbone.step(self._token_input(token), cond, cache, pos)  # (B, D)
        return self._head_logits(out), cache  # (B, V)

    def predict_token_logits(self, input_ids: torch.Tensor, t: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        """Token logits (B, L, V) for every family.

        continuous / hybrid: of the denoised estimate of ``input_ids`` noised to time t;
        masked: SUBS log-probabilities of x_0 given ``input_ids`` holding [MASK] (t is implied
        by the masks); ar: next-token logits.
        """
        if self.family == "masked":
            return subs_log_probs(self.token_logits(input_ids, **kwargs), input_ids, self.mask_id)
        if self.family == "ar":
            return self.token_logits(input_ids)
        _, _, info = self(input_ids, t, **kwargs)
        return self.decode(info["x0_hat"])

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ----- export ------------------------------------------------------------------------
    def save_pretrained(self, out_dir: str | Path, tokenizer=None, extra_card: str = "") -> Path:
        """Write config.json, model.safetensors, tokenizer.json (if given) and README.md."""
        from dimba.checkpoint import save_pretrained

        return save_pretrained(self, out_dir, tokenizer=tokenizer, extra_card=extra_card)

    @classmethod
    def from_pretrained(cls, path: str | Path, map_location: str = "cpu") -> "DIMBA":
        """Load an export folder strictly (a missing or unexpected weight is an error)."""
        from dimba.checkpoint import load_pretrained

        return load_pretrained(path, map_location=map_location)


def build_model(cfg: ModelConfig, vocab_size: int | None = None) -> DIMBA:
    """A `DIMBA` from a validated `ModelConfig` (``vocab_size`` overrides the config's)."""
    kwargs = cfg.model_dump()
    v = vocab_size or kwargs.pop("vocab_size")
    kwargs.pop("vocab_size", None)
    if v is None:
        raise ValueError("model.vocab_size is unknown: give a tokenizer or set model.vocab_size")
    return DIMBA(v, **kwargs)


__all__ = ["DIMBA", "build_model"]
