"""`dimba generate --show`: the canvas redrawn in the terminal at every step (rich), on stderr.

Masked positions are grey blocks, tokens committed at this step are highlighted, earlier ones are coloured by the
model's confidence (red = unsure, green = sure), and the continuous family's rounded x0 estimate is in italics;
a header gives the step, the elapsed time and tokens/s. The final text still goes alone to stdout.
"""

from __future__ import annotations

import math
import time

import torch

from dimba.canvas_view import DONE, END, ESTIMATE, MASK, NEW, CanvasView, Frame, Pieces
from dimba.errors import UsageError
from dimba.generation import Step

MASK_GLYPH = "░"


def confidence_colour(p: float) -> str:
    """A rich colour from red (p = 0) through yellow to green (p = 1); grey for an unknown (NaN) confidence."""
    if math.isnan(p):
        return "grey50"
    p = min(max(p, 0.0), 1.0)
    red, green = (255, int(510 * p)) if p < 0.5 else (int(510 * (1 - p)), 255)
    return f"rgb({red},{green},60)"


def _style(kind: str, p: float) -> str:
    if kind == MASK:
        return "grey42"
    if kind == NEW:
        return "bold black on bright_yellow"
    if kind == ESTIMATE:
        return f"italic {confidence_colour(p)}"
    return confidence_colour(p) if kind == DONE else "grey30"


def render_row(prompt: str, pieces: list[str], kinds: str, confidence: list[float]):
    """The rich Text of one canvas row: the prompt (dim), then each position by its kind."""
    from rich.text import Text

    text = Text()
    text.append(prompt, style="dim")
    for piece, kind, p in zip(pieces, kinds, confidence):
        if kind == END:
            break
        text.append(MASK_GLYPH if kind == MASK else piece, style=_style(kind, p))
    return text


class LiveView:
    """A step observer (``on_step``) that draws each step of a generation with rich's Live display.

    Use as a context manager around the generation: ``with LiveView(...) as view: generate(..., on_step=view)``.
    ``prompt`` is the prompt text, ``length`` the new tokens shown, ``rows`` the samples generated.
    """

    def __init__(self, model, tokenizer, prompt: str, length: int, rows: int = 1, console=None):
        try:
            from rich.console import Console
        except ImportError:
            raise UsageError("--show needs the rich package: pip install 'dimba[serve]'") from None
        self.view, self.pieces = CanvasView(model, length, tokenizer.eos_id), Pieces(tokenizer)
        self.prompt, self.rows = prompt, rows
        self.console = console if console is not None else Console(stderr=True)
        self._live = None
        self._start = 0.0

    def __enter__(self) -> "LiveView":
        from rich.live import Live

        self._start = time.perf_counter()
        self._live = Live(console=self.console, auto_refresh=False, transient=False)
        self._live.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._live.__exit__(*exc)

    def __call__(self, step: Step) -> None:
        self.show(self.view.update(step))

    def show(self, frame: Frame) -> None:
        """Draw ``frame`` now."""
        from rich.console import Group
        from rich.text import Text

        elapsed = time.perf_counter() - self._start
        decided = sum(len(k) - k.count(MASK) for k in frame.kinds)
        header = Text(f"step {frame.step}/{frame.num_steps} · {elapsed:.2f} s · {decided / max(elapsed, 1e-9):.0f} "
                      "tokens/s", style="bold")
        rows = [render_row(self.prompt, self.pieces.row(ids), kinds, conf.tolist())
                for ids, kinds, conf in zip(frame.ids, frame.kinds, frame.confidence)]
        self._live.update(Group(header, *rows), refresh=True)

    def finish(self, ids: torch.Tensor, prompt_len: int) -> None:
        """Draw the final canvas of the generated ids (N, P + new)."""
        self.show(self.view.final(ids, prompt_len))
