"""The lm-evaluation-harness model ``dimba``, for every family (``pip install 'dimba[lmeval]'``).

    dimba lm-eval --model dimba --model_args pretrained=RUN,mc_samples=8 --tasks dimba_continuation --device cpu

(`dimba lm-eval` is lm_eval's own command line with this model registered and dimba's tasks on its include path;
from Python, importing this module registers the model for ``lm_eval.simple_evaluate(model="dimba", ...)``.)

- ``loglikelihood(context, continuation)``: log p(continuation | context) from the family's likelihood estimator,
  the one `dimba eval` uses (`Family.likelihood`), with the context as the clean prompt: exact for ar; for the
  diffusion families minus the family's upper bound on the NLL, a lower bound on the log-likelihood estimated
  with ``mc_samples`` Monte Carlo samples from a generator seeded with ``seed`` for every request (the choices of
  a question share their random numbers). ``is_greedy``: the family's sampler at temperature 0 generates exactly
  the continuation (``greedy=false`` skips that check and reports False).
- ``loglikelihood_rolling(text)``: the same for the whole text after [EOS], over windows of ``max_length`` tokens
  (default: the training context), each conditioned on the tokens before it in the window.
- ``generate_until``: the family's sampler with the model's sampler defaults (the run's `sample` config, an export
  folder's sample_config.json), overridden by sampler fields given as model arguments (``num_steps=16``, ...) and
  by the task's ``temperature`` / ``do_sample`` (false: temperature 0) / ``top_k`` / ``top_p``; ``max_gen_toks`` new
  tokens at most, cut before the first stop sequence of ``until`` (and at [EOS]).

A continuous or hybrid model's bound takes t0 and clamp (``t0=``, ``clamp=`` model arguments); those not given are
chosen once, as `dimba eval` does, on 8 training blocks of ``calibration_data`` (default: the run's corpus, else
the built-in one). What the numbers are is printed when the model loads and reported in the results' config.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from pydantic import ValidationError
from tqdm.auto import tqdm

from dimba.config import SampleConfig, load_run_config
from dimba.errors import UsageError
from dimba.generation import generate_ids, generated_ids
from dimba.loading import load_for_inference, model_folder, sample_defaults

_TASK_SAMPLER_KEYS = ("temperature", "top_k", "top_p")
_IGNORED_GEN_KEYS = ("do_sample", "until", "max_gen_toks")


def windows(ids: list[int], start: int, max_length: int) -> list[tuple[list[int], int]]:
    """Blocks of at most ``max_length`` tokens that score each token of ``ids[start:]`` once (``start`` >= 1), each
    with the length of its context: a block scores up to ``max_length`` - 1 tokens after the one before them,
    and the last one takes as much context as fits."""
    out, pos = [], start
    while pos < len(ids):
        end = min(pos + max_length - 1, len(ids))
        begin = max(0, end - max_length)
        out.append((ids[begin:end], pos - begin))
        pos = end
    return out


def _flag(value) -> bool:
    return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes")


@register_model("dimba")
class DimbaLM(LM):
    """A dimba run, export folder or Hub model (``pretrained``) as an lm-eval model (see the module docstring)."""

    def __init__(self, pretrained: str, mc_samples: int = 8, seed: int = 0, max_length: int | None = None,
                 max_gen_toks: int = 256, greedy: bool = True, t0: float | None = None, clamp: str | None = None,
                 calibration_data: str | None = None, device: str = "cpu", batch_size=None, max_batch_size=None,
                 **sampler):
        super().__init__()
        self.mc_samples, self.seed, self.max_gen_toks = int(mc_samples), int(seed), int(max_gen_toks)
        if self.mc_samples < 1 or self.max_gen_toks < 1:
            raise UsageError(f"mc_samples and max_gen_toks must be at least 1, got {mc_samples} and {max_gen_toks}")
        self.greedy = _flag(greedy)
        self.model, self.tokenizer = load_for_inference(pretrained)
        if str(device).startswith("cuda") and not torch.cuda.is_available():
            device = "cpu"  # lm_eval's default device is cuda:0
        self.model.to(device)
        self.family = self.model.family
        self.context = self.model.config.context_length or 256
        self.max_length = int(max_length or self.context)
        if not 2 <= self.max_length <= self.context:
            raise UsageError(f"max_length={self.max_length} must lie in [2, {self.context}] (the model's context)")
        self.sample = self._sample_settings(pretrained, sampler)
        self.options = self._likelihood_options(pretrained, t0, clamp, calibration_data)
        print(f"dimba: {pretrained}: {self.describe()}", file=sys.stderr)

    # ----- settings -------------------------------------------------------------------------------------------------
    @staticmethod
    def _sample_settings(pretrained: str, given: dict) -> SampleConfig:
        unknown = sorted(set(given) - set(SampleConfig.model_fields))
        if unknown:
            raise UsageError(f"unknown dimba model argument {unknown[0]!r}: the arguments are pretrained, mc_samples, "
                             "seed, max_length, max_gen_toks, greedy, t0, clamp, calibration_data and the sampler "
                             f"settings {', '.join(SampleConfig.model_fields)}")
        try:
            return SampleConfig(**{**sample_defaults(pretrained).model_dump(), **given})
        except ValidationError as err:
            first = err.errors()[0]
            raise UsageError(f"model argument {first['loc'][0]}={first['input']!r}: {first['msg']}") from None

    def _calibration_blocks(self, pretrained: str, corpus: str | None) -> torch.Tensor:
        """8 training blocks (8, L) of ``corpus``, else of the run's own corpus, else of the built-in corpus."""
        from dimba.config import DataConfig
        from dimba.data import open_data

        run_cfg = model_folder(pretrained) / "config.yaml"
        data = load_run_config(run_cfg).data if run_cfg.is_file() else DataConfig(seq_len=self.context)
        if corpus is not None:
            data = data.model_copy(update={"corpus": corpus, "streaming": False})
        return open_data(data, self.tokenizer).train_head(8)

    def _likelihood_options(self, pretrained: str, t0, clamp, corpus: str | None) -> dict:
        """The settings of the family's estimator: those given, the others chosen once on calibration blocks."""
        given = {k: v for k, v in {"t0": None if t0 is None else float(t0), "clamp": clamp}.items() if v is not None}
        self.family.check_likelihood_options(given)
        if all(name in given for name in self.family.likelihood_options):
            return given
        blocks = self._calibration_blocks(pretrained, corpus)  # (8, L)
        chosen = self.family.likelihood(self.model, blocks[:1], 1, 16, torch.Generator().manual_seed(self.seed),
                                        False, calibration_blocks=blocks, **given).extra
        return {**given, **{name: chosen[name] for name in self.family.likelihood_options}}

    def describe(self) -> str:
        """What the loglikelihoods are, in one line."""
        if self.family.exact_likelihood:
            what = "loglikelihood is the exact log-likelihood"
        else:
            what = (f"loglikelihood is minus an upper bound on the NLL (the bound of dimba eval), {self.mc_samples} "
                    f"Monte Carlo samples per request, seed {self.seed}")
        options = "".join(f", {k}={v}" for k, v in self.options.items())
        return f"{self.family.name} family: {what}{options}; context {self.max_length} tokens"

    def get_model_info(self) -> dict:
        """Reported in the results' config."""
        return {"dimba_family": self.family.name, "dimba_likelihood": self.describe(),
                "dimba_mc_samples": 0 if self.family.exact_likelihood else self.mc_samples, "dimba_seed": self.seed,
                **{f"dimba_{k}": v for k, v in self.options.items()}}

    # ----- scoring --------------------------------------------------------------------------------------------------
    def _generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed)

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], int]:
        """The ids of context + continuation and where the continuation starts (as lm-eval's HF model: trailing
        spaces of the context go with the continuation; an empty context is [EOS], a document boundary)."""
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        if not context:
            return [self.tokenizer.eos_id, *self.tokenizer.encode(continuation)], 1
        return self.tokenizer.encode(context + continuation), len(self.tokenizer.encode(context))

    def _is_greedy(self, block: list[int], context: int) -> bool:
        settings = self.sample.model_copy(update={"temperature": 0.0})
        new = len(block) - context
        ids = generate_ids(self.model, block[:context], new, settings, 1, self._generator(), self.tokenizer.eos_id)
        return ids[0, context:context + new].tolist() == block[context:]

    @torch.no_grad()
    def score(self, ids: list[int], start: int) -> tuple[float, bool]:
        """log p(ids[start:] | ids[:start]) (minus a bound for the diffusion families) and whether greedy generation
        gives exactly those tokens (False when ``greedy`` is off)."""
        total, greedy = 0.0, self.greedy
        for block, context in windows(ids, start, self.max_length):
            estimate = self.family.likelihood(self.model, torch.tensor([block]), self.mc_samples, self.mc_samples,
                                              self._generator(), False, context=context, **self.options)
            total -= estimate.total_nats
            greedy = greedy and self._is_greedy(block, context)
        return total, greedy

    @torch.no_grad()
    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        return [self.score(*self._encode_pair(*req.args)) for req in tqdm(requests, disable=disable_tqdm)]

    @torch.no_grad()
    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        eos = self.tokenizer.eos_id
        return [self.score([eos, *self.tokenizer.encode(req.args[0])], 1)[0]
                for req in tqdm(requests, disable=disable_tqdm)]

    # ----- generation -----------------------------------------------------------------------------------------------
    def _task_settings(self, kwargs: dict) -> SampleConfig:
        """The sampler settings of a request: the model's, with the task's temperature / top-k / top-p; greedy
        unless ``do_sample``."""
        unknown = sorted(set(kwargs) - set(_TASK_SAMPLER_KEYS) - set(_IGNORED_GEN_KEYS))
        if unknown:
            raise UsageError(f"generation setting {unknown[0]!r} is not one dimba takes: use "
                             f"{', '.join(_TASK_SAMPLER_KEYS + _IGNORED_GEN_KEYS)}")
        given = {k: kwargs[k] for k in _TASK_SAMPLER_KEYS if kwargs.get(k) is not None}
        if "do_sample" in kwargs and not _flag(kwargs["do_sample"]):
            given["temperature"] = 0.0
        return self.sample.model_copy(update=given)

    def _generate(self, context: str, kwargs: dict) -> str:
        until = kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        new = min(int(kwargs.get("max_gen_toks", self.max_gen_toks)), self.max_length - 1)
        prompt = (self.tokenizer.encode(context) or [self.tokenizer.eos_id])[-(self.max_length - new):]
        ids = generate_ids(self.model, prompt, new, self._task_settings(kwargs), 1, self._generator(),
                           self.tokenizer.eos_id)  # (1, P + canvas)
        text = self.tokenizer.decode(generated_ids(ids, len(prompt), new, self.tokenizer.eos_id)[0])
        for stop in until:
            text = text.split(stop)[0]
        return text

    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        return [self._generate(req.args[0], dict(req.args[1])) for req in tqdm(requests, disable=disable_tqdm)]


TASKS_DIR = Path(__file__).parent / "tasks"  # dimba_continuation, dimba_next_line, dimba_heldout


def run_cli(argv: list[str]) -> int:
    """``lm_eval ARGV`` (its own command line, e.g. ``run --model dimba ...``) with the ``dimba`` model registered
    and dimba's tasks on the include path (unless ``--include_path`` is given: pass dimba's task YAML files as
    ``--tasks`` paths then). Returns lm_eval's exit status."""
    from lm_eval.__main__ import cli_evaluate

    argv = list(argv)
    if argv and not {"-h", "--help", "--include_path"} & set(argv):
        argv += ["--include_path", str(TASKS_DIR)]
    saved, sys.argv = sys.argv, ["dimba lm-eval", *argv]
    try:
        cli_evaluate()
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    finally:
        sys.argv = saved
    return 0
