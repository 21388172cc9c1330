"""CUDA: dispatch to mamba_ssm's scan and causal_conv1d, parity with the CPU code, mamba_ssm checkpoints on CPU.

Marked ``gpu`` and skipped without CUDA; the tests that need ``mamba_ssm`` or ``causal_conv1d`` are
skipped without them. Tolerances: mamba_ssm's Triton kernels multiply float32 operands in TF32
(10-bit mantissa), so their outputs agree with float64 to about 1e-3 of the tensor's scale.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from test_biscan import biscan_inputs, quasiseparable_reference, with_grads
from test_ssm import assert_rel_close, run_with_grads, scan_inputs

from dimba.backbones import Block, ssm
from dimba.backbones.bimamba import SharedBiMamba2
from dimba.backbones.mamba import BiMamba2, Mamba2Mixer
from dimba.backbones.ssm import bidirectional_scan, conv_silu, selective_scan

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
needs_mamba_ssm = pytest.mark.skipif(ssm.mamba_chunk_scan_combined is None, reason="needs mamba_ssm")
needs_causal_conv1d = pytest.mark.skipif(ssm.causal_conv1d_fn is None, reason="needs causal_conv1d")
TF32 = 1e-2  # relative tolerance (of the tensor's max) for results computed with TF32 products
F32 = 1e-4  # the same for float32 arithmetic against a float64 reference


def on_cuda(inputs: dict, dtype=torch.float32) -> dict:
    return {k: v.to("cuda", dtype) for k, v in inputs.items()}


def count_calls(monkeypatch, module, name: str) -> list:
    """Replace ``module.name`` by a wrapper that records each call; returns the record."""
    calls, real = [], getattr(module, name)

    def wrapper(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)
    return calls


@needs_mamba_ssm
@pytest.mark.parametrize("length,groups", [(300, 2), (64, 1), (37, 4)])
def test_scan_dispatches_to_mamba_ssm_and_matches_float64(monkeypatch, length, groups):
    calls = count_calls(monkeypatch, ssm, "mamba_chunk_scan_combined")
    chunk_size = 32  # one chunk size and head shape for all the tests here: each new one costs Triton compilations
    inputs = scan_inputs(length=length, heads=8, headdim=16, d_state=16, groups=groups)
    y_ref, h_ref, grads_ref = run_with_grads(selective_scan, inputs, chunk_size)  # CPU, float64
    y, h, grads = run_with_grads(selective_scan, on_cuda(inputs), chunk_size)
    assert calls, "selective_scan did not use mamba_ssm on CUDA"
    assert y.is_cuda and y.dtype == torch.float32
    assert_rel_close(y.cpu(), y_ref, TF32, "y")
    assert_rel_close(h.cpu(), h_ref, TF32, "final state")
    for name, g in grads.items():
        assert_rel_close(g.cpu(), grads_ref[name], TF32, f"d{name}")


def test_without_mamba_ssm_warns_once_and_matches_cpu(monkeypatch):
    monkeypatch.setattr(ssm, "mamba_chunk_scan_combined", None)
    ssm._warn_pure_pytorch_on_cuda.cache_clear()
    inputs = scan_inputs(length=100, heads=4, headdim=16, d_state=16, groups=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got64 = run_with_grads(selective_scan, on_cuda(inputs, torch.float64), 32)  # float64: no warning
        assert not [w for w in caught if "mamba_ssm" in str(w.message)]
        got32 = [run_with_grads(selective_scan, on_cuda(inputs), 32) for _ in range(2)]
    assert len([w for w in caught if "mamba_ssm is not installed" in str(w.message)]) == 1
    ref64 = run_with_grads(selective_scan, inputs, 32)
    ref32 = run_with_grads(selective_scan, {k: v.float() for k, v in inputs.items()}, 32)
    for got, ref, rtol in [(got64, ref64, 1e-12), (got32[0], ref32, 1e-5), (got32[1], ref32, 1e-5)]:
        assert_rel_close(got[0].cpu(), ref[0], rtol, "y")
        assert_rel_close(got[1].cpu(), ref[1], rtol, "final state")
        for name, g in got[2].items():
            assert_rel_close(g.cpu(), ref[2][name], rtol, f"d{name}")


def mixer_kwargs(ngroups: int) -> dict:
    return dict(d_state=16, d_conv=4, expand=2, headdim=16, ngroups=ngroups, chunk_size=32)


def output_and_grads(module, u: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Output for u and the gradients of a fixed projection of it w.r.t. every parameter, on CPU."""
    module.zero_grad(set_to_none=True)
    y = module(u)  # (B, L, D)
    w = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y)  # (B, L, D)
    (y * w).sum().backward()
    return y.detach().to("cpu", copy=True), {k: p.grad.to("cpu", copy=True) for k, p in module.named_parameters()}


@needs_mamba_ssm
@pytest.mark.parametrize("ngroups", [1, 2])
@pytest.mark.parametrize("mem_eff_path", [False, pytest.param(True, marks=needs_causal_conv1d)])
def test_mamba_ssm_checkpoint_loads_and_agrees_on_cpu(tmp_path, ngroups, mem_eff_path):
    """A mamba_ssm Mamba2 layer saved on GPU loads into Mamba2Mixer (strict names and shapes) and gives
    the same outputs and parameter gradients on CPU, and on CUDA through the fast kernels."""
    from mamba_ssm.modules.mamba2 import Mamba2
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    reference = Mamba2(64, use_mem_eff_path=mem_eff_path, **mixer_kwargs(ngroups)).cuda()
    save_file(reference.state_dict(), tmp_path / "mamba2.safetensors")
    ours = Mamba2Mixer(64, **mixer_kwargs(ngroups))
    ours.load_state_dict(load_file(tmp_path / "mamba2.safetensors"))
    u = torch.randn(2, 100, 64)  # (B, L, D)
    y_ref, grads_ref = output_and_grads(reference, u.cuda())
    y_cpu, grads_cpu = output_and_grads(ours, u)
    y_cuda, grads_cuda = output_and_grads(copy.deepcopy(ours).cuda(), u.cuda())
    assert grads_cpu.keys() == grads_ref.keys()
    for y, grads in [(y_cpu, grads_cpu), (y_cuda, grads_cuda)]:
        assert_rel_close(y, y_ref, TF32, "y")
        for name, g in grads.items():
            assert_rel_close(g, grads_ref[name], TF32, f"d{name}")


@needs_causal_conv1d
@pytest.mark.parametrize("d_state,extra", [(8, 0), (8, 4), (6, 0)])
def test_mixer_conv_uses_causal_conv1d_and_matches_cpu(monkeypatch, d_state, extra):
    """Also for inputs whose strides the kernel's channel-last layout refuses: a slice of a row of
    ``conv_dim + 4`` columns (like the mixer's split of its input projection), or an odd ``conv_dim``."""
    calls = count_calls(monkeypatch, ssm, "causal_conv1d_fn")
    torch.manual_seed(0)
    mixer = Mamba2Mixer(32, d_state=d_state, headdim=16)
    rows = torch.randn(2, 37, mixer.conv_dim + extra)  # (B, L, C + extra)
    results = []
    for device in ("cpu", "cuda"):
        mixer.to(device).zero_grad(set_to_none=True)
        leaf = rows.to(device, copy=True).requires_grad_()
        out = mixer._causal_conv(leaf[..., : mixer.conv_dim])  # (B, L, C)
        out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out))
        results.append([t.detach().cpu() for t in (out, leaf.grad, mixer.conv1d.weight.grad, mixer.conv1d.bias.grad)])
    assert calls, "the mixer did not use causal_conv1d on CUDA"
    for name, got, ref in zip(("output", "dx", "dweight", "dbias"), results[1], results[0]):
        assert_rel_close(got, ref, 1e-5, name)


def test_without_causal_conv1d_the_mixer_warns_once_and_matches_cpu(monkeypatch):
    monkeypatch.setattr(ssm, "causal_conv1d_fn", None)
    ssm._warn_pure_pytorch_on_cuda.cache_clear()
    torch.manual_seed(0)
    mixer = Mamba2Mixer(32, **mixer_kwargs(1))
    u = torch.randn(2, 40, 32)  # (B, L, D)
    with torch.no_grad():
        y_cpu = mixer(u)  # (B, L, D)
        mixer.cuda()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            y_cuda = [mixer(u.cuda()).cpu() for _ in range(2)]
    assert len([w for w in caught if "causal_conv1d is not installed" in str(w.message)]) == 1
    for y in y_cuda:
        assert_rel_close(y, y_cpu, TF32, "y")


def assert_cuda_matches_cpu(layer) -> None:
    """A bidirectional layer (d_model 64) on CUDA gives its CPU output and gradients, within TF32 tolerance."""
    u = torch.randn(2, 77, 64)  # (B, L, D)
    y_cpu, grads_cpu = output_and_grads(layer, u)
    y_cuda, grads_cuda = output_and_grads(copy.deepcopy(layer).cuda(), u.cuda())
    assert_rel_close(y_cuda, y_cpu, TF32, "y")
    for name, g in grads_cuda.items():
        assert_rel_close(g, grads_cpu[name], TF32, f"d{name}")


@pytest.mark.parametrize("tie_reverse", [False, True])
def test_bimamba_on_cuda_matches_cpu(tie_reverse):
    torch.manual_seed(0)
    layer = BiMamba2(64, tie_reverse=tie_reverse, **mixer_kwargs(2))
    assert_cuda_matches_cpu(layer)


def test_step_on_cuda_equals_full_forward():
    """Token-by-token decoding on CUDA reproduces the (fast-kernel) forward pass of the same mixer."""
    torch.manual_seed(0)
    mixer = Mamba2Mixer(32, **mixer_kwargs(2)).cuda()
    u = torch.randn(2, 45, 32, device="cuda")  # (B, L, D)
    with torch.no_grad():
        full = mixer(u)  # (B, L, D)
        state = mixer.allocate_state(2)
        steps = []
        for t in range(u.shape[1]):
            y_t, state = mixer.step(u[:, t], state)  # (B, D)
            steps.append(y_t)
    assert_rel_close(torch.stack(steps, dim=1).cpu(), full.cpu(), TF32, "stepped")


def test_bf16_autocast_block_is_finite_and_close_to_float32():
    torch.manual_seed(0)
    block = Block(BiMamba2(64, **mixer_kwargs(1)), 64, 64, "film", mlp=False).cuda()
    h = torch.randn(4, 512, 64, device="cuda", requires_grad=True)  # (B, L, D)
    c = torch.randn(4, 64, device="cuda")  # (B, C)
    y32 = block(h, c)  # (B, L, D)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y16 = block(h, c)  # (B, L, D)
    (grad_h,) = torch.autograd.grad(y16.float().square().mean(), h)
    assert torch.isfinite(y16).all() and torch.isfinite(grad_h).all()
    assert_rel_close(y16.float().detach().cpu(), y32.detach().cpu(), 5e-2, "bf16 output")


@needs_mamba_ssm
@pytest.mark.parametrize("length,groups,forward_diagonal", [(300, 2, True), (37, 1, True), (300, 2, False)])
def test_bidirectional_scan_is_one_mamba_ssm_call_and_matches_float64(monkeypatch, length, groups, forward_diagonal):
    calls = count_calls(monkeypatch, ssm, "mamba_chunk_scan_combined")
    inputs = biscan_inputs(length=length, heads=8, headdim=16, d_state=16, groups=groups)
    y_ref, grads_ref = with_grads(quasiseparable_reference, inputs, forward_diagonal=forward_diagonal)  # CPU, float64
    y, grads = with_grads(bidirectional_scan, on_cuda(inputs), chunk_size=32, forward_diagonal=forward_diagonal)
    assert len(calls) == 1, "both directions should take one mamba_chunk_scan_combined call"
    assert y.is_cuda and y.dtype == torch.float32
    assert_rel_close(y.cpu(), y_ref, TF32, "y")
    for name, g in grads.items():
        assert_rel_close(g.cpu(), grads_ref[name], TF32, f"d{name}")


def test_bidirectional_scan_without_mamba_ssm_warns_once_and_matches_float64(monkeypatch):
    monkeypatch.setattr(ssm, "mamba_chunk_scan_combined", None)
    ssm._warn_pure_pytorch_on_cuda.cache_clear()
    inputs = biscan_inputs(length=100, heads=4, headdim=16, d_state=16, groups=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = [with_grads(bidirectional_scan, on_cuda(inputs), chunk_size=32) for _ in range(2)]
    assert len([w for w in caught if "mamba_ssm is not installed" in str(w.message)]) == 1
    # against the float64 truth, not the CPU's float32: on an H200 dA_rev differed from that by 2e-5 of its max
    # (summation order), more than float32 rounding allows a comparison of two float32 results at 1e-5
    y_ref, grads_ref = with_grads(quasiseparable_reference, inputs)  # CPU, float64
    for y, grads in got:
        assert_rel_close(y.cpu(), y_ref, F32, "y")
        for name, g in grads.items():
            assert_rel_close(g.cpu(), grads_ref[name], F32, f"d{name}")


@needs_causal_conv1d
@pytest.mark.parametrize("lookahead", [1, 3])
def test_conv_with_lookahead_uses_causal_conv1d_and_matches_cpu(monkeypatch, lookahead):
    calls = count_calls(monkeypatch, ssm, "causal_conv1d_fn")
    gen = torch.Generator().manual_seed(0)
    x, weight, bias = torch.randn(2, 37, 36, generator=gen), torch.randn(36, 4, generator=gen), torch.randn(36, generator=gen)
    dout = torch.randn(2, 37, 36, generator=gen)
    results = []
    for device in ("cpu", "cuda"):
        leaves = [t.to(device, copy=True).requires_grad_() for t in (x, weight, bias)]
        out = conv_silu(*leaves, lookahead=lookahead)  # (B, L, C)
        results.append([out.detach().cpu()] + [g.cpu() for g in torch.autograd.grad(out, leaves, dout.to(device))])
    assert calls, "conv_silu did not use causal_conv1d on CUDA"
    for name, got, ref in zip(("output", "dx", "dweight", "dbias"), results[1], results[0]):
        assert_rel_close(got, ref, 1e-5, name)


@pytest.mark.parametrize("ngroups,hydra", [(1, False), (2, False), (2, True)])
def test_shared_bimamba_on_cuda_matches_cpu(ngroups, hydra):
    torch.manual_seed(0)
    layer = SharedBiMamba2(64, hydra=hydra, **mixer_kwargs(ngroups))
    assert_cuda_matches_cpu(layer)


def test_shared_bimamba_padding_on_cuda_matches_each_row_alone():
    torch.manual_seed(0)
    layer = SharedBiMamba2(64, **mixer_kwargs(1)).cuda()
    u = torch.randn(3, 90, 64, device="cuda")  # (B, L, D)
    lengths = torch.tensor([90, 41, 7], device="cuda")
    with torch.no_grad():
        out = layer(u, lengths)  # (B, L, D)
        for i, n in enumerate(lengths.tolist()):
            assert_rel_close(out[i, :n].cpu(), layer(u[i: i + 1, :n])[0].cpu(), TF32, f"row {i}")
