"""DIMBA, the shared trunk: token embedding, latent encode/decode, prompt conditioning, backbone and output head.

What differs between families (``ModelConfig.family``, see `dimba.families`) is asked of the model's family:
whether the network reads latents (latent projections and input flags) or token ids, whether the backbone is
causal, whether t and the prompt condition it, and the forward process behind `DIMBA.forward`.

- Latent families (continuous, hybrid) diffuse z_0 = encode(tokens): RMS-normalised token embeddings (or a
  learned projection of them to ``d_latent``), times ``latent_scale`` so that the diffused signal has unit
  variance; `denoise` maps a noisy latent to the network output and `decode` maps an x0 estimate to logits.
- Token families (masked, ar) read token ids that may hold [MASK] (`token_logits`); the ar family's causal
  backbone also decodes token by token with a cache (`allocate_cache`, `ar_prefill`, `ar_step`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from dimba import export
from dimba.backbones import Backbone
from dimba.backbones.layers import RMSNorm, TimestepEmbedding
from dimba.config import ModelConfig
from dimba.diffusion.gaussian import x0_from_v
from dimba.diffusion.masked import MaskSchedule
from dimba.diffusion.schedules import NoiseSchedule
from dimba.diffusion.warp import TimeWarp
from dimba.families import get_family
from dimba.special_tokens import MASK_ID
from dimba.vae import TokenVAE


def _rms_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def _legacy_keywords(kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` without the constructor keywords of the original DIMBA code that dimba accepts with the meaning
    they had there (``d_prompt`` equal to ``d_model``, ``dropout=0``, ``use_simple_mamba=False``); any other value is
    refused in one line naming the dimba equivalent."""
    kwargs = dict(kwargs)
    d_model = kwargs.get("d_model", ModelConfig.model_fields["d_model"].default)
    refusals = {
        "d_prompt": (lambda v: v in (None, d_model), "dimba conditions on a d_model-wide prompt summary: omit d_prompt "
                     "(or set it to d_model)"),
        "dropout": (lambda v: not v, "dimba's denoisers have no dropout: omit dropout (or pass 0)"),
        "use_simple_mamba": (lambda v: not v, "dimba runs its pure-PyTorch Mamba-2 scan wherever the mamba_ssm "
                             "kernels are not installed (always on CPU): omit use_simple_mamba"),
    }
    for name, (accepted, hint) in refusals.items():
        if name in kwargs and not accepted(kwargs.pop(name)):
            raise ValueError(f"DIMBA({name}=...) is not supported: {hint}")
    return kwargs


class DIMBA(nn.Module):
    """Diffusion LM with a bidirectional Mamba-2 (or transformer) denoiser.

    Keyword arguments are the fields of `dimba.config.ModelConfig` (``vocab_size`` is required), plus the
    original DIMBA keywords ``d_prompt``, ``dropout`` and ``use_simple_mamba`` at values that mean what dimba
    does. ``DIMBA(**model.config)`` builds the same architecture.
    """

    def __init__(self, vocab_size: int, **kwargs: Any):
        super().__init__()
        cfg = ModelConfig(vocab_size=vocab_size, **_legacy_keywords(kwargs))
        self.config = cfg
        self.family = family = get_family(cfg.family)
        self.mask_id = MASK_ID
        self.onehot = cfg.onehot_latent and family.latent  # the latent of a token is its scaled one-hot vector
        d = cfg.d_model
        self.d_x = vocab_size if self.onehot else cfg.d_latent if cfg.latent_diffusion and family.latent else d
        self.schedule = NoiseSchedule(cfg.schedule, cfg.zero_terminal_snr, cfg.num_diffusion_steps, cfg.noise_shift)
        self.mask_schedule = MaskSchedule(cfg.mask_schedule)

        self.embedding = nn.Embedding(vocab_size, d)
        # tied head: unit-variance logits at init
        nn.init.normal_(self.embedding.weight, std=cfg.embed_init_std if cfg.embed_init_std is not None else d**-0.5)
        use_proj = cfg.latent_diffusion and family.latent and not cfg.use_vae_latent
        self.latent_in = nn.Linear(d, self.d_x, bias=False) if use_proj else None
        self.latent_out = nn.Linear(self.d_x, d, bias=False) if use_proj else None
        self.vae = TokenVAE(d, self.d_x) if cfg.latent_diffusion and family.latent and cfg.use_vae_latent else None
        scale = torch.ones(()) if cfg.latent_scale is None else torch.full((), cfg.latent_scale)
        self.register_buffer("latent_scale", scale)

        self.time_embed = TimestepEmbedding(d)
        self.null_prompt = nn.Parameter(torch.zeros(d))
        self.prompt_proj = nn.Linear(d, d) if family.prompt_conditioned else None
        # input flags of latent inputs: 0 = being denoised, 1 = clean prompt, 2 = absorbed (hybrid)
        self.prompt_flag = nn.Embedding(family.input_flags, d) if family.input_flags else None
        if self.prompt_flag is not None:
            nn.init.zeros_(self.prompt_flag.weight)

        self.in_proj = nn.Linear(self.d_x * (2 if cfg.self_conditioning else 1), d) if family.latent else None
        self.backbone = Backbone(
            cfg.backbone, d, cfg.num_denoiser_layers, cond_dim=d, conditioning_type=cfg.conditioning_type,
            bidirectional=cfg.bidirectional and not family.causal, num_heads=cfg.num_heads, d_state=cfg.d_state,
            d_conv=cfg.d_conv, expand=cfg.expand, headdim=cfg.headdim, chunk_size=cfg.chunk_size,
            tie_reverse=cfg.tie_reverse, bimamba=cfg.bimamba,
        )
        # a one-hot latent's network output is the hidden state the head reads (logits prediction)
        self.out_proj = nn.Linear(d, d if self.onehot else self.d_x) if family.latent else None
        self.head_norm = RMSNorm(d)
        self.head = nn.Linear(d, vocab_size, bias=False)
        if cfg.tie_weights:
            self.head.weight = self.embedding.weight
        self.time_warp = TimeWarp() if cfg.time_warping and family.latent else None

    # ----- the names of the original DIMBA code ------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def d_model(self) -> int:
        return self.config.d_model

    @property
    def d_latent(self) -> int:
        """Width of the diffused latent (d_model without a latent projection)."""
        return self.d_x

    # ----- latent space -------------------------------------------------------------------
    def encode_latent(self, embeddings: torch.Tensor) -> torch.Tensor:
        """The diffused latent of token embeddings (B, L, D) -> (B, L, d_x), times ``latent_scale``: the
        RMS-normalised embedding (after the latent projection, if any), or the TokenVAE's posterior mean.
        ``encode(ids) == encode_latent(embedding(ids))``."""
        if self.vae is not None:
            return self.vae.posterior(embeddings)[0] * self.latent_scale  # (B, L, d_x)
        h = embeddings if self.latent_in is None else self.latent_in(embeddings)  # (B, L, d_x)
        return _rms_normalize(h) * self.latent_scale

    def decode_latent(self, latent: torch.Tensor) -> torch.Tensor:
        """Back to the embedding space (B, L, d_x) -> (B, L, D): divided by ``latent_scale`` and projected back
        (or decoded by the TokenVAE). Without a latent projection it inverts `encode_latent` on RMS-normalised
        embeddings."""
        h = latent / self.latent_scale
        if self.vae is not None:
            return self.vae.decode(h)  # (B, L, D)
        return h if self.latent_out is None else self.latent_out(h)  # (B, L, D)

    def encode(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Clean latent z_0 of token ids: (B, L) -> (B, L, d_x), about unit variance (per token, with
        ``onehot_latent``)."""
        if self.onehot:
            hot = nn.functional.one_hot(input_ids, self.d_x).to(self.latent_scale.dtype)  # (B, L, V)
            return hot * self.latent_scale
        return self.encode_latent(self.embedding(input_ids))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Token logits (float32) of a latent (an x0 estimate): (B, L, d_x) -> (B, L, V). A one-hot latent's x0
        estimate is a point of the scaled simplex: its logits are the log of its normalised coordinates."""
        if self.onehot:
            return (z.float() / self.latent_scale).clamp_min(1e-12).log()  # (B, L, V)
        return self._head_logits(self.decode_latent(z))

    def codebook(self) -> torch.Tensor:
        """The latent of every vocabulary token: (V, d_x)."""
        ids = torch.arange(self.config.vocab_size, device=self.embedding.weight.device)
        return self.encode(ids[None])[0]

    def round(self, z: torch.Tensor) -> torch.Tensor:
        """Nearest-codebook token of each latent: (B, L, d_x) -> (B, L). round(encode(x)) == x."""
        if self.onehot:
            return z.argmax(-1)  # equal-norm orthogonal codebook: the largest coordinate is the nearest
        book = self.codebook()  # (V, d_x)
        dist = (z.pow(2).sum(-1, keepdim=True) - 2 * z @ book.T + book.pow(2).sum(-1))  # (B, L, V)
        return dist.argmin(-1)

    @torch.no_grad()
    def calibrate_latent_scale(self, input_ids: torch.Tensor) -> float:
        """Set ``latent_scale`` so that encode(input_ids) has unit variance; returns the scale."""
        self.latent_scale.fill_(1.0)
        z = self.encode(input_ids).float()
        self.latent_scale.fill_(1.0 / z.std().clamp_min(1e-6).item())
        return float(self.latent_scale)

    # ----- conditioning -------------------------------------------------------------------
    def time_of(self, t: torch.Tensor | float, batch: int, device: torch.device) -> torch.Tensor:
        """Continuous times (B,) of ``t``: a float, a (B,) tensor, or integer timesteps k in [0, T) of the
        original DIMBA convention, which map to (k + 1) / T (T = ``num_diffusion_steps``)."""
        t = torch.as_tensor(t, device=device)
        t = self.schedule.to_continuous(t).float()
        return t.expand(batch) if t.dim() == 0 else t  # (B,)

    def condition(self, input_ids: torch.Tensor, t: torch.Tensor, prompt_mask: torch.Tensor | None = None,
                  drop_cond: bool | torch.Tensor = False) -> torch.Tensor:
        """The conditioning vector (B, D): timestep embedding + a pooled summary of the PROMPT only.

        Positions outside ``prompt_mask`` (the tokens being denoised) never enter it. A family that is not
        conditioned on t gets the embedding of t = 0.
        """
        b = input_ids.shape[0]
        if not self.family.time_conditioned:
            t = torch.zeros((), device=input_ids.device)
        c = self.time_embed(self.time_of(t, b, input_ids.device))  # (B, D)
        null = self.null_prompt.expand(b, -1)  # (B, D)
        if prompt_mask is None or self.prompt_proj is None:
            return c + null
        w = prompt_mask.to(c.dtype)  # (B, L)
        pooled = (self.embedding(input_ids) * w[..., None]).sum(1) / w.sum(1, keepdim=True).clamp_min(1)  # (B, D)
        has_prompt = (w.sum(1) > 0) & ~torch.as_tensor(drop_cond, device=c.device).expand(b)  # (B,)
        return c + torch.where(has_prompt[:, None], self.prompt_proj(pooled), null)

    # ----- denoiser -----------------------------------------------------------------------
    def denoise(self, z_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, prompt_mask: torch.Tensor | None = None,
                x_self_cond: torch.Tensor | None = None, masked: torch.Tensor | None = None,
                lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Raw network output (x0, v or the latent the head reads logits from, per ``prediction_type``) for a noisy
        latent (B, L, d_x).

        ``masked`` (B, L) bool (hybrid family) marks absorbed positions; their latent is ignored. ``lengths`` (B,):
        real positions per row, the rest right padding that never changes the outputs at real positions.
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
        return self.out_proj(self.backbone(h, cond, lengths))  # (B, L, d_x)

    def interpret(self, x_pred: torch.Tensor, z_t: torch.Tensor, alpha_bar: torch.Tensor,
                  masked: torch.Tensor | None = None, score_temperature: float = 1.0,
                  estimate_x0: bool = True) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The x0 estimate (B, L, d_x) a network output implies, and for ``prediction_type="logits"`` the predicted
        token logits (B, L, V) (float32; else None). Logits prediction estimates x0 by score interpolation: the
        codebook latents averaged under softmax(logits / ``score_temperature``) (`score_interpolate`; the
        returned logits are not divided); with ``logit_skip`` the logits include the Bayes logits
        of z_t under a uniform prior over the codebook, sqrt(ab) / (1 - ab) z_t . e_v (Gaussian q(z_t | x = v)
        with equal-norm codebook latents), so the network learns what the context adds to them; an absorbed
        position (``masked`` (B, L) bool, hybrid family) has no latent and so no skip logits. ``estimate_x0=False``
        skips a logits model's score interpolation (its x0 estimate is then None): for callers that read only the
        logits, such as the training pass."""
        kind = self.config.prediction_type
        if kind == "v":
            return x0_from_v(z_t, x_pred, alpha_bar), None
        if kind == "x0":
            return x_pred, None
        book = None if self.onehot else self.codebook()  # (V, d_x)
        if self.config.logit_skip:
            logits = self._skip_logits(x_pred, z_t, alpha_bar, masked, book)  # (B, L, V)
        else:
            logits = self._head_logits(self._head_input(x_pred))  # (B, L, V)
        if not estimate_x0:
            return None, logits
        return self.score_interpolate(logits, score_temperature, book), logits

    def _head_input(self, x_pred: torch.Tensor) -> torch.Tensor:
        """The hidden state (B, L, D) the head reads from a logits model's network output (B, L, d_x or D)."""
        return x_pred if self.onehot else self.decode_latent(x_pred)

    def _skip_logits(self, x_pred: torch.Tensor, z_t: torch.Tensor, alpha_bar: torch.Tensor,
                     masked: torch.Tensor | None, book: torch.Tensor | None) -> torch.Tensor:
        """The head's logits of ``x_pred`` plus the Bayes logits sqrt(ab) / (1 - ab) z_t . e_v (see `interpret`),
        float32 (B, L, V), as ONE product [head_norm(h), c z_t] @ [W_head, book]^T: the scale c is applied to the
        (B, L, d_x) latent and the sum is accumulated inside the product, so no vocabulary-sized tensor is scaled or
        added. A one-hot latent (``book`` None) has z_t . e_v = scale z_t[v]: its Bayes logits are added as they are."""
        ab = alpha_bar.float().reshape(-1, 1, 1)  # (B, 1, 1)
        if masked is not None:
            z_t = z_t.masked_fill(masked[..., None], 0.0)  # (B, L, d_x)
        h = self.head_norm(self._head_input(x_pred))  # (B, L, D)
        zs = ab.sqrt() / (1 - ab).clamp_min(1e-4) * z_t.float()  # (B, L, d_x)
        if self.onehot:
            return self.head(h).float() + zs * self.latent_scale  # (B, L, V)
        a = torch.cat([h, zs.to(h.dtype)], dim=-1)  # (B, L, D + d_x)
        w = torch.cat([self.head.weight, book.to(self.head.weight.dtype)], dim=-1)  # (V, D + d_x)
        return (a @ w.T).float()  # (B, L, V)

    def score_interpolate(self, logits: torch.Tensor, temperature: float = 1.0,
                          book: torch.Tensor | None = None) -> torch.Tensor:
        """The codebook latents averaged under softmax(logits (B, L, V) / temperature): an x0 estimate (B, L, d_x).
        ``book``: the codebook (V, d_x) when the caller has it."""
        scaled = logits if temperature == 1.0 else logits / temperature  # (B, L, V)
        if self.onehot:
            return scaled.softmax(-1) * self.latent_scale.to(scaled.dtype)  # (B, L, V): the codebook is scale * I
        book = self.codebook().to(logits.dtype) if book is None else book  # (V, d_x)
        return scaled.softmax(-1).to(book.dtype) @ book  # (B, L, d_x)

    def x0_from_output(self, x_pred: torch.Tensor, z_t: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
        """The x0 estimate implied by the network output (see `interpret`)."""
        return self.interpret(x_pred, z_t, alpha_bar)[0]

    def estimate(self, z_t: torch.Tensor, t: torch.Tensor, alpha_bar: torch.Tensor,
                 masked: torch.Tensor | None = None, ids: torch.Tensor | None = None,
                 prompt_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The unconditional x0 estimate (B, L, d_x) at a noisy latent z_t (B, L, d_x), a deterministic function
        of (z_t, t, masked), and the predicted logits (B, L, V) of a logits model (else None): with
        self-conditioning, the network's own first estimate at the same z_t is fed back (two passes, as in Plaid's
        likelihood evaluation). ``t``, ``alpha_bar``: (B,). With ``prompt_mask`` (B, L) the tokens ``ids`` (B, L)
        there are a clean prompt, as in generation: z_t holds their clean latents, which are flagged, condition
        the network and are fed back as their own estimate."""
        if prompt_mask is None:
            cond = self.condition(z_t.new_zeros(z_t.shape[:2], dtype=torch.long), t)  # (B, D): no prompt
        else:
            cond = self.condition(ids, t, prompt_mask)  # (B, D)
        x0, logits = self.interpret(self.denoise(z_t, t, cond, prompt_mask, None, masked), z_t, alpha_bar, masked)
        if self.config.self_conditioning:
            if prompt_mask is not None:
                x0 = torch.where(prompt_mask[..., None], z_t, x0)  # (B, L, d_x)
            x0, logits = self.interpret(self.denoise(z_t, t, cond, prompt_mask, x0, masked), z_t, alpha_bar, masked)
        return x0, logits

    def forward(self, input_ids: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None,
                prompt_mask: torch.Tensor | None = None, x_self_cond: torch.Tensor | None = None,
                drop_cond: bool | torch.Tensor = False, masked: torch.Tensor | None = None, estimate_x0: bool = True):
        """Noise ``input_ids`` to time t and denoise: returns (x_pred, noise, latent_info) (latent families).

        With ``prompt_mask`` (B, L) bool, prompt tokens stay clean in the sequence and condition the denoiser;
        ``drop_cond`` (bool or (B,)) drops the prompt for classifier-free guidance: those sequences are noised
        and scored entirely. Hybrid: each non-prompt token is absorbed with probability 1 - alpha(t) of the mask
        schedule (``masked`` (B, L) bool gives the draw), and the others get Gaussian noise at the same t.
        ``latent_info`` holds z0, z_t, alpha_bar, t, x0_hat (None for a logits model with ``estimate_x0=False``,
        see `interpret`), logits, the effective prompt_mask and masked.
        """
        return self.family.forward(self, input_ids, t, noise=noise, prompt_mask=prompt_mask, x_self_cond=x_self_cond,
                                   drop_cond=drop_cond, masked=masked, estimate_x0=estimate_x0)

    # ----- token inputs (masked, ar) --------------------------------------------------------
    def _token_input(self, ids: torch.Tensor) -> torch.Tensor:
        """The backbone input of token ids (...,): their RMS-normalised embeddings (..., D)."""
        return _rms_normalize(self.embedding(ids))

    def _head_logits(self, h: torch.Tensor) -> torch.Tensor:
        """Float32 vocabulary logits of hidden states (..., D) -> (..., V)."""
        return self.head(self.head_norm(h)).float()

    def token_logits(self, input_ids: torch.Tensor, prompt_mask: torch.Tensor | None = None,
                     drop_cond: bool | torch.Tensor = False, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Raw float32 logits (B, L, V) of the token families on ids (B, L) that may hold [MASK].

        The clean prompt (``prompt_mask``) also conditions through the pooled summary; with a causal
        backbone (ar) position l predicts token l + 1. ``lengths`` (B,): real tokens per row, the rest
        right padding, which never changes the logits at real positions (variable-length batches).
        """
        cond = self.condition(input_ids, torch.zeros((), device=input_ids.device), prompt_mask, drop_cond)  # (B, D)
        return self._head_logits(self.backbone(self._token_input(input_ids), cond, lengths))  # (B, L, V)

    # ----- block diffusion (model.block_size) ------------------------------------------------
    def block_logits(self, x_t: torch.Tensor, x_0: torch.Tensor, prompt_mask: torch.Tensor | None = None,
                     drop_cond: bool | torch.Tensor = False, clean_grad: bool = True) -> torch.Tensor:
        """Raw float32 logits (B, L, V) of a block-diffusion model on the noisy ids x_t (B, L) (holding [MASK]) read
        with the clean ids x_0 (B, L): the logits of block k depend on x_t's block k and x_0's blocks before it
        only (BD3-LM's two streams; `Backbone.forward_blocks`). L must be a multiple of ``block_size``.
        ``clean_grad=False``: no gradients through the clean stream (training's ``diffusion.block_clean_grad``)."""
        cond = self.condition(x_t, torch.zeros((), device=x_t.device), prompt_mask, drop_cond)  # (B, D)
        h = self.backbone.forward_blocks(self._token_input(x_t), self._token_input(x_0), cond, self._block_size(),
                                         clean_grad)
        return self._head_logits(h)  # (B, L, V)

    def allocate_block_cache(self, batch: int, max_len: int) -> list:
        """An empty-prefix cache for `block_step`, for sequences of up to ``max_len`` positions."""
        self._block_size()
        return self.backbone.allocate_block_cache(batch, max_len, device=self.embedding.weight.device)

    def block_step(self, ids: torch.Tensor, cond: torch.Tensor, cache: list, pos: int) -> tuple[torch.Tensor, list]:
        """Logits (B, Bk, V) of one block of ids (B, Bk) at positions pos..pos+Bk-1 after the clean prefix in
        ``cache`` (`block_logits`' for that block, in O(Bk) work), and the cache after the block read as clean.
        ``cond`` (B, D) is `condition`'s vector (t = 0, the prompt)."""
        h, cache = self.backbone.block_step(self._token_input(ids), cond, cache, pos)  # (B, Bk, D)
        return self._head_logits(h), cache

    # ----- DualCache (full-sequence token models) ------------------------------------------------
    def dual_forward(self, ids: torch.Tensor, cond: torch.Tensor, start: int, end: int) -> tuple[torch.Tensor, list]:
        """Raw float32 logits (B, L, V) of a full-sequence token model on ids (B, L), and a DualCache of the block
        [start, end) for `dual_step` (`Backbone.dual_forward`). ``cond`` (B, D): `condition`'s vector."""
        h, cache = self.backbone.dual_forward(self._token_input(ids), cond, start, end)  # (B, L, D)
        return self._head_logits(h), cache

    def dual_step(self, ids: torch.Tensor, cond: torch.Tensor, cache: list, start: int) -> torch.Tensor:
        """Logits (B, Bk, V) of the block ids (B, Bk) at positions start..start+Bk-1, read with the ``cache`` of
        `dual_forward` for that block in O(Bk) work: approximate, the rest of the canvas as it was then."""
        return self._head_logits(self.backbone.dual_step(self._token_input(ids), cond, cache, start))

    def _block_size(self) -> int:
        if self.config.block_size is None:
            raise ValueError("this model has no model.block_size: it was not trained for block diffusion")
        return self.config.block_size

    def allocate_cache(self, batch: int, max_len: int | None = None) -> list:
        """An empty decoding cache for `ar_step` (causal backbone), for up to ``max_len`` positions."""
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
        return self.family.predict_token_logits(self, input_ids, t, **kwargs)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ----- export ------------------------------------------------------------------------
    def save_pretrained(self, out_dir: str | Path, tokenizer=None, extra_card: str = "", sample: dict | None = None
                        ) -> Path:
        """Write config.json, model.safetensors, tokenizer.json (if given), sample_config.json (the sampler defaults
        ``sample``, if given) and README.md (see `dimba.export`)."""
        return export.save_pretrained(self, out_dir, tokenizer=tokenizer, extra_card=extra_card, sample=sample)

    @classmethod
    def from_pretrained(cls, path: str | Path, map_location: str = "cpu") -> "DIMBA":
        """Load an export folder strictly (a missing or unexpected weight is an error): a local folder, or a Hub
        model ``owner/name`` through the Hugging Face cache (offline from it with ``HF_HUB_OFFLINE=1``)."""
        from dimba.hub import resolve

        path = resolve(path)
        model = export.build_from_config(cls, path)
        export.load_weights(model, path / export.WEIGHTS_NAME)
        return model.to(map_location)


def build_model(cfg: ModelConfig, vocab_size: int | None = None) -> DIMBA:
    """A `DIMBA` from a validated `ModelConfig` (``vocab_size`` overrides the config's)."""
    kwargs = cfg.model_dump()
    v = vocab_size or kwargs.pop("vocab_size")
    kwargs.pop("vocab_size", None)
    if v is None:
        raise ValueError("model.vocab_size is unknown: give a tokenizer or set model.vocab_size")
    return DIMBA(v, **kwargs)


__all__ = ["DIMBA", "build_model"]
