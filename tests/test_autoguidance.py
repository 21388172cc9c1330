"""Autoguidance (`SampleConfig.guide_model`, Karras et al. 2024) for the masked sampler: each step's log-probabilities
are the weaker model's extrapolated toward the model's, log p_g + w (log p - log p_g)."""

import pytest
import torch

from dimba import DIMBA
from dimba.cli import main
from dimba.config import SampleConfig
from dimba.errors import UsageError
from dimba.families.masked import MaskedGeneration
from dimba.generation import generate, run


def masked_model(seed, **kw):
    torch.manual_seed(seed)
    model = DIMBA(vocab_size=40, family="masked", d_model=16, num_denoiser_layers=2, d_state=8, headdim=8,
                  chunk_size=4, num_heads=2, context_length=24, **kw)
    for p in model.parameters():  # a sharper, non-trivial model
        p.data.add_(0.3 * torch.randn_like(p))
    return model.double().eval()


@pytest.mark.parametrize("prompt_len", [0, 3])
def test_guided_log_probs_extrapolate_from_the_guide(prompt_len):
    model, weak = masked_model(0), masked_model(1)
    prompt = torch.arange(5, 5 + prompt_len)[None].expand(2, -1)  # (N, P)
    settings = SampleConfig(num_steps=8, guidance_scale=1.5)
    gen = MaskedGeneration(model, prompt, 12, settings, None, True, guide=weak)
    x, prompt_mask = gen.state.x, gen.prompt_mask  # (N, L)
    with torch.no_grad():
        got = gen.predict(gen.state, 0).logits  # (N, L, V)
        strong = model.token_logits(x, prompt_mask).log_softmax(-1)
        guide = weak.token_logits(x, prompt_mask).log_softmax(-1)
    assert torch.allclose(got, guide + 1.5 * (strong - guide))
    assert not torch.allclose(got, strong, atol=1e-3)  # the guide moved them


def test_a_guide_equal_to_the_model_changes_no_sample():
    model, same = masked_model(0), masked_model(0)
    prompt = torch.tensor([5, 6, 7])
    plain = generate(model, prompt, 16, SampleConfig(num_steps=8), num_samples=3,
                     generator=torch.Generator().manual_seed(2))
    gen = MaskedGeneration(model, prompt[None].expand(3, -1), 16, SampleConfig(num_steps=8, guidance_scale=3.0), None,
                           True, guide=same)
    assert torch.equal(run(gen, torch.Generator().manual_seed(2)), plain)


def test_guidance_one_with_a_guide_is_refused():
    with pytest.raises(UsageError, match="--guidance 1"):
        MaskedGeneration(masked_model(0), torch.tensor([[5]]), 8, SampleConfig(num_steps=4), None, True,
                         guide=masked_model(1))


def test_other_families_refuse_a_guide_model():
    model = DIMBA(vocab_size=40, family="ar", d_model=16, num_denoiser_layers=1, d_state=8, headdim=8,
                  context_length=16)
    with pytest.raises(UsageError, match="masked family, not ar"):
        generate(model, [5], 4, SampleConfig(guide_model="anything", guidance_scale=2.0))


def test_a_block_diffusion_model_refuses_a_guide_model():
    model = masked_model(0, block_size=4)
    settings = SampleConfig(num_steps=8, guide_model="a path", guidance_scale=2.0)
    with pytest.raises(UsageError, match="block-diffusion"):
        model.family.generation(model, torch.tensor([[5]]), 8, settings, None, None, True, guide=masked_model(1))


def test_generate_with_the_run_as_its_own_guide_prints_the_unguided_text(masked_run, capsys):
    """Through the CLI: the guide is loaded from a checkpoint path; the run's own last checkpoint as its guide
    extrapolates from itself, which leaves every sample as it was."""
    args = ["generate", str(masked_run), "--prompt", "ROMEO:", "--length", "10", "--steps", "5", "--seed", "1",
            "--num-samples", "2"]
    assert main(args) == 0
    plain = capsys.readouterr().out
    assert main([*args, "--guide-model", str(masked_run / "checkpoints" / "last.ckpt"), "--guidance", "2"]) == 0
    assert capsys.readouterr().out == plain


@pytest.mark.parametrize("guide,words", [("nowhere", "--guide-model: model directory 'nowhere' not found"),
                                         ("AR", "holds a model of the ar family")])
def test_a_guide_model_that_cannot_guide_is_one_line_and_exit_2(masked_run, tmp_path, capsys, guide, words):
    if guide == "AR":
        model = DIMBA(vocab_size=300, family="ar", d_model=16, num_denoiser_layers=1, d_state=8, headdim=8)
        model.save_pretrained(tmp_path / "ar")
        (tmp_path / "ar" / "tokenizer.json").write_bytes((masked_run / "tokenizer.json").read_bytes())
        guide = str(tmp_path / "ar")
    code = main(["generate", str(masked_run), "--length", "4", "--steps", "2", "--guide-model", guide,
                 "--guidance", "2"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and words in err and "\n" not in err


def test_serve_refuses_a_run_whose_guide_model_cannot_be_loaded_at_start(masked_run):
    from dimba.errors import CheckpointError
    from dimba.serve.server import Options, prepare

    defaults = SampleConfig(guide_model=str(masked_run / "nowhere"), guidance_scale=2.0)
    with pytest.raises(CheckpointError, match="--guide-model: "):
        prepare(str(masked_run), defaults, Options(port=0), start=False)


def test_a_served_guide_is_checked_with_each_request_s_settings(masked_run):
    """The request check builds the generation as generating does, guide included: a request that leaves the
    guidance at 1 under a run's guide is a 400 naming the fix, one with a scale is a job."""
    from dimba.loading import load_for_inference
    from dimba.serve.schema import ApiError, CompletionRequest, Limits, Served, to_job

    model, tokenizer = load_for_inference(masked_run)
    defaults = SampleConfig(guide_model=str(masked_run / "checkpoints" / "last.ckpt"))
    served = Served(model, tokenizer, "m", defaults, Limits(max_tokens=16))
    with pytest.raises(ApiError, match="--guidance 1"):
        to_job(served, CompletionRequest(prompt="ROMEO:", max_tokens=4))
    job, _ = to_job(served, CompletionRequest(prompt="ROMEO:", max_tokens=4, guidance=1.5))
    assert job.settings.guide_model == defaults.guide_model and job.settings.guidance_scale == 1.5
