"""Variable-length batches: right padding never changes the outputs at real positions, in either direction."""

from __future__ import annotations

import pytest
import torch
from test_backbone_cache import perturb

from dimba.backbones import Backbone
from dimba.backbones.mixer import real_positions, reverse_rows

D_MODEL, COND_DIM = 16, 16
LENGTHS = [37, 20, 1, 29]  # the longest row sets L; the others are right-padded with noise
SMALL = {"d_state": 8, "headdim": 8, "chunk_size": 8, "d_conv": 4, "expand": 2}
CASES = {
    "mamba2-shared": ("mamba2", True, {**SMALL, "bimamba": "shared"}),
    "mamba2-separate": ("mamba2", True, {**SMALL, "bimamba": "separate"}),
    "mamba2-hydra": ("mamba2", True, {**SMALL, "bimamba": "hydra"}),
    "mamba2-separate-tied": ("mamba2", True, {**SMALL, "bimamba": "separate", "tie_reverse": True}),
    "mamba2-causal": ("mamba2", False, SMALL),
    "transformer": ("transformer", True, {"num_heads": 2}),
    "transformer-causal": ("transformer", False, {"num_heads": 2}),
}


def make(case: str, dtype=torch.float64) -> Backbone:
    name, bidirectional, kw = CASES[case]
    torch.manual_seed(0)
    backbone = Backbone(name, D_MODEL, 2, COND_DIM, bidirectional=bidirectional, **kw).to(dtype).eval()
    perturb(backbone)  # training-like weights, the zero-initialised modulations included
    return backbone


def padded_batch(dtype=torch.float64, seed=1):
    """Rows (1, n, D) of the given lengths, and the batch (B, L, D) of them right-padded with noise."""
    gen = torch.Generator().manual_seed(seed)
    batch = 10 * torch.randn(len(LENGTHS), max(LENGTHS), D_MODEL, generator=gen, dtype=dtype)  # loud padding
    rows = [torch.randn(1, n, D_MODEL, generator=gen, dtype=dtype) for n in LENGTHS]
    for i, row in enumerate(rows):
        batch[i, : row.shape[1]] = row[0]
    return rows, batch, torch.randn(len(LENGTHS), COND_DIM, generator=gen, dtype=dtype)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
def test_padded_batch_equals_each_row_alone(case, dtype, tol):
    backbone = make(case, dtype)
    rows, batch, c = padded_batch(dtype)
    lengths = torch.tensor(LENGTHS)
    with torch.no_grad():
        out = backbone(batch, c, lengths=lengths)  # (B, L, D)
        for i, row in enumerate(rows):
            alone = backbone(row, c[i: i + 1])  # (1, n, D)
            torch.testing.assert_close(out[i, : LENGTHS[i]], alone[0], rtol=tol, atol=tol)


@pytest.mark.parametrize("case", ["mamba2-shared", "mamba2-separate", "transformer"])
def test_without_lengths_the_padding_leaks_into_bidirectional_outputs(case):
    """The test above is not vacuous: a bidirectional backbone reads the padding unless told where it starts."""
    backbone = make(case)
    rows, batch, c = padded_batch()
    with torch.no_grad():
        out = backbone(batch, c)  # (B, L, D)
        alone = backbone(rows[1], c[1:2])  # (1, 20, D)
    assert (out[1, :20] - alone[0]).abs().max() > 1e-3


def test_all_lengths_full_equals_no_lengths():
    backbone = make("mamba2-shared")
    _, batch, c = padded_batch()
    with torch.no_grad():
        full = torch.full((batch.shape[0],), batch.shape[1])
        torch.testing.assert_close(backbone(batch, c, lengths=full), backbone(batch, c), rtol=1e-12, atol=1e-12)


def test_gradients_never_reach_the_padding_from_real_positions():
    backbone = make("mamba2-shared")
    _, batch, c = padded_batch()
    batch.requires_grad_()
    lengths = torch.tensor(LENGTHS)
    out = backbone(batch, c, lengths=lengths)  # (B, L, D)
    out[real_positions(lengths, batch.shape[1])].sum().backward()
    assert batch.grad[~real_positions(lengths, batch.shape[1])].abs().max() == 0


def test_reverse_rows_reverses_within_each_length():
    x = torch.arange(12.0).view(2, 6, 1)  # (B, L, 1)
    lengths = torch.tensor([4, 6])
    out = reverse_rows(x, lengths)
    assert out[..., 0].tolist() == [[3, 2, 1, 0, 4, 5], [11, 10, 9, 8, 7, 6]]
    torch.testing.assert_close(reverse_rows(out, lengths), x, rtol=0, atol=0)
    torch.testing.assert_close(reverse_rows(x, None), x.flip(1), rtol=0, atol=0)


@pytest.mark.parametrize("backbone", ["mamba2", "transformer"])
def test_model_token_logits_of_a_padded_batch_equal_each_row_alone(backbone):
    """DIMBA.token_logits(lengths=...): the trunk hands the lengths to its backbone."""
    from dimba import DIMBA

    torch.manual_seed(0)
    model = DIMBA(40, family="masked", backbone=backbone, d_model=D_MODEL, num_denoiser_layers=2, num_heads=2,
                  **SMALL).double().eval()
    perturb(model.backbone)
    gen = torch.Generator().manual_seed(2)
    batch = torch.randint(3, 40, (len(LENGTHS), max(LENGTHS)), generator=gen)  # (B, L): random padding tokens
    lengths = torch.tensor(LENGTHS)
    with torch.no_grad():
        out = model.token_logits(batch, lengths=lengths)  # (B, L, V)
        for i, n in enumerate(LENGTHS):
            alone = model.token_logits(batch[i : i + 1, :n])  # (1, n, V)
            torch.testing.assert_close(out[i, :n], alone[0], rtol=0, atol=1e-10)
