"""Attention mixer: multi-head self-attention with rotary positions and SDPA, bidirectional or causal.

A causal :class:`Attention` also decodes incrementally with a key/value cache:
:meth:`Attention.allocate_state`, :meth:`Attention.prefill` and :meth:`Attention.step`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dimba.backbones.mixer import real_positions


def rotary_tables(length: int, head_dim: int, device: torch.device, base: float = 10_000.0,
                  start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables (length, head_dim / 2) of RoPE (Su et al. 2021) for positions start..start+length-1."""
    inv = 1.0 / base ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)  # (Dh/2,)
    positions = torch.arange(start, start + length, device=device, dtype=torch.float32)  # (L,)
    angles = positions[:, None] * inv[None]  # (L, Dh/2)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[..., :Dh/2], x[..., Dh/2:]) of x: (B, H, L, Dh) by the position angles.

    Computed in float32 (float64 for float64 inputs) and returned in the dtype of x.
    """
    xf = x if x.dtype == torch.float64 else x.float()
    x1, x2 = xf.chunk(2, dim=-1)  # (B, H, L, Dh/2) each
    out = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)  # (B, H, L, Dh)
    return out.to(x.dtype)


class Attention(nn.Module):
    """Self-attention mixer with the contract of every mixer (:mod:`dimba.backbones.mixer`): (B, L, D) -> (B, L, D)."""

    def __init__(self, d_model: int, num_heads: int, causal: bool = False):
        super().__init__()
        if d_model % num_heads:
            raise ValueError(f"d_model={d_model} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.head_dim = d_model // num_heads
        if self.head_dim % 2:
            raise ValueError(f"head dimension {self.head_dim} must be even for rotary embeddings")
        self.causal = causal
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.out_proj = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, L, D) -> (B, L, D). With ``lengths`` (B,), bidirectional attention masks the keys after
        each row's real tokens; causal attention never reads right padding and needs no mask."""
        q, k, v = self._rotated_qkv(x, start=0)  # (B, H, L, Dh) each
        mask = None
        if lengths is not None and not self.causal:
            mask = real_positions(lengths, x.shape[1])[:, None, None, :]  # (B, 1, 1, L): keys to attend to
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=self.causal)  # (B, H, L, Dh)
        return self._output(y)  # (B, L, D)

    def allocate_state(self, batch: int, max_len: int, device: torch.device | None = None,
                       dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Empty key/value cache ``(k, v)``, each (batch, H, max_len, Dh), for up to ``max_len`` positions.

        Defaults to the device and dtype of the weights. :meth:`prefill` and :meth:`step` write
        into these tensors in place.
        """
        self._require_causal()
        weight = self.qkv.weight
        device = weight.device if device is None else device
        dtype = weight.dtype if dtype is None else dtype
        shape = (batch, self.num_heads, max_len, self.head_dim)
        return torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype)

    def prefill(self, x: torch.Tensor, cache: tuple[torch.Tensor, torch.Tensor]
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Causal forward on a prompt x (B, P, D) at positions 0..P-1 -> (y (B, P, D), cache).

        Stores the keys and values of the P positions in ``cache`` in place, so decoding goes on
        with :meth:`step` at ``pos = P``.
        """
        self._require_causal()
        k_cache, v_cache = cache
        length = x.shape[1]
        self._check_position(length - 1, k_cache)
        q, k, v = self._rotated_qkv(x, start=0)  # (B, H, P, Dh) each
        k_cache[:, :, :length] = k
        v_cache[:, :, :length] = v
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, P, Dh)
        return self._output(y), cache  # (B, P, D)

    def step(self, x_t: torch.Tensor, cache: tuple[torch.Tensor, torch.Tensor], pos: int
             ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """One decoding step: x_t (B, D) at absolute position ``pos`` -> (y_t (B, D), cache).

        Writes the key and value of position ``pos`` into ``cache`` in place and attends over
        the cached positions 0..pos, which must have been filled by earlier calls (or :meth:`prefill`).
        Stepping through a sequence gives the outputs of the causal :meth:`forward`.
        """
        self._require_causal()
        k_cache, v_cache = cache
        self._check_position(pos, k_cache)
        q, k, v = self._rotated_qkv(x_t[:, None], start=pos)  # (B, H, 1, Dh) each
        k_cache[:, :, pos] = k[:, :, 0]
        v_cache[:, :, pos] = v[:, :, 0]
        y = F.scaled_dot_product_attention(q, k_cache[:, :, : pos + 1], v_cache[:, :, : pos + 1])  # (B, H, 1, Dh)
        return self._output(y)[:, 0], cache  # (B, D)

    # ----- block diffusion ---------------------------------------------------------------------
    def clean_blocks(self, x_clean: torch.Tensor, block: int
                     ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Block diffusion's clean stream x_clean (n, L, D) -> (its output: each block attends to the clean blocks up
        to its own, and the clean keys and values (n, H, L, Dh) each, what the noisy stream reads)."""
        length = x_clean.shape[1]
        q, k, v = self._rotated_qkv(x_clean, 0)  # (n, H, L, Dh) each
        mask = block_diffusion_mask(length, block, x_clean.device)[length:, length:]  # (L, L): clean queries and keys
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (n, H, L, Dh)
        return self._output(y), (k, v)

    def noisy_blocks(self, x_noisy: torch.Tensor, clean: tuple[torch.Tensor, torch.Tensor], block: int
                     ) -> torch.Tensor:
        """Block diffusion's noisy stream x_noisy (n, L, D): each block attends to itself and to the clean blocks
        before it, whose keys and values ``clean`` holds (:meth:`clean_blocks`) -> (n, L, D)."""
        length = x_noisy.shape[1]
        q, k, v = self._rotated_qkv(x_noisy, 0)  # (n, H, L, Dh) each
        k, v = (torch.cat(pair, dim=2) for pair in zip((k, v), clean))  # (n, H, 2L, Dh) each
        mask = block_diffusion_mask(length, block, x_noisy.device)[:length]  # (L, 2L): BD3-LM's, noisy queries
        return self._output(F.scaled_dot_product_attention(q, k, v, attn_mask=mask))

    def allocate_block_state(self, batch: int, max_len: int, device: torch.device | None = None,
                             dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Empty key/value cache ``(k, v)``, each (batch, H, max_len, Dh), for `block_step`."""
        weight = self.qkv.weight
        shape = (batch, self.num_heads, max_len, self.head_dim)
        kw = {"device": weight.device if device is None else device, "dtype": weight.dtype if dtype is None else dtype}
        return torch.zeros(shape, **kw), torch.zeros(shape, **kw)

    def block_step(self, x: torch.Tensor, cache: tuple[torch.Tensor, torch.Tensor], pos: int
                   ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """One block x (n, Bk, D) at positions pos..pos+Bk-1, attending to the cached clean positions before
        ``pos`` and to itself -> (y (n, Bk, D), cache). Writes the block's keys and values into ``cache`` in
        place: the next call at the same ``pos`` overwrites them, a call at ``pos + Bk`` reads them as clean."""
        k_cache, v_cache = cache
        end = pos + x.shape[1]
        self._check_position(end - 1, k_cache)
        q, k, v = self._rotated_qkv(x, start=pos)  # (n, H, Bk, Dh) each
        k_cache[:, :, pos:end] = k
        v_cache[:, :, pos:end] = v
        y = F.scaled_dot_product_attention(q, k_cache[:, :, :end], v_cache[:, :, :end])  # (n, H, Bk, Dh)
        return self._output(y), cache

    # ----- DualCache (`dimba.backbones.dualcache`) ------------------------------------------------
    def dual_forward(self, x: torch.Tensor, start: int, end: int) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """:meth:`forward` on x (n, L, D) and the keys and values of every position, (n, H, L, Dh) each."""
        q, k, v = self._rotated_qkv(x, start=0)  # (n, H, L, Dh) each
        return self._output(F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)), (k, v)

    def dual_step(self, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor], start: int) -> torch.Tensor:
        """The block x (n, Bk, D) at positions start..start+Bk-1, attending to itself and to the cached keys and
        values of every other position -> (n, Bk, D)."""
        end = start + x.shape[1]
        q, k, v = self._rotated_qkv(x, start=start)  # (n, H, Bk, Dh) each
        k, v = (torch.cat([c[:, :, :start], new, c[:, :, end:]], dim=2) for c, new in zip(state, (k, v)))  # (n, H, L, Dh)
        mask = None
        if self.causal:
            mask = torch.arange(k.shape[2], device=x.device)[None] <= torch.arange(start, end, device=x.device)[:, None]
        return self._output(F.scaled_dot_product_attention(q, k, v, attn_mask=mask))  # (n, Bk, D)

    def _rotated_qkv(self, x: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys and values of x (B, L, D) at positions start..start+L-1, RoPE applied to q and k."""
        b, length, _ = x.shape
        qkv = self.qkv(x).view(b, length, 3, self.num_heads, self.head_dim)  # (B, L, 3, H, Dh)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, L, Dh) each
        cos, sin = rotary_tables(length, self.head_dim, x.device, start=start)  # (L, Dh/2) each
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v

    def _output(self, y: torch.Tensor) -> torch.Tensor:
        """Merge the heads of y (B, H, L, Dh) and project: -> (B, L, D)."""
        return self.out_proj(y.transpose(1, 2).flatten(2))  # (B, L, D)

    def _require_causal(self) -> None:
        if not self.causal:
            raise ValueError("incremental decoding needs a causal Attention (causal=True)")

    @staticmethod
    def _check_position(pos: int, k_cache: torch.Tensor) -> None:
        if not 0 <= pos < k_cache.shape[2]:
            raise ValueError(f"position {pos} is outside the cache of {k_cache.shape[2]} positions")


def block_diffusion_mask(length: int, block: int, device: torch.device | None = None) -> torch.Tensor:
    """BD3-LM's attention mask over [x_t, x_0] (2L, 2L) bool, True = attend: a noisy token reads its own noisy
    block and the clean blocks before it; a clean token reads the clean blocks up to its own."""
    blk = torch.arange(length, device=device) // block  # (L,)
    same = blk[:, None] == blk[None, :]  # (L, L)
    before = blk[:, None] > blk[None, :]  # (L, L): key block before the query's
    top = torch.cat([same, before], dim=1)  # (L, 2L): noisy queries
    bottom = torch.cat([torch.zeros_like(same), same | before], dim=1)  # (L, 2L): clean queries
    return torch.cat([top, bottom], dim=0)  # (2L, 2L)
