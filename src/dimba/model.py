"""DIMBA: token embedding + latent encode/decode + prompt conditioning + backbone + output head.

The continuous family diffuses z_0 = encode(tokens): RMS-normalised token embeddings (or a
learned projection of them to ``d_latent``), times a calibrated ``latent_scale`` so that the
diffused signal has unit variance. The denoiser predicts x0 or v in that latent space; logits
come from ``decode`` (the output head) applied to the x0 estimate.
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
from dimba.diffusion.schedules import NoiseSchedule


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
        d, self.d_x = cfg.d_model, (cfg.d_latent if cfg.latent_diffusion else cfg.d_model)
        self.schedule = NoiseSchedule(cfg.schedule, cfg.zero_terminal_snr, cfg.num_diffusion_steps, cfg.noise_shift)

        self.embedding = nn.Embedding(vocab_size, d)
        nn.init.normal_(self.embedding.weight, std=d**-0.5)  # tied head: unit-variance logits at init
        self.latent_in = nn.Linear(d, self.d_x, bias=False) if cfg.latent_diffusion else None
        self.latent_out = nn.Linear(self.d_x, d, bias=False) if cfg.latent_diffusion else None
        self.register_buffer("latent_scale", torch.ones(()))

        self.time_embed = TimestepEmbedding(d)
        self.prompt_proj = nn.Linear(d, d)
        self.null_prompt = nn.Parameter(torch.zeros(d))
        self.prompt_flag = nn.Embedding(2, d)
        nn.init.zeros_(self.prompt_flag.weight)

        self.in_proj = nn.Linear(self.d_x * (2 if cfg.self_conditioning else 1), d)
        self.backbone = Backbone(
            cfg.backbone, d, cfg.num_denoiser_layers, cond_dim=d, conditioning_type=cfg.conditioning_type,
            bidirectional=cfg.bidirectional, num_heads=cfg.num_heads, d_state=cfg.d_state, d_conv=cfg.d_conv,
            expand=cfg.expand, headdim=cfg.headdim, chunk_size=cfg.chunk_size, tie_reverse=cfg.tie_reverse,
        )
        self.out_proj = nn.Linear(d, self.d_x)
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
        return self.head(self.head_norm(h)).float()

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
        c = self.time_embed(self._time(t, b, input_ids.device))  # (B, D)
        null = self.null_prompt.expand(b, -1)  # (B, D)
        if prompt_mask is None:
            return c + null
        w = prompt_mask.to(c.dtype)  # (B, L)
        pooled = (self.embedding(input_ids) * w[..., None]).sum(1) / w.sum(1, keepdim=True).clamp_min(1)  # (B, D)
        has_prompt = (w.sum(1) > 0) & ~torch.as_tensor(drop_cond, device=c.device).expand(b)  # (B,)
        return c + torch.where(has_prompt[:, None], self.prompt_proj(pooled), null)

    # ----- denoiser -----------------------------------------------------------------------
    def denoise(self, z_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, prompt_mask: torch.Tensor | None = None,
                x_self_cond: torch.Tensor | None = None) -> torch.Tensor:
        """Raw network output (x0 or v, per ``prediction_type``) for a noisy latent (B, L, d_x)."""
        if self.config.self_conditioning:
            sc = torch.zeros_like(z_t) if x_self_cond is None else x_self_cond
            z_t = torch.cat([z_t, sc], dim=-1)  # (B, L, 2 d_x)
        h = self.in_proj(z_t)  # (B, L, D)
        flags = torch.zeros(h.shape[:2], dtype=torch.long, device=h.device) if prompt_mask is None else prompt_mask.long()
        h = h + self.prompt_flag(flags)  # (B, L, D): which positions hold the clean prompt
        return self.out_proj(self.backbone(h, cond))  # (B, L, d_x)

    def x0_from_output(self, x_pred: torch.Tensor, z_t: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
        """The x0 estimate implied by the network output."""
        if self.config.prediction_type == "v":
            return x0_from_v(z_t, x_pred, alpha_bar)
        return x_pred

    def forward(self, input_ids: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None,
                prompt_mask: torch.Tensor | None = None, x_self_cond: torch.Tensor | None = None,
                drop_cond: bool | torch.Tensor = False):
        """Noise ``input_ids`` to time t and denoise: returns (x_pred, noise, latent_info).

        With ``prompt_mask`` (B, L) bool, prompt tokens stay clean in the sequence and condition
        the denoiser; ``drop_cond`` (bool or (B,)) drops the prompt for classifier-free guidance:
        those sequences are noised and scored entirely. ``latent_info`` holds z0, z_t,
        alpha_bar, t, x0_hat and the effective prompt_mask.
        """
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
        cond = self.condition(input_ids, t, prompt_mask, drop)
        x_pred = self.denoise(z_t, t, cond, prompt_mask, x_self_cond)
        x0_hat = self.x0_from_output(x_pred, z_t, alpha_bar)
        info = {"z0": z0, "z_t": z_t, "alpha_bar": alpha_bar, "t": t, "x0_hat": x0_hat, "prompt_mask": prompt_mask}
        return x_pred, noise, info

    def predict_token_logits(self, input_ids: torch.Tensor, t: torch.Tensor, **kwargs) -> torch.Tensor:
        """Logits (B, L, V) of the denoised estimate of ``input_ids`` noised to time t."""
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
