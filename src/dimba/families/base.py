"""What a family is: a process over token sequences (Gaussian noise on latents, [MASK] absorption, both, or none:
autoregression) together with everything that depends on it: the inputs the trunk builds, the training loss, the
generation loop's model calls and sampler, the likelihood estimator, the metric names and the model-card text.

The trunk (`dimba.model.DIMBA`), the training loop, the generation loop, evaluation and the CLI ask the family of
a model (``model.family``) instead of comparing its name. A new family is a subclass in one module plus one
`dimba.families.register_family` call.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from dimba.errors import UsageError
from dimba.samplers.state import ModelOutput, SamplerState


@dataclass
class LikelihoodEstimate:
    """A family's estimate of -log p of evaluated blocks.

    total_nats: the NLL (or the upper bound on it) of all scored tokens, in nats.
    stderr_nats: its Monte Carlo standard error (0 for an exact likelihood).
    scored: the token ids (R, L') whose likelihood it is; bits per byte count the UTF-8 bytes of their text.
    mc_samples: Monte Carlo samples per block (0 for an exact likelihood).
    parts_nats: totals by part of the bound (reported per token), e.g. diffusion / reconstruction / prior.
    extra: reported as they are (e.g. the reverse process's t0 and clamp).
    """

    total_nats: float
    stderr_nats: float
    scored: torch.Tensor
    mc_samples: int = 0
    parts_nats: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


class Generation:
    """One generation call of a family: the sampler, the initial state, and the model calls of the loop.

    `dimba.generation.run` drives it: ``sampler.set_timesteps`` was called; then, while the state is not done,
    ``output = predict(state, i)`` and ``state = sampler.step(state, output, i, generator)``; finally
    ``finish(state, generator)`` returns the ids (N, P + new). Subclasses hold the model and what the calls
    need (prompt latents, caches, guidance settings).
    """

    def __init__(self, sampler, state: SamplerState):
        self.sampler, self.state = sampler, state

    def predict(self, state: SamplerState, i: int) -> ModelOutput:
        """The model's output on ``state`` at step ``i``."""
        raise NotImplementedError

    def finish(self, state: SamplerState, generator: torch.Generator | None) -> torch.Tensor:
        """The generated ids (N, P + new) of the final state; by default its canvas."""
        return state.x


class Family:
    """Base class of the families. Class attributes describe what the trunk and the tools must build or expect;
    methods implement the family's process. Instances are stateless and shared: one per registered name."""

    name: str = ""
    description: str = ""  # the model card's first words: "A masked (...) diffusion language model"
    latent: bool = False  # diffuses continuous latents: the trunk builds latent projections and input flags
    input_flags: int = 0  # learned embeddings added to latent inputs: 0 = denoised, 1 = clean prompt, 2 = absorbed
    causal: bool = False  # the backbone is made causal
    time_conditioned: bool = False  # the conditioning vector embeds t (otherwise the embedding of t = 0)
    prompt_conditioned: bool = True  # the pooled clean prompt conditions the network (classifier-free guidance)
    metrics: tuple[str, ...] = ("loss", "ce", "acc")  # the parts `loss` returns, logged in metrics.csv
    has_steps: bool = True  # generation takes a number of denoising steps
    block_diffusion: bool = False  # trains and generates with model.block_size (BD3-LM blocks)
    exact_likelihood: bool = False  # `likelihood` is the exact NLL, not a bound: such a model can judge gen-PPL
    ranking_mc_samples: int = 8  # best-of-K: likelihood samples per candidate unless the caller gives a number
    preference_t0: float | None = None  # dpo / ipo / simpo: where the bound stops unless finetune.preference_t0 says
    likelihood_options: tuple[str, ...] = ()  # settings of the estimator `likelihood` takes (dimba eval flags)
    # the `SampleConfig` fields its generation reads (the sampler controls `dimba serve` offers)
    sample_settings: tuple[str, ...] = ("num_steps", "temperature", "top_k", "top_p", "guidance_scale")

    def check_config(self, cfg) -> None:
        """Raise ValueError (one line naming the fix) if the `ModelConfig` ``cfg`` does not suit this family."""

    def loss(self, model, input_ids: torch.Tensor, dc, t: torch.Tensor | None = None,
             prompt_mask: torch.Tensor | None = None, drop_cond: bool | torch.Tensor = False,
             self_cond_prob: float | None = None, noise: torch.Tensor | None = None,
             generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The training objective on ``input_ids`` (B, L) with the settings of a `DiffusionConfig` ``dc``:
        ``(loss, parts)``, parts named by `metrics`. ``t``, ``noise`` and ``generator`` fix or drive the
        randomness; ``prompt_mask`` (B, L) marks a clean prompt; ``drop_cond`` drops it (guidance)."""
        raise NotImplementedError

    def forward(self, model, input_ids: torch.Tensor, t, **kwargs):
        """`DIMBA.forward`: noise ``input_ids`` to time t and denoise (the latent families)."""
        raise ValueError(f"forward() noises latents (continuous / hybrid families); a {self.name} model takes token "
                         "ids: use token_logits() or predict_token_logits()")

    def predict_token_logits(self, model, input_ids: torch.Tensor, t=None, **kwargs) -> torch.Tensor:
        """`DIMBA.predict_token_logits`: token logits (B, L, V) of ``input_ids`` (noised to t where that applies)."""
        raise NotImplementedError

    def generation(self, model, prompt: torch.Tensor, seq_len: int, settings, generator: torch.Generator | None,
                   eos_id: int | None, use_cache: bool) -> Generation:
        """A `Generation` of ``seq_len`` tokens after ``prompt`` (N, P) with the sampler settings ``settings`` (a
        `SampleConfig`); rows stop at ``eos_id`` where the sampler allows; ``use_cache`` lets the loop reuse
        model outputs or states where that is exact. A family whose `sample_settings` name ``guide_model`` also
        takes ``guide=``, that model loaded (autoguidance); the others are never given it."""
        raise NotImplementedError

    def canvas_length(self, context: int, prompt_len: int, length: int) -> int:
        """New positions to generate for ``length`` wanted tokens: a diffusion family denoises the whole
        training context after the prompt (the only length it was trained on) and cuts the output."""
        return context - prompt_len

    def likelihood(self, model, blocks: torch.Tensor, mc_samples: int, batch_size: int,
                   generator: torch.Generator | None, progress: bool, calibration_blocks: torch.Tensor | None = None,
                   context: int = 0, **options) -> LikelihoodEstimate:
        """-log p (or an upper bound on it) of ``blocks`` (N, L), with the `likelihood_options` given; an
        estimator with settings to choose may choose them on ``calibration_blocks`` (never the evaluated ones).

        The first ``context`` tokens of every block are given and not scored: the estimate is then of
        -log p(x_context.. | x_..context), the context being the clean prompt it is in generation (the
        lm-evaluation-harness model asks this of a continuation). An ar model always takes token 0 as given.
        """
        raise NotImplementedError

    def sft_loss(self, model, rows, dc, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Supervised fine-tuning on ``rows`` (`dimba.data.finetune.TokenRows`) with the diffusion settings ``dc``:
        the loss and the response's cross-entropy per scored token; here both are one sample of `response_nll`
        (the exact NLL for ar, a NELBO sample for masked) per scored token, the prompt and padding never scored."""
        terms = self.response_nll(model, rows, self.response_noise(rows, generator))  # (B, L)
        loss = terms.sum() / rows.scored.sum().clamp_min(1)
        return loss, loss

    def response_noise(self, rows, generator: torch.Generator | None = None, full: bool = False,
                       t0: float | None = None):
        """The randomness of one estimate of `response_nll` on ``rows`` (`dimba.data.finetune.TokenRows`), drawn
        once so that a policy and its frozen reference are scored with the same noise (VRPO); ``full``: the
        one-pass per-token surrogate of diffu-GRPO / d1 (every response token noised at once) where that differs;
        ``t0``: the last time of a bound that has one (the continuous families; None: its smallest)."""
        raise UsageError(f"fine-tuning needs a likelihood of the response given the prompt; the {self.name} family "
                         "has none yet: fine-tune a model of another family")

    def response_nll(self, model, rows, noise) -> torch.Tensor:
        """Per-position terms (B, L) whose row sums estimate -log p(response | prompt) of ``rows`` (exactly, or an
        upper bound's Monte Carlo estimate with ``noise`` from `response_noise`); 0 off the scored positions."""
        raise UsageError(f"fine-tuning needs a likelihood of the response given the prompt; the {self.name} family "
                         "has none yet: fine-tune a model of another family")

    def check_likelihood_options(self, options: dict[str, Any]) -> None:
        """A one-line `UsageError` for an option (given, not None) that this family's likelihood does not take."""
        foreign = [name for name, value in options.items() if value is not None and name not in self.likelihood_options]
        if foreign:
            takes = ", ".join(f"--{o.replace('_', '-')}" for o in self.likelihood_options) or "no options"
            raise UsageError(f"--{foreign[0].replace('_', '-')} does not apply to the {self.name} family: its "
                             f"likelihood takes {takes}")

    def model_card(self, cfg) -> str:
        """Family-specific lines of the model card (markdown), after the description."""
        return ""

    def __repr__(self) -> str:
        return f"<family {self.name!r}>"

    def __str__(self) -> str:
        return self.name

    def __deepcopy__(self, memo) -> "Family":
        return self  # stateless and shared: a copied model (EMA) keeps the same family


def token_nll(logits: torch.Tensor, ids: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Per-token cross-entropy (B, L) of ``logits`` (B, L, V) against ``ids`` (B, L), 0 where ``ids`` is
    ``ignore_index``: read along the vocabulary's own (last, contiguous) dimension, where ``logits.transpose(1, 2)``
    would make PyTorch copy the vocabulary-sized tensor."""
    flat = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids.reshape(-1), reduction="none",
                           ignore_index=ignore_index)  # (B * L,)
    return flat.view(ids.shape)


def masked_mean(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The mean of ``x`` weighted by ``weight`` (same shape), 0 where the weights sum to 0."""
    return (x * weight).sum() / weight.sum().clamp_min(1)


def mc_stderr(terms) -> float:
    """Monte Carlo standard error of the total bound estimate (nats), given the data, from terms (N, K) (numpy).

    Per block, the variance of its K-sample mean is estimated as the sample variance of its terms
    over K (treating the stratified samples as independent, which overstates it: stratification
    only lowers the variance); blocks are independent, so their variances add. With K = 1 there is
    no within-block spread, and the spread of the N terms across blocks is used instead (it also
    counts the variation between blocks, so again it overstates the Monte Carlo error).
    """
    n, k = terms.shape
    if k > 1:
        return float(math.sqrt(terms.var(axis=1, ddof=1).sum() / k))
    return float(terms[:, 0].std(ddof=1) * math.sqrt(n)) if n > 1 else float("nan")


def model_device(model) -> torch.device:
    """The device of ``model``'s parameters (the CPU for a model without any)."""
    params = model.parameters() if hasattr(model, "parameters") else iter(())
    first = next(iter(params), None)
    return first.device if first is not None else torch.device("cpu")
