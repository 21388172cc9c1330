"""What a person watching a generation sees after each step (`dimba generate --show`, the `dimba serve` page).

For every row and every shown position (the first ``length`` positions after the prompt) a `CanvasView` says
which token is shown, what the position is, and the model's confidence in it. It reads the generation loop's
`dimba.generation.Step`s only, so it works for every family:

- token samplers (ids on the canvas: masked, ar, ...): a position is decided once its id changed from the
  initial canvas ([MASK], or the ar fill); its confidence is the probability the model gave the committed token
  at the step that committed it (temperature 1, [MASK] excluded), and for a position still undecided the
  probability of the model's best guess;
- latent samplers (continuous, hybrid): the shown token is the rounded x0 estimate (the most likely token under
  the output head), its confidence that token's probability; the hybrid family's absorbed positions are masks.

Positions from a row's first end-of-text token on are the end. A view never draws random numbers, so watching
a generation does not change it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dimba.generation import Step

MASK, NEW, DONE, ESTIMATE, END = "m", "n", "d", "e", "x"
KINDS = {MASK: "still masked (undecided)", NEW: "committed at this step", DONE: "committed at an earlier step",
         ESTIMATE: "the current rounded x0 estimate (latent samplers)", END: "after the end of the text"}


@dataclass
class Frame:
    """The shown canvas after ``step`` of ``num_steps`` steps (``step == num_steps`` once finished).

    ids: (N, W) the token shown at each position; kinds: one string per row, one `KINDS` letter per position;
    confidence: (N, W) float, NaN where the model said nothing about the position yet.
    """

    step: int
    num_steps: int
    ids: torch.Tensor
    kinds: list[str]
    confidence: torch.Tensor


def _probs(logits: torch.Tensor, never: int | None = None) -> torch.Tensor:
    """The model's probabilities (temperature 1) of logits or log-probabilities (..., V), in float32, with token
    ``never`` (the [MASK] a sampler never draws) excluded."""
    logits = logits.float()
    if never is not None and never < logits.shape[-1]:
        logits = logits.clone()
        logits[..., never] = float("-inf")
    return logits.softmax(-1)


_CODE = {kind: code for code, kind in enumerate(KINDS)}


class CanvasView:
    """Follows one generation step by step (`update`), then its final ids (`final`).

    ``model`` is the generating model (latent samplers are rounded with its output head), ``length`` the number
    of positions shown after the prompt, ``eos_id`` the end-of-text token.
    """

    def __init__(self, model, length: int, eos_id: int):
        self.model, self.length, self.eos_id = model, length, eos_id
        self._decided: torch.Tensor | None = None  # (N, L) token samplers: positions committed so far
        self._confidence: torch.Tensor | None = None  # (N, L) token samplers: confidence kept from earlier steps
        self._last: Frame | None = None

    def update(self, step: Step) -> Frame:
        """The frame after ``step``."""
        state = step.state
        window = slice(state.gen_start, state.gen_start + self.length)
        latent = state.x.is_floating_point()
        ids, undecided, confidence = self._latent(step) if latent else self._tokens(step)
        ids, undecided, confidence = ids[:, window], undecided[:, window], confidence[:, window]  # (N, W) each
        new = torch.ones_like(undecided) if self._last is None else ids != self._last.ids
        codes = torch.where(new, _CODE[NEW], _CODE[ESTIMATE if latent else DONE]).masked_fill(undecided, _CODE[MASK])
        self._last = Frame(step.i + 1, step.num_steps, ids, self._kinds(ids, codes, undecided), confidence)
        return self._last

    def final(self, ids: torch.Tensor, prompt_len: int) -> Frame:
        """The frame of the ids (N, P + new) the generation returned: every position decided, with the confidence
        of the last frame where it showed the same token."""
        shown = ids[:, prompt_len: prompt_len + self.length]  # (N, W)
        confidence = torch.full(shown.shape, float("nan"))
        last = self._last
        if last is not None and last.ids.shape == shown.shape:
            confidence = torch.where(shown == last.ids, last.confidence, confidence)
        steps = last.num_steps if last is not None else 0
        codes = torch.full(shown.shape, _CODE[DONE])
        return Frame(steps, steps, shown, self._kinds(shown, codes, torch.zeros_like(codes, dtype=torch.bool)),
                     confidence)

    def _tokens(self, step: Step) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Ids, undecided positions and confidence (N, L) of a token canvas."""
        x = step.state.x
        changed = x != step.before.x  # (N, L)
        decided = changed if self._decided is None else self._decided | changed
        confidence = torch.full(x.shape, float("nan")) if self._confidence is None else self._confidence
        if step.output.logits is not None:
            probs = _probs(step.output.logits, self.model.mask_id)
            if probs.dim() == 3:  # (N, W, V) from output.start: undecided positions there show the best guess
                window = slice(step.output.start, step.output.start + probs.shape[1])  # W = L but for a block model
                p_token, best = torch.full(x.shape, float("nan"), dtype=probs.dtype), torch.full_like(confidence, float("nan"))
                p_token[:, window] = probs.gather(-1, x[:, window, None])[..., 0]  # (N, L)
                best[:, window] = probs.max(-1).values.to(best.dtype)
                confidence = torch.where(decided, confidence, best)
            else:  # (N, V): the distribution of the position drawn at this step
                p_token = probs.gather(1, x)  # (N, L)
            confidence = torch.where(changed, p_token, confidence)
        self._decided, self._confidence = decided, confidence
        return x, ~decided, confidence

    def _latent(self, step: Step) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rounded x0 estimate, absorbed positions and confidence (N, L) of a latent canvas."""
        state, output = step.state, step.output
        logits = output.logits if output.logits is not None else self.model.decode(output.x0)  # (N, L, V)
        top = _probs(logits).max(-1)
        absorbed = state.masked if state.masked is not None else torch.zeros_like(top.indices, dtype=torch.bool)
        return top.indices, absorbed, top.values

    def _kinds(self, ids: torch.Tensor, codes: torch.Tensor, undecided: torch.Tensor) -> list[str]:
        """The kind strings of ``codes`` (N, W), every position from a row's first decided end-of-text token on
        marked as the end."""
        is_end = (ids == self.eos_id) & ~undecided  # (N, W)
        first = torch.where(is_end.any(-1), is_end.int().argmax(-1), ids.shape[1])  # (N,)
        after = torch.arange(ids.shape[1], device=ids.device)[None] >= first[:, None]  # (N, W)
        letters = list(KINDS)
        return ["".join(letters[c] for c in row) for row in codes.masked_fill(after, _CODE[END]).tolist()]


class Pieces:
    """The text of single tokens (cached): what each canvas position shows; special tokens show nothing."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        if token_id not in self._cache:
            self._cache[token_id] = self.tokenizer.decode([token_id])
        return self._cache[token_id]

    def row(self, ids: torch.Tensor) -> list[str]:
        """The pieces of a row of ids (W,)."""
        return [self(i) for i in ids.tolist()]
