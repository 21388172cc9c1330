"""Token packing of an in-memory corpus: documents -> EOS-separated token stream -> blocks of ``seq_len``, and the
seeded micro-batches of the training blocks."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from dimba.data.corpora import load_corpus, split_text
from dimba.data.tokenizer import FILE_NAME, Tokenizer, TokenizerError
from dimba.errors import DataError, UsageError


def _token_stream(docs: list[str], tokenizer: Tokenizer) -> torch.Tensor:
    """All documents' tokens, each document followed by EOS."""
    eos = [tokenizer.eos_id]
    ids = [i for doc_ids in tokenizer.encode_documents(docs) for i in doc_ids + eos]
    return torch.tensor(ids, dtype=torch.long)  # (T,)


def _blocks(stream: torch.Tensor, block_size: int) -> torch.Tensor:
    n = stream.numel() // block_size
    return stream[: n * block_size].view(n, block_size)  # (N, block_size)


def tokenize_and_pack(docs: list[str], tokenizer: Tokenizer, block_size: int) -> torch.Tensor:
    """Encode the documents with EOS after each, concatenate, and cut into full blocks.

    Returns a LongTensor ``(N, block_size)``; the ragged remainder is dropped.
    """
    stream = _token_stream(docs, tokenizer)  # (T,)
    if stream.numel() < block_size:
        raise DataError(
            f"corpus has {stream.numel()} tokens, fewer than one block of {block_size}: "
            "use more text or a smaller data.seq_len"
        )
    return _blocks(stream, block_size)  # (N, block_size)


@dataclass
class PreparedData:
    """A tokenizer and the packed train and validation blocks of a corpus."""

    tokenizer: Tokenizer
    train: torch.Tensor  # (N, L) long
    val: torch.Tensor  # (M, L) long
    train_text_chars: int
    val_bytes: int  # UTF-8 bytes of the validation text, for bits-per-byte

    def train_head(self, n: int) -> torch.Tensor:
        """The first ``n`` training blocks: ``(n, L)``."""
        return self.train[:n]

    def resume_position(self, state: dict | None, micro_steps: int) -> int:
        """Where the micro-batches of a run resumed from checkpoint ``state`` start: after the ``micro_steps``
        micro-batches already taken (the seeded shuffle makes the position a count)."""
        return micro_steps

    def batches(self, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                position: int = 0) -> "BlockBatches":
        """Endless micro-batches of ``rank`` from micro-batch ``position`` (see `micro_batches`)."""
        return BlockBatches(micro_batches(self.train, batch_size, seed, position, rank, world_size))


class BlockBatches:
    """The micro-batches of `micro_batches`; their position is a count that a checkpoint need not store."""

    def __init__(self, batches):
        self._batches = batches

    def __iter__(self) -> "BlockBatches":
        return self

    def __next__(self) -> torch.Tensor:
        return next(self._batches)  # (B, L)

    def saved_position(self) -> None:
        """Nothing to store: the position follows from the step count."""
        return None


def micro_batches(data: torch.Tensor, batch_size: int, seed: int, start: int = 0, rank: int = 0, world_size: int = 1):
    """Endless micro-batches of ``rank``: a fresh seeded permutation per epoch; ``start`` skips that many batches,
    so resuming at micro-batch k yields exactly the batches an uninterrupted run would.

    Each micro-step takes a global batch of ``batch_size * world_size`` blocks from the permutation and
    gives rank r the slice ``[r * batch_size, (r + 1) * batch_size)``: ranks never share a block, and
    one process yields what a single-process run always did."""
    global_batch = batch_size * world_size
    per_epoch = data.shape[0] // global_batch
    if per_epoch == 0:
        times = f" x {world_size} processes" if world_size > 1 else ""
        raise UsageError(f"train.batch_size={batch_size}{times} exceeds the {data.shape[0]} training blocks: "
                         "lower train.batch_size or data.seq_len, or use more text")
    k = start
    while True:
        epoch, pos = divmod(k, per_epoch)
        perm = torch.randperm(data.shape[0], generator=torch.Generator().manual_seed(seed + epoch))
        first = pos * global_batch + rank * batch_size
        yield data[perm[first:first + batch_size]]  # (B, L)
        k += 1


def prepare_data(
    spec: str, seq_len: int, val_fraction: float, tokenizer: Tokenizer | None, vocab_size: int
) -> PreparedData:
    """Load corpus ``spec``, split it, and pack both splits into blocks of ``seq_len`` tokens.

    Without a ``tokenizer``, one of ``vocab_size`` is trained on the training split only.
    """
    train_docs, val_docs = split_text(load_corpus(spec), val_fraction)
    if tokenizer is None:
        tokenizer = Tokenizer.train(train_docs, vocab_size=vocab_size)
    train = tokenize_and_pack(train_docs, tokenizer, seq_len)  # (N, L)
    val_stream = _token_stream(val_docs, tokenizer)  # (T,)
    if val_stream.numel() < seq_len:
        raise DataError(
            f"validation split has {val_stream.numel()} tokens, fewer than one block of {seq_len}: "
            "raise data.val_fraction or lower data.seq_len"
        )
    return PreparedData(
        tokenizer=tokenizer,
        train=train,
        val=_blocks(val_stream, seq_len),  # (M, L)
        train_text_chars=sum(len(doc) for doc in train_docs),
        val_bytes=sum(len(doc.encode("utf-8")) for doc in val_docs),
    )


def train_tokenizer_on(corpus: str, vocab_size: int, out: str | Path) -> Path:
    """Train a tokenizer on the training split of ``corpus`` and save ``out/tokenizer.json`` (`dimba tokenizer
    train`); an existing tokenizer file is never overwritten."""
    target = Path(out) / FILE_NAME
    if Path(out).exists() and not Path(out).is_dir():
        raise TokenizerError(f"--out {str(out)!r} is a file, not a directory: choose a directory path")
    if target.exists():
        raise TokenizerError(f"{str(target)!r} already exists: choose another --out directory or delete it")
    train_docs, _ = split_text(load_corpus(corpus))
    return Tokenizer.train(train_docs, vocab_size=vocab_size).save(target)
