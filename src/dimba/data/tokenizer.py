"""Byte-level BPE tokenizer: training, exact encode/decode round trips and atomic save/load."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from dimba.errors import DimbaError, first_line
from dimba.io import atomic_write_text
from dimba.special_tokens import EOS_ID, MASK_ID, PAD_ID, SPECIAL_TOKENS

FILE_NAME = "tokenizer.json"

_MIN_VOCAB = 256 + len(SPECIAL_TOKENS)  # the byte alphabet plus the special tokens
_TRAIN_HINT = "train one with 'dimba tokenizer train --data ... --out DIR' or pass a run directory that has one"
# A newline between two non-space characters ends a pre-token on both sides, so cutting the text
# right after it gives the same tokens as encoding the whole text (see `Tokenizer.encode_documents`).
_SAFE_CUT = re.compile(r"(?<=\S\n)(?=\S)")
_CHUNK_CHARS = 4096


class TokenizerError(DimbaError):
    """A missing, unreadable or incompatible tokenizer file, or a bad training request."""


def _resolve(path: str | Path) -> Path:
    """A tokenizer file path; a directory stands for its ``tokenizer.json``."""
    path = Path(path)
    return path / FILE_NAME if path.is_dir() else path


def _chunks(text: str) -> list[str]:
    """Cut ``text`` at safe newlines into pieces of about ``_CHUNK_CHARS`` characters."""
    chunks: list[str] = []
    current: list[str] = []
    size = 0
    for piece in _SAFE_CUT.split(text):
        current.append(piece)
        size += len(piece)
        if size >= _CHUNK_CHARS:
            chunks.append("".join(current))
            current, size = [], 0
    if current:
        chunks.append("".join(current))
    return chunks


class Tokenizer:
    """A byte-level BPE tokenizer with the special tokens ``[PAD]``=0, ``[EOS]``=1, ``[MASK]``=2.

    Any string encodes, and ``decode(encode(s)) == s`` exactly. The special tokens live in the BPE
    vocabulary only, not among the "added tokens" that HF matches in raw text: encoding never yields
    them (a literal ``"[MASK]"`` in the text is ordinary bytes), and matching costs no time.
    """

    def __init__(self, hf: HFTokenizer):
        spec = json.loads(hf.to_str())
        kinds = ((spec.get("model") or {}).get("type"), (spec.get("pre_tokenizer") or {}).get("type"))
        if kinds != ("BPE", "ByteLevel"):  # only byte-level BPE encodes any string
            raise TokenizerError(f"tokenizer is {kinds[0] or 'unknown'} / {kinds[1] or 'no pre-tokenizer'}, not a "
                                 f"byte-level BPE (not a dimba tokenizer): {_TRAIN_HINT}")
        if spec.get("added_tokens"):
            spec["added_tokens"] = []
            hf = HFTokenizer.from_str(json.dumps(spec))
        for want_id, token in enumerate(SPECIAL_TOKENS):
            if hf.token_to_id(token) != want_id:
                raise TokenizerError(
                    f"tokenizer does not have {token} at id {want_id} (not a dimba tokenizer): {_TRAIN_HINT}"
                )
        self._hf = hf

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 4096, min_frequency: int = 2) -> Tokenizer:
        """Learn a byte-level BPE vocabulary of at most ``vocab_size`` entries (special tokens included)."""
        if vocab_size < _MIN_VOCAB:
            raise TokenizerError(
                f"vocab_size {vocab_size} is below {_MIN_VOCAB} (256 bytes + {len(SPECIAL_TOKENS)} special tokens): "
                "use a larger --vocab-size / data.vocab_size"
            )
        hf = HFTokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=list(SPECIAL_TOKENS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        hf.train_from_iterator(texts, trainer=trainer)
        return cls(hf)

    @classmethod
    def from_str(cls, text: str) -> Tokenizer:
        """Rebuild a tokenizer from the JSON text of `to_str`."""
        try:
            hf = HFTokenizer.from_str(text)
        except Exception as exc:  # the Rust side raises a bare Exception
            raise TokenizerError(f"not a valid tokenizer.json ({first_line(exc)}): {_TRAIN_HINT}") from None
        return cls(hf)

    @classmethod
    def from_file(cls, path: str | Path) -> Tokenizer:
        """Load a ``tokenizer.json`` file, or the one inside the directory ``path``."""
        path = _resolve(path)
        if not path.is_file():
            raise TokenizerError(f"tokenizer file {str(path)!r} not found: {_TRAIN_HINT}")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise TokenizerError(
                f"tokenizer file {str(path)!r} is unreadable ({first_line(exc)}): {_TRAIN_HINT}"
            ) from None
        try:
            return cls.from_str(text)
        except TokenizerError as exc:
            raise TokenizerError(f"tokenizer file {str(path)!r}: {exc}") from None

    def to_str(self) -> str:
        """The tokenizer as JSON text (the content of ``tokenizer.json``)."""
        return self._hf.to_str()

    def save(self, path: str | Path) -> Path:
        """Write ``tokenizer.json`` atomically to ``path`` (or into it, if it is a directory); return the file."""
        return atomic_write_text(_resolve(path), self.to_str())

    @property
    def vocab_size(self) -> int:
        """Number of token ids, special tokens included."""
        return self._hf.get_vocab_size(with_added_tokens=True)

    @property
    def pad_id(self) -> int:
        """Id of ``[PAD]`` (0)."""
        return PAD_ID

    @property
    def eos_id(self) -> int:
        """Id of ``[EOS]`` (1), appended after every document when packing."""
        return EOS_ID

    @property
    def mask_id(self) -> int:
        """Id of ``[MASK]`` (2), the absorbing state of masked diffusion."""
        return MASK_ID

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; no special tokens are added."""
        return self._hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """`encode` of each text, computed in parallel."""
        return [enc.ids for enc in self._hf.encode_batch(list(texts), add_special_tokens=False)]

    def encode_documents(self, docs: Sequence[str]) -> list[list[int]]:
        """`encode` of each document, fast for long documents.

        Each document is cut at newlines that cannot change its tokens, and the pieces are
        encoded in parallel; the result equals ``[encode(d) for d in docs]``.
        """
        pieces = [_chunks(doc) for doc in docs]
        encoded = iter(self.encode_batch([piece for doc_pieces in pieces for piece in doc_pieces]))
        return [[i for _ in doc_pieces for i in next(encoded)] for doc_pieces in pieces]

    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special_tokens: bool = True) -> str:
        """Text of a 1-D sequence of ids (a list or a tensor)."""
        if isinstance(ids, torch.Tensor):
            if ids.dim() != 1:
                raise ValueError(f"decode takes 1-D ids, got a tensor of shape {tuple(ids.shape)}: decode row by row")
            ids = ids.tolist()
        if skip_special_tokens:
            ids = [i for i in ids if i >= len(SPECIAL_TOKENS)]
        return self._hf.decode(list(ids))
