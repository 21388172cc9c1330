"""The chunked SSD scan against the sequential recurrence: values, gradients, states, stability, dtypes."""

from __future__ import annotations

import pytest
import torch

from dimba.backbones.ssm import selective_scan, selective_scan_sequential


def scan_inputs(batch=2, length=50, heads=4, headdim=3, d_state=5, groups=1, dtype=torch.float64, A=None, seed=0):
    """Random scan inputs: dt uniform in [1e-3, 1e-1], A uniform in [-16, -1] unless given."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)

    def uniform(lo, hi, *shape):
        return (lo + (hi - lo) * torch.rand(*shape, generator=g, dtype=torch.float64)).to(dtype)

    return {
        "x": randn(batch, length, heads, headdim),
        "dt": uniform(1e-3, 1e-1, batch, length, heads),
        "A": uniform(-16.0, -1.0, heads) if A is None else A.to(dtype),
        "B": randn(batch, length, groups, d_state),
        "C": randn(batch, length, groups, d_state),
        "D": randn(heads),
        "initial_state": randn(batch, heads, headdim, d_state),
    }


def run_with_grads(scan, inputs, chunk_size, seed=1):
    """Output, final state and the gradients of a fixed random projection of both w.r.t. every input."""
    leaves = {k: v.detach().clone().requires_grad_() for k, v in inputs.items()}
    kw = {k: v for k, v in leaves.items() if k != "initial_state"}
    y, h = scan(**kw, chunk_size=chunk_size, initial_state=leaves["initial_state"], return_final_state=True)
    g = torch.Generator().manual_seed(seed)
    loss = (y * torch.randn(y.shape, generator=g, dtype=torch.float64).to(y)).sum()
    loss = loss + (h * torch.randn(h.shape, generator=g, dtype=torch.float64).to(h)).sum()
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return y, h, dict(zip(leaves, grads))


def assert_rel_close(actual, expected, rtol, name=""):
    """max |actual - expected| <= rtol * max |expected| (a scale-aware tolerance for whole tensors)."""
    err = (actual.double() - expected.double()).abs().max().item()
    scale = expected.double().abs().max().item()
    assert err <= rtol * scale, f"{name}: max error {err:.3g} > {rtol:.1g} * {scale:.3g}"


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("chunk_size,length", [(16, 50), (8, 64), (64, 37), (16, 1)])
def test_matches_sequential_float64(groups, chunk_size, length):
    inputs = scan_inputs(length=length, groups=groups)
    y, h, grads = run_with_grads(selective_scan, inputs, chunk_size)
    y_ref, h_ref, grads_ref = run_with_grads(selective_scan_sequential, inputs, chunk_size)
    assert y.shape == inputs["x"].shape and h.shape == inputs["initial_state"].shape
    assert_rel_close(y, y_ref, 1e-10, "y")
    assert_rel_close(h, h_ref, 1e-10, "final state")
    for name in inputs:
        assert_rel_close(grads[name], grads_ref[name], 1e-10, f"d{name}")


@pytest.mark.parametrize("groups", [1, 2])
def test_float32_matches_float64_reference(groups):
    inputs = scan_inputs(length=100, heads=4, headdim=8, d_state=8, groups=groups)
    y, h, grads = run_with_grads(selective_scan, {k: v.float() for k, v in inputs.items()}, 32)
    y_ref, h_ref, grads_ref = run_with_grads(selective_scan_sequential, inputs, 32)
    assert y.dtype == torch.float32
    assert_rel_close(y, y_ref, 1e-4, "y")
    assert_rel_close(h, h_ref, 1e-4, "final state")
    for name in inputs:
        assert_rel_close(grads[name], grads_ref[name], 1e-4, f"d{name}")


def test_without_D_and_initial_state():
    inputs = scan_inputs(length=40, groups=2)
    args = {k: inputs[k] for k in ("x", "dt", "A", "B", "C")}
    y = selective_scan(**args, chunk_size=16)
    torch.testing.assert_close(y, selective_scan_sequential(**args), rtol=1e-10, atol=1e-12)


def test_strided_inputs():
    """x, B, C sliced out of one projection (as in the mixer) behave like contiguous inputs."""
    inputs = scan_inputs(length=40, heads=4, headdim=3, d_state=5, groups=2)
    flat = [inputs[k].flatten(2) for k in ("x", "B", "C")]  # (b, L, 12), (b, L, 10), (b, L, 10)

    def scan_and_backward(x, B, C):
        y = selective_scan(
            x.unflatten(-1, (4, 3)), inputs["dt"], inputs["A"], B.unflatten(-1, (2, 5)),
            C.unflatten(-1, (2, 5)), inputs["D"], chunk_size=16,
        )
        y.square().sum().backward()
        return y

    packed = torch.cat(flat, dim=-1).requires_grad_()  # (b, L, 32)
    parts = packed.split([12, 10, 10], dim=-1)
    assert not parts[0].is_contiguous()
    separate = [t.clone().requires_grad_() for t in flat]
    torch.testing.assert_close(scan_and_backward(*parts), scan_and_backward(*separate), rtol=1e-12, atol=1e-12)
    expected_grad = torch.cat([t.grad for t in separate], dim=-1)
    torch.testing.assert_close(packed.grad, expected_grad, rtol=1e-12, atol=1e-12)


def test_final_state_resumes_the_scan():
    """Scanning a sequence in two pieces, the second from the first's final state, equals one scan."""
    inputs = scan_inputs(length=70, groups=2)
    del inputs["initial_state"]
    whole = selective_scan(**inputs, chunk_size=16)
    first = {k: v[:, :30] if v.dim() > 1 else v for k, v in inputs.items()}
    second = {k: v[:, 30:] if v.dim() > 1 else v for k, v in inputs.items()}
    y1, h1 = selective_scan(**first, chunk_size=16, return_final_state=True)
    y2 = selective_scan(**second, chunk_size=16, initial_state=h1)
    torch.testing.assert_close(torch.cat([y1, y2], dim=1), whole, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", ["log-spaced -1 to -1e4", "S4D-real"])
def test_extreme_decays_match_sequential(kind):
    heads = 6
    A = -torch.logspace(0, 4, heads) if kind.startswith("log") else -(torch.arange(heads) + 1.0)
    inputs = scan_inputs(length=200, heads=heads, A=A)
    y, h, grads = run_with_grads(selective_scan, inputs, 64)
    y_ref, h_ref, grads_ref = run_with_grads(selective_scan_sequential, inputs, 64)
    assert_rel_close(y, y_ref, 1e-10, "y")
    for name in inputs:
        assert_rel_close(grads[name], grads_ref[name], 1e-10, f"d{name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["log-spaced -1 to -1e4", "S4D-real"])
def test_long_sequence_is_finite(dtype, kind):
    heads = 8
    A = -torch.logspace(0, 4, heads) if kind.startswith("log") else -(torch.arange(heads) + 1.0)
    inputs = scan_inputs(batch=1, length=8192, heads=heads, headdim=4, d_state=4, A=A, dtype=dtype)
    leaves = {k: v.requires_grad_() for k, v in inputs.items()}
    y, h = selective_scan(**leaves, chunk_size=64, return_final_state=True)
    assert y.dtype == dtype and y.shape == inputs["x"].shape
    (y.float().square().mean() + h.square().mean()).backward()
    assert torch.isfinite(y).all() and torch.isfinite(h).all()
    for name, leaf in leaves.items():
        assert leaf.grad.dtype == dtype, name
        assert torch.isfinite(leaf.grad).all(), f"non-finite d{name}"


def test_half_precision_is_computed_in_float32():
    inputs = {k: v.bfloat16() for k, v in scan_inputs(length=50, groups=2).items()}
    y = selective_scan(**inputs, chunk_size=16)
    y_fp32 = selective_scan(**{k: v.float() for k, v in inputs.items()}, chunk_size=16)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, y_fp32.bfloat16())


def test_bf16_autocast_keeps_the_scan_in_float32():
    """Under `train.precision=bf16-mixed` (CPU autocast) the scan's products stay float32: the same output and
    gradients as without autocast (it used to fail on mixed bf16/float32 operands)."""
    inputs = scan_inputs(length=50, groups=2, dtype=torch.float32)
    plain = run_with_grads(selective_scan, inputs, chunk_size=16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = run_with_grads(selective_scan, inputs, chunk_size=16)
    pairs = [(auto[0], plain[0]), (auto[1], plain[1])] + [(auto[2][k], plain[2][k]) for k in plain[2]]
    for a, b in pairs:
        assert a.dtype == torch.float32 and torch.equal(a, b)


def test_rejects_groups_not_dividing_heads():
    inputs = scan_inputs(heads=4, groups=3)
    with pytest.raises(ValueError, match="must divide"):
        selective_scan(**inputs)
