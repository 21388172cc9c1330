"""The ar family, the yardstick: the backbone made causal (a causal attention mask; Mamba-2 with the forward scan
only), next-token cross-entropy on every position, generation left to right with a KV cache (transformer) or the
recurrent state (Mamba-2: O(1) time and memory per token), and the exact NLL.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from dimba.families.base import Family, Generation, LikelihoodEstimate, model_device, token_nll
from dimba.samplers.ar import ARSampler
from dimba.samplers.state import ModelOutput, SamplerState
from dimba.special_tokens import EOS_ID


def next_token_nll(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """-log p(token l + 1 | tokens up to l) at each position l < L - 1: (B, L - 1) from logits (B, L, V) of ids
    (B, L), read without slicing the vocabulary-sized logits (the last position's target is ignored)."""
    return token_nll(logits, F.pad(ids[:, 1:], (0, 1), value=-100))[:, :-1]


def compute_ar_losses(model, input_ids: torch.Tensor):
    """Next-token cross-entropy on every position; returns ``(loss, parts)``."""
    logits = model.token_logits(input_ids)  # (B, L, V): position l predicts token l + 1
    loss = next_token_nll(logits, input_ids).mean()
    acc = (logits[:, :-1].argmax(-1) == input_ids[:, 1:]).float().mean()
    return loss, {"loss": loss.detach(), "ce": loss.detach(), "acc": acc.detach()}


def block_nll(model, blocks: torch.Tensor, batch_size: int, progress: bool, context: int = 1) -> np.ndarray:
    """Exact -log p(x_c..x_{L-1} | x_0..x_{c-1}) of each block, float64 (N,), c = ``context`` >= 1.

    logits[:, l] predict token l + 1; log-softmax is taken in float64.
    """
    out = []
    for start in tqdm(range(0, len(blocks), batch_size), desc="eval ar", disable=not progress, leave=False):
        x = blocks[start:start + batch_size].to(model_device(model))  # (B, L)
        logp = model.token_logits(x)[:, context - 1:-1].double().log_softmax(-1)  # (B, L-c, V)
        nll = -logp.gather(-1, x[:, context:, None])[..., 0]  # (B, L-c)
        out.append(nll.sum(-1).cpu().numpy())
    return np.concatenate(out)  # (N,)


class ARGeneration(Generation):
    """Left to right, one token per model call, O(1) each with the cache (`ARFamily.generation`).

    An empty prompt starts from EOS (documents are separated by EOS in training), which is not
    returned. Without ``use_cache`` the whole prefix is read again at every token.
    """

    def __init__(self, model, prompt: torch.Tensor, seq_len: int, settings, eos_id: int | None, use_cache: bool):
        n, p = prompt.shape
        fill = EOS_ID if eos_id is None else eos_id
        context = prompt if p > 0 else torch.full((n, 1), fill, dtype=torch.long, device=prompt.device)  # (N, C)
        sampler = ARSampler(fill, settings.temperature, settings.top_k, settings.top_p, eos_id)
        state = sampler.initial_state(context, seq_len)  # (N, C + seq_len)
        sampler.set_timesteps(seq_len, state)
        super().__init__(sampler, state)
        self.model, self.prompt, self.use_cache = model, prompt, use_cache
        self._cache: list | None = None

    def predict(self, state: SamplerState, i: int) -> ModelOutput:
        """Next-token logits (N, V) for position ``gen_start + i``."""
        c, model = state.gen_start, self.model
        if not self.use_cache:
            return ModelOutput(logits=model.token_logits(state.x[:, :c + i])[:, -1])
        if i == 0:  # read the context into a fresh cache
            logits, self._cache = model.ar_prefill(state.x[:, :c], model.allocate_cache(len(state.x), state.x.shape[1]))
        else:  # feed the token drawn at the last step
            logits, self._cache = model.ar_step(state.x[:, c + i - 1], self._cache, c + i - 1)
        return ModelOutput(logits=logits)

    def finish(self, state: SamplerState, generator: torch.Generator | None) -> torch.Tensor:
        """The prompt and the new tokens: (N, P + seq_len)."""
        return torch.cat([self.prompt, state.x[:, state.gen_start:]], dim=1)


class ARFamily(Family):
    """Causal next-token prediction (see the module docstring)."""

    name = "ar"
    description = "An autoregressive language model"
    causal = True
    prompt_conditioned = False
    has_steps = False
    exact_likelihood = True
    sample_settings = ("temperature", "top_k", "top_p")

    def loss(self, model, input_ids, dc, t=None, prompt_mask=None, drop_cond=False, self_cond_prob=None, noise=None,
             generator=None):
        """Next-token cross-entropy on every position: the prompt is scored too."""
        return compute_ar_losses(model, input_ids)

    def predict_token_logits(self, model, input_ids, t=None, **kwargs):
        """Next-token logits (B, L, V): position l predicts token l + 1."""
        return model.token_logits(input_ids)

    def generation(self, model, prompt, seq_len, settings, generator, eos_id, use_cache):
        return ARGeneration(model, prompt, seq_len, settings, eos_id, use_cache)

    def response_noise(self, rows, generator=None, full=False, t0=None):
        """None: the likelihood is exact."""
        return None

    def response_nll(self, model, rows, noise):
        """The exact -log p of each scored token given the tokens before it (position l: token l)."""
        logits = model.token_logits(rows.ids, lengths=rows.lengths).float()  # (B, L, V)
        nll = F.pad(next_token_nll(logits, rows.ids), (1, 0))  # (B, L): token l at position l; token 0 never scored
        return torch.where(rows.scored, nll, torch.zeros_like(nll))

    def canvas_length(self, context: int, prompt_len: int, length: int) -> int:
        """Exactly the tokens asked for."""
        return length

    def likelihood(self, model, blocks, mc_samples, batch_size, generator, progress, calibration_blocks=None,
                   context=0) -> LikelihoodEstimate:
        """The exact NLL of the tokens after the ``context`` of each block given the tokens before them; token 0
        has no context and is never scored."""
        context = max(context, 1)
        nll = block_nll(model, blocks, batch_size, progress, context)  # (N,)
        return LikelihoodEstimate(float(nll.sum()), 0.0, blocks[:, context:])
