"""`dimba vae train`: pre-train a TokenVAE (with the token embedding and output head it reads through) on the tokens
of a corpus, and start a diffusion model from it (``model.vae_checkpoint_path``)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_model, save_model
from torch import nn

from dimba.backbones.layers import RMSNorm
from dimba.data.corpora import load_corpus, split_text
from dimba.data.packing import tokenize_and_pack
from dimba.data.tokenizer import Tokenizer
from dimba.errors import CheckpointError, UsageError
from dimba.io import atomic_write_text
from dimba.training.rng import init_seed
from dimba.vae import TokenVAE, elbo

VAE_TYPE = "dimba-token-vae"
WEIGHTS, CONFIG, TOKENIZER = "model.safetensors", "config.json", "tokenizer.json"


class _TokenAutoencoder(nn.Module):
    """Embedding -> TokenVAE -> RMSNorm -> tied head, under the names a DIMBA gives them (`load_token_vae`)."""

    def __init__(self, vocab_size: int, d_model: int, d_latent: int):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, d_model)
        nn.init.normal_(self.embedding.weight, std=d_model**-0.5)
        self.vae = TokenVAE(d_model, d_latent)
        self.head_norm = RMSNorm(d_model)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        return self.head_norm(h) @ self.embedding.weight.T  # (..., V), tied to the embedding


def train_vae(corpus: str, out: str | Path, d_latent: int = 64, d_model: int = 256, kl_weight: float = 1e-3,
              steps: int = 2000, batch_tokens: int = 2048, lr: float = 3e-3, vocab_size: int = 4096,
              seed: int = 0) -> dict:
    """Train on tokens drawn from the training split of ``corpus`` (a BPE tokenizer of ``vocab_size`` trained on it)
    and write ``out``: model.safetensors, config.json (sizes, settings, validation ELBO parts) and tokenizer.json.
    Returns the validation metrics (nats per token: ce, kl; acc of the posterior mean)."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"--out {str(out)!r} already exists and is not empty: choose another folder")
    torch.manual_seed(init_seed(seed))  # the initial weights: not the stream of ``gen`` below
    train_docs, val_docs = split_text(load_corpus(corpus))
    tokenizer = Tokenizer.train(train_docs, vocab_size=vocab_size)
    train = tokenize_and_pack(train_docs, tokenizer, 1).flatten()  # (T,) the token stream, EOS between documents
    val = tokenize_and_pack(val_docs, tokenizer, 1).flatten()[:20_000]  # (T',)
    model = _TokenAutoencoder(tokenizer.vocab_size, d_model, d_latent)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    for step in range(steps):
        for group in opt.param_groups:  # cosine decay to a tenth
            group["lr"] = lr * (0.1 + 0.45 * (1 + math.cos(math.pi * step / steps)))
        ids = train[torch.randint(len(train), (batch_tokens,), generator=gen)]  # (N,)
        loss, _ = elbo(model.vae, model.embedding(ids), ids, model.head, kl_weight, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        _, parts = elbo(model.vae, model.embedding(val), val, model.head, kl_weight, gen)
    metrics = {k: float(v) for k, v in parts.items()}
    out.mkdir(parents=True, exist_ok=True)
    save_model(model, str(out / WEIGHTS), metadata={"format": "pt"})
    config = {"model_type": VAE_TYPE, "vocab_size": tokenizer.vocab_size, "d_model": d_model,
              "d_latent": d_latent, "kl_weight": kl_weight, "steps": steps, "corpus": corpus, "val": metrics}
    atomic_write_text(out / CONFIG, json.dumps(config, indent=2) + "\n")
    tokenizer.save(out / TOKENIZER)
    return metrics


def _vae_config(folder: Path) -> dict:
    try:
        config = json.loads((folder / CONFIG).read_text())
    except (OSError, ValueError):
        config = None
    if not isinstance(config, dict) or config.get("model_type") != VAE_TYPE:
        raise CheckpointError(f"model.vae_checkpoint_path {str(folder)!r} is not a folder written by `dimba vae train`: "
                              "train one with `dimba vae train --out DIR`")
    return config


def load_token_vae(model, folder: str | Path) -> None:
    """Load the embedding, TokenVAE and head norm of a `train_vae` folder into ``model`` (a DIMBA with
    ``use_vae_latent``)."""
    folder = Path(folder)
    config = _vae_config(folder)
    want = (model.config.vocab_size, model.config.d_model, model.d_x)
    got = (config.get("vocab_size"), config.get("d_model"), config.get("d_latent"))
    if want != got:
        raise CheckpointError(f"model.vae_checkpoint_path {str(folder)!r} has vocabulary, d_model, d_latent {got} but the "
                              f"model {want}: set model.d_model and model.d_latent to the VAE's and use its tokenizer")
    try:
        with safe_open(str(folder / WEIGHTS), framework="pt") as f:
            names = set(f.keys())
        if not {"embedding.weight", "head_norm.weight"} <= names or not any(n.startswith("vae.") for n in names):
            raise CheckpointError(f"model.vae_checkpoint_path {str(folder)!r} lacks the embedding, TokenVAE or head norm: "
                                  "train it again with `dimba vae train`")
        load_model(model, str(folder / WEIGHTS), strict=False)
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise CheckpointError(f"model.vae_checkpoint_path {str(folder)!r}: unreadable weights ({exc}): train it again") \
            from None



def freeze_token_vae(model) -> None:
    """Keep the pre-trained latent space: the embedding (and the head tied to it), the TokenVAE and the head norm
    of ``model`` are not trained."""
    for module in (model.embedding, model.vae, model.head_norm):
        module.requires_grad_(False)


def vae_tokenizer_path(folder: str | Path) -> Path:
    """The tokenizer.json of a `train_vae` folder."""
    return Path(folder) / TOKENIZER
