"""Streaming of large local corpora through HF ``datasets``: tokenised on the fly, packed, resumable exactly.

A corpus (a ``.txt``, ``.jsonl`` or ``.parquet`` file, or a folder of them, read in sorted path order)
is a sequence of documents: a ``.txt`` file is one document, a ``.jsonl`` line or a ``.parquet`` row one
document (its ``"text"`` field). Their tokens, each document followed by EOS, are concatenated and cut
into blocks of ``seq_len`` as in the in-memory path (`dimba.data.packing.tokenize_and_pack`); the stream is read
in order, without shuffling (shuffle the files beforehand if their order is not random).

Choices:

- **Validation** is the first ``data.val_blocks`` blocks of the stream; training starts right after
  them, in every epoch, so the two never overlap.
- **Tokenizer**: ``data.tokenizer`` when given (or the run's own on resume); otherwise a BPE
  tokenizer trained on the first ``data.tokenizer_train_mb`` MB of documents (validation included:
  only the tokenizer, never the model, sees that text).
- **Position**: ``[epoch, document, offset]``: the index of the next document with unread tokens
  (counting every record of the stream, empty ones too) and how many of its tokens (EOS included)
  were already used. Resuming skips that many documents unread and tokenises from the next one, so
  the blocks after a resume are exactly those an uninterrupted stream yields. At the end of an epoch
  the ragged remainder is dropped and the stream restarts after the validation blocks, with
  ``epoch + 1``.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from dimba.data.tokenizer import Tokenizer
from dimba.errors import DataError, UsageError

Position = list[int]  # [epoch, document, offset]
_BUILDERS = {".txt": "text", ".jsonl": "json", ".parquet": "parquet"}
_ENCODE_CHUNK = 64  # documents tokenised together


def _files(spec: str) -> list[Path]:
    path = Path(spec)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in _BUILDERS and p.is_file())
        if not files:
            raise DataError(f"folder {spec!r} has no .txt, .jsonl or .parquet files: put the corpus there or pass a file")
        return files
    if path.is_file() and path.suffix in _BUILDERS:
        return [path]
    raise DataError(f"streamed corpus {spec!r} not found or not a .txt/.jsonl/.parquet file or a folder of them: "
                    "pass one (the built-in 'shakespeare' needs data.streaming=false)")


def _fingerprint(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


def _unchanged(files: list[Path], seen: dict[Path, tuple[int, int]]) -> None:
    """A one-line `DataError` naming the first of ``files`` that vanished or changed since ``seen`` was taken: the
    stream positions saved in checkpoints count the documents of the files as they were."""
    for path in files:
        try:
            now = _fingerprint(path)
        except FileNotFoundError:
            raise DataError(f"streamed corpus file {str(path)!r} vanished during training: put it back and resume the "
                            "run (dimba train --resume RUN)") from None
        if now != seen[path]:
            raise DataError(f"streamed corpus file {str(path)!r} changed during training (its size or modification "
                            "time): restore it and resume the run, or train a new run on the new text")


def document_stream(spec: str) -> Callable[[], Iterator[str]]:
    """A function that opens the documents of corpus ``spec`` as a fresh ``datasets`` stream (offline-safe:
    only local files and the packaged text/json/parquet readers). A file that vanishes or changes while the
    stream runs is a one-line `DataError` naming it (checked before and after each run of files is read)."""
    try:
        import datasets
    except ImportError:
        raise DataError("data.streaming needs the datasets package: pip install 'dimba[stream]'") from None
    files = _files(spec)
    seen = {path: _fingerprint(path) for path in files}
    groups = [(builder, list(group))  # consecutive files of one kind, in path order
              for builder, group in itertools.groupby(files, key=lambda f: _BUILDERS[f.suffix])]

    def open_docs() -> Iterator[str]:
        for builder, paths in groups:
            _unchanged(paths, seen)
            extra = {"sample_by": "document"} if builder == "text" else {}
            ds = datasets.load_dataset(builder, data_files=[str(p) for p in paths], split="train", streaming=True,
                                       **extra)
            try:
                for number, record in enumerate(ds):
                    text = record.get("text")
                    if not isinstance(text, str):
                        raise DataError(f'record {number} of {[str(p) for p in paths]} has no string "text" field: '
                                        "give every record one")
                    yield text
            except OSError:  # a file gone while it was read
                _unchanged(paths, seen)
                raise
            _unchanged(paths, seen)
    return open_docs


def stream_blocks(open_docs: Callable[[], Iterator[str]], tokenizer: Tokenizer, block_size: int,
                  start: Position) -> Iterator[tuple[torch.Tensor, Position]]:
    """Blocks of one epoch from position ``start``, each with the position right after it.

    Yields ``(block (block_size,) long, [epoch, document, offset])``; stops at the end of the
    documents, dropping the ragged remainder.
    """
    epoch, doc_index, offset = start
    docs = itertools.islice(open_docs(), doc_index, None)  # skipped documents are read, not tokenised
    block: list[int] = []
    while chunk := list(itertools.islice(docs, _ENCODE_CHUNK)):
        for ids in tokenizer.encode_documents([d if d.strip() else "" for d in chunk]):
            ids = ids + [tokenizer.eos_id] if ids else []  # whitespace-only documents are dropped
            while offset < len(ids):
                take = min(block_size - len(block), len(ids) - offset)
                block += ids[offset:offset + take]
                offset += take
                if len(block) == block_size:
                    after = [epoch, doc_index + 1, 0] if offset == len(ids) else [epoch, doc_index, offset]
                    yield torch.tensor(block, dtype=torch.long), after
                    block = []
            doc_index, offset = doc_index + 1, 0


class StreamedData:
    """A streamed corpus: its tokenizer, the validation blocks held out from its start, and the
    position where training starts in each epoch."""

    def __init__(self, spec: str, seq_len: int, val_blocks: int, tokenizer: Tokenizer | None, vocab_size: int,
                 tokenizer_train_mb: float):
        self.open_docs = document_stream(spec)
        self.seq_len = seq_len
        if tokenizer is None:
            tokenizer = Tokenizer.train(self._head_documents(int(tokenizer_train_mb * 2**20)), vocab_size=vocab_size)
        self.tokenizer = tokenizer
        val, self.train_start = [], [0, 0, 0]
        for block, self.train_start in itertools.islice(stream_blocks(self.open_docs, tokenizer, seq_len, [0, 0, 0]),
                                                        val_blocks):
            val.append(block)
        if len(val) < val_blocks:
            raise DataError(f"streamed corpus {spec!r} has {len(val)} blocks of {seq_len} tokens, not more than the "
                            f"{val_blocks} validation blocks: lower data.val_blocks or data.seq_len, or use more text")
        self.val = torch.stack(val)  # (val_blocks, L)
        if next(self.blocks(self.train_start), None) is None:
            raise DataError(f"streamed corpus {spec!r} has no training block after the {val_blocks} validation "
                            "blocks: lower data.val_blocks or data.seq_len, or use more text")

    def _head_documents(self, budget: int) -> Iterator[str]:
        for doc in self.open_docs():
            if budget <= 0:
                return
            budget -= len(doc.encode("utf-8"))
            yield doc

    def blocks(self, start: Position) -> Iterator[tuple[torch.Tensor, Position]]:
        """Endless training blocks from ``start`` (epoch after epoch), each with the position after it."""
        epoch = start[0]
        while True:
            epoch_start = start if epoch == start[0] else [epoch, *self.train_start[1:]]
            yield from stream_blocks(self.open_docs, self.tokenizer, self.seq_len, epoch_start)
            epoch += 1

    def train_head(self, n: int) -> torch.Tensor:
        """The first ``n`` training blocks (fewer if an epoch has fewer): ``(n, L)``."""
        return torch.stack([b for b, _ in itertools.islice(stream_blocks(self.open_docs, self.tokenizer, self.seq_len,
                                                                         self.train_start), n)])

    def resume_position(self, state: dict | None, micro_steps: int) -> Position:
        """The stream position saved in checkpoint ``state`` (the start of training without one)."""
        if state is None:
            return self.train_start
        if "data_position" not in state:
            raise UsageError("the checkpoint has no stream position (trained without data.streaming): resume with "
                             "data.streaming=false")
        return state["data_position"]

    def batches(self, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                position: Position | None = None) -> StreamBatches:
        """Micro-batches of ``rank`` from ``position`` (default: the start of training). The stream is read in
        order: ``seed`` is unused."""
        return StreamBatches(self, batch_size, rank, world_size, position or self.train_start)


class StreamBatches:
    """Endless micro-batches of one rank: each global batch is the next ``batch_size * world_size``
    blocks of the stream and rank r takes ``[r * batch_size, (r + 1) * batch_size)`` of it, so ranks never
    share a block. ``position`` is where the stream stands after the last batch returned: save it, and
    ``StreamedData.batches(..., position=...)`` continues exactly from there."""

    def __init__(self, data: StreamedData, batch_size: int, rank: int, world_size: int, position: Position):
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.position = [int(p) for p in position]
        self._blocks = data.blocks(self.position)

    def __iter__(self) -> StreamBatches:
        return self

    def saved_position(self) -> Position:
        """What a checkpoint stores to continue exactly here: ``[epoch, document, offset]``."""
        return list(self.position)

    def __next__(self) -> torch.Tensor:
        mine = []
        for i in range(self.batch_size * self.world_size):
            block, self.position = next(self._blocks)
            if i // self.batch_size == self.rank:
                mine.append(block)
        return torch.stack(mine)  # (B, L)

