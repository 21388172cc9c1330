"""The hand-written conv + SiLU and gated RMSNorm equal the plain compositions they replace."""

import platform
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from dimba.backbones.mixer_ops import conv1d_silu, gated_rms_norm


def _conv_reference(x, weight, bias, lookahead=0):
    """silu(nn.functional.conv1d) over x zero-padded by K-1-lookahead steps before and lookahead after, in
    the (B, C, L) layout it wants, back to (B, L, C)."""
    K = weight.shape[1]
    padded = F.pad(x.transpose(1, 2), (K - 1 - lookahead, lookahead))  # (B, C, L + K - 1)
    return F.silu(F.conv1d(padded, weight[:, None], bias, groups=x.shape[2])).transpose(1, 2)


def _grads(fn, inputs, dout):
    inputs = [t.detach().requires_grad_() for t in inputs]
    out = fn(*inputs)
    return out, torch.autograd.grad(out, inputs, dout)


@pytest.mark.parametrize("lookahead", [0, 1, 3])
@pytest.mark.parametrize("length", [1, 2, 3, 4, 37, 150])  # 150: three blocks of the conv
def test_conv_equals_conv1d(length, lookahead):
    torch.manual_seed(length)
    wide = torch.randn(2, length, 20, dtype=torch.float64)  # (B, L, 20): the conv reads a slice of it,
    x = wide[..., 3:15]  # (B, L, 12), non-contiguous like the slice of in_proj's output in the mixer
    weight, bias = torch.randn(12, 4, dtype=torch.float64), torch.randn(12, dtype=torch.float64)
    dout = torch.randn(2, length, 12, dtype=torch.float64)
    ref, ref_grads = _grads(lambda *a: _conv_reference(*a, lookahead), (x, weight, bias), dout)
    out, grads = _grads(lambda *a: conv1d_silu(*a, lookahead), (x, weight, bias), dout)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-12)


def test_conv_rejects_a_lookahead_beyond_its_width():
    with pytest.raises(ValueError, match="lookahead must be in"):
        conv1d_silu(torch.randn(1, 5, 4), torch.randn(4, 4), None, lookahead=4)


def test_causal_conv_is_causal():
    x = torch.randn(1, 10, 4, requires_grad=True)
    out = conv1d_silu(x, torch.randn(4, 4), None)
    out[0, 5].sum().backward()
    assert x.grad[0, 6:].abs().sum() == 0 and x.grad[0, 2:6].abs().sum() > 0 and x.grad[0, :2].abs().sum() == 0


def _norm_reference(y, z, weight, group_size=8, eps=1e-5):
    g = (y * F.silu(z)).unflatten(-1, (-1, group_size))  # (..., G, D/G)
    return (g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + eps)).flatten(-2) * weight


def test_gated_norm_equals_composition_with_gradients():
    torch.manual_seed(0)
    y, z = torch.randn(2, 5, 16, dtype=torch.float64), torch.randn(2, 5, 16, dtype=torch.float64)
    weight, dout = torch.randn(16, dtype=torch.float64), torch.randn(2, 5, 16, dtype=torch.float64)
    ref, ref_grads = _grads(_norm_reference, (y, z, weight), dout)
    out, grads = _grads(lambda a, b, w: gated_rms_norm(a, b, w, 8, 1e-5), (y, z, weight), dout)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-12)


def test_gated_norm_keeps_half_dtypes_and_computes_in_float32():
    torch.manual_seed(0)
    y, z, weight = torch.randn(3, 16), torch.randn(3, 16), torch.randn(16)
    out = gated_rms_norm(y.bfloat16(), z.bfloat16(), weight, 8, 1e-5)
    assert out.dtype == torch.bfloat16
    ref = _norm_reference(y.bfloat16().float(), z.bfloat16().float(), weight)
    torch.testing.assert_close(out.float(), ref, rtol=1e-2, atol=1e-2)


_FAULTS = """
import resource, sys, torch
from dimba.malloc import keep_freed_memory
applied = keep_freed_memory()
def faults_per_page():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.empty(2**24); x.fill_(1.0); del x  # 64 MiB: above glibc's largest mmap threshold
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / (2**26 / 4096)
print(applied, min(faults_per_page() for _ in range(6)))  # the first call maps the block in any case
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc")
@pytest.mark.parametrize("system_malloc", ["", "1"])
def test_keep_freed_memory_stops_refaulting_large_blocks(system_malloc, monkeypatch):
    monkeypatch.setenv("DIMBA_SYSTEM_MALLOC", system_malloc)
    out = subprocess.run([sys.executable, "-c", _FAULTS], capture_output=True, text=True, check=True).stdout.split()
    applied, faults = out[0] == "True", float(out[1])
    if system_malloc:  # glibc's defaults: a 64 MiB block is a fresh mapping every time, all its pages fault again
        assert not applied and faults > 0.9
    else:  # the block comes back from the heap, already mapped (on most calls; glibc may move the heap top once)
        assert applied and faults < 0.1


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc")
@pytest.mark.parametrize("system_malloc", ["", "1"])
def test_importing_dimba_keeps_freed_memory_for_library_users(system_malloc, monkeypatch):
    monkeypatch.setenv("DIMBA_SYSTEM_MALLOC", system_malloc)
    code = "import dimba, dimba.malloc; print(dimba.malloc.freed_memory_kept())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == ("False" if system_malloc else "True")


_SUBNORMAL = """
import sys
import torch
import dimba
from dimba.subnormals import flushed_subnormals, flushing

def product():
    torch.set_num_threads(2)
    x = torch.full((2**22,), 1e-30)  # the product below is about 1e-39: subnormal, unless flushed to zero
    return int(((x * 1e-9) != 0).sum()), x.numel()

if sys.argv[1] == "import":
    print(flushing(), *product())
else:
    with flushed_subnormals() as on:
        print(on, *product())
"""


@pytest.mark.parametrize("how, keep", [("import", ""), ("block", ""), ("block", "1")])
def test_flushed_subnormals_reaches_every_intra_op_thread(how, keep, monkeypatch):
    """The mode is on before torch's intra-op threads exist, so every thread of a 2-thread product inherits it
    (set after them, only the calling thread's share would be flushed); importing dimba alone changes nothing."""
    monkeypatch.setenv("DIMBA_KEEP_SUBNORMALS", keep)
    out = subprocess.run([sys.executable, "-c", _SUBNORMAL, how], capture_output=True, text=True,
                         check=True).stdout.split()
    flushed, nonzero, n = out[0] == "True", int(out[1]), int(out[2])
    if keep or how == "import":
        assert not flushed and nonzero == n
    else:  # every x86-64 CPU has the mode (FTZ / DAZ)
        assert flushed or platform.machine().lower() not in ("x86_64", "amd64")
        assert nonzero == (0 if flushed else n)


def test_the_command_runs_with_subnormals_flushed_and_gives_the_mode_back(monkeypatch):
    from dimba import cli
    from dimba.subnormals import flushing

    seen = []
    monkeypatch.setattr(cli, "_check_ranges", lambda args: seen.append(flushing()))
    before = flushing()
    assert cli.main(["train", "--print-config"]) == 0
    assert seen == [platform.machine().lower() in ("x86_64", "amd64")] and flushing() == before
