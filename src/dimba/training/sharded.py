"""Sharded training checkpoints of ``train.strategy=fsdp`` runs, written and read with torch.distributed.checkpoint.

A save is collective: each rank writes only its shards of the model, EMA and AdamW state into one directory
(``checkpoints/step-N.dcp/``: DCP's ``.metadata`` plus one ``__R_0.distcp`` file per rank), rank 0 adds the small
per-run state (``run.pt``: scheduler, step, every rank's RNG states, elapsed time, bad-step counts, stream
position). The directory is written under a hidden temporary name and renamed; then ``checkpoints/last.json``,
the pointer to the latest checkpoint, is replaced atomically; only then are superseded non-periodic checkpoints
(``last-N-*.dcp/``, an older single-file ``last.ckpt``) removed. A crash at any moment leaves a pointer to a
complete checkpoint (at worst a hidden temporary, which `dimba.training.files.remove_partial_saves` deletes). Every
rank writes into the same directory: on several machines, the run folder must be on a filesystem they share.

A resume loads each rank's shards straight into the sharded model, EMA and optimizer (DCP reshards when the
number of processes changed). `load_ema_weights` reads the EMA alone into an unsharded model in one process,
for `dimba generate / export / eval`.

DCP's ``.metadata`` is a pickle, which torch reads with an unrestricted ``pickle.load``; here `_SafeReader`
reads it with an unpickler that admits DCP's metadata classes, torch.Size, dtypes and paths only; `_SafePlanner`
reads non-tensor entries (optimizer hyper-parameters) with ``torch.load(weights_only=True)``, as DCP already
reads the tensors: loading a checkpoint never runs code from it.
"""

from __future__ import annotations

import dataclasses
import enum
import importlib
import io
import json
import os
import pickle
import secrets
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)

from dimba.errors import CheckpointError, first_line
from dimba.io import atomic_save, atomic_write_text
from dimba.training.files import LAST_CKPT, LAST_POINTER as POINTER

RUN_STATE = "run.pt"  # the per-run state beside the shards, read with torch.load(weights_only=True)
_SAFE_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem",
                 "torch.distributed.checkpoint.planner")
_SAFE_GLOBALS = (("torch.serialization", "_get_layout"), ("collections", "OrderedDict"), ("pathlib", "PosixPath"),
                 ("pathlib", "WindowsPath"))  # a layout by name; containers; the checkpoint's path


class _MetadataUnpickler(pickle.Unpickler):
    """Admits only what DCP's metadata holds: its dataclasses and enums, torch.Size, dtypes, layouts, paths."""

    def find_class(self, module: str, name: str) -> Any:
        known = module in _SAFE_MODULES or module == "torch"
        obj = getattr(importlib.import_module(module), name, None) if known else None
        if module in _SAFE_MODULES and isinstance(obj, type) and (dataclasses.is_dataclass(obj)
                                                                   or issubclass(obj, enum.Enum)):
            return obj
        if module == "torch" and (obj is torch.Size
                                  or isinstance(obj, (torch.dtype, torch.layout, torch.memory_format))):
            return obj
        if (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in checkpoint metadata")


class _SafeReader(FileSystemReader):
    """DCP's file reader, with the metadata read by `_MetadataUnpickler`."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        metadata = read_metadata(Path(self.path))
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _SafePlanner(DefaultLoadPlanner):
    """DCP's load planner, reading non-tensor entries with ``torch.load(weights_only=True)``."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        value = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], value)
        else:
            self.state_dict[read_item.dest_index.fqn] = value


def read_metadata(path: Path) -> Metadata:
    """DCP's metadata of checkpoint ``path``, unpickled safely; a `CheckpointError` if it is missing or damaged."""
    try:
        with open(path / ".metadata", "rb") as f:
            metadata = _MetadataUnpickler(f).load()
        if not isinstance(metadata, Metadata):
            raise pickle.UnpicklingError("not DCP metadata")
    except Exception as exc:  # noqa: BLE001 - any unreadable metadata is the same user-facing problem
        raise CheckpointError(f"sharded checkpoint {str(path)!r} is damaged (its .metadata: {first_line(exc, 120)}): "
                              "resume from another checkpoint") from None
    if getattr(metadata, "storage_meta", None) is None:
        metadata.storage_meta = StorageMeta()
    return metadata


def stored_shapes(path: Path, prefix: str) -> dict[str, tuple[int, ...]]:
    """Name -> shape of the tensors of sharded checkpoint ``path`` stored under ``prefix`` (``"model."``,
    ``"ema.module."``), prefix removed."""
    return {key.removeprefix(prefix): tuple(md.size) for key, md in read_metadata(path).state_dict_metadata.items()
            if key.startswith(prefix) and isinstance(md, TensorStorageMetadata)}


def read_run_state(path: Path) -> dict[str, Any]:
    """The per-run state of sharded checkpoint ``path`` after checking that every shard file is complete
    (present and as long as the metadata says): a truncated or partly deleted checkpoint is refused here,
    before any rank loads from it."""
    metadata = read_metadata(path)
    for info in (metadata.storage_data or {}).values():
        shard = path / info.relative_path
        if not shard.is_file() or shard.stat().st_size < info.offset + info.length:
            raise CheckpointError(f"sharded checkpoint {str(path)!r} is damaged ({info.relative_path} is missing or "
                                  "truncated): resume from another checkpoint")
    try:
        state = torch.load(path / RUN_STATE, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"sharded checkpoint {str(path)!r} is damaged (its {RUN_STATE}: {type(exc).__name__}): "
                              "resume from another checkpoint") from None
    missing = [key for key in ("scheduler", "step", "rng") if not isinstance(state, dict) or key not in state]
    if missing:
        raise CheckpointError(f"sharded checkpoint {str(path)!r} is damaged (its {RUN_STATE} has no {missing[0]!r} "
                              "entry): resume from another checkpoint")
    return {**state, "sharded": path}


def latest(folder: Path) -> Path | None:
    """The checkpoint directory ``folder``/last.json points to; None without a pointer."""
    pointer = folder / POINTER
    if not pointer.is_file():
        return None
    try:
        name = json.loads(pointer.read_text()).get("checkpoint")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        name = None
    if not (isinstance(name, str) and "/" not in name and name.endswith(".dcp")):
        raise CheckpointError(f"{str(pointer)!r} is damaged: point it at a checkpoint, e.g. "
                              '{"checkpoint": "step-0000100.dcp"}')
    if not (folder / name).is_dir():
        raise CheckpointError(f"{str(pointer)!r} names {name}, which is not in {str(folder)!r}: point it at a "
                              "checkpoint directory that is there")
    return folder / name


def _states(model, ema, optimizer) -> dict[str, dict[str, Any]]:
    """This rank's shards (DTensors) of the model, EMA and optimizer state, by parameter name."""
    return {"model": get_model_state_dict(model), "ema": get_model_state_dict(ema),
            "optimizer": get_optimizer_state_dict(model, optimizer)}


def save(fabric, folder: Path, periodic: bool, step: int, model, ema, optimizer, run_state: dict[str, Any],
         name: str | None = None) -> None:
    """Collective: write a sharded checkpoint of ``model``, ``ema`` (an AveragedModel of it) and ``optimizer``
    with ``run_state`` (rank 0's), as step-N.dcp when ``periodic``, otherwise as a non-periodic last-N-*.dcp,
    then point last.json at it and remove what it supersedes (see the module docstring). With ``name`` (e.g.
    best.dcp) it replaces that directory instead and leaves the pointer and the other checkpoints alone."""
    pointed = name is None
    if pointed:
        name = f"step-{step:07d}.dcp" if periodic else f"last-{step:07d}-{secrets.token_hex(4)}.dcp"
    name = fabric.broadcast(name)  # rank 0's, for every rank
    tmp = folder / f".{name}.{fabric.broadcast(secrets.token_hex(4))}"
    dcp.save(_states(model, ema, optimizer), storage_writer=FileSystemWriter(str(tmp)))  # ends when every rank wrote
    if fabric.is_global_zero:
        atomic_save(run_state, tmp / RUN_STATE)
        target = folder / name
        if target.exists():  # step-N.dcp of a save a crash cut off before its pointer moved, or the old best.dcp
            shutil.rmtree(target)
        os.replace(tmp, target)
        if pointed:
            _point_at(folder, name, step, fabric.world_size)
    fabric.barrier()


def _point_at(folder: Path, name: str, step: int, world_size: int) -> None:
    """Point last.json at checkpoint directory ``name`` and remove the checkpoints it supersedes."""
    atomic_write_text(folder / POINTER, json.dumps({"checkpoint": name, "step": step,
                                                    "world_size": world_size}) + "\n")
    for old in folder.glob("last-*.dcp"):
        if old.name != name:
            shutil.rmtree(old)
    (folder / LAST_CKPT).unlink(missing_ok=True)  # an unsharded checkpoint of the same run, now superseded


def load(path: Path, model, ema, optimizer) -> None:
    """Collective: load sharded checkpoint ``path`` into the sharded ``model``, ``ema`` and ``optimizer``; each
    rank reads the parts of the files that hold its shards."""
    states = _states(model, ema, optimizer)  # the optimizer's state initialised (zero moments) to be overwritten
    try:
        dcp.load(states, storage_reader=_SafeReader(path), planner=_SafePlanner())
    except Exception as exc:  # noqa: BLE001 - DCP raises the errors of every rank on every rank
        raise CheckpointError(f"sharded checkpoint {str(path)!r} could not be loaded ({first_line(exc, 200)}): "
                              "resume from another checkpoint") from None
    set_model_state_dict(model, states["model"])
    set_model_state_dict(ema, states["ema"])
    set_optimizer_state_dict(model, optimizer, states["optimizer"])


def load_ema_weights(path: Path, model) -> None:
    """Load the EMA weights of sharded checkpoint ``path`` into the unsharded ``model``, in place, in this process
    alone (whole tensors assembled from every rank's shards; the model and optimizer states are not read)."""
    read_run_state(path)  # every shard file complete
    weights = {f"module.{name}": value for name, value in model.state_dict().items()}  # the model's own storage
    try:
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
            dcp.load({"ema": weights}, storage_reader=_SafeReader(path), planner=_SafePlanner(), no_dist=True)
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"sharded checkpoint {str(path)!r} could not be read ({first_line(exc, 200)}): "
                              "use another checkpoint of the run") from None
