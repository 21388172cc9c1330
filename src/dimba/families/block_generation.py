"""Generation with a block-diffusion masked model (``model.block_size``, BD3-LM): blocks left to right, each
denoised by `dimba.samplers.masked.MaskedSampler` on its own, the clean past a cache.

With ``use_cache`` a finished block is read once (`DIMBA.block_step`) to advance the cache: the recurrent state
for Mamba (conv look-back and forward SSM state per layer, a fixed size), the key/value cache for attention. Each
denoising step then runs the model on the current block alone, O(block) work instead of O(length). Without it,
each step runs the two-stream model on the canvas up to the block's end (the same logits, for checks and
timing). The canvas is not limited to the training context: the blocks run on until the wanted length (rounded
up to whole blocks, cut afterwards), and stop at EOS.
"""

from __future__ import annotations

import torch

from dimba.errors import UsageError
from dimba.families.base import Generation
from dimba.samplers.masked import MaskedSampler
from dimba.samplers.state import ModelOutput, SamplerState


class BlockMaskedGeneration(Generation):
    """Block-by-block unmasking of ``seq_len`` tokens after ``prompt`` (N, P) with a block-diffusion model."""

    def __init__(self, model, prompt: torch.Tensor, seq_len: int, settings, eos_id: int | None, use_cache: bool):
        if settings.guidance_scale != 1.0:
            raise UsageError("classifier-free guidance is not available with a block-diffusion model "
                             "(model.block_size): leave --guidance at 1")
        if settings.dual_cache:
            raise UsageError("--dual-cache is for full-sequence models: a block-diffusion model (model.block_size) "
                             "caches its clean prefix exactly already; drop --dual-cache")
        n, p = prompt.shape
        self.block = block = model.config.block_size
        self.wanted = p + seq_len
        total = -(-self.wanted // block) * block  # whole blocks
        sampler = MaskedSampler(model.mask_id, settings.remasking, block, settings.temperature, settings.top_k,
                                settings.top_p, eos_id, aligned=True, threshold=settings.unmask_threshold,
                                entropy_bound=settings.unmask_entropy)
        state = sampler.initial_state(prompt, total - p)  # (N, total)
        sampler.set_timesteps(settings.num_steps, state)
        super().__init__(sampler, state)
        self.model, self.use_cache = model, use_cache
        self.prompt_mask = torch.arange(total, device=prompt.device)[None].expand(n, -1) < p  # (N, total)
        self.cond = model.condition(state.x, torch.zeros((), device=prompt.device), self.prompt_mask)  # (N, D)
        self.cache = model.allocate_block_cache(n, total) if use_cache else None
        self.cached_to = 0  # positions [0, cached_to) are read into the cache

    def predict(self, state: SamplerState, i: int) -> ModelOutput:
        """Log-probabilities (N, block, V) of the model block holding step ``i``'s positions (``start`` = its first)."""
        start = self.sampler.active_block(state, i)[0] // self.block * self.block
        end = start + self.block
        x = state.x
        if self.cache is None:
            logits = self.model.block_logits(x[:, :end], x[:, :end], self.prompt_mask[:, :end])[:, start:]
        else:
            while self.cached_to < start:  # read each finished block once, as clean
                a = self.cached_to
                _, self.cache = self.model.block_step(x[:, a:a + self.block], self.cond, self.cache, a)
                self.cached_to += self.block
            logits, _ = self.model.block_step(x[:, start:end], self.cond, self.cache, start)  # (N, block, V)
        return ModelOutput(logits=logits.log_softmax(-1), start=start)

    def finish(self, state: SamplerState, generator: torch.Generator | None) -> torch.Tensor:
        """The canvas cut to the prompt plus the wanted tokens: (N, P + seq_len)."""
        return state.x[:, :self.wanted]
