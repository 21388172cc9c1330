"""What a watcher sees of a generation: `dimba.canvas_view` frames (every family), the rich terminal view of
`dimba generate --show`, and that watching never changes what is generated."""

import io
import math
import re

import pytest
import torch

from dimba import DIMBA
from dimba.canvas_view import CanvasView, Pieces
from dimba.cli import main
from dimba.config import SampleConfig
from dimba.generation import generate_ids
from dimba.live import MASK_GLYPH, LiveView, confidence_colour, render_row
from dimba.loading import load_for_inference
from dimba.special_tokens import MASK_ID

rich = pytest.importorskip("rich")

V = 40
SMALL = dict(d_model=32, num_denoiser_layers=1, d_state=8, headdim=16, chunk_size=8, context_length=24)


def _frames(model, settings, length=16, rows=2, seed=0):
    """The frames of one generation and its ids, and the ids of the same generation unwatched."""
    view, frames = CanvasView(model, length, eos_id=V - 1), []
    prompt = [5, 6, 7]
    ids = generate_ids(model, prompt, length, settings, rows, torch.Generator().manual_seed(seed), V - 1,
                       on_step=lambda step: frames.append(view.update(step)))
    plain = generate_ids(model, prompt, length, settings, rows, torch.Generator().manual_seed(seed), V - 1)
    return frames, view.final(ids, len(prompt)), ids, plain


@pytest.mark.parametrize("family", ["masked", "continuous", "hybrid", "ar"])
def test_watching_changes_nothing_and_every_frame_is_consistent(family):
    torch.manual_seed(0)
    model = DIMBA(V, family=family, **SMALL).eval()
    frames, final, ids, plain = _frames(model, SampleConfig(num_steps=8))
    assert torch.equal(ids, plain)  # a view draws no random numbers
    assert frames and [f.step for f in frames] == list(range(1, len(frames) + 1))
    for frame in frames:
        assert frame.ids.shape == frame.confidence.shape == (2, 16) and len(frame.kinds) == 2
        assert all(len(k) == 16 and set(k) <= set("mndex") for k in frame.kinds)
        known = frame.confidence[~frame.confidence.isnan()]
        assert ((known >= 0) & (known <= 1)).all()
    assert "m" not in "".join(final.kinds) and torch.equal(final.ids, ids[:, 3:19])
    latent = family in ("continuous", "hybrid")
    assert all(("e" in k or "n" in k or "x" in k) for k in frames[-1].kinds) if latent else True
    assert not any("e" in k for f in frames for k in f.kinds) or latent  # estimates only for latent canvases


def test_masked_frames_show_masks_being_committed():
    torch.manual_seed(1)
    model = DIMBA(V, family="masked", **SMALL).eval()
    frames, _, _, _ = _frames(model, SampleConfig(num_steps=8), rows=1)
    masks = [f.kinds[0].count("m") for f in frames]
    assert masks[0] > 0 and masks == sorted(masks, reverse=True)
    for before, after in zip(frames, frames[1:]):
        new = [i for i, k in enumerate(after.kinds[0]) if k == "n"]
        assert new and all(before.kinds[0][i] == "m" for i in new)  # committed now: masked just before
        assert all(after.ids[0, i] != MASK_ID and not math.isnan(after.confidence[0, i]) for i in new)
        kept = [i for i, k in enumerate(before.kinds[0]) if k in "nd"]
        assert all(after.ids[0, i] == before.ids[0, i] for i in kept)  # a committed token stays


def test_the_end_of_text_and_what_follows_are_marked_end():
    model = DIMBA(V, family="masked", **SMALL).eval()
    view = CanvasView(model, 6, eos_id=9)
    kinds = view._kinds(torch.tensor([[1, 2, 9, 3, 4, 5]]), torch.zeros(1, 6, dtype=torch.long),
                        torch.zeros(1, 6, dtype=torch.bool))
    assert kinds == ["mmxxxx"]


def test_render_row_and_colours():
    text = render_row("P:", ["a", "b", "c", "d"], "nmdx", [0.9, float("nan"), 0.1, 0.5])
    assert text.plain == "P:a" + MASK_GLYPH + "c"  # stops at the end
    assert confidence_colour(float("nan")) == "grey50"
    assert confidence_colour(0.0) == "rgb(255,0,60)" and confidence_colour(1.0) == "rgb(0,255,60)"


def test_live_view_draws_every_step(masked_run):
    from rich.console import Console

    model, tokenizer = load_for_inference(masked_run)
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=100, color_system="truecolor")
    prompt = tokenizer.encode("ROMEO:")
    with LiveView(model, tokenizer, "ROMEO:", 12, rows=2, console=console) as view:
        ids = generate_ids(model, prompt, 12, SampleConfig(num_steps=6), 2, torch.Generator().manual_seed(0),
                           tokenizer.eos_id, on_step=view)
        view.finish(ids, len(prompt))
    drawn = re.findall(r"step (\d+)/(\d+)", re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", out.getvalue()))
    steps = [int(a) for a, _ in drawn]
    assert steps[:6] == list(range(1, 7)) and set(steps[6:]) == {6}  # every step, then the final canvas
    assert MASK_GLYPH in out.getvalue() and "tokens/s" in out.getvalue()


def test_generate_show_leaves_stdout_the_text_alone(masked_run, capsys):
    args = ["generate", str(masked_run), "--prompt", "ROMEO:", "--length", "12", "--steps", "6", "--seed", "4",
            "--num-samples", "2"]
    assert main(args) == 0
    plain = capsys.readouterr()
    assert main([*args, "--show"]) == 0
    shown = capsys.readouterr()
    assert shown.out == plain.out and "ROMEO:" in shown.out
    assert "step 6/6" in shown.err and "tokens/s" in shown.err


def test_pieces_are_cached_token_texts(masked_run):
    _, tokenizer = load_for_inference(masked_run)
    pieces = Pieces(tokenizer)
    ids = tokenizer.encode("ROMEO: O gentle night")
    assert "".join(pieces.row(torch.tensor(ids))) == tokenizer.decode(ids)
