"""Sample quality of any family: gen-PPL under an autoregressive judge, unigram entropy, distinct-n,
the fraction of words seen in training, BLEU / ROUGE against references, and generation latency.

gen-PPL (the MDLM convention, Sahoo et al. 2024 §4): every generated continuation is decoded to text,
re-encoded with the *judge's* tokenizer (the tokenizers may differ), placed after the judge's EOS
(beginning of document: ar models are trained on EOS-separated documents) and the prompt, cut to the
judge's context, and the judge's exact NLL of the continuation's tokens is pooled over samples:
gen-PPL = exp(total nats / total scored tokens). A low gen-PPL with a low unigram entropy means
repetition, not quality: read the two together.
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from dimba.errors import UsageError
from dimba.evaluation.likelihood import evaluate_likelihood
from dimba.evaluation.words import normalize_words, word_overlap
from dimba.families import Family
from dimba.generation import generate_ids, generated_ids

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")
_REFERENCES_HINT = 'pass a JSON-lines file with one {"prompt": "...", "reference": "..."} object per line'


def unigram_entropy(ids: Sequence[int]) -> float:
    """Entropy (nats) of the token-frequency distribution of ``ids``: sum_v -p_v log p_v with p_v = count_v / len."""
    if not len(ids):
        raise ValueError("the entropy of an empty sample is undefined")
    counts = np.fromiter(Counter(ids).values(), dtype=np.float64)  # (distinct tokens,)
    p = counts / counts.sum()
    return float(-(p * np.log(p)).sum())


def distinct_n(texts: Sequence[str], n: int) -> float | None:
    """Unique word n-grams / all word n-grams of ``texts`` pooled (an n-gram never spans two texts);
    words as `normalize_words` cuts them. None when the texts hold no n-gram."""
    grams = [tuple(words[i:i + n]) for words in map(normalize_words, texts) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else None


def check_judge(judge) -> None:
    """Raise a one-line `UsageError` unless ``judge``'s family has an exact likelihood (an ar model): gen-PPL
    needs one."""
    family = getattr(judge, "family", None)
    if not (isinstance(family, Family) and family.exact_likelihood):
        raise UsageError(f"the judge is a {family} model, but gen-PPL needs an exact likelihood: pass an ar-family "
                         "run or export folder as --judge (dimba train --family ar)")


def _block_nats(judge, judge_tokenizer, ids: list[int]) -> float:
    """The judge's exact NLL (nats) of ids[1:] given ids[0], by `evaluate_likelihood` on one block."""
    r = evaluate_likelihood(judge, torch.tensor([ids]), judge_tokenizer, batch_size=1)  # block (1, L)
    return r["nll_nats_per_token"] * r["tokens"]


def judge_nll(judge, judge_tokenizer, texts: Sequence[str], prompt: str = "") -> tuple[float, int]:
    """(total nats, scored tokens) of the judge's exact NLL of ``texts``, each read after EOS + ``prompt``.

    Each text is encoded with ``judge_tokenizer`` after the separately encoded prompt, so the conditioning
    prefix [EOS] + prompt is the same for every text; the whole sequence is cut to the judge's context.
    By the chain rule -log p(text | prefix) = -log p(prefix + text | EOS) - (-log p(prefix | EOS)), both
    exact under the causal judge. Texts with no token left score nothing.
    """
    check_judge(judge)
    context = judge.config.context_length or 256
    head = [judge_tokenizer.eos_id] + (judge_tokenizer.encode(prompt) if prompt else [])
    if len(head) >= context:
        raise UsageError(f"the prompt is {len(head) - 1} tokens for the judge, whose context is {context}: "
                         "shorten --prompt")
    base = _block_nats(judge, judge_tokenizer, head) if len(head) > 1 else 0.0
    total, tokens = 0.0, 0
    for text in texts:
        ids = (head + judge_tokenizer.encode(text))[:context]
        if len(ids) > len(head):
            total += _block_nats(judge, judge_tokenizer, ids) - base
            tokens += len(ids) - len(head)
    return total, tokens


def _eval_extras():
    try:
        import sacrebleu
        from rouge_score import rouge_scorer
    except ImportError:
        raise UsageError("BLEU and ROUGE need sacrebleu and rouge-score: pip install 'dimba[eval]'") from None
    return sacrebleu, rouge_scorer


def reference_scores(hypotheses: Sequence[str], references: Sequence[str]) -> dict:
    """Corpus BLEU (sacrebleu, 0..100) and the mean over pairs of the ROUGE-1/2/L F-measures (rouge-score,
    0..1) of ``hypotheses`` against their ``references``, pair by pair."""
    if len(hypotheses) != len(references) or not hypotheses:
        raise ValueError(f"need as many hypotheses as references, at least one: got {len(hypotheses)} and {len(references)}")
    sacrebleu, rouge_scorer = _eval_extras()
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES))
    scores = [scorer.score(ref, hyp) for hyp, ref in zip(hypotheses, references)]
    return {"bleu": sacrebleu.corpus_bleu(list(hypotheses), [list(references)]).score,
            **{kind: float(np.mean([s[kind].fmeasure for s in scores])) for kind in ROUGE_TYPES}}


def load_references(path: str | Path) -> list[tuple[str, str]]:
    """(prompt, reference) pairs of a JSON-lines file, one ``{"prompt": str, "reference": str}`` a line
    (blank lines skipped); anything else is a one-line `UsageError`."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"--references {str(path)!r} not found: {_REFERENCES_HINT}")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"--references {str(path)!r} is unreadable ({type(exc).__name__}): {_REFERENCES_HINT}") from None
    pairs = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            raise UsageError(f"--references {str(path)!r} line {number} is not JSON: {_REFERENCES_HINT}") from None
        if not (isinstance(row, dict) and isinstance(row.get("prompt"), str) and isinstance(row.get("reference"), str)):
            raise UsageError(f"--references {str(path)!r} line {number} lacks a string 'prompt' or 'reference': "
                             f"{_REFERENCES_HINT}")
        pairs.append((row["prompt"], row["reference"]))
    if not pairs:
        raise UsageError(f"--references {str(path)!r} is empty: {_REFERENCES_HINT}")
    return pairs


def check_fits(context: int, prompt_len: int, length: int, what: str) -> None:
    """A one-line `UsageError` unless ``what`` (``prompt_len`` tokens) + ``length`` new tokens fit ``context``."""
    if prompt_len + length > context:
        raise UsageError(f"{what} ({prompt_len} tokens) + --length {length} exceeds the model context of {context} "
                         f"tokens: use --length {max(context - prompt_len, 1)} or less, or a shorter prompt")


def warm_up(model, sample_cfg, length: int) -> None:
    """One untimed generation of one sample, so that a timed one does not pay one-time costs (threads, allocator)."""
    generate_ids(model, [], length, sample_cfg, 1, torch.Generator().manual_seed(0))


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


@torch.no_grad()
def sample_quality(model, tokenizer, judge, judge_tokenizer, num_samples: int, sample_cfg, length: int,
                   prompt_ids: Sequence[int] = (), generator: torch.Generator | None = None,
                   vocabulary: set[str] | None = None, references: Sequence[tuple[str, str]] | None = None) -> dict:
    """Generate ``num_samples`` continuations of ``prompt_ids`` (``length`` new tokens at most, cut at EOS,
    with the `SampleConfig` ``sample_cfg``) and measure them.

    Returns a dict: gen_ppl and judge_nats_per_token (under the ar ``judge``; None without one or without
    a scored token), judge_tokens; entropy (mean over non-empty samples of `unigram_entropy` of the
    generated ids), empty_samples; distinct_1/2/3 (`distinct_n`); train_word_fraction (words of all
    samples found in ``vocabulary``, None without it); bleu, rouge1, rouge2, rougeL (None without
    ``references``: one continuation of ``length`` tokens per (prompt, reference) pair, scored by
    `reference_scores`), references; seconds (generating the samples, nothing else: call `warm_up`
    first to leave out one-time costs), seconds_per_sample, tokens (generated tokens kept),
    tokens_per_second; family, samples, length, steps (None for ar), prompt_tokens, and texts (the
    continuations).
    """
    if judge is not None:
        check_judge(judge)
    if num_samples < 1 or length < 1:
        raise UsageError(f"--samples and --length must be at least 1, got {num_samples} and {length}")
    context = model.config.context_length or 256
    check_fits(context, len(prompt_ids), length, "the prompt")
    prompts = [tokenizer.encode(p) if p else [] for p, _ in references or ()]
    for number, ids in enumerate(prompts, 1):
        check_fits(context, len(ids), length, f"the prompt of references line {number}")
    if references:
        _eval_extras()  # fail before generating, not after

    start = time.perf_counter()
    ids = generate_ids(model, prompt_ids, length, sample_cfg, num_samples, generator, tokenizer.eos_id)  # (N, P + C)
    new = generated_ids(ids, len(prompt_ids), length, tokenizer.eos_id)  # on the host: the clock sees the device finish
    seconds = time.perf_counter() - start
    texts = [tokenizer.decode(row) for row in new]
    tokens = sum(map(len, new))

    nats, scored = judge_nll(judge, judge_tokenizer, texts, tokenizer.decode(prompt_ids)) if judge else (0.0, 0)
    overlap = word_overlap("\n".join(texts), vocabulary) if vocabulary is not None and any(map(normalize_words, texts)) \
        else None
    result = {
        "family": model.family.name, "samples": num_samples, "length": length,
        "steps": sample_cfg.num_steps if model.family.has_steps else None, "prompt_tokens": len(prompt_ids),
        "gen_ppl": math.exp(nats / scored) if scored else None,
        "judge_nats_per_token": nats / scored if scored else None, "judge_tokens": scored,
        "entropy": _mean([unigram_entropy(row) for row in new if row]), "empty_samples": sum(not row for row in new),
        **{f"distinct_{n}": distinct_n(texts, n) for n in (1, 2, 3)},
        "train_word_fraction": overlap,
        "bleu": None, **dict.fromkeys(ROUGE_TYPES), "references": len(references) if references else None,
        "seconds": seconds, "seconds_per_sample": seconds / num_samples, "tokens": tokens,
        "tokens_per_second": tokens / seconds if seconds > 0 else None,
    }
    if references:
        hyps = [tokenizer.decode(generated_ids(generate_ids(model, p, length, sample_cfg, 1, generator, tokenizer.eos_id),
                                               len(p), length, tokenizer.eos_id)[0]) for p in prompts]
        result.update(reference_scores(hyps, [ref for _, ref in references]))
    return {**result, "texts": texts}


def format_report(result: dict) -> str:
    """The metrics of a `sample_quality` result as a small two-column table."""
    rows = [("family", result["family"]), ("samples x length", f"{result['samples']} x {result['length']}"),
            ("steps", result["steps"]), ("gen-PPL (judge)", result["gen_ppl"]),
            ("judge nats/token", result["judge_nats_per_token"]), ("unigram entropy", result["entropy"]),
            ("empty samples", result["empty_samples"]),
            ("distinct-1/2/3", " / ".join(_cell(result[f"distinct_{n}"]) for n in (1, 2, 3))),
            ("train word fraction", result["train_word_fraction"])]
    if result["bleu"] is not None:
        rows += [("BLEU", result["bleu"]), ("ROUGE-1/2/L", " / ".join(_cell(result[k]) for k in ROUGE_TYPES))]
    rows += [("seconds", result["seconds"]), ("tokens/s", result["tokens_per_second"])]
    return "\n".join(f"{name:<22}{_cell(value)}" for name, value in rows)


def _cell(value) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" if isinstance(value, float) else str(value)
