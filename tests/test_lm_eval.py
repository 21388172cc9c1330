"""The lm-evaluation-harness model ``dimba`` and the shipped held-out tasks (the ``lmeval`` extra; skipped without
it), run offline on tiny ar and masked runs."""

import json

import pytest
import torch

pytest.importorskip("lm_eval", reason="the lmeval extra is not installed: pip install -e '.[dev,lmeval]'")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.api.registry import get_model  # noqa: E402

from dimba.cli import main  # noqa: E402
from dimba.config import load_run_config  # noqa: E402
from dimba.data import prepare_data  # noqa: E402
from dimba.data.corpora import load_corpus, split_text  # noqa: E402
from dimba.evaluation import harness  # noqa: E402  (registers the model)
from dimba.evaluation.heldout_tasks import CHOICES, heldout_documents  # noqa: E402


@pytest.fixture(scope="module")
def runs(tmp_path_factory, corpus, tiny):
    """Tiny ar, masked and continuous runs trained for 10 steps."""
    out = {}
    for family in ("ar", "masked", "continuous"):
        out[family] = tmp_path_factory.mktemp("lmeval") / family
        assert main(["train", "--data", str(corpus), "--family", family, "--max-steps", "10", "--out",
                     str(out[family]), "--quiet", *tiny]) == 0
    return out


def _lm(run, **args):
    arg_string = ",".join(f"{k}={v}" for k, v in {"pretrained": run, **args}.items())
    return get_model("dimba").create_from_arg_string(arg_string, {"device": "cpu"})


def _request(kind: str, *args) -> Instance:
    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


@pytest.mark.parametrize("family, model_args", [("ar", ""), ("masked", ",mc_samples=2,greedy=false")])
def test_lm_eval_runs_the_shipped_task_offline(runs, corpus, family, model_args, capsys):
    argv = ["--model", "dimba", "--model_args", f"pretrained={runs[family]}{model_args}", "--tasks",
            "dimba_continuation", "--device", "cpu", "--limit", "4", "--metadata", json.dumps({"corpus": str(corpus)})]
    assert main(["lm-eval", *argv]) == 0
    captured = capsys.readouterr()
    table = [line for line in captured.out.splitlines() if line.startswith("|dimba_continuation")]
    assert len(table) == 1 and "|acc " in table[0], captured.out
    accuracy = float(table[0].split("|")[7])
    assert 0.0 <= accuracy <= 1.0
    said = "exact log-likelihood" if family == "ar" else "2 Monte Carlo samples per request"
    assert said in captured.err  # what the loglikelihoods are is stated in the output


def test_ar_loglikelihoods_equal_dimba_eval_exact_nll(runs, capsys):
    run = runs["ar"]
    lm = _lm(run)
    cfg = load_run_config(run / "config.yaml")
    val = prepare_data(cfg.data.corpus, cfg.data.seq_len, cfg.data.val_fraction, lm.tokenizer,
                       lm.tokenizer.vocab_size).val  # (N, 32)
    checked = 0
    for k in range(6):
        block = val[k].tolist()
        context, continuation = lm.tokenizer.decode(block[:1]), lm.tokenizer.decode(block[1:])
        if context != context.rstrip() or lm.tokenizer.encode(context + continuation) != block:
            continue  # the text does not tokenize back into this block: not the same text
        totals = []
        for n in (k, k + 1):  # dimba eval scores tokens 1..31 of each block given the ones before
            if n == 0:
                totals.append(0.0)
                continue
            assert main(["eval", str(run), "--json", "--max-tokens", str(32 * n)]) == 0
            result = json.loads(capsys.readouterr().out)
            totals.append(result["nll_nats_per_token"] * result["tokens"])
        [(loglikelihood, _)] = lm.loglikelihood([_request("loglikelihood", context, continuation)])
        assert loglikelihood == pytest.approx(-(totals[1] - totals[0]), rel=1e-5)
        checked += 1
    assert checked >= 2


def test_rolling_scores_every_token_once_in_windows(runs):
    lm = _lm(runs["ar"], max_length=16)
    text = "ROMEO:\nO gentle night, thou art the moon of my heart number 3.\n" * 2
    ids = [lm.tokenizer.eos_id, *lm.tokenizer.encode(text)]
    assert len(ids) > 16  # more than one window
    scored = [i for block, context in harness.windows(ids, 1, 16) for i in range(context, len(block))]
    assert len(scored) == len(ids) - 1 and all(len(b) <= 16 for b, _ in harness.windows(ids, 1, 16))
    [rolling] = lm.loglikelihood_rolling([_request("loglikelihood_rolling", text)])
    assert rolling == pytest.approx(lm.score(ids, 1)[0]) and rolling < 0
    # each window scores its tokens given the ones before it: the ar model's exact conditional
    with torch.no_grad():
        exact = sum(lm.model.token_logits(torch.tensor([b]))[0, c - 1:-1].double().log_softmax(-1)
                    .gather(-1, torch.tensor(b[c:])[:, None]).sum().item() for b, c in harness.windows(ids, 1, 16))
    assert rolling == pytest.approx(exact, rel=1e-6)


@pytest.mark.parametrize("family, options", [("masked", {}), ("continuous", {"t0": 0.02, "clamp": "soft"})])
def test_diffusion_loglikelihood_is_a_seeded_bound_with_its_mc_count(runs, family, options):
    requests = [_request("loglikelihood", "ROMEO:\n", "O gentle night"), _request("loglikelihood", "", "O gentle")]
    first, again, other = (_lm(runs[family], mc_samples=3, seed=seed, greedy="false", **options) for seed in (1, 1, 2))
    scores = first.loglikelihood(requests)
    assert scores == again.loglikelihood(requests)  # reproducible
    assert scores != other.loglikelihood(requests)  # a Monte Carlo estimate
    assert all(value < 0 and not greedy for value, greedy in scores)
    assert first.get_model_info()["dimba_mc_samples"] == 3 and "3 Monte Carlo samples" in first.describe()


@pytest.mark.parametrize("family", ["ar", "masked"])
def test_generate_until_stops_at_the_first_stop_sequence(runs, family):
    lm = _lm(runs[family], num_steps=4)
    settings = {"max_gen_toks": 12, "do_sample": False}
    [full] = lm.generate_until([_request("generate_until", "ROMEO:\n", {**settings, "until": []})])
    assert full  # something was generated
    stop = full[len(full) // 2]
    [cut] = lm.generate_until([_request("generate_until", "ROMEO:\n", {**settings, "until": [stop]})])
    assert cut == full.split(stop)[0] and stop not in cut


def test_unknown_model_argument_is_one_line(runs):
    from dimba.errors import UsageError

    with pytest.raises(UsageError, match="unknown dimba model argument 'mc_sample'"):
        _lm(runs["ar"], mc_sample=2)


def test_heldout_documents_are_seeded_multiple_choice(corpus):
    docs = heldout_documents(str(corpus), num_docs=5)
    assert docs == heldout_documents(str(corpus), num_docs=5)
    for doc in docs:
        assert len(doc["choices"]) == CHOICES and doc["choices"][doc["label"]] == doc["target"]
        assert len(set(doc["choices"])) == CHOICES and doc["context"].endswith("\n")
        assert doc["passage"].startswith(doc["context"] + doc["target"])
    _, val = split_text(load_corpus(str(corpus)), 0.05)
    assert all(doc["target"] in "".join(val) for doc in docs)  # from the held-out split
