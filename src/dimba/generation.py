"""Generation: one loop for every family.

The model's family builds a `dimba.families.Generation` (its sampler, the initial canvas and its model calls:
guidance, self-conditioning, caches); `run` drives it step by step, calling back after each step and stopping
when the state is done (no [MASK] left, every row at EOS). Samplers are pure step functions
(`dimba.samplers.state`). A step observer (``on_step``) sees each `Step` whole: the states before and after it
and the model output it was taken with (the live views of `dimba.live` and `dimba.serve`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from dimba.config import SampleConfig
from dimba.families import Generation
from dimba.samplers.state import ModelOutput, SamplerState
from dimba.special_tokens import EOS_ID

Callback = Callable[[int, "torch.Tensor | float", torch.Tensor], None]


@dataclass
class Step:
    """One step of the loop, as a step observer sees it: step ``i`` of ``num_steps`` at time ``t``
    (``sampler.timesteps[i]``) moved ``before`` to ``state`` with the model's ``output`` on ``before``."""

    i: int
    num_steps: int
    t: "torch.Tensor | float"
    before: SamplerState
    state: SamplerState
    output: ModelOutput


StepObserver = Callable[[Step], None]


def run(gen: Generation, generator: torch.Generator | None = None, callback: Callback | None = None,
        on_step: StepObserver | None = None) -> torch.Tensor:
    """Step ``gen`` to the end: the generated ids (N, P + new).

    ``callback(i, t, x)`` follows every step i at time t (``sampler.timesteps[i]``), x being the x0 estimate
    (Gaussian samplers) or the canvas of ids (token samplers); ``on_step(step)`` gets the whole `Step`.
    An exception raised by either stops the loop and propagates.
    """
    state, sampler = gen.state, gen.sampler
    for i in range(sampler.num_steps):
        if state.done:
            break
        output = gen.predict(state, i)
        before, state = state, sampler.step(state, output, i, generator)
        if callback is not None:
            callback(i, sampler.timesteps[i], state.x0 if state.x0 is not None else state.x)
        if on_step is not None:
            on_step(Step(i, sampler.num_steps, sampler.timesteps[i], before, state, output))
    return gen.finish(state, generator)


def _prompt_tensor(prompt_ids, num_samples: int, device: torch.device) -> torch.Tensor:
    if prompt_ids is None:
        return torch.zeros(num_samples, 0, dtype=torch.long, device=device)
    p = torch.as_tensor(prompt_ids, dtype=torch.long, device=device)
    if p.dim() == 1:
        p = p[None].expand(num_samples, -1)
    return p  # (N, P)


def _device(model, device: torch.device | str | None) -> torch.device:
    """The model's device; ``device``, if given, must be it."""
    own = next(model.parameters()).device
    if device is not None and torch.device(device) != own:
        raise ValueError(f"the model is on {own} but device={str(device)!r}: move it first with model.to({str(device)!r})")
    return own


@torch.no_grad()
def sample_from_model(model, prompt_ids: Sequence[int] | torch.Tensor | None = None, seq_len: int = 100,
                      num_steps: int = 50, temperature: float = 1.0, top_k: int | None = None,
                      top_p: float | None = None, guidance_scale: float = 1.0, eta: float = 0.0,
                      num_samples: int = 1, clamp: str = "none", generator: torch.Generator | None = None,
                      callback: Callback | None = None, remasking: str = "low_confidence",
                      block_length: int | None = None, eos_id: int | None = None, use_cache: bool = True,
                      device: torch.device | str | None = None, score_temperature: float = 0.5) -> torch.Tensor:
    """Generate ``seq_len`` tokens after a prompt; returns ids (N, P + seq_len).

    Per family (``model.family``):

    - continuous: x0-DDIM (``num_steps``, ``eta``, ``clamp``, ``score_temperature``), see `ContinuousGeneration`;
    - hybrid: ancestral unmasking + x0-DDIM (`dimba.samplers.hybrid`);
    - masked: `MaskedSampler` with ``remasking`` (ancestral, low_confidence, random) and
      semi-autoregressive blocks of ``block_length``; the model output is reused while the
      canvas is unchanged (``use_cache``);
    - ar: left to right with the backbone's cache (``use_cache``; without it the whole prefix
      is re-read at every token), ``num_steps`` unused.

    Every family samples tokens in float64 with temperature / top-k / top-p, and applies
    classifier-free guidance with ``guidance_scale`` != 1 (not ar). With ``eos_id`` the masked
    and ar samplers stop a row at its first EOS and fill the rest with EOS.
    ``callback(i, t, x)`` is called after every step, x being the x0 estimate (continuous,
    hybrid) or the canvas of ids (masked, ar). ``device``, as in the original DIMBA code, is where
    generation runs: the model's device (the default), where the model must already be.
    """
    settings = SampleConfig(num_steps=num_steps, temperature=temperature, top_k=top_k, top_p=top_p,
                            guidance_scale=guidance_scale, eta=eta, clamp=clamp, remasking=remasking,
                            block_length=block_length, score_temperature=score_temperature)
    return generate(model, prompt_ids, seq_len, settings, num_samples, generator, callback, eos_id, use_cache,
                    device)


@torch.no_grad()
def generate(model, prompt_ids: Sequence[int] | torch.Tensor | None, seq_len: int, settings: SampleConfig,
             num_samples: int = 1, generator: torch.Generator | None = None, callback: Callback | None = None,
             eos_id: int | None = None, use_cache: bool = True, device: torch.device | str | None = None,
             on_step: StepObserver | None = None) -> torch.Tensor:
    """`sample_from_model` with the sampler settings of a `SampleConfig`: ids (N, P + seq_len); ``prompt_ids``
    may also be one prompt per row (N, P). ``on_step`` observes every `Step` (see `run`)."""
    model.eval()
    prompt = _prompt_tensor(prompt_ids, num_samples, _device(model, device))  # (N, P)
    return run(build_generation(model, prompt, seq_len, settings, generator, eos_id, use_cache), generator, callback,
               on_step)


def build_generation(model, prompt: torch.Tensor, seq_len: int, settings: SampleConfig,
                     generator: torch.Generator | None, eos_id: int | None, use_cache: bool) -> Generation:
    """The family's `Generation` of ``seq_len`` tokens after ``prompt`` (N, P) with ``settings``, given the loaded
    ``settings.guide_model`` when one is set (autoguidance; only the families that take one are given one)."""
    guided = {}
    if settings.guide_model is not None:
        from dimba.loading import guide_model  # loading reads runs, whose training modules generate (GRPO)

        guided["guide"] = guide_model(settings.guide_model, model)
    return model.family.generation(model, prompt, seq_len, settings, generator, eos_id, use_cache, **guided)


def canvas_length(model, prompt_len: int, length: int) -> int:
    """New positions the model generates for ``length`` wanted tokens after a prompt of ``prompt_len``
    (`Family.canvas_length`): the diffusion families denoise the training context (the only length they were
    trained on), which is cut to ``length`` afterwards; ar and block-diffusion models generate ``length``."""
    if getattr(model.config, "block_size", None) is not None:
        return length
    return model.family.canvas_length(model.config.context_length or 256, prompt_len, length)


def generate_ids(model, prompt_ids: Sequence[int] | torch.Tensor, length: int, sample: SampleConfig,
                 num_samples: int = 1, generator: torch.Generator | None = None, eos_id: int = EOS_ID,
                 on_step: StepObserver | None = None) -> torch.Tensor:
    """Ids (N, P + canvas) of ``num_samples`` generations with the settings of a `SampleConfig` ``sample``,
    stopping a row at ``eos_id`` (masked, ar); `generated_ids` keeps the first ``length`` new tokens. The
    canvas is `canvas_length`'s; ``prompt_ids`` is one prompt (P,) or one per row (N, P); ``on_step`` observes
    every `Step`."""
    canvas = canvas_length(model, torch.as_tensor(prompt_ids).shape[-1], length)
    return generate(model, prompt_ids, canvas, sample, num_samples, generator, eos_id=eos_id, on_step=on_step)


def generate_responses(model, prompt_ids: Sequence[int] | torch.Tensor, sample: SampleConfig, num_samples: int = 1,
                       generator: torch.Generator | None = None, eos_id: int = EOS_ID) -> list[list[int]]:
    """The new ids of ``num_samples`` generations after ``prompt_ids`` (one prompt (P,), or one per row (N, P)),
    each cut before its EOS and at most as long as the model's context leaves room for, with its EOS."""
    p = torch.as_tensor(prompt_ids).shape[-1]
    room = model.config.context_length - p
    ids = generate_ids(model, prompt_ids, room, sample, num_samples, generator, eos_id)  # (N, P + canvas)
    return generated_ids(ids.cpu(), p, room - 1, eos_id)


def generate_groups(model, prompts: Sequence[Sequence[int]], sample: SampleConfig, group_size: int = 1,
                    generator: torch.Generator | None = None, eos_id: int = EOS_ID) -> list[list[list[int]]]:
    """``group_size`` responses to each of ``prompts`` (as `generate_responses`), in prompt order: the prompts of
    one length are generated together, one batch of (prompts x group_size) rows per length."""
    by_length: dict[int, list[int]] = {}
    for i, prompt in enumerate(prompts):
        by_length.setdefault(len(prompt), []).append(i)
    groups: list[list[list[int]]] = [[] for _ in prompts]
    for _, members in sorted(by_length.items()):
        batch = torch.tensor([list(prompts[i]) for i in members]).repeat_interleave(group_size, 0)  # (M*G, P)
        responses = generate_responses(model, batch, sample, len(batch), generator, eos_id)
        for j, i in enumerate(members):
            groups[i] = responses[j * group_size:(j + 1) * group_size]
    return groups


def generate_texts(model, tokenizer, prompt_ids: Sequence[int], length: int, sample: SampleConfig,
                   num_samples: int = 1, generator: torch.Generator | None = None,
                   on_step: StepObserver | None = None) -> list[str]:
    """Texts of ``num_samples`` generations with the settings of a `SampleConfig` ``sample``: the prompt
    plus at most ``length`` new tokens, cut at the first EOS (see `generate_ids`)."""
    ids = generate_ids(model, prompt_ids, length, sample, num_samples, generator, tokenizer.eos_id, on_step)
    return completions(ids, tokenizer, len(prompt_ids), length)


def generated_ids(ids: torch.Tensor, prompt_len: int, length: int, eos_id: int = EOS_ID) -> list[list[int]]:
    """The new ids of generated rows (N, L): at most ``length`` tokens after the prompt, cut before the first EOS."""
    rows = ids[:, prompt_len: prompt_len + length].tolist()
    return [row[: row.index(eos_id)] if eos_id in row else row for row in rows]


def completions(ids: torch.Tensor, tokenizer, prompt_len: int, length: int) -> list[str]:
    """Texts of generated rows (N, L): the prompt plus at most ``length`` new tokens, cut at the first EOS."""
    new = generated_ids(ids, prompt_len, length, tokenizer.eos_id)
    return [tokenizer.decode(prompt + row) for prompt, row in zip(ids[:, :prompt_len].tolist(), new)]
