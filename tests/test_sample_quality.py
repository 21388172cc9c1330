"""Sample quality: entropy, distinct-n, gen-PPL under an ar judge (checked against a token-by-token loop),
BLEU / ROUGE, and the `dimba eval --samples` / `dimba bench sweep` verbs with their user errors."""

import json
import math
import sys

import pytest
import torch

from dimba.cli import main
from dimba.config import SampleConfig
from dimba.errors import UsageError
from dimba.model import DIMBA
from dimba.evaluation.sample_quality import distinct_n, judge_nll, reference_scores, sample_quality, unigram_entropy
from dimba.data.tokenizer import Tokenizer


def test_unigram_entropy_of_a_known_list():
    # frequencies 2/4, 1/4, 1/4: H = 0.5 ln 2 + 2 * 0.25 ln 4 = 1.5 ln 2
    assert unigram_entropy([5, 5, 6, 7]) == pytest.approx(1.5 * math.log(2), abs=1e-15)
    assert unigram_entropy([9] * 10) == 0
    assert unigram_entropy(list(range(8))) == pytest.approx(math.log(8), abs=1e-15)
    with pytest.raises(ValueError):
        unigram_entropy([])


def test_distinct_n_pools_texts_without_crossing_them():
    texts = ["The cat, the cat!", "the dog"]  # words: the cat the cat | the dog
    assert distinct_n(texts, 1) == 3 / 6
    assert distinct_n(texts, 2) == 3 / 4  # (the cat) x2, (cat the), (the dog); no (cat the) across the texts
    assert distinct_n(texts, 3) == 2 / 2
    assert distinct_n(["one"], 2) is None


@pytest.fixture(scope="module")
def models(corpus):
    """A random masked generator with one tokenizer and a random ar judge (context 16) with another, whose merges
    (learnt on upper-cased text) split the generator's lower-case merged tokens."""
    lines = corpus.read_text().splitlines()
    tok_a, tok_b = Tokenizer.train(lines, vocab_size=300), Tokenizer.train([s.upper() for s in lines], vocab_size=300)
    torch.manual_seed(0)
    small = dict(backbone="transformer", d_model=32, num_denoiser_layers=1, num_heads=2, context_length=16)
    generator = DIMBA(tok_a.vocab_size, family="masked", **small).eval()
    judge = DIMBA(tok_b.vocab_size, family="ar", **small).eval()
    return generator, tok_a, judge, tok_b


def _hand_nll(judge, tok, texts, prompt=""):
    """Nats and count of the judge's NLL of each text after [EOS] + prompt, one prefix forward per token."""
    head = [tok.eos_id] + (tok.encode(prompt) if prompt else [])
    total, count = 0.0, 0
    with torch.no_grad():
        for text in texts:
            ids = (head + tok.encode(text))[: judge.config.context_length]
            for pos in range(len(head), len(ids)):
                logits = judge.token_logits(torch.tensor([ids[:pos]]))[0, -1]  # (V,): predicts token pos
                total -= float(logits.double().log_softmax(-1)[ids[pos]])
                count += 1
    return total, count


def test_gen_ppl_is_the_judges_exact_nll_after_retokenisation(models):
    generator, tok_a, judge, tok_b = models
    r = sample_quality(generator, tok_a, judge, tok_b, 3, SampleConfig(num_steps=4), 10,
                       generator=torch.Generator().manual_seed(0))
    texts = r["texts"]
    assert len(texts) == 3 and r["samples"] == 3 and r["steps"] == 4 and r["family"] == "masked"
    assert sum(len(tok_b.encode(t)) for t in texts) > sum(len(tok_a.encode(t)) for t in texts)  # re-tokenised
    nats, count = _hand_nll(judge, tok_b, texts)
    assert count == r["judge_tokens"] > 0
    assert r["judge_nats_per_token"] == pytest.approx(nats / count, rel=1e-6)
    assert r["gen_ppl"] == pytest.approx(math.exp(nats / count), rel=1e-6)
    assert r["bleu"] is None and r["rouge1"] is None and r["train_word_fraction"] is None
    assert r["tokens"] <= 30 and r["seconds"] > 0 and r["tokens_per_second"] == pytest.approx(r["tokens"] / r["seconds"])


def test_judge_conditions_on_the_prompt_and_truncates_to_its_context(models):
    _, _, judge, tok = models
    texts = ["O GENTLE NIGHT", "THOU ART THE MOON OF MY HEART NUMBER 3, THOU ART THE SUN OF MY HEART"]
    nats, count = judge_nll(judge, tok, texts, prompt="ROMEO:")
    hand_nats, hand_count = _hand_nll(judge, tok, texts, prompt="ROMEO:")
    assert count == hand_count and nats == pytest.approx(hand_nats, rel=1e-6)
    room = 16 - 1 - len(tok.encode("ROMEO:"))  # the judge's context of 16 after [EOS] + prompt
    assert len(tok.encode(texts[0])) < room < len(tok.encode(texts[1]))
    assert count == len(tok.encode(texts[0])) + room  # the long text is cut
    with pytest.raises(UsageError, match="judge"):
        judge_nll(judge, tok, texts, prompt="ROMEO: " * 20)


def test_a_non_ar_judge_is_refused(models):
    generator, tok_a, _, _ = models
    with pytest.raises(UsageError, match="ar-family"):
        sample_quality(generator, tok_a, generator, tok_a, 1, SampleConfig(num_steps=2), 4)


def test_bleu_and_rouge_of_identical_and_disjoint_texts():
    pytest.importorskip("sacrebleu")
    pytest.importorskip("rouge_score")
    text = "the quick brown fox jumps over the lazy dog"
    same = reference_scores([text, "O gentle night thou art"], [text, "O gentle night thou art"])
    assert same["bleu"] == pytest.approx(100) and all(same[k] == pytest.approx(1.0) for k in ("rouge1", "rouge2", "rougeL"))
    apart = reference_scores(["alpha beta gamma delta epsilon"], ["one two three four five"])
    assert apart["bleu"] < 1e-6 and all(apart[k] == 0 for k in ("rouge1", "rouge2", "rougeL"))


def test_missing_eval_extra_is_one_usage_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "sacrebleu", None)  # import sacrebleu now raises ImportError
    with pytest.raises(UsageError, match=r"pip install 'dimba\[eval\]'"):
        reference_scores(["a"], ["a"])


@pytest.fixture(scope="module")
def runs(tmp_path_factory, corpus, tiny):
    out = tmp_path_factory.mktemp("runs")
    for family in ("masked", "ar"):
        assert main(["train", "--family", family, "--data", str(corpus), "--max-steps", "3", "--out",
                     str(out / family), "--quiet", *tiny]) == 0
    return out


def test_cli_sample_quality_json_and_table(runs, tmp_path, capsys):
    pytest.importorskip("sacrebleu")
    pytest.importorskip("rouge_score")
    refs = tmp_path / "refs.jsonl"
    refs.write_text('{"prompt": "ROMEO:", "reference": "O gentle night"}\n\n{"prompt": "", "reference": "thou art"}\n')
    capsys.readouterr()
    args = [str(runs / "masked"), "--samples", "2", "--judge", str(runs / "ar"), "--json", "--length", "8", "--steps",
            "3", "--prompt", "ROMEO:", "--references", str(refs)]
    assert main(["sample-quality", *args]) == 0
    r = json.loads(capsys.readouterr().out)
    assert main(["eval", *args]) == 0  # the spelling of the previous release, kept for one release with a note
    old = capsys.readouterr()
    timing = {"seconds": 0, "seconds_per_sample": 0, "tokens_per_second": 0}
    assert {**json.loads(old.out), **timing} == {**r, **timing} and "now `dimba sample-quality" in old.err
    assert {"gen_ppl", "judge_nats_per_token", "entropy", "distinct_1", "distinct_2", "distinct_3", "train_word_fraction",
            "bleu", "rouge1", "rouge2", "rougeL", "samples", "length", "steps", "seconds", "tokens_per_second",
            "family"} <= set(r)
    assert r["family"] == "masked" and r["samples"] == 2 and r["length"] == 8 and r["steps"] == 3
    assert r["prompt_tokens"] > 0 and r["references"] == 2 and 0 <= r["rouge1"] <= 1 and 0 <= r["bleu"] <= 100
    assert r["judge_tokens"] > 0 and math.isfinite(r["gen_ppl"])
    assert 0 <= r["entropy"] <= math.log(8) + 1e-12 and 0 <= r["train_word_fraction"] <= 1
    assert main(["sample-quality", str(runs / "masked"), "--samples", "2", "--judge", str(runs / "ar"), "--length",
                 "8"]) == 0
    table = capsys.readouterr().out
    assert "gen-PPL" in table and "distinct-1/2/3" in table and "BLEU" not in table


def test_cli_bench_sweep_writes_json_and_png(runs, tmp_path, capsys):
    capsys.readouterr()
    prefix = tmp_path / "plots" / "sweep"
    assert main(["bench", "sweep", str(runs / "masked"), "--judge", str(runs / "ar"), "--steps", "4,2", "--samples", "2",
                 "--length", "8", "--out", str(prefix)]) == 0
    r = json.loads(capsys.readouterr().out)
    assert [p["steps"] for p in r["points"]] == [2, 4] and r["ar"]["family"] == "ar" and r["ar"]["steps"] is None
    assert all(p["judge_tokens"] > 0 and math.isfinite(p["gen_ppl"]) and p["seconds_per_sample"] > 0
               and "texts" not in p for p in r["points"])
    assert json.loads((tmp_path / "plots" / "sweep.json").read_text()) == r
    assert (tmp_path / "plots" / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("argv, needle", [
    (["sample-quality", "{ar}", "--samples", "2", "--judge", "{masked}"], "ar-family"),
    (["sample-quality", "{masked}", "--samples", "2", "--judge", "{tmp}/nope"], "--judge"),
    (["sample-quality", "{masked}", "--samples", "2"], "--judge"),
    (["eval", "{masked}", "--samples", "2"], "--judge"),
    (["eval", "{masked}", "--judge", "{ar}"], "sample-quality"),
    (["eval", "{masked}", "--references", "{tmp}/refs.jsonl"], "sample-quality"),
    (["sample-quality", "{masked}", "--samples", "0", "--judge", "{ar}"], "--samples"),
    (["sample-quality", "{masked}", "--samples", "2", "--judge", "{ar}", "--references", "{tmp}/nope.jsonl"],
     "not found"),
    (["sample-quality", "{masked}", "--samples", "2", "--judge", "{ar}", "--references", "{tmp}/notjson.jsonl"],
     "not JSON"),
    (["sample-quality", "{masked}", "--samples", "2", "--judge", "{ar}", "--references", "{tmp}/nokey.jsonl"],
     "'reference'"),
    (["sample-quality", "{masked}", "--samples", "2", "--judge", "{ar}", "--references", "{tmp}/empty.jsonl"],
     "empty"),
    (["sample-quality", "{masked}", "--samples", "2", "--judge", "{ar}", "--length", "40"], "context"),
    (["bench", "sweep", "{ar}", "--judge", "{ar}", "--out", "{tmp}/sw"], "no denoising steps"),
    (["bench", "sweep", "{masked}", "--judge", "{masked}", "--out", "{tmp}/sw"], "ar-family"),
    (["bench", "sweep", "{masked}", "--judge", "{ar}", "--steps", "2,x", "--out", "{tmp}/sw"], "--steps"),
    (["bench", "sweep", "{masked}", "--steps", "2"], "--judge"),
])
def test_user_errors_are_one_line_exit_2(argv, needle, runs, tmp_path, capsys):
    (tmp_path / "notjson.jsonl").write_text('{"prompt": "a", "reference": "b"}\nnot json\n')
    (tmp_path / "nokey.jsonl").write_text('{"prompt": "a", "text": "b"}\n')
    (tmp_path / "empty.jsonl").write_text("\n  \n")
    (tmp_path / "refs.jsonl").write_text('{"prompt": "a", "reference": "b"}\n')
    before = sorted(p.name for p in tmp_path.rglob("*"))
    capsys.readouterr()
    code = main([a.format(tmp=tmp_path, ar=runs / "ar", masked=runs / "masked") for a in argv])
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("dimba: error:") and needle in err, err
    assert captured.out == "" and sorted(p.name for p in tmp_path.rglob("*")) == before
