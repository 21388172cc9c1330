"""``train.strategy=fsdp``: fully sharded data parallel training with PyTorch FSDP2 (``fully_shard``) through
Lightning Fabric's ``ModelParallelStrategy``, on GPUs (NCCL) and on CPU processes (gloo).

Each backbone block is one FSDP unit and the root holds the rest (embeddings, tied head, conditioning): every
rank stores 1/world of each weight, gradient and AdamW moment, and of each EMA weight too, since the EMA is a copy
of the model sharded the same way. The EMA update is elementwise, so averaging the local shards gives exactly the
EMA of a DDP run. Checkpoints are sharded: each rank writes and reads only its shards (`dimba.training.sharded`). A run
that switches to FSDP on resume reads the single-file checkpoint of its earlier sessions: the weights load before
sharding, and `shard_optimizer_state` cuts the whole optimizer state into this rank's shards.

Lightning's ``FSDPStrategy`` (FSDP1) is not used: Fabric refuses it off CUDA, and torch's FSDP1 needs an
accelerator device.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning_fabric.strategies import ModelParallelStrategy
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor, distribute_tensor

FORWARD_METHODS = ("token_logits", "decode")  # what the losses call on the model besides forward
PRECISIONS = ("32-true", "bf16-mixed")  # of train.precision, those ModelParallelStrategy runs (no gradient scaler)


def strategy(world_size: int) -> ModelParallelStrategy:
    """Fabric's FSDP2 strategy with one data-parallel mesh dimension over all ``world_size`` processes."""
    return ModelParallelStrategy(parallelize_fn=shard_model, data_parallel_size=world_size, tensor_parallel_size=1)


def shard_model(model: torch.nn.Module, mesh: DeviceMesh, reshard_root: bool | None = None) -> torch.nn.Module:
    """Shard a DIMBA in place: each backbone block, then the root, whose `FORWARD_METHODS` gather its weights
    like ``forward`` does. ``reshard_root=True`` frees the root's gathered weights after every forward too: for
    the EMA, which only runs forward passes and must hold its shards again before each update."""
    dp_mesh = mesh["data_parallel"]
    for block in model.backbone.blocks:
        fully_shard(block, mesh=dp_mesh)
    fully_shard(model, mesh=dp_mesh, reshard_after_forward=reshard_root)
    for name in FORWARD_METHODS:
        register_fsdp_forward_method(model, name)
    return model


def shard_optimizer_state(state: dict[str, Any], optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """An AdamW state dict with whole tensors (from any run) cut into this rank's shards of ``optimizer``'s
    sharded parameters, ready for ``optimizer.load_state_dict``; unchanged for unsharded parameters."""
    params = [p for group in optimizer.param_groups for p in group["params"]]  # the order of state_dict() ids
    per_param = {}
    for index, entry in state["state"].items():
        p = params[index]
        if isinstance(p, DTensor):  # the moments have the parameter's shape; "step" is a scalar count
            entry = {key: value if key == "step" else
                     distribute_tensor(value.to(p.device), p.device_mesh, p.placements, src_data_rank=None)
                     for key, value in entry.items()}
        per_param[index] = entry
    return {**state, "state": per_param}
