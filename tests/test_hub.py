"""The Hugging Face Hub, up to the network boundary: the folder and model card `dimba push` would upload, and Hub
ids ``owner/name`` resolved offline from a populated Hugging Face cache."""

import json
import shutil

import pytest
import torch
from huggingface_hub import HfApi, constants

from dimba import DIMBA
from dimba.cli import main

REPO_ID = "someone/tiny-dimba"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def run(tmp_path_factory, corpus, tiny):
    out = tmp_path_factory.mktemp("hub") / "run"
    assert main(["train", "--data", str(corpus), "--max-steps", "10", "--out", str(out), "--quiet", *tiny,
                 "sample.num_steps=7", "sample.temperature=0.9"]) == 0
    return out


@pytest.fixture()
def offline_cache(tmp_path, monkeypatch):
    """An empty HF cache, offline (as HF_HUB_OFFLINE=1 and HF_HUB_CACHE=...)."""
    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)  # "someone/tiny-dimba" is not a local folder here
    return cache


def _populate(cache, repo_id: str, folder) -> None:
    """Lay ``folder`` out in the HF cache as the snapshot of ``repo_id`` at `COMMIT` on branch main (blobs linked
    from the snapshot, as huggingface_hub writes them)."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for i, path in enumerate(sorted(folder.iterdir())):
        blob = repo / "blobs" / f"{i:040x}"
        shutil.copyfile(path, blob)
        (snapshot / path.name).symlink_to(blob)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)


@pytest.fixture()
def uploads(monkeypatch):
    """What `HfApi` would have been asked to upload: its create_repo and upload_folder calls, the folder's files
    copied out before it goes away."""
    calls = {}

    def create_repo(self, repo_id, private=False, exist_ok=False, repo_type=None, **_):
        calls["create"] = {"repo_id": repo_id, "private": private, "repo_type": repo_type}
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, repo_id, folder_path, allow_patterns=None, **_):
        from pathlib import Path

        calls["files"] = {p.name: p.read_bytes() for p in Path(folder_path).iterdir()
                          if allow_patterns is None or p.name in allow_patterns}

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    return calls


def test_push_uploads_an_export_with_a_card_recording_the_run(run, uploads, capsys):
    args = ["--eval", "--mc-samples", "2", "--seed", "5", "--max-tokens", "64"]
    assert main(["push", str(run), "--repo-id", REPO_ID, "--private", *args]) == 0
    assert f"https://huggingface.co/{REPO_ID}" in capsys.readouterr().out
    assert uploads["create"] == {"repo_id": REPO_ID, "private": True, "repo_type": "model"}
    files = uploads["files"]
    assert set(files) == {"config.json", "model.safetensors", "tokenizer.json", "sample_config.json", "README.md"}
    assert json.loads(files["sample_config.json"])["num_steps"] == 7
    card = files["README.md"].decode()
    assert card.startswith("---\nlibrary_name: dimba\n")  # Hub metadata
    for needle in ("Family `continuous`", "trained for 10 optimizer steps", "T = 1000 steps", "num_steps=7",
                   "temperature=0.9", "bits/byte", "2 Monte Carlo samples per block, seed 5", "Tokenizer: byte-level "
                   "BPE with 300 tokens", "Training data: `", "blocks of 32 tokens"):
        assert needle in card, needle


def test_push_of_an_export_folder_uploads_it_as_it_is(run, tmp_path, uploads):
    assert main(["export", str(run), "--out", str(tmp_path / "exp")]) == 0
    assert main(["push", str(tmp_path / "exp"), "--repo-id", REPO_ID]) == 0
    assert uploads["files"] == {p.name: p.read_bytes() for p in (tmp_path / "exp").iterdir()}
    assert uploads["create"]["private"] is False


def test_push_without_network_is_one_line(run, tmp_path, offline_cache, capsys):
    assert main(["push", str(run), "--repo-id", REPO_ID]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"dimba: error: pushing to '{REPO_ID}' failed"), err


def test_hub_round_trip_through_the_cache(run, tmp_path, offline_cache, capsys):
    export = tmp_path / "exp"
    assert main(["export", str(run), "--out", str(export)]) == 0
    _populate(offline_cache, REPO_ID, export)
    local, hub = DIMBA.from_pretrained(export).eval(), DIMBA.from_pretrained(REPO_ID).eval()
    ids = torch.randint(3, 300, (2, 32), generator=torch.Generator().manual_seed(0))  # (2, 32)
    t = torch.full((2,), 500)
    outputs = []
    for model in (local, hub):
        torch.manual_seed(1)  # the same noise
        with torch.no_grad():
            outputs.append(model(ids, t)[0])  # (2, 32, d)
    assert torch.equal(*outputs)
    args = ["--prompt", "HAMLET:", "--length", "8", "--seed", "3"]
    capsys.readouterr()
    assert main(["generate", str(export), *args]) == 0
    from_export = capsys.readouterr().out
    assert main(["generate", REPO_ID, *args]) == 0  # its sampler defaults (num_steps=7) come along
    assert capsys.readouterr().out == from_export


def test_hub_eval_reads_the_cached_model(run, corpus, tmp_path, offline_cache, capsys):
    export = tmp_path / "exp"
    assert main(["export", str(run), "--out", str(export)]) == 0
    _populate(offline_cache, REPO_ID, export)
    args = ["--json", "--max-tokens", "32", "--mc-samples", "2", "--t0", "0.01", "--clamp", "none", "--data",
            str(corpus)]
    capsys.readouterr()
    assert main(["eval", str(export), *args]) == 0
    from_export = json.loads(capsys.readouterr().out)
    assert main(["eval", REPO_ID, *args]) == 0
    from_hub = json.loads(capsys.readouterr().out)
    assert from_hub["nll_nats_per_token"] == from_export["nll_nats_per_token"]


def test_a_hub_id_missing_from_the_cache_offline_is_one_line(offline_cache, capsys):
    assert main(["generate", "nobody/nothing"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "HF_HUB_OFFLINE=1" in err and "'nobody/nothing'" in err, err
