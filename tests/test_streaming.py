"""Streaming corpora through HF datasets: packing as in memory, per-rank batches without duplication,
exact resume from a saved stream position (also across epochs), and a bitwise-identical resumed fit()."""

import itertools
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

pytest.importorskip("datasets")

from dimba.training.checkpoint import load_training_state  # noqa: E402
from dimba.config import load_config  # noqa: E402
from dimba.data.packing import tokenize_and_pack
from dimba.errors import DataError  # noqa: E402
from dimba.data.streaming import StreamedData, document_stream, stream_blocks  # noqa: E402
from dimba.data.tokenizer import Tokenizer  # noqa: E402
from dimba.training import fit  # noqa: E402

DOCS = [f"{['ROMEO', 'JULIET', 'NURSE'][i % 3]}:\nO gentle night, thou art the {['moon', 'sun', 'star'][i % 3]} "
        f"of my heart number {i % 7}.\n" * (1 + i % 4) for i in range(120)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("stream") / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    return path


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.train(DOCS, vocab_size=300)


def test_blocks_are_packed_as_in_memory(corpus, tokenizer):
    streamed = torch.stack([b for b, _ in stream_blocks(document_stream(str(corpus)), tokenizer, 16, [0, 0, 0])])
    assert torch.equal(streamed, tokenize_and_pack(DOCS, tokenizer, 16))  # (N, 16)


def test_folder_of_txt_jsonl_and_parquet_is_read_in_path_order(tmp_path, tokenizer):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "a.txt").write_text(DOCS[0])
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": DOCS[1]}) + "\n" + json.dumps({"text": DOCS[2]}) + "\n")
    pq.write_table(pa.table({"text": DOCS[3:5]}), tmp_path / "c.parquet")
    (tmp_path / "d.txt").write_text(DOCS[5])
    assert list(document_stream(str(tmp_path))()) == DOCS[:6]


def test_validation_is_the_head_of_the_stream_and_training_starts_after_it(corpus, tokenizer):
    data = StreamedData(str(corpus), 16, 5, tokenizer, 300, 1.0)
    everything = [b for b, _ in stream_blocks(data.open_docs, tokenizer, 16, [0, 0, 0])]
    assert torch.equal(data.val, torch.stack(everything[:5]))
    assert torch.equal(data.train_head(3), torch.stack(everything[5:8]))


def test_ranks_split_each_global_batch_without_duplication(corpus, tokenizer):
    data = StreamedData(str(corpus), 16, 2, tokenizer, 300, 1.0)
    single = list(itertools.islice(data.batches(6), 10))  # runs past one epoch
    ranks = [list(itertools.islice(data.batches(3, rank=r, world_size=2), 10)) for r in (0, 1)]
    for whole, a, b in zip(single, *ranks):
        assert torch.equal(whole, torch.cat([a, b]))


def test_resume_from_any_position_continues_the_uninterrupted_stream(corpus, tokenizer):
    data = StreamedData(str(corpus), 16, 2, tokenizer, 300, 1.0)
    n_epoch = sum(1 for _ in stream_blocks(data.open_docs, tokenizer, 16, data.train_start))
    batches = data.batches(4)
    full, positions = [], []
    for _ in range(3 * n_epoch // 4):  # three epochs
        full.append(next(batches))
        positions.append(list(batches.position))
    assert positions[-1][0] == 2  # the epoch counter moved on
    assert any(p[2] for p in positions)  # some positions are inside a document
    for k in range(0, len(full) - 1, 7):
        resumed = list(itertools.islice(data.batches(4, position=positions[k]), len(full) - k - 1))
        assert all(torch.equal(a, b) for a, b in zip(full[k + 1:], resumed)), k


def test_unusable_streamed_corpora_are_refused_in_one_line(tmp_path, corpus, tokenizer):
    with pytest.raises(DataError, match="not found"):
        StreamedData(str(tmp_path / "missing.jsonl"), 16, 2, tokenizer, 300, 1.0)
    with pytest.raises(DataError, match="validation blocks"):
        StreamedData(str(corpus), 16, 10_000, tokenizer, 300, 1.0)
    (tmp_path / "bad.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(DataError, match='"text" field'):
        StreamedData(str(tmp_path / "bad.jsonl"), 16, 2, tokenizer, 300, 1.0)


@pytest.fixture(scope="module")
def streamed(tiny) -> tuple[str, ...]:
    """Overrides of a tiny streamed ar run of 10 steps."""
    return (*tiny, "model.family=ar", "data.streaming=true", "data.val_blocks=4", "train.grad_accum=2",
            "train.eval_every=5", "train.eval_batches=1", "train.save_every=5", "train.log_every=1",
            "train.max_time=null", "train.max_steps=10")


def test_fit_on_a_stream_resumed_halfway_is_bitwise_identical(tmp_path, streamed):
    corpus, full, resumed = tmp_path / "small.jsonl", tmp_path / "full", tmp_path / "resumed"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS[:40]))  # about 40 blocks: 10 steps use 80
    fit(load_config("tiny", None, [f"data.corpus={corpus}", *streamed]), full, progress=False)
    halfway = load_training_state(full / "checkpoints" / "step-0000005.ckpt")
    assert halfway["step"] == 5 and halfway["data_position"][1:] != [0, 0]
    shutil.copytree(full, resumed)  # then roll the copy back to step 5, as if it had stopped there
    shutil.copy(resumed / "checkpoints" / "step-0000005.ckpt", resumed / "checkpoints" / "last.ckpt")
    (resumed / "checkpoints" / "step-0000010.ckpt").unlink()
    fit(load_config("tiny", None, [f"data.corpus={corpus}", *streamed]), resumed, resume=True, progress=False)

    a, b = (load_training_state(run / "checkpoints" / "last.ckpt") for run in (full, resumed))
    assert a["step"] == b["step"] == 10 and a["data_position"] == b["data_position"]
    assert a["data_position"][0] >= 1  # the stream went round more than once
    for key in ("model", "ema"):
        assert a[key].keys() == b[key].keys()
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key


def test_cli_streams_offline(corpus, tmp_path, streamed):
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    args = [sys.executable, "-m", "dimba", "train", "--quiet", "--data", str(corpus), "--out", str(tmp_path / "run"),
            *streamed, "train.max_steps=2"]
    done = subprocess.run(args, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert load_training_state(tmp_path / "run" / "checkpoints" / "last.ckpt")["data_position"][0] == 0


def test_a_corpus_file_that_changes_or_vanishes_while_streaming_is_named(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    first, second = folder / "a.txt", folder / "b.jsonl"
    first.write_text("\n\n".join(DOCS[:10]))
    second.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS[10:20]))
    open_docs = document_stream(str(folder))
    assert len(list(open_docs())) == 11  # unchanged files stream (a .txt file is one document)
    docs = open_docs()
    next(docs)  # reading a.txt
    with open(second, "a") as fh:  # b.jsonl grows before its turn
        fh.write(json.dumps({"text": "more"}) + "\n")
    with pytest.raises(DataError, match=f"'{second}' changed during training"):
        list(docs)
    docs = open_docs()
    next(docs)
    first.write_text("\n\n".join(DOCS[:11]))  # the file just read is rewritten
    with pytest.raises(DataError, match=f"'{first}' changed during training"):
        list(docs)
    first.unlink()
    with pytest.raises(DataError, match=f"'{first}' vanished during training: put it back"):
        list(open_docs())
