"""Hostile input: every error a user can cause ends in one ``dimba: error:`` line naming the problem
and the fix, exit status 2, no traceback, and nothing on disk written, overwritten or lost.

The cases complement ``test_user_errors_are_one_line_exit_2`` in test_cli.py; the property tests at
the end throw random config trees and overrides at validation.
"""

import builtins
import errno
import io
import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from dimba.cli import main
from dimba.config import Config, apply_overrides, load_config, validate
from dimba.errors import ConfigError


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A small two-speaker play, enough for a few dozen 32-token blocks."""
    path = tmp_path_factory.mktemp("corpus") / "plays.txt"
    speeches = (f"{['ROMEO', 'JULIET'][i % 2]}:\nO gentle night, thou art the {['moon', 'sun', 'star'][i % 3]} "
                f"of my heart number {i % 7}.\n\n" for i in range(200))
    path.write_text("".join(speeches))
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory, corpus, tiny):
    """A tiny continuous run trained for 3 steps."""
    out = tmp_path_factory.mktemp("runs") / "r"
    assert main(["train", "--data", str(corpus), "--max-steps", "3", "--out", str(out), "--quiet", *tiny]) == 0
    return out


@pytest.fixture(scope="module")
def export(tmp_path_factory, run):
    """The export folder of `run`."""
    out = tmp_path_factory.mktemp("exports") / "e"
    assert main(["export", str(run), "--out", str(out)]) == 0
    return out


class Evil:
    """Unpickling this object would create the file ``path``: a stand-in for running an attacker's code."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


class Case:
    """What a builder gets: the test's own folder, and the shared run, export and corpus."""

    def __init__(self, tmp: Path, run: Path, export: Path, corpus: Path, tiny: tuple[str, ...]):
        self.tmp, self.run, self.export, self.corpus, self.tiny = tmp, run, export, corpus, tiny
        self.out = str(tmp / "new")  # an --out that must not come into being

    def write(self, name: str, content: str | bytes) -> str:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
        return str(path)

    def train(self, *args: str) -> list[str]:
        return ["train", "--data", str(self.corpus), "--out", self.out, "--quiet", *self.tiny, *args]

    def copy(self, which: str) -> Path:
        """A private copy of the run or the export folder, to damage."""
        return Path(shutil.copytree(getattr(self, which), self.tmp / which))

    def edit(self, path: Path, old: str, new: str) -> None:
        text = path.read_text()
        assert old in text
        path.write_text(text.replace(old, new))


def _config_json(c: Case, **changes) -> list[str]:
    exp = c.copy("export")
    config = json.loads((exp / "config.json").read_text())
    (exp / "config.json").write_text(json.dumps({**config, **changes}))
    return ["generate", str(exp)]


def _foreign_tokenizer(c: Case) -> str:
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models

    vocab = {"[PAD]": 0, "[EOS]": 1, "[MASK]": 2, "[UNK]": 3, "ROMEO": 4}
    return c.write("wordlevel.json", HFTokenizer(models.WordLevel(vocab, unk_token="[UNK]")).to_str())


def _other_vocab_tokenizer(c: Case) -> list[str]:
    from dimba.data.tokenizer import Tokenizer

    exp = c.copy("export")
    Tokenizer.train([c.corpus.read_text()], vocab_size=280).save(exp / "tokenizer.json")
    return ["generate", str(exp), "--prompt", "ROMEO:"]


def _damaged_weights(c: Case, damage) -> list[str]:
    exp = c.copy("export")
    weights = exp / "model.safetensors"
    weights.write_bytes(damage(weights.read_bytes()))
    return ["generate", str(exp)]


def _weights_folder(c: Case) -> list[str]:
    exp = c.copy("export")
    (exp / "model.safetensors").unlink()
    (exp / "model.safetensors").mkdir()
    return ["generate", str(exp)]


def _checkpoint(c: Case, blob) -> Path:
    """A copy of the run whose last.ckpt is ``blob`` (an object for torch.save, or raw bytes)."""
    run = c.copy("run")
    ckpt = run / "checkpoints" / "last.ckpt"
    if isinstance(blob, bytes):
        ckpt.write_bytes(blob)
    else:
        torch.save(blob, ckpt)
    return run


def _pickled(c: Case) -> Path:
    return _checkpoint(c, {"ema": Evil(c.tmp / "pwned"), "step": 3})


def _replace(c: Case, name: str, content: str | bytes, which: str = "run") -> Path:
    """A copy of the run (or export folder) whose file ``name`` holds ``content``."""
    folder = c.copy(which)
    if isinstance(content, bytes):
        (folder / name).write_bytes(content)
    else:
        (folder / name).write_text(content)
    return folder


def _no_checkpoints(c: Case) -> list[str]:
    run = c.copy("run")
    shutil.rmtree(run / "checkpoints")
    return ["train", "--resume", str(run), "--quiet"]


def _other_family(c: Case, verb: str = "generate") -> list[str]:
    run = c.copy("run")
    c.edit(run / "config.yaml", "family: continuous", "family: masked")
    return ["generate", str(run)] if verb == "generate" else ["train", "--resume", str(run)]


_NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")

CASES = {
    # ---- config: files, keys, types, values, consistency
    "config file: misspelled key": (lambda c: c.train("--config", c.write("c.yaml", "train:\n  lrr: 0.1\n")),
                                    "unknown config key 'train.lrr'"),
    "config file: misspelled section": (lambda c: c.train("--config", c.write("c.yaml", "modle:\n  d_model: 32\n")),
                                        "unknown config key 'modle'"),
    "config file: a list, not a mapping": (lambda c: c.train("--config", c.write("c.yaml", "- model\n- train\n")),
                                           "holds a list, not a mapping"),
    "config file: broken YAML": (lambda c: c.train("--config", c.write("c.yaml", "train: [1, 2\n")), "not valid YAML"),
    "config file: section is a number": (lambda c: c.train("--config", c.write("c.yaml", "model: 32\n")),
                                         "section 'model' is 32, not a mapping"),
    "config file: a folder": (lambda c: c.train("--config", str(c.tmp)), "is a folder, not a YAML file"),
    "config file: not UTF-8": (lambda c: c.train("--config", c.write("c.yaml", b"train:\n  lr: \xff\xfe\n")),
                               "is not UTF-8 text"),
    "config file: bad tagged scalar": (lambda c: c.train("--config", c.write("c.yaml", "train:\n  lr: !!int abc\n")),
                                       "not valid YAML"),
    "wrong type: a list for an int": (lambda c: c.train("data.seq_len=[32, 64]"), "'data.seq_len'"),
    "negative size": (lambda c: c.train("model.num_denoiser_layers=-2"), "'model.num_denoiser_layers'"),
    "zero size": (lambda c: c.train("train.batch_size=0"), "'train.batch_size'"),
    "infinite learning rate": (lambda c: c.train("train.lr=.inf"), "finite number"),
    "nan time budget": (lambda c: c.train("--max-time", "nan"), "finite number"),
    "d_model not divisible by heads": (lambda c: c.train("model.backbone=transformer", "model.num_heads=5"),
                                       "not divisible by num_heads=5"),
    "expand*d_model not divisible by headdim": (lambda c: c.train("model.headdim=24"), "not divisible by headdim=24"),
    "override below a value": (lambda c: c.train("train.lr.max=1"), "'train.lr' is a value, not a section"),
    "tokenizer vocabulary too small": (lambda c: c.train("data.vocab_size=100"), "'data.vocab_size'"),
    "bad flag value": (lambda c: c.train("--max-steps", "many"), "invalid int value: 'many'"),
    "unknown flag": (lambda c: c.train("--epochs", "3"), "unrecognized arguments: --epochs"),
    # ---- hardware
    "more devices than cores": (lambda c: c.train("train.devices=64"), "train.devices=64"),
    "torch.compile without CUDA": pytest.param(lambda c: c.train("train.compile=true"), "needs a CUDA device",
                                               marks=_NO_CUDA),
    "cuda on a CPU machine": pytest.param(lambda c: c.train("train.accelerator=cuda"), "no cuda device", marks=_NO_CUDA),
    # ---- corpora
    "corpus: binary": (lambda c: c.train("--data", c.write("b.txt", bytes(range(256)) * 4)), "looks binary"),
    "corpus: not UTF-8": (lambda c: c.train("--data", c.write("l.txt", "café au lait\n".encode("latin-1") * 50)),
                          "not valid UTF-8"),
    "corpus: folder without text files": (lambda c: c.train("--data", str(Path(c.write("d/x.csv", "a,b\n")).parent)),
                                          "no .txt or .jsonl files"),
    "corpus: bad JSONL line": (lambda c: c.train("--data", c.write("c.jsonl", '{"text": "a"}\nnot json\n')),
                               "line 2 is not valid JSON"),
    "corpus: JSONL without text": (lambda c: c.train("--data", c.write("c.jsonl", '{"body": "a"}\n')),
                                   'no string "text" field'),
    "corpus: smaller than one block": (lambda c: c.train("--data", c.write("s.txt", "ROMEO:\nHi.\n\nJULIET:\nHo.\n")),
                                       "fewer than one block of 32"),
    "corpus: a single line": (lambda c: c.train("--data", c.write("one.txt", "O Romeo")), "single line"),
    "corpus: empty name": (lambda c: c.train("--data", ""), "'data.corpus'"),
    "batch larger than the data": (lambda c: c.train("train.batch_size=100000"), "train.batch_size=100000 exceeds"),
    # ---- tokenizers
    "tokenizer: missing file": (lambda c: c.train(f"data.tokenizer={c.tmp / 'nope.json'}"), "not found"),
    "tokenizer: corrupt file": (lambda c: c.train(f"data.tokenizer={c.write('t.json', '{not json')}"),
                                "not a valid tokenizer.json"),
    "tokenizer: another kind": (lambda c: c.train(f"data.tokenizer={_foreign_tokenizer(c)}"), "not a dimba tokenizer"),
    "tokenizer train: vocabulary too small": (
        lambda c: ["tokenizer", "train", "--data", str(c.corpus), "--vocab-size", "100", "--out", c.out], "below 259"),
    "tokenizer train: --out is a file": (
        lambda c: ["tokenizer", "train", "--data", str(c.corpus), "--out", c.write("f", "x")], "is a file"),
    # ---- output folders
    "train --out is a file": (lambda c: ["train", "--out", c.write("f", "keep me"), *c.tiny], "is a file"),
    "train --out holds other files": (lambda c: ["train", "--out", str(Path(c.write("o/notes.txt", "keep")).parent)],
                                      "already holds other files"),
    "export --out is a file": (lambda c: ["export", str(c.run), "--out", c.write("f", "keep me")], "already exists"),
    # ---- generation
    "prompt plus --length beyond the context": (
        lambda c: ["generate", str(c.run), "--prompt", "ROMEO:", "--length", "100"], "exceeds the model context"),
    "generate from a file": (lambda c: ["generate", str(c.corpus)], "is a file"),
    # ---- export folders
    "config.json: another vocab_size": (lambda c: _config_json(c, vocab_size=777), "but the config needs (777, 32)"),
    "config.json: another family": (lambda c: _config_json(c, family="masked"), "weights the config does not know"),
    "config.json: unknown key": (lambda c: _config_json(c, d_modle=32), "d_modle"),
    "config.json: not JSON": (lambda c: ["generate", str(_replace(c, "config.json", "{", "export"))],
                              "not valid JSON"),
    "tokenizer.json of another vocabulary": (_other_vocab_tokenizer, "the model's vocabulary has"),
    "model.safetensors: truncated": (lambda c: _damaged_weights(c, lambda b: b[: len(b) // 2]), "corrupted"),
    "model.safetensors: header overwritten": (lambda c: _damaged_weights(c, lambda b: b"\xff" * 16 + b[16:]),
                                              "corrupted"),
    "model.safetensors: a folder": (_weights_folder, "is a folder"),
    # ---- training runs and checkpoints
    "pickle as last.ckpt: generate": (lambda c: ["generate", str(_pickled(c))], "unreadable or not a dimba checkpoint"),
    "pickle as last.ckpt: resume": (lambda c: ["train", "--resume", str(_pickled(c)), "--quiet"],
                                    "unreadable or not a dimba checkpoint"),
    "pickle as last.ckpt: export": (lambda c: ["export", str(_pickled(c)), "--out", c.out],
                                    "unreadable or not a dimba checkpoint"),
    "last.ckpt: truncated": (lambda c: ["generate", str(_checkpoint(c, (c.run / "checkpoints/last.ckpt")
                                                                   .read_bytes()[:1000]))], "unreadable"),
    "last.ckpt: another torch file": (lambda c: ["generate", str(_checkpoint(c, {"weights": torch.zeros(2)}))],
                                      "not a dimba training checkpoint"),
    "last.ckpt: entries of the wrong kind": (
        lambda c: ["generate", str(_checkpoint(c, dict.fromkeys("model ema optimizer scheduler step rng".split(), 0)))],
        "does not fit its config.yaml"),
    "resume without checkpoints": (_no_checkpoints, "not found"),
    "resume without a run": (lambda c: ["train", "--resume"], "(no run given)"),
    "resume as another family": (lambda c: ["train", "--resume", str(c.copy("run")), "--family", "masked"],
                                 "cannot change model.family ('continuous' -> 'masked')"),
    "run weights under another family's config": (_other_family, "does not fit its config.yaml"),
    "resume a run whose config.yaml names another family": (lambda c: _other_family(c, "resume"),
                                                             "does not fit its config.yaml"),
    "run config.yaml: broken YAML": (lambda c: ["generate", str(_replace(c, "config.yaml", "model: [\n"))],
                                     "not valid YAML"),
    "run config.yaml: not UTF-8": (lambda c: ["generate", str(_replace(c, "config.yaml", b"\xff\xfe"))],
                                   "not UTF-8 text"),
    "run config.yaml: a list (resume)": (lambda c: ["train", "--resume", str(_replace(c, "config.yaml", "- 1\n"))],
                                         "holds a list, not a mapping"),
    "run config.yaml: invalid value": (lambda c: ["generate", str(_replace(c, "config.yaml", "train: {lr: -1}\n"))],
                                       "'train.lr'"),
    "run tokenizer.json: corrupt": (lambda c: ["generate", str(_replace(c, "tokenizer.json", "garbage"))],
                                    "not a valid tokenizer.json"),
}


def _snapshot(*roots: Path) -> dict[str, bytes | None]:
    """Every path below ``roots`` with its bytes (None for a folder)."""
    return {str(p): (p.read_bytes() if p.is_file() else None) for root in roots for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("build, needle", list(CASES.values()), ids=list(CASES))
def test_hostile_input_is_one_line_exit_2_and_harmless(build, needle, tmp_path, run, export, corpus, tiny, capsys):
    case = Case(tmp_path, run, export, corpus, tiny)
    argv = build(case)
    watched = (tmp_path, run, export, corpus.parent)
    before = _snapshot(*watched)
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("dimba: error: ") and "Traceback" not in err, err
    assert needle in err, err
    assert _snapshot(*watched) == before  # nothing created, changed or removed
    assert not (tmp_path / "pwned").exists()  # a pickled payload never ran


# ---- faults on disk: a full disk (ENOSPC) or a read-only folder (EROFS) during a write, simulated by making the
# writes of the matching files fail; the same guarantees, and the run's previous checkpoint stays intact and loadable

class _FillingFile:
    """A file on a disk that fills up: the first write stores half its bytes, then fails with ENOSPC."""

    def __init__(self, fh):
        self._fh = fh

    def write(self, data):
        self._fh.write(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name):
        return getattr(self._fh, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._fh.close()


def _failing(match, code: int):
    """A fault: opening a file whose path ``match``es for writing fails with ``code`` (EROFS: at once; ENOSPC: its
    first write, half of it stored)."""
    def install(monkeypatch):
        real = builtins.open

        def fake_open(file, mode="r", *args, **kwargs):
            if isinstance(file, (str, Path)) and set(mode) & set("wxa") and match(Path(file)):
                if code != errno.ENOSPC:
                    raise OSError(code, os.strerror(code), str(file))
                return _FillingFile(real(file, mode, *args, **kwargs))
            return real(file, mode, *args, **kwargs)
        monkeypatch.setattr(builtins, "open", fake_open)
        monkeypatch.setattr(io, "open", fake_open)  # pathlib's
    return install


def _full_weights(monkeypatch):
    """safetensors writes in Rust: its error for a full disk, as it words it."""
    from safetensors import SafetensorError

    def save_model(model, filename, metadata=None):
        raise SafetensorError(f"Error while serializing: I/O error: No space left on device (os error 28) at path "
                              f"{filename!r}")
    monkeypatch.setattr("dimba.export.save_model", save_model)


def _ckpt(p: Path) -> bool:
    return ".ckpt" in p.name


def _in_export(name: str):
    return lambda p: p.parent.name.startswith(".new.") and name in p.name


DISK_FAULTS = {
    "disk full: checkpoint save": (lambda c: ["train", "--resume", str(c.copy("run")), "--max-steps", "5", "--quiet"],
                                   _failing(_ckpt, errno.ENOSPC), "no space left on the device (ENOSPC)"),
    "read-only: checkpoint save": (lambda c: ["train", "--resume", str(c.copy("run")), "--max-steps", "5", "--quiet"],
                                   _failing(_ckpt, errno.EROFS), "the file system is read-only (EROFS)"),
    "disk full: export config": (lambda c: ["export", str(c.run), "--out", c.out],
                                 _failing(_in_export("config.json"), errno.ENOSPC), "no space left"),
    "disk full: export weights": (lambda c: ["export", str(c.run), "--out", c.out], _full_weights, "no space left"),
    "disk full: export card": (lambda c: ["export", str(c.run), "--out", c.out],
                               _failing(_in_export("README.md"), errno.ENOSPC), "no space left"),
    "read-only: export": (lambda c: ["export", str(c.run), "--out", c.out],
                          _failing(_in_export("config.json"), errno.EROFS), "read-only"),
    "disk full: tokenizer write": (
        lambda c: ["tokenizer", "train", "--data", str(c.corpus), "--vocab-size", "280", "--out", c.out],
        _failing(lambda p: "tokenizer.json" in p.name, errno.ENOSPC), "no space left"),
    "read-only: tokenizer write of a new run": (lambda c: c.train(), _failing(lambda p: "tokenizer.json" in p.name,
                                                                              errno.EACCES), "permission denied"),
}


@pytest.mark.parametrize("build, fault, needle", list(DISK_FAULTS.values()), ids=list(DISK_FAULTS))
def test_disk_faults_are_one_line_exit_2_and_keep_the_checkpoint(build, fault, needle, tmp_path, run, export, corpus,
                                                                 tiny, capsys, monkeypatch):
    case = Case(tmp_path, run, export, corpus, tiny)
    argv = build(case)
    copied = tmp_path / "run" / "checkpoints"
    before = _snapshot(run, export, corpus.parent, copied if copied.exists() else tmp_path / "absent")
    fault(monkeypatch)
    code = main(argv)
    monkeypatch.undo()
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    *progress, last = err.splitlines()  # training prints its final validation line before it saves
    assert all(line.startswith("step ") for line in progress) and "Traceback" not in err, err
    assert last.startswith("dimba: error: cannot write ") and needle in last, err
    assert _snapshot(run, export, corpus.parent, copied if copied.exists() else tmp_path / "absent") == before
    assert not [p for p in tmp_path.rglob("*") if p.name.startswith(".")]  # no temporary left behind
    assert not any(p.is_file() for p in Path(case.out).rglob("*")) and not Path(case.out).is_file()
    if copied.exists():  # the previous checkpoint is still the run's, and loads
        assert "the checkpoint of step 3 is intact" in err, err
        assert main(["generate", str(tmp_path / "run"), "--length", "4", "--steps", "2"]) == 0


def test_an_empty_corpus_name_never_reads_the_working_directory():
    from dimba.data.corpora import load_corpus
    from dimba.errors import DataError

    with pytest.raises(DataError, match="corpus name is empty"):
        load_corpus("")


# ---------------------------------------------------------------- property: random configs


_SECTIONS = {name: list(field.annotation.model_fields) for name, field in Config.model_fields.items()}
_NAMES = sorted({name for fields in _SECTIONS.values() for name in fields})
_scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.integers(-3, 3),
                     st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8),
                     st.sampled_from(["mamba2", "masked", "cosine", "auto", "1e-3", "nan", "-inf", "[1", "{a: 1}"]))
_keys = st.one_of(st.sampled_from(_NAMES), st.text(max_size=6), st.integers(-2, 2))
_values = st.recursive(_scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                         st.dictionaries(_keys, inner, max_size=3)), max_leaves=8)
_sections = st.one_of(st.sampled_from(list(_SECTIONS)), st.text(max_size=6))
_trees = st.dictionaries(_sections, st.one_of(st.dictionaries(_keys, _values, max_size=6), _values), max_size=5)


def _flow_yaml(value) -> str:
    """``value`` as one flow-style YAML text, the way a user types it after ``KEY=``."""
    return yaml.safe_dump(value, default_flow_style=True, sort_keys=False).strip().removesuffix("...").strip()


_value_text = st.one_of(_values.map(_flow_yaml), st.text(max_size=10))
_dotted = st.one_of(st.sampled_from([f"{s}.{name}" for s, names in _SECTIONS.items() for name in names]),
                    st.builds(lambda s, k: f"{s}.{k}", _sections, st.text(max_size=6)))
_override = st.one_of(st.builds(lambda k, v: f"{k}={v}", _dotted, _value_text), st.text(max_size=16))
_TINY_CONFIG = load_config("tiny")


def _config_or_one_line_error(make) -> None:
    """``make()`` returns a `Config`, or raises a `ConfigError` whose message is one stripped line."""
    try:
        cfg = make()
    except ConfigError as exc:
        msg = str(exc)
        assert msg and msg == msg.strip() and len(msg.splitlines()) == 1, msg
    else:
        assert isinstance(cfg, Config)
        assert all(math.isfinite(v) for v in _floats(cfg.model_dump()))


def _floats(tree: dict):
    """Every float in a nested dict."""
    for value in tree.values():
        if isinstance(value, dict):
            yield from _floats(value)
        elif isinstance(value, float):
            yield value


@settings(max_examples=200, deadline=None)
@given(_trees)
def test_validate_returns_a_config_or_a_one_line_config_error(tree):
    _config_or_one_line_error(lambda: validate(tree))


@settings(max_examples=200, deadline=None)
@given(st.lists(_override, max_size=4))
def test_overrides_give_a_config_or_a_one_line_config_error(overrides):
    _config_or_one_line_error(lambda: apply_overrides(_TINY_CONFIG, overrides))

