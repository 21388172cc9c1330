"""Data: corpora, the tokenizer, packing into blocks, and streaming. `open_data` is the one entry point of training:
it returns the tokenizer, the validation blocks and a source of training micro-batches, in memory or streamed."""

from __future__ import annotations

from dimba.data.packing import PreparedData, prepare_data
from dimba.data.streaming import StreamedData
from dimba.data.tokenizer import Tokenizer


def open_data(data_cfg, tokenizer: Tokenizer | None) -> PreparedData | StreamedData:
    """The corpus of a `DataConfig`: ``.tokenizer``, ``.val`` (M, L) blocks, ``.train_head(n)``,
    ``.resume_position(checkpoint, micro_steps)`` and ``.batches(batch_size, seed, rank, world_size, position)``.
    Without ``tokenizer`` one of ``data_cfg.vocab_size`` is trained on the training text."""
    if data_cfg.streaming:
        return StreamedData(data_cfg.corpus, data_cfg.seq_len, data_cfg.val_blocks, tokenizer, data_cfg.vocab_size,
                            data_cfg.tokenizer_train_mb)
    return prepare_data(data_cfg.corpus, data_cfg.seq_len, data_cfg.val_fraction, tokenizer, data_cfg.vocab_size)


__all__ = ["PreparedData", "StreamedData", "Tokenizer", "open_data", "prepare_data"]
