"""Denoiser backbones: (B, L, D) hidden states + a conditioning vector (B, C) -> (B, L, D).

A backbone knows nothing of noise, masks, schedules or losses. Its mixers keep one contract
(:mod:`dimba.backbones.mixer`): ``forward`` with optional per-row ``lengths`` (right padding never
changes the outputs at real positions), and ``allocate_state`` / ``prefill`` / ``step`` for causal
decoding. A new mixer is one file plus one entry in `MIXERS`. A causal backbone
(``bidirectional=False``) decodes one token at a time in O(1) work per token and layer for Mamba-2
(O(position) for attention) with :meth:`Backbone.allocate_cache`, :meth:`Backbone.prefill` and
:meth:`Backbone.step`.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable, NamedTuple

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from dimba.backbones.bimamba import SharedBiMamba2
from dimba.backbones.layers import Modulation, RMSNorm, SwiGLU
from dimba.backbones.mamba import BiMamba2, Mamba2Mixer
from dimba.backbones.transformer import Attention
from dimba.malloc import keep_freed_memory

# Large activations are reused instead of unmapped and page-faulted again on every pass (1.5-2x the
# speed of a Mamba-2 layer on CPU, for a higher peak RSS): see dimba.malloc; DIMBA_SYSTEM_MALLOC=1 opts out.
keep_freed_memory()

# model.bimamba: SharedBiMamba2, BiMamba2 (two mixers, the older block), or SharedBiMamba2 in Hydra's form
BIMAMBA_BLOCKS = ("shared", "separate", "hydra")


def _mamba2(d_model: int, bidirectional: bool, **kw) -> nn.Module:
    mixer_kw = {k: kw[k] for k in ("d_state", "d_conv", "expand", "headdim", "chunk_size")}
    if not bidirectional:
        return Mamba2Mixer(d_model, **mixer_kw)
    bimamba = kw.get("bimamba", "shared")
    if bimamba not in BIMAMBA_BLOCKS:
        raise ValueError(f"unknown bimamba {bimamba!r}: choose one of {', '.join(BIMAMBA_BLOCKS)}")
    if bimamba == "separate":
        return BiMamba2(d_model, tie_reverse=kw.get("tie_reverse", False), **mixer_kw)
    if kw.get("tie_reverse"):
        raise ValueError("tie_reverse=True shares the weights of bimamba='separate''s two mixers: "
                         f"use bimamba='separate' (the {bimamba} block has one mixer already)")
    return SharedBiMamba2(d_model, hydra=bimamba == "hydra", **mixer_kw)


def _check_mamba2(cfg: Any) -> None:
    if cfg.tie_reverse and cfg.bimamba != "separate":
        raise ValueError("tie_reverse=true ties the two mixers of bimamba=separate: set model.bimamba=separate "
                         f"(the {cfg.bimamba} block has one mixer already)")
    if (cfg.expand * cfg.d_model) % cfg.headdim:
        raise ValueError(f"expand*d_model={cfg.expand * cfg.d_model} is not divisible by headdim={cfg.headdim}: "
                         "change one of them")


def _transformer(d_model: int, bidirectional: bool, **kw) -> nn.Module:
    return Attention(d_model, kw["num_heads"], causal=not bidirectional)


def _check_transformer(cfg: Any) -> None:
    if cfg.d_model % cfg.num_heads:
        raise ValueError(f"d_model={cfg.d_model} is not divisible by num_heads={cfg.num_heads}: change one of them")


class BackboneSpec(NamedTuple):
    """A registered backbone: its mixer ``factory(d_model, bidirectional, **model settings)``, whether each
    block also has an MLP, and ``check(model_config)``, which raises ValueError (one line naming the fix)
    on settings this backbone cannot build."""

    factory: Callable[..., nn.Module]
    mlp: bool
    check: Callable[[Any], None]


# model.backbone name -> its spec: a new backbone is one mixer file plus one line here
MIXERS: dict[str, BackboneSpec] = {
    "mamba2": BackboneSpec(_mamba2, False, _check_mamba2),
    "transformer": BackboneSpec(_transformer, True, _check_transformer),
}


def backbone_names() -> list[str]:
    """The names ``model.backbone`` accepts."""
    return list(MIXERS)


class Block(nn.Module):
    """Pre-norm residual block: h + mixer(mod(norm(h), c)) [+ mlp(mod(norm(h), c))]."""

    def __init__(self, mixer: nn.Module, d_model: int, cond_dim: int, conditioning_type: str, mlp: bool):
        super().__init__()
        self.norm1 = RMSNorm(d_model)
        self.mod1 = Modulation(d_model, cond_dim, conditioning_type)
        self.mixer = mixer
        self.mlp = None
        if mlp:
            self.norm2 = RMSNorm(d_model)
            self.mod2 = Modulation(d_model, cond_dim, conditioning_type)
            self.mlp = SwiGLU(d_model)

    def forward(self, h: torch.Tensor, c: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """h (B, L, D), c (B, C) -> (B, L, D); ``lengths`` (B,) or None: real tokens per row."""
        h = h + self.mixer(self.mod1(self.norm1(h), c), lengths)  # (B, L, D)
        return self._mlp(h, c)

    def allocate_state(self, batch: int, max_len: int, device: torch.device | None = None,
                       dtype: torch.dtype | None = None):
        """Empty decoding state of the causal mixer for up to ``max_len`` positions: a KV cache for
        attention, the (conv, SSM) recurrent state for Mamba-2 (whose size does not depend on ``max_len``)."""
        return self.mixer.allocate_state(batch, max_len, device, dtype)

    def prefill(self, h: torch.Tensor, c: torch.Tensor, state) -> tuple[torch.Tensor, object]:
        """:meth:`forward` on a prompt h (B, P, D) at positions 0..P-1 that also fills ``state``."""
        y, state = self.mixer.prefill(self.mod1(self.norm1(h), c), state)  # (B, P, D)
        return self._mlp(h + y, c), state

    def step(self, h_t: torch.Tensor, c: torch.Tensor, state, pos: int) -> tuple[torch.Tensor, object]:
        """:meth:`forward` for the one token h_t (B, D) at position ``pos`` -> (B, D), new state."""
        y_t, state = self.mixer.step(self.mod1(self.norm1(h_t), c), state, pos)  # (B, D)
        return self._mlp(h_t + y_t, c), state

    def clean_blocks(self, h: torch.Tensor, c: torch.Tensor, block: int) -> tuple[torch.Tensor, object]:
        """Block diffusion's clean stream h (B, L, D) -> (its output (B, L, D), what the noisy stream reads of it:
        the mixer's ``clean_blocks``)."""
        y, clean = self.mixer.clean_blocks(self.mod1(self.norm1(h), c), block)  # (B, L, D)
        return self._mlp(h + y, c), clean

    def noisy_blocks(self, h: torch.Tensor, c: torch.Tensor, clean, block: int) -> torch.Tensor:
        """Block diffusion's noisy stream h (B, L, D) read with ``clean`` (:meth:`clean_blocks`) -> (B, L, D)."""
        return self._mlp(h + self.mixer.noisy_blocks(self.mod1(self.norm1(h), c), clean, block), c)

    def block_step(self, h: torch.Tensor, c: torch.Tensor, state, pos: int) -> tuple[torch.Tensor, object]:
        """Block diffusion decoding: one block h (B, Bk, D) at ``pos`` after the clean prefix in ``state``."""
        y, state = self.mixer.block_step(self.mod1(self.norm1(h), c), state, pos)  # (B, Bk, D)
        return self._mlp(h + y, c), state

    def dual_forward(self, h: torch.Tensor, c: torch.Tensor, start: int, end: int) -> tuple[torch.Tensor, object]:
        """:meth:`forward` on h (B, L, D) and the mixer's DualCache state of the block [start, end)."""
        y, state = self.mixer.dual_forward(self.mod1(self.norm1(h), c), start, end)  # (B, L, D)
        return self._mlp(h + y, c), state

    def dual_step(self, h: torch.Tensor, c: torch.Tensor, state, start: int) -> torch.Tensor:
        """The block h (B, Bk, D) at ``start`` read with the DualCache ``state`` of its surroundings."""
        return self._mlp(h + self.mixer.dual_step(self.mod1(self.norm1(h), c), state, start), c)  # (B, Bk, D)

    def _mlp(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """The residual MLP sub-block, when present: (B, [L,] D) -> (B, [L,] D)."""
        if self.mlp is not None:
            h = h + self.mlp(self.mod2(self.norm2(h), c))  # (B, [L,] D)
        return h


class Backbone(nn.Module):
    """A stack of `Block`s and a final RMSNorm."""

    def __init__(self, name: str, d_model: int, num_layers: int, cond_dim: int, conditioning_type: str = "film",
                 bidirectional: bool = True, **mixer_kwargs):
        super().__init__()
        if name not in MIXERS:
            raise ValueError(f"unknown backbone {name!r}: choose one of {', '.join(MIXERS)}")
        spec = MIXERS[name]
        self.blocks = nn.ModuleList(
            Block(spec.factory(d_model, bidirectional, **mixer_kwargs), d_model, cond_dim, conditioning_type, spec.mlp)
            for _ in range(num_layers)
        )
        self.norm = RMSNorm(d_model)
        self.bidirectional = bidirectional
        self.gradient_checkpointing = False

    def forward(self, h: torch.Tensor, c: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """h (B, L, D), c (B, C) -> (B, L, D) after the final norm.

        ``lengths`` (B,) int: the number of real tokens of each row, the rest being right padding.
        Outputs at real positions then equal those of each row run alone, in both directions;
        outputs at padded positions are unspecified. None: every position is real.

        With ``gradient_checkpointing`` (training with gradients), each block's activations are
        recomputed in the backward pass instead of stored.
        """
        recompute = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.blocks:
            if recompute:
                h = checkpoint(block, h, c, lengths, use_reentrant=False)  # (B, L, D)
            else:
                h = block(h, c, lengths)  # (B, L, D)
        return self.norm(h)

    def forward_blocks(self, h_noisy: torch.Tensor, h_clean: torch.Tensor, c: torch.Tensor, block: int,
                       clean_grad: bool = True) -> torch.Tensor:
        """Block diffusion (BD3-LM): the noisy stream h_noisy (B, L, D) read with the clean stream h_clean
        (B, L, D) -> the noisy stream's output (B, L, D) after the final norm.

        Outputs in block k (positions k*block .. (k+1)*block - 1) depend on the noisy block k and the clean
        blocks before it only; L must be a multiple of ``block``. With ``block = L`` this is :meth:`forward`.
        The clean stream runs first, through every layer; with ``clean_grad=False`` it runs without gradients,
        a constant context (Transformer-XL's stop-gradient memory), which saves its backward pass and activations.
        """
        if h_noisy.shape[1] % block:
            raise ValueError(f"sequence length {h_noisy.shape[1]} is not a multiple of block_size {block}: "
                             "give whole blocks (set the context length to a multiple of model.block_size)")
        recompute = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        run = partial(checkpoint, use_reentrant=False) if recompute else (lambda fn, *args: fn(*args))
        cleans = []
        with torch.set_grad_enabled(clean_grad and torch.is_grad_enabled()):
            for layer in self.blocks:
                h_clean, clean = run(layer.clean_blocks, h_clean, c, block)  # (B, L, D), the layer's context
                cleans.append(clean)
        for layer, clean in zip(self.blocks, cleans, strict=True):
            h_noisy = run(layer.noisy_blocks, h_noisy, c, clean, block)  # (B, L, D)
        return self.norm(h_noisy)

    def allocate_block_cache(self, batch: int, max_len: int, device: torch.device | None = None,
                             dtype: torch.dtype | None = None) -> list:
        """The empty-prefix cache of :meth:`block_step`, one state per layer (a KV cache of ``max_len`` positions
        for attention; for Mamba-2 the conv context and forward SSM state, whose size does not depend on it)."""
        return [layer.mixer.allocate_block_state(batch, max_len, device, dtype) for layer in self.blocks]

    def block_step(self, h: torch.Tensor, c: torch.Tensor, cache: list, pos: int) -> tuple[torch.Tensor, list]:
        """Block-diffusion decoding: one block h (B, Bk, D) at positions pos..pos+Bk-1 after the clean prefix that
        ``cache`` summarises -> (out (B, Bk, D) after the final norm, the cache after this block read as clean).

        The output equals :meth:`forward_blocks`' on that block with the prefix as the clean stream. ``cache`` is
        consumed: pass the returned one on (calls at the same ``pos`` with the cache from before it give the
        same output, which is how a block is denoised step after step and then committed).
        """
        new_cache = []
        for layer, state in zip(self.blocks, cache, strict=True):
            h, state = layer.block_step(h, c, state, pos)  # (B, Bk, D)
            new_cache.append(state)
        return self.norm(h), new_cache

    def dual_forward(self, h: torch.Tensor, c: torch.Tensor, start: int, end: int) -> tuple[torch.Tensor, list]:
        """:meth:`forward` on h (B, L, D) that also returns a DualCache for the block [start, end): what every
        layer's mixer keeps of the positions outside it (`dimba.backbones.dualcache`)."""
        cache = []
        for layer in self.blocks:
            h, state = layer.dual_forward(h, c, start, end)  # (B, L, D)
            cache.append(state)
        return self.norm(h), cache

    def dual_step(self, h: torch.Tensor, c: torch.Tensor, cache: list, start: int) -> torch.Tensor:
        """The block h (B, Bk, D) at positions start..start+Bk-1, every layer on the block alone with the
        ``cache`` of :meth:`dual_forward` -> (B, Bk, D) after the final norm. Approximate: the cache keeps the
        surroundings as they were when it was made (exact while the block is unchanged)."""
        for layer, state in zip(self.blocks, cache, strict=True):
            h = layer.dual_step(h, c, state, start)  # (B, Bk, D)
        return self.norm(h)

    def allocate_cache(self, batch: int, max_len: int, device: torch.device | None = None,
                       dtype: torch.dtype | None = None) -> list:
        """Empty decoding cache, one state per block, for sequences of up to ``max_len`` positions.

        Defaults to the device and dtype of the weights. Attention KV caches are written in
        place by :meth:`prefill` and :meth:`step`; Mamba-2 states are replaced, never modified.
        """
        self._require_causal("allocate_cache")
        return [block.allocate_state(batch, max_len, device, dtype) for block in self.blocks]

    def prefill(self, h: torch.Tensor, c: torch.Tensor, cache: list) -> tuple[torch.Tensor, list]:
        """Causal :meth:`forward` on a prompt h (B, P, D) at positions 0..P-1 that also fills ``cache``.

        Returns (out (B, P, D), new cache); decoding goes on with :meth:`step` at ``pos = P``.
        """
        self._require_causal("prefill")
        new_cache = []
        for block, state in zip(self.blocks, cache, strict=True):
            h, state = block.prefill(h, c, state)  # (B, P, D)
            new_cache.append(state)
        return self.norm(h), new_cache

    def step(self, h_t: torch.Tensor, c: torch.Tensor, cache: list, pos: int) -> tuple[torch.Tensor, list]:
        """One decoding step for the token at position ``pos``.

        h_t (B, D) hidden state of that token, c (B, C) conditioning -> (out (B, D) after the
        final norm, new cache).

        ``cache`` comes from :meth:`allocate_cache`, :meth:`prefill` or the previous step (at
        ``pos - 1``). Stepping through a sequence gives the outputs of :meth:`forward`.
        """
        self._require_causal("step")
        new_cache = []
        for block, state in zip(self.blocks, cache, strict=True):
            h_t, state = block.step(h_t, c, state, pos)  # (B, D)
            new_cache.append(state)
        return self.norm(h_t), new_cache

    def _require_causal(self, method: str) -> None:
        if self.bidirectional:
            raise ValueError(f"{method}() needs a causal backbone (bidirectional=False)")
