"""Models on the Hugging Face Hub: ``owner/name`` resolved to its snapshot in the HF cache, and export folders pushed.

`resolve` is what `DIMBA.from_pretrained`, `dimba generate`, `dimba eval` and the lm-evaluation-harness model call on
their model argument: a local folder is used as it is; an ``owner/name`` that is not one is fetched into the HF cache
(``HF_HUB_CACHE``) with `huggingface_hub.snapshot_download`, or, with ``HF_HUB_OFFLINE=1``, found there without any
network access. `push` uploads an export folder with `huggingface_hub.HfApi`. This module imports no model code.
"""

from __future__ import annotations

import re
from pathlib import Path

from dimba.errors import CheckpointError, UsageError, first_line
from dimba.export import CONFIG_NAME, SAMPLE_NAME, TOKENIZER_NAME, WEIGHTS_NAME

CARD_NAME = "README.md"
HUB_FILES = (CONFIG_NAME, WEIGHTS_NAME, TOKENIZER_NAME, SAMPLE_NAME, CARD_NAME)  # what an export folder holds
_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}")


def is_hub_id(name: str | Path) -> bool:
    """Whether ``name`` reads as a Hub model id ``owner/name`` and is not a local path."""
    return bool(_REPO_ID.fullmatch(str(name))) and not Path(name).exists()


def _hub_errors() -> tuple[type[Exception], ...]:
    """What `huggingface_hub` raises for a failed request: its HTTP errors, network errors (OSError or the HTTP
    library's error), offline mode and an invalid repo id."""
    from huggingface_hub import errors

    return tuple({OSError, errors.HFValidationError, getattr(errors, "HTTPError", OSError)})


def resolve(name: str | Path) -> Path:
    """The local folder of model ``name``: ``name`` itself when it is a local path (or not a Hub id), else the
    snapshot of Hub model ``owner/name`` in the HF cache (downloaded there first unless ``HF_HUB_OFFLINE=1``).
    A model that cannot be found either way is a one-line `CheckpointError`."""
    if not is_hub_id(name):
        return Path(name)
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(repo_id=str(name), allow_patterns=list(HUB_FILES)))
    except LocalEntryNotFoundError:
        how = ("HF_HUB_OFFLINE=1: nothing is downloaded" if constants.HF_HUB_OFFLINE else
               "and the Hub could not be reached")
        raise CheckpointError(f"{str(name)!r} is neither a local folder nor a Hub model in the Hugging Face cache "
                              f"{constants.HF_HUB_CACHE!r} ({how}): download it once with network access, or pass a "
                              "run directory or an export folder") from None
    except (RepositoryNotFoundError, GatedRepoError):
        raise CheckpointError(f"{str(name)!r} is neither a local folder nor a model on the Hugging Face Hub that you "
                              "can read: check the name (a private model needs `hf auth login` or HF_TOKEN)") from None
    except _hub_errors() as exc:
        raise CheckpointError(f"cannot fetch Hub model {str(name)!r} ({first_line(exc, 200)}): check the network, or "
                              "pass a local run directory or export folder") from None


def push(folder: Path, repo_id: str, private: bool = False, message: str = "Upload a dimba model") -> str:
    """Upload the files of export folder ``folder`` (`HUB_FILES`) to the Hub model repository ``repo_id``, created
    (``private`` if asked) when it does not exist; returns the repository's URL."""
    if not _REPO_ID.fullmatch(repo_id):
        raise UsageError(f"--repo-id {repo_id!r} is not a Hub model id: write OWNER/NAME (letters, digits, '-', '_', '.')")
    from huggingface_hub import HfApi
    from huggingface_hub.errors import LocalTokenNotFoundError

    api = HfApi()
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model", commit_message=message,
                          allow_patterns=list(HUB_FILES))
    except LocalTokenNotFoundError:
        raise UsageError(f"pushing to {repo_id!r} needs a Hugging Face token: run `hf auth login` or set HF_TOKEN")
    except _hub_errors() as exc:
        raise UsageError(f"pushing to {repo_id!r} failed ({first_line(exc, 200)}): check the network (HF_HUB_OFFLINE "
                         "unset), your token (`hf auth login` or HF_TOKEN) and write access to the repository") from None
    return str(url)
