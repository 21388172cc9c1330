"""TokenVAE: a per-token variational autoencoder between token embeddings (d_model) and diffusion latents (d_latent),
the learned latent of the original DIMBA (``use_vae_latent``).

The encoder maps an embedding to q(z | x) = N(mu, sigma^2) and the decoder maps a latent back to the embedding
space, where the model's (tied) output head reads token logits. Pre-trained on its own by `dimba vae train` with
the ELBO  E_q[-log p(x | z)] + beta KL(q(z | x) || N(0, I))  (`elbo`); in a diffusion model the latent of a token
is its mean mu (deterministic, so encode/decode round-trip through the nearest codebook entry).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class TokenVAE(nn.Module):
    """Encoder MLP D -> H -> 2 d_latent (mu, log sigma^2) and decoder MLP d_latent -> H -> D (H = max(D, d))."""

    def __init__(self, d_model: int, d_latent: int):
        super().__init__()
        hidden = max(d_model, d_latent)
        self.encoder = nn.Sequential(nn.Linear(d_model, hidden), nn.SiLU(), nn.Linear(hidden, 2 * d_latent))
        self.decoder = nn.Sequential(nn.Linear(d_latent, hidden), nn.SiLU(), nn.Linear(hidden, d_model))

    def posterior(self, embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu, log sigma^2) of q(z | x), each (..., d_latent), for embeddings (..., D)."""
        mu, logvar = self.encoder(embeddings).chunk(2, dim=-1)
        return mu, logvar.clamp(-12, 8)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """A latent (..., d_latent) back in the embedding space (..., D)."""
        return self.decoder(z)


def elbo(vae: TokenVAE, embeddings: torch.Tensor, ids: torch.Tensor, head, kl_weight: float,
         generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The beta-ELBO loss per token of ``ids`` (N,) with embeddings (N, D): reconstruction cross-entropy of
    ``head`` (decoded embedding -> logits (N, V)) at a reparameterised z ~ q(z | x), plus ``kl_weight`` times the
    KL to N(0, I) (nats, summed over latent dimensions). Returns (loss, parts: loss, ce, kl, acc)."""
    mu, logvar = vae.posterior(embeddings)  # (N, d) each
    eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
    z = mu + (0.5 * logvar).exp() * eps  # (N, d)
    logits = head(vae.decode(z)).float()  # (N, V)
    ce = F.cross_entropy(logits, ids)
    kl = 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).sum(-1).mean()
    loss = ce + kl_weight * kl
    acc = (head(vae.decode(mu)).argmax(-1) == ids).float().mean()
    return loss, {"loss": loss.detach(), "ce": ce.detach(), "kl": kl.detach(), "acc": acc.detach()}
