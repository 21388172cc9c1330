"""Block diffusion (BD3-LM) backbones: block k reads the clean blocks before it and its own noisy block, never the
future; block_size = L is the full-sequence model; the cached block decoding gives the training outputs."""

import pytest
import torch

from dimba.backbones import Backbone

L, D = 24, 16
BACKBONES = [("mamba2", "shared"), ("mamba2", "separate"), ("mamba2", "hydra"), ("transformer", "shared")]


def make(name: str, bimamba: str, chunk: int = 4) -> Backbone:
    torch.manual_seed(0)
    net = Backbone(name, D, 2, cond_dim=D, num_heads=2, d_state=8, d_conv=4, expand=2, headdim=8,
                   chunk_size=chunk, tie_reverse=False, bimamba=bimamba).double().eval()
    for p in net.parameters():  # non-trivial norms and modulations
        p.data.add_(0.05 * torch.randn_like(p))
    return net


def streams(n: int = 2):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(n, L, D, generator=g, dtype=torch.float64), torch.randn(n, L, D, generator=g, dtype=torch.float64),
            torch.randn(n, D, generator=g, dtype=torch.float64))


@pytest.mark.parametrize("name,bimamba", BACKBONES)
@pytest.mark.parametrize("block", [1, 4, 8])
def test_block_k_reads_only_the_clean_past_and_its_own_noisy_block(name, bimamba, block):
    net = make(name, bimamba)
    noisy, clean, c = streams()
    out = net.forward_blocks(noisy, clean, c, block)  # (n, L, D)
    k = 1 if block == 8 else 2
    a, b = k * block, (k + 1) * block
    changes = {
        "future clean": (noisy, torch.cat([clean[:, :b], clean[:, b:] + 1], 1)),
        "future noisy": (torch.cat([noisy[:, :b], noisy[:, b:] - 1], 1), clean),
        "earlier noisy": (torch.cat([noisy[:, :a] * 3, noisy[:, a:]], 1), clean),
        "own clean": (noisy, torch.cat([clean[:, :a], clean[:, a:b] + 2, clean[:, b:]], 1)),
    }
    for what, (n2, c2) in changes.items():
        out2 = net.forward_blocks(n2, c2, c, block)
        torch.testing.assert_close(out2[:, a:b], out[:, a:b], msg=f"block {k} changed with the {what} tokens")
    # it does read the clean past and its own noisy block
    moved = net.forward_blocks(noisy, torch.cat([clean[:, :a] + 1, clean[:, a:]], 1), c, block)
    assert (moved[:, a:b] - out[:, a:b]).abs().max() > 1e-3
    moved = net.forward_blocks(torch.cat([noisy[:, :a], noisy[:, a:b] + 1, noisy[:, b:]], 1), clean, c, block)
    assert (moved[:, a:b] - out[:, a:b]).abs().max() > 1e-3


@pytest.mark.parametrize("name,bimamba", BACKBONES)
def test_one_block_of_the_whole_sequence_is_the_full_model(name, bimamba):
    net = make(name, bimamba)
    noisy, clean, c = streams()
    torch.testing.assert_close(net.forward_blocks(noisy, clean, c, L), net(noisy, c))


@pytest.mark.parametrize("name,bimamba", BACKBONES)
def test_block_k_equals_the_model_on_the_clean_prefix_and_block_k_alone(name, bimamba):
    net = make(name, bimamba)
    noisy, clean, c = streams()
    block = 8
    out = net.forward_blocks(noisy, clean, c, block)
    for k in range(L // block):
        end = (k + 1) * block
        alone = net.forward_blocks(noisy[:, :end], clean[:, :end], c, block)
        torch.testing.assert_close(alone[:, k * block:end], out[:, k * block:end])


@pytest.mark.parametrize("name,bimamba", BACKBONES)
@pytest.mark.parametrize("block", [1, 8])
def test_cached_block_steps_give_the_training_outputs(name, bimamba, block):
    """Each noisy block run on the cache of the clean blocks before it (which are read once each) gives the
    two-stream forward's output for that block."""
    net = make(name, bimamba)
    noisy, clean, c = streams()
    out = net.forward_blocks(noisy, clean, c, block)
    cache = net.allocate_block_cache(2, L, dtype=torch.float64)
    for pos in range(0, L, block):
        y, _ = net.block_step(noisy[:, pos:pos + block], c, cache, pos)  # denoising call: state discarded
        torch.testing.assert_close(y, out[:, pos:pos + block])
        _, cache = net.block_step(clean[:, pos:pos + block], c, cache, pos)  # commit the clean block


@pytest.mark.parametrize("name,bimamba", BACKBONES)
def test_a_clean_stream_without_gradients_gives_the_same_outputs_and_noisy_gradients(name, bimamba):
    """diffusion.block_clean_grad=false: the clean stream is a constant context. The outputs and the gradients
    through the noisy stream are unchanged; nothing flows into the clean stream, and the weights lose its share."""
    net = make(name, bimamba)
    runs = {}
    for clean_grad in (True, False):
        net.zero_grad()
        noisy, clean, c = (t.requires_grad_() for t in streams())
        out = net.forward_blocks(noisy, clean, c, 8, clean_grad=clean_grad)  # (n, L, D)
        (out * torch.linspace(-1, 1, L, dtype=out.dtype)[:, None]).sum().backward()
        weight = net.blocks[0].norm1.weight.grad.clone()  # (D,): read by both streams
        runs[clean_grad] = out.detach(), noisy.grad, clean.grad, weight
    (out_t, noisy_t, clean_t, weight_t), (out_f, noisy_f, clean_f, weight_f) = runs[True], runs[False]
    torch.testing.assert_close(out_f, out_t)
    torch.testing.assert_close(noisy_f, noisy_t)
    assert clean_f is None and clean_t.abs().max() > 1e-3
    assert (weight_f - weight_t).abs().max() > 1e-4


def test_a_sequence_of_partial_blocks_is_refused_with_the_fix():
    net = make("mamba2", "shared")
    noisy, clean, c = streams()
    with pytest.raises(ValueError, match="multiple of block_size"):
        net.forward_blocks(noisy[:, :10], clean[:, :10], c, 4)


def tiny_model(block, backbone="mamba2", **kw):
    from dimba import DIMBA

    torch.manual_seed(0)
    return DIMBA(vocab_size=40, family="masked", d_model=16, num_denoiser_layers=2, backbone=backbone, d_state=8,
                 headdim=8, chunk_size=4, num_heads=2, context_length=L, block_size=block, **kw)


@pytest.mark.parametrize("backbone", ["mamba2", "transformer"])
def test_whole_sequence_blocks_train_as_the_full_sequence_model(backbone):
    from dimba.families.masked import compute_masked_losses

    ids = torch.randint(3, 40, (3, L), generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.2, 0.5, 0.9])
    full, block = tiny_model(None, backbone), tiny_model(L, backbone)
    block.load_state_dict(full.state_dict())
    losses = [compute_masked_losses(m, ids, t, generator=torch.Generator().manual_seed(1))[0] for m in (full, block)]
    torch.testing.assert_close(losses[1], losses[0])


def test_block_model_trains_in_one_pass_with_gradients_everywhere():
    from dimba.families.masked import compute_masked_losses

    model = tiny_model(8)
    ids = torch.randint(3, 40, (2, L), generator=torch.Generator().manual_seed(0))
    fixed, _ = compute_masked_losses(model, ids, torch.tensor([0.3, 0.6]))  # one t for every block (validation)
    loss, parts = compute_masked_losses(model, ids, generator=torch.Generator().manual_seed(1))
    loss.backward()
    assert torch.isfinite(fixed)
    assert torch.isfinite(loss) and parts["ce"] > 0
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum())]
    assert missing == [n for n in missing if "prompt_proj" in n or "null_prompt" in n or "time_embed" in n]


def test_block_size_is_refused_where_it_cannot_apply():
    from dimba.config import ModelConfig

    with pytest.raises(ValueError, match="block diffusion"):
        ModelConfig(family="ar", block_size=8)
    with pytest.raises(ValueError, match="not a multiple of model.block_size"):
        ModelConfig(family="masked", block_size=5, context_length=L)
    assert ModelConfig(family="masked").block_size is None  # configs saved before the field load unchanged
