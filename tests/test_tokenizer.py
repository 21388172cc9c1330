"""Byte-level BPE tokenizer: exact round trips, special tokens, save/load and the CLI helper."""

import json
import random

import pytest
import torch

from dimba.data.packing import train_tokenizer_on
from dimba.data.tokenizer import Tokenizer, TokenizerError
from dimba.errors import DimbaError
from dimba.io import atomic_write_text
from dimba.special_tokens import EOS, MASK, PAD, SPECIAL_TOKENS

CORPUS = [
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\n"
    "All:\nSpeak, speak.\n\n"
    "First Citizen:\nYou are all resolved rather to die than to famish?\n",
    "def f(x):\n    return x  # tabs\tand  spaces\n",
    "Ünïcödé façade, naïve café — 日本語のテキスト.\n",
] * 20

TRICKY = [
    "",
    " ",
    "\n",
    "\n\n\n",
    "line one\nline two\n",
    "trailing spaces   \nnext",
    "  leading and  double   spaces",
    "tab\there\t\tand\ttabs\t",
    "windows\r\nline\r\nends\r\n",
    "naïve café, Ünïcödé — “quotes” … 日本語 🙂🎭 e\u0301 \u202eRTL",
    "literal [PAD] [EOS] [MASK] tokens",
    "a\n\n b\n  \nc \n\td",
    "\x00\x01 control \x1f chars \x7f",
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(CORPUS, vocab_size=400, min_frequency=2)


def _random_text(rng: random.Random, n: int) -> str:
    alphabet = "ab c\n\t  \r.,'!é日🙂[]MASK\u00a0\u2028"
    return "".join(rng.choice(alphabet) for _ in range(n))


@pytest.mark.parametrize("text", TRICKY)
def test_decode_inverts_encode_exactly(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_random_strings_round_trip_and_never_yield_special_ids(tok):
    rng = random.Random(0)
    for _ in range(200):
        text = _random_text(rng, rng.randint(0, 60))
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert min(ids, default=99) >= len(SPECIAL_TOKENS)


def test_special_tokens_have_fixed_ids(tok):
    assert SPECIAL_TOKENS == (PAD, EOS, MASK) == ("[PAD]", "[EOS]", "[MASK]")
    assert (tok.pad_id, tok.eos_id, tok.mask_id) == (0, 1, 2)
    assert tok.decode([0, 1, 2], skip_special_tokens=False) == "[PAD][EOS][MASK]"


def test_decode_skips_special_tokens_and_accepts_tensors(tok):
    ids = tok.encode("hear me")
    padded = [tok.mask_id, *ids, tok.eos_id, tok.pad_id, tok.pad_id]
    assert tok.decode(padded) == "hear me"
    assert tok.decode(torch.tensor(padded)) == "hear me"
    assert tok.decode(torch.tensor(padded), skip_special_tokens=False) == "[MASK]hear me[EOS][PAD][PAD]"
    with pytest.raises(ValueError, match="1-D"):
        tok.decode(torch.tensor([padded, padded]))


def test_vocab_size_is_reached_and_bounded():
    tok = Tokenizer.train(CORPUS, vocab_size=300)
    assert tok.vocab_size == 300
    with pytest.raises(TokenizerError, match="259"):
        Tokenizer.train(CORPUS, vocab_size=258)


def test_training_compresses_frequent_words(tok):
    assert len(tok.encode("speak")) < len("speak".encode())


def test_encode_batch_and_documents_match_encode(tok):
    rng = random.Random(1)
    long_docs = [_random_text(rng, 20_000), "x\n" * 5000 + "  \n\n y", *TRICKY]
    expected = [tok.encode(d) for d in long_docs]
    assert tok.encode_batch(long_docs) == expected
    assert tok.encode_documents(long_docs) == expected


def test_encode_documents_cuts_only_where_tokens_cannot_change():
    pattern = "ab  \n\n cd\n\n\tef\t\n"  # whitespace runs across newlines merge into single tokens
    tok = Tokenizer.train([pattern] * 200, vocab_size=300)
    assert len(tok.encode("  \n\n ")) < 5
    doc = pattern * 2000 + "end"
    assert tok.encode_documents([doc, doc[5:]]) == [tok.encode(doc), tok.encode(doc[5:])]


def test_save_load_gives_identical_encodings(tok, tmp_path):
    path = tok.save(tmp_path / "tokenizer.json")
    assert path == tmp_path / "tokenizer.json"
    assert [p.name for p in tmp_path.iterdir()] == ["tokenizer.json"]  # no temp file left behind
    for loaded in (Tokenizer.from_file(path), Tokenizer.from_file(tmp_path), Tokenizer.from_str(tok.to_str())):
        assert loaded.vocab_size == tok.vocab_size
        assert [loaded.encode(t) for t in TRICKY] == [tok.encode(t) for t in TRICKY]


def test_save_into_directory(tok, tmp_path):
    assert tok.save(tmp_path) == tmp_path / "tokenizer.json"
    assert Tokenizer.from_file(tmp_path).encode("speak") == tok.encode("speak")


def test_failed_write_keeps_the_old_file(tmp_path):
    target = atomic_write_text(tmp_path / "f.json", "old")
    with pytest.raises(UnicodeEncodeError):
        atomic_write_text(target, "new \ud800 unencodable")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]


def test_missing_file_error_names_file_and_fix(tmp_path):
    missing = tmp_path / "run" / "tokenizer.json"
    with pytest.raises(TokenizerError) as err:
        Tokenizer.from_file(missing)
    msg = str(err.value)
    assert "\n" not in msg and str(missing) in msg and "dimba tokenizer train" in msg
    assert isinstance(err.value, DimbaError) and isinstance(err.value, ValueError)


def test_invalid_files_raise_tokenizer_error(tok, tmp_path):
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{not json")
    binary = tmp_path / "binary.json"
    binary.write_bytes(b"\xff\xfe\x00")
    spec = json.loads(tok.to_str())
    spec["model"]["vocab"] = {k: v for k, v in spec["model"]["vocab"].items() if k != MASK}
    foreign = tmp_path / "foreign.json"
    foreign.write_text(json.dumps(spec))
    for path, words in ((bad_json, "not a valid"), (binary, "unreadable"), (foreign, "[MASK]")):
        with pytest.raises(TokenizerError) as err:
            Tokenizer.from_file(path)
        assert str(path) in str(err.value) and words in str(err.value) and "\n" not in str(err.value)


def test_train_tokenizer_cli_writes_and_refuses_to_overwrite(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(CORPUS))
    out = tmp_path / "tok"
    path = train_tokenizer_on(str(corpus), 300, str(out))
    assert path == out / "tokenizer.json"
    tok = Tokenizer.from_file(path)
    assert tok.vocab_size == 300 and tok.decode(tok.encode("All:\nSpeak")) == "All:\nSpeak"
    before = path.read_bytes()
    with pytest.raises(TokenizerError, match="already exists.*--out"):
        train_tokenizer_on(str(corpus), 400, str(out))
    assert path.read_bytes() == before
    with pytest.raises(TokenizerError, match="is a file"):
        train_tokenizer_on(str(corpus), 300, str(corpus))
