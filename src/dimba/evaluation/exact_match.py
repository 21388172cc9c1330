"""Exact-match accuracy on verifiable problems and best-of-K selection.

`solve` generates answers to ``{"prompt", "answer"}`` problems (rows of equal prompt length generated together);
with ``best_of`` = K it draws K candidates per problem and keeps the one the model itself finds most likely
(`rank_by_likelihood`: the exact log-probability for ar, a Monte Carlo ELBO for a diffusion family: a score that
needs no answer) or, given a reward, the one it rewards most. `exact_match` is the share solved exactly;
`self_preference_rows` turns the model's own wrong answers into preference rows.
"""

from __future__ import annotations

import torch

from dimba.data.finetune import build_rows
from dimba.evaluation.rewards import exact_match as exact_reward
from dimba.generation import generate_groups, generate_ids, generated_ids
from dimba.training.objectives import response_noises, sequence_logp


@torch.no_grad()
def likelihood_scores(model, prompt: list[int], responses: list[list[int]], mc_samples: int | None = None,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """log p(response | prompt) of each response (K,) under ``model``: exact (ar) or the mean of ``mc_samples``
    ELBO samples (diffusion families; None: the family's ``ranking_mc_samples``), with the response's EOS (and a
    diffusion canvas's EOS fill) scored."""
    mc_samples = mc_samples or model.family.ranking_mc_samples
    rows = build_rows([prompt] * len(responses), responses, model.family, model.config.context_length)
    rows = rows.to(next(model.parameters()).device)
    return sequence_logp(model, rows, response_noises(model.family, rows, mc_samples, generator)).cpu()  # (K,)


@torch.no_grad()
def best_of_ids(model, prompts: list[list[int]], sample, best_of: int = 1, generator: torch.Generator | None = None,
                eos_id: int = 1, mc_samples: int | None = None, choose=None) -> list[list[int]]:
    """One response (ids, cut before EOS) per prompt: the best of ``best_of`` samples by the model's likelihood, or
    by ``choose(index, candidates) -> ids`` when given. Prompts of equal length are generated in one batch."""
    out: list[list[int]] = []
    for i, candidates in enumerate(generate_groups(model, prompts, sample, best_of, generator, eos_id)):
        if choose is not None:
            out.append(choose(i, candidates))
        elif best_of == 1:
            out.append(candidates[0])
        else:
            out.append(most_likely(model, prompts[i], candidates, mc_samples, generator))
    return out


def most_likely(model, prompt: list[int], candidates: list[list[int]], mc_samples: int | None = None,
                generator: torch.Generator | None = None) -> list[int]:
    """The candidate response (ids, without EOS) that ``model`` finds most likely after ``prompt``; candidates are
    scored as if cut to leave room for their EOS in the context."""
    room = model.config.context_length - len(prompt) - 1
    scores = likelihood_scores(model, prompt, [c[:room] for c in candidates], mc_samples, generator)  # (K,)
    return candidates[int(scores.argmax())]


@torch.no_grad()
def best_of_generations(model, tokenizer, prompt: list[int], length: int, sample, num_samples: int, best_of: int,
                        generator: torch.Generator | None = None, mc_samples: int | None = None) -> list[str]:
    """``num_samples`` texts (prompt + at most ``length`` new tokens), each the most likely of ``best_of`` samples
    (`dimba generate --best-of`)."""
    ids = generate_ids(model, prompt, length, sample, num_samples * best_of, generator, tokenizer.eos_id)
    candidates = generated_ids(ids.cpu(), len(prompt), length, tokenizer.eos_id)
    picks = [most_likely(model, prompt, candidates[i * best_of:(i + 1) * best_of], mc_samples, generator)
             for i in range(num_samples)]
    return [tokenizer.decode(prompt + pick) for pick in picks]


def _most_rewarded(tokenizer, problems: list[dict[str, str]], reward):
    """``choose(index, candidates)`` for `best_of_ids`: the candidate ``reward`` scores highest for problem ``index``."""
    def choose(i, candidates):
        scores = [float(reward(tokenizer.decode(c), problems[i]["answer"])) for c in candidates]
        return candidates[max(range(len(scores)), key=scores.__getitem__)]
    return choose


def exact_match(model, tokenizer, problems: list[dict[str, str]], sample, best_of: int = 1, seed: int = 0,
                mc_samples: int | None = None, reward=None) -> dict:
    """Exact-match accuracy of ``model`` on ``problems`` (``{"prompt", "answer"}`` texts): ``{"accuracy",
    "correct", "n", "best_of"}``; the answer is the text generated up to EOS, stripped. ``best_of`` > 1 keeps the
    most likely of that many samples, or with ``reward`` (a function (text, answer) -> float) the most rewarded."""
    generator = torch.Generator().manual_seed(seed)
    prompts = [tokenizer.encode(p["prompt"]) for p in problems]
    choose = None if reward is None else _most_rewarded(tokenizer, problems, reward)
    responses = best_of_ids(model, prompts, sample, best_of, generator, tokenizer.eos_id, mc_samples, choose)
    correct = sum(tokenizer.decode(r).strip() == p["answer"].strip() for r, p in zip(responses, problems))
    return {"accuracy": correct / len(problems), "correct": correct, "n": len(problems), "best_of": best_of}


def self_preference_rows(model, tokenizer, problems: list[dict[str, str]], sample, samples: int = 4, seed: int = 0,
                         reward=exact_reward) -> list[dict[str, str]]:
    """On-policy preference rows ``{"prompt", "chosen", "rejected"}``: per problem, ``samples`` answers drawn from
    ``model`` with ``sample``; the first one that ``reward`` scores below the reference answer is the rejected
    answer, the reference the chosen one (the pairs of iterative RPO, Pang et al. 2024: the model's own mistakes
    against the truth). Problems it never gets wrong give no row."""
    generator = torch.Generator().manual_seed(seed)
    prompts = [tokenizer.encode(p["prompt"]) for p in problems]

    def first_wrong(i, candidates):
        answer = problems[i]["answer"]
        best = float(reward(answer, answer))
        return next((c for c in candidates if float(reward(tokenizer.decode(c), answer)) < best), None)

    picks = best_of_ids(model, prompts, sample, samples, generator, tokenizer.eos_id, choose=first_wrong)
    return [{"prompt": p["prompt"], "chosen": p["answer"], "rejected": tokenizer.decode(r)}
            for p, r in zip(problems, picks) if r is not None]
