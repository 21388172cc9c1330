"""The bidirectional scan (both directions in one pass) against its quasiseparable matrix, built explicitly."""

from __future__ import annotations

import pytest
import torch
from test_ssm import assert_rel_close

from dimba.backbones.biscan import chunked_bidirectional_scan
from dimba.backbones.ssm import bidirectional_scan, chunked_selective_scan, stacked_bidirectional_scan

NAMES = ("x", "dt_fwd", "dt_rev", "A_fwd", "A_rev", "B_fwd", "C_fwd", "B_rev", "C_rev", "D")


def biscan_inputs(batch=2, length=50, heads=4, headdim=3, d_state=5, groups=1, dtype=torch.float64, seed=0):
    """Random inputs: dt uniform in [1e-3, 0.3], A uniform in [-16, -1] (strong decays inside a chunk)."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)

    def uniform(lo, hi, *shape):
        return (lo + (hi - lo) * torch.rand(*shape, generator=g, dtype=torch.float64)).to(dtype)

    bl = (batch, length)
    return {"x": randn(*bl, heads, headdim), "dt_fwd": uniform(1e-3, 0.3, *bl, heads),
            "dt_rev": uniform(1e-3, 0.3, *bl, heads), "A_fwd": uniform(-16.0, -1.0, heads),
            "A_rev": uniform(-16.0, -1.0, heads), "B_fwd": randn(*bl, groups, d_state),
            "C_fwd": randn(*bl, groups, d_state), "B_rev": randn(*bl, groups, d_state),
            "C_rev": randn(*bl, groups, d_state), "D": randn(heads)}


def quasiseparable_reference(x, dt_fwd, dt_rev, A_fwd, A_rev, B_fwd, C_fwd, B_rev, C_rev, D, forward_diagonal=True):
    """y = M x + D x with the (L, L) matrix M of every (batch, head) written out: no chunks, no states.

    M[t, s] = C^f_t . B^f_s exp(sum_{s<k<=t} dt^f_k A^f) dt^f_s for s <= t (s < t without
              ``forward_diagonal``), and C^r_t . B^r_s exp(sum_{t<=k<s} dt^r_k A^r) dt^r_s for s > t.
    """
    R = x.shape[2] // B_fwd.shape[2]
    Bf, Cf, Br, Cr = (t.repeat_interleave(R, dim=2) for t in (B_fwd, C_fwd, B_rev, C_rev))  # (b, L, H, N)
    prefix = (dt_fwd * A_fwd).cumsum(1)  # (b, L, H)  sums over k <= t
    suffix = (dt_rev * A_rev).flip(1).cumsum(1).flip(1)  # (b, L, H)  sums over k >= t
    t = torch.arange(x.shape[1])
    lower = (t[None, :] <= t[:, None])[None, :, :, None]  # (1, L, L, 1): s <= t
    reads_f = lower if forward_diagonal else (t[None, :] < t[:, None])[None, :, :, None]  # s <= t or s < t
    decay_f = (prefix[:, :, None] - prefix[:, None]).masked_fill(~reads_f, float("-inf")).exp()  # (b, t, s, H)
    decay_r = (suffix[:, :, None] - suffix[:, None]).masked_fill(lower, float("-inf")).exp()  # (b, t, s, H)
    M = (torch.einsum("bthn,bshn->btsh", Cf, Bf) * decay_f * dt_fwd[:, None]
         + torch.einsum("bthn,bshn->btsh", Cr, Br) * decay_r * dt_rev[:, None])  # (b, t, s, H)
    y = torch.einsum("btsh,bshp->bthp", M, x)  # (b, L, H, P)
    return y if D is None else y + D[:, None] * x


def with_grads(fn, inputs, seed=1, **kw):
    """Output and the gradients of a fixed random projection of it w.r.t. every input."""
    leaves = {k: v.detach().clone().requires_grad_() for k, v in inputs.items()}
    y = fn(**leaves, **kw)
    weight = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(y)
    grads = torch.autograd.grad((y * weight).sum(), list(leaves.values()))
    return y, dict(zip(leaves, grads))


def assert_matches(got, ref, rtol):
    assert got[0].shape == ref[0].shape
    assert_rel_close(got[0], ref[0], rtol, "y")
    for name, g in got[1].items():
        assert_rel_close(g, ref[1][name], rtol, f"d{name}")


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("chunk_size,length", [(16, 50), (8, 64), (64, 37), (16, 1), (4, 9)])
def test_one_pass_equals_the_explicit_matrix_float64(groups, chunk_size, length):
    inputs = biscan_inputs(length=length, groups=groups)
    ref = with_grads(quasiseparable_reference, inputs)
    assert_matches(with_grads(chunked_bidirectional_scan, inputs, chunk_size=chunk_size), ref, 1e-10)


@pytest.mark.parametrize("chunk_size,length", [(16, 50), (8, 64), (4, 9)])
def test_strictly_causal_forward_direction_equals_the_explicit_matrix_float64(chunk_size, length):
    """forward_diagonal=False (Hydra's form): neither direction reads position t itself."""
    inputs = biscan_inputs(length=length, groups=2)
    ref = with_grads(quasiseparable_reference, inputs, forward_diagonal=False)
    assert_matches(with_grads(chunked_bidirectional_scan, inputs, chunk_size=chunk_size, forward_diagonal=False),
                   ref, 1e-10)
    impulse = {**inputs, "D": None, "x": torch.zeros_like(inputs["x"])}
    impulse["x"][:, 3] = 1.0
    y = chunked_bidirectional_scan(**impulse, chunk_size=chunk_size, forward_diagonal=False)
    assert y[:, 3].abs().max() == 0  # no diagonal: x_3 alone leaves y_3 at 0, and reaches both sides
    assert y[:, 4].abs().max() > 0 and y[:, 2].abs().max() > 0


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("forward_diagonal", [True, False])
def test_stacked_form_of_the_cuda_path_equals_the_explicit_matrix(groups, forward_diagonal):
    """bidirectional_scan's CUDA path (the reverse direction as more heads over the flipped sequence, in
    one causal scan call), run here with the CPU scan in place of mamba_ssm's."""
    inputs = biscan_inputs(length=45, groups=groups)
    ref = with_grads(quasiseparable_reference, inputs, forward_diagonal=forward_diagonal)
    got = with_grads(lambda **kw: stacked_bidirectional_scan(chunked_selective_scan, **kw, chunk_size=16,
                                                             forward_diagonal=forward_diagonal), inputs)
    assert_matches(got, ref, 1e-10)


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("forward_diagonal", [True, False])
@pytest.mark.parametrize("length", [1, 9, 16])
def test_one_chunk_without_gradients_equals_the_explicit_matrix(groups, forward_diagonal, length):
    """A sequence of at most one chunk, read without gradients (a cached block step), takes the one-matrix path;
    the chunked Function (with gradients) and the explicit matrix give the same outputs."""
    inputs = biscan_inputs(length=length, groups=groups)
    ref = quasiseparable_reference(**inputs, forward_diagonal=forward_diagonal)
    with torch.no_grad():
        fast = chunked_bidirectional_scan(**inputs, chunk_size=16, forward_diagonal=forward_diagonal)
    chunked = with_grads(chunked_bidirectional_scan, inputs, chunk_size=16, forward_diagonal=forward_diagonal)[0]
    torch.testing.assert_close(fast, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(chunked.detach(), ref, rtol=1e-10, atol=1e-12)
    low = {k: None if v is None else v.float() for k, v in {**inputs, "D": None}.items()}
    with torch.no_grad():  # float32, no D: as the block step runs it
        got = bidirectional_scan(**low, chunk_size=16, forward_diagonal=forward_diagonal)
    assert got.dtype == torch.float32
    assert_rel_close(got.double(), quasiseparable_reference(**{**inputs, "D": None},
                                                            forward_diagonal=forward_diagonal), 1e-4, "y")


def test_float32_matches_float64_reference():
    inputs = biscan_inputs(length=130, heads=4, headdim=8, d_state=8, groups=2)
    got = with_grads(bidirectional_scan, {k: v.float() for k, v in inputs.items()}, chunk_size=32)
    assert got[0].dtype == torch.float32
    assert_matches(got, with_grads(quasiseparable_reference, inputs), 1e-4)


def test_without_D():
    inputs = biscan_inputs(length=30, groups=2)
    inputs["D"] = None
    y = chunked_bidirectional_scan(**inputs, chunk_size=8)
    torch.testing.assert_close(y, quasiseparable_reference(**inputs), rtol=1e-10, atol=1e-12)


def test_each_direction_reads_its_own_side():
    """The forward tensors shape outputs at and after a position only, the reverse ones before it only."""
    inputs = biscan_inputs(length=40, dtype=torch.float32)
    inputs["A_fwd"], inputs["A_rev"] = -0.5 * torch.ones(4), -0.5 * torch.ones(4)  # decays that reach the far end
    t = 17
    base = chunked_bidirectional_scan(**inputs, chunk_size=16)
    for name, changes in (("B_fwd", slice(t, None)), ("B_rev", slice(0, t))):
        bumped = {**inputs, name: inputs[name].clone()}
        bumped[name][:, t] += 1.0
        diff = (chunked_bidirectional_scan(**bumped, chunk_size=16) - base).abs().amax(dim=(0, 2, 3))  # (L,)
        unchanged = torch.ones(40, dtype=torch.bool)
        unchanged[changes] = False
        assert diff[unchanged].max() == 0, name
        assert diff[changes].min() > 0, name


def test_long_sequence_with_strong_decay_stays_finite():
    """Decays that underflow a float32 (dt A down to -16 per step) give no inf or NaN, forward or backward."""
    inputs = biscan_inputs(batch=1, length=700, heads=2, headdim=4, d_state=4, dtype=torch.float32)
    inputs["dt_fwd"] = inputs["dt_fwd"] * 4
    y, grads = with_grads(bidirectional_scan, inputs, chunk_size=64)
    assert torch.isfinite(y).all()
    assert all(torch.isfinite(g).all() for g in grads.values())
