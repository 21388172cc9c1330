"""Absorbing-state ([MASK]) discrete diffusion sampling: MDLM ancestral and LLaDA remasking.

A sampler holds no model: `set_timesteps` plans the steps for a canvas and `step` turns the
model's logits on the current canvas into the next canvas (the contract of `dimba.samplers.state`). The generated region is filled in
blocks strictly left to right (semi-autoregressive, LLaDA); a single block is plain MDLM / LLaDA.
The [MASK] token is never sampled (SUBS) and a committed token is never changed.
"""

from __future__ import annotations

import torch

from dimba.samplers.categorical import sample_from_probs, token_probs
from dimba.samplers.state import ModelOutput, SamplerState

REMASKING = ("ancestral", "low_confidence", "random")


class MaskedSampler:
    """Unmask a canvas of [MASK] tokens over a planned number of steps.

    remasking:
        "ancestral": MDLM reverse process under the log-linear schedule. Within a block of k
            steps, step j goes from t = 1 - j/k to s = 1 - (j+1)/k and unmasks each masked
            position independently with probability (t - s) / t.
        "low_confidence": LLaDA. A block's masked count is split evenly over its steps; each step
            commits that many masked positions whose sampled token is the most probable.
        "random": LLaDA with the committed positions chosen uniformly at random.
    block_length: length of the blocks the generated region is split into (None: one block).
    temperature, top_k, top_p: token sampling, in float64 (temperature 0 is greedy).
    eos_id: once a row commits eos at position j, its masked positions after j become eos.
    aligned: block boundaries fall on multiples of block_length from position 0 (a block-diffusion model's
        blocks), the first generated block ending at the first boundary after the prompt.
    threshold: parallel unmasking (Fast-dLLM): each step commits every masked token of the block whose sampled
        token has a probability above it (at least the most confident one).
    entropy_bound: parallel unmasking (EB-sampler): each step commits the masked tokens of the block in order
        of increasing entropy while the entropies of those before stay within this bound, in nats (at least one).

    With ``threshold`` and/or ``entropy_bound`` (both: the union), the count of a step is the rule's, not a
    planned one: each step works on the first block with a masked token, a block's planned steps are its
    maximum (its last commits what is left) and the state is done, ending generation, as soon as no [MASK] is
    left: a block may take fewer model calls than planned.
    """

    def __init__(self, mask_id: int, remasking: str = "low_confidence", block_length: int | None = None,
                 temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                 eos_id: int | None = None, aligned: bool = False, threshold: float | None = None,
                 entropy_bound: float | None = None):
        if remasking not in REMASKING:
            raise ValueError(f"remasking must be one of {REMASKING}, got {remasking!r}")
        if block_length is not None and block_length < 1:
            raise ValueError(f"block_length must be >= 1 or None, got {block_length}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        self.mask_id = mask_id
        self.remasking = remasking
        self.block_length = block_length
        self.temperature = temperature
        self.top_k = top_k
        self.top_p = top_p
        self.eos_id = eos_id
        self.aligned = aligned
        self.threshold, self.entropy_bound = threshold, entropy_bound
        self._adaptive = threshold is not None or entropy_bound is not None
        self._steps: list[int] = []  # planned steps of each block
        self._spent: tuple[int, int] = (-1, 0)  # adaptive rules: (block, steps already taken in it)
        self._length = 0
        self._gen_start = 0
        self._blocks: list[tuple[int, int]] = []  # [start, end) of each block
        self._plan: list[tuple[int, int, int]] = []  # step -> (block, step within block, steps in block)
        self._block_masked: tuple[int, torch.Tensor] | None = None  # (block, (N,) masked count at its first step)

    def set_timesteps(self, num_steps: int, state: SamplerState) -> None:
        """Plan num_steps steps for the canvas of ``state``, whose positions >= ``state.gen_start`` are generated.

        The region [gen_start, L) is split into blocks of block_length (the last may be
        shorter); each block gets num_steps // n_blocks steps, the remainder one each to the first
        blocks. Raises ValueError if num_steps < 1 or num_steps < n_blocks.
        """
        length, gen_start = state.x.shape[1], state.gen_start
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        if not 0 <= gen_start <= length:
            raise ValueError(f"need 0 <= gen_start <= length, got gen_start={gen_start}, length={length}")
        size = self.block_length or max(length - gen_start, 1)
        first = (gen_start // size + 1) * size if self.aligned else gen_start  # where the blocks after the first start
        self._blocks = ([(gen_start, min(first, length))] if first > gen_start else []) + \
            [(a, min(a + size, length)) for a in range(first, length, size)] or [(gen_start, length)]
        n_blocks = len(self._blocks)
        if num_steps < n_blocks:
            raise ValueError(f"num_steps={num_steps} is fewer than the {n_blocks} blocks of length "
                             f"{self.block_length}; each block needs at least one step")
        base, extra = divmod(num_steps, n_blocks)
        steps = [base + (b < extra) for b in range(n_blocks)]
        self._plan = [(b, j, k) for b, k in enumerate(steps) for j in range(k)]
        self._steps, self._spent = steps, (-1, 0)
        self._length, self._gen_start = length, gen_start
        self._block_masked = None

    def active_block(self, state: SamplerState, i: int) -> tuple[int, int]:
        """[start, end) of the block step ``i`` unmasks on ``state`` (the planned one, or with a parallel unmasking
        rule the first block holding a [MASK])."""
        return self._blocks[self._block_of(state.x, i)]

    def _block_of(self, x: torch.Tensor, i: int) -> int:
        if not self._adaptive:
            return self._plan[i][0]
        masked = (x[:, self._gen_start:] == self.mask_id).any(0).nonzero()  # (M, 1) masked columns
        first = self._gen_start + (int(masked[0, 0]) if len(masked) else self._length - self._gen_start - 1)
        return next(b for b, (_, end) in enumerate(self._blocks) if first < end)

    @property
    def num_steps(self) -> int:
        """Number of steps planned by the last `set_timesteps`."""
        return len(self._plan)

    @property
    def timesteps(self) -> list[float]:
        """The time of each step, from 1 (all masked) down: 1 - i / num_steps."""
        return [1.0 - i / len(self._plan) for i in range(len(self._plan))]

    def initial_state(self, prompt: torch.Tensor, length: int) -> SamplerState:
        """The canvas (N, P + length): the prompt (N, P), then [MASK] everywhere."""
        n, p = prompt.shape
        fill = torch.full((n, length), self.mask_id, dtype=torch.long, device=prompt.device)
        return self._with_done(SamplerState(x=torch.cat([prompt, fill], dim=1), gen_start=p))  # (N, P + length)

    def step(self, state: SamplerState, output: ModelOutput, i: int,
             generator: torch.Generator | None = None) -> SamplerState:
        """``output.logits`` (N, L, V) of the model on the canvas ``state.x`` (N, L) (mask_id where still masked)
        -> the next state.

        Only masked positions of step i's block are unmasked; the inputs are not modified. The
        LLaDA modes must be stepped in order through each block (the block's planned counts are
        fixed at its first step). The state is done when no [MASK] is left.
        """
        x, logits = state.x, output.logits
        if not self._plan:
            raise RuntimeError("call set_timesteps before step")
        if not 0 <= i < len(self._plan):
            raise IndexError(f"step {i} is outside the {len(self._plan)} planned steps")
        b, j, k = self._plan[i] if not self._adaptive else self._adaptive_step(x, i)
        start, end = self._blocks[b]
        off = output.start
        if x.dim() != 2 or x.shape[1] != self._length or logits.shape[0] != x.shape[0] or not (
                off <= start and end <= off + logits.shape[1]):
            raise ValueError(f"expected x (N, {self._length}) and logits (N, L', V) covering positions {start}..{end - 1} "
                             f"from position {off}, got {tuple(x.shape)} and {tuple(logits.shape)}")
        block = x[:, start:end]  # (N, Lb)
        masked = block == self.mask_id  # (N, Lb)
        lg = logits[:, start - off:end - off].to(torch.float64, copy=True)  # (N, Lb, V)
        if self.mask_id < lg.shape[-1]:
            lg[..., self.mask_id] = float("-inf")  # SUBS: never sample [MASK]
        probs = token_probs(lg, self.temperature, self.top_k, self.top_p)  # (N, Lb, V) float64
        tokens = probs.argmax(-1) if self.temperature == 0 else sample_from_probs(probs, generator)  # (N, Lb)
        if self._adaptive:
            commit = masked & self._parallel_commit(probs, tokens, masked, last=j >= k - 1)  # (N, Lb)
        elif self.remasking == "ancestral":
            t, s = 1 - j / k, 1 - (j + 1) / k
            u = torch.rand(masked.shape, generator=generator, device=x.device, dtype=torch.float64)  # (N, Lb)
            commit = masked & (u < (t - s) / t)  # (N, Lb)
        else:
            commit = masked & self._most_confident(probs, tokens, masked, b, j, k, generator)  # (N, Lb)
        out = x.clone()  # (N, L)
        out[:, start:end] = torch.where(commit, tokens, block)
        if self.eos_id is not None:
            self._fill_after_eos(out)
        return self._with_done(state.replace(x=out))

    def _with_done(self, state: SamplerState) -> SamplerState:
        return state.replace(done=not bool((state.x == self.mask_id).any()))

    def _adaptive_step(self, x: torch.Tensor, i: int) -> tuple[int, int, int]:
        """(block, steps taken in it, its planned steps) under a parallel unmasking rule."""
        b = self._block_of(x, i)
        spent = self._spent[1] + 1 if self._spent[0] == b else 0
        self._spent = (b, spent)
        return b, spent, self._steps[b]

    def _parallel_commit(self, probs: torch.Tensor, tokens: torch.Tensor, masked: torch.Tensor, last: bool
                         ) -> torch.Tensor:
        """The positions (N, Lb) bool the threshold and / or entropy-bound rules commit (every masked one at a
        block's last planned step, and at least the most confident masked one of each row)."""
        if last:
            return masked
        conf = probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1).masked_fill(~masked, -1.0)  # (N, Lb)
        pick = torch.zeros_like(masked)
        if self.threshold is not None:
            pick |= conf > self.threshold
        if self.entropy_bound is not None:
            entropy = (probs * probs.clamp_min(1e-300).log()).sum(-1).neg().masked_fill(~masked, float("inf"))  # (N, Lb)
            order = entropy.argsort(dim=-1, stable=True)  # (N, Lb) lowest entropy first
            ranked = entropy.gather(-1, order)  # (N, Lb)
            within = (ranked.cumsum(-1) - ranked) <= self.entropy_bound  # (N, Lb): entropies before it in the bound
            pick |= torch.zeros_like(masked).scatter(-1, order, within)
        best = torch.zeros_like(masked).scatter(-1, conf.argmax(-1, keepdim=True), True)  # (N, Lb)
        return (pick | best) & masked

    def _most_confident(self, probs: torch.Tensor, tokens: torch.Tensor, masked: torch.Tensor, b: int, j: int, k: int,
                        generator: torch.Generator | None) -> torch.Tensor:
        """LLaDA: the planned number of masked positions with the highest confidence, per row: (N, Lb) bool."""
        left = masked.sum(-1)  # (N,)
        if j == 0:
            self._block_masked = (b, left)
        elif self._block_masked is None or self._block_masked[0] != b or self._block_masked[1].shape != left.shape:
            raise RuntimeError(f"step for block {b} was not started at its first step; call the steps in order")
        n = self._block_masked[1]  # (N,)
        planned = n // k + (n % k > j).long()  # (N,)
        count = left if j == k - 1 else torch.minimum(planned, left)  # (N,)
        if self.remasking == "low_confidence":
            conf = probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)  # (N, Lb)
        else:
            conf = torch.rand(masked.shape, generator=generator, device=masked.device, dtype=torch.float64)  # (N, Lb)
        order = conf.masked_fill(~masked, float("-inf")).argsort(dim=-1, descending=True, stable=True)  # (N, Lb)
        ranks_kept = torch.arange(masked.shape[1], device=masked.device) < count[:, None]  # (N, Lb) in sorted order
        return torch.zeros_like(masked).scatter(-1, order, ranks_kept)

    def _fill_after_eos(self, x: torch.Tensor) -> None:
        """In place: every masked position after a row's first eos (at or after gen_start) becomes eos."""
        pos = torch.arange(x.shape[1], device=x.device)  # (L,)
        is_eos = (x == self.eos_id) & (pos >= self._gen_start)  # (N, L)
        first = torch.where(is_eos.any(-1), is_eos.int().argmax(-1), x.shape[1])  # (N,)
        x.masked_fill_((x == self.mask_id) & (pos > first[:, None]), self.eos_id)
