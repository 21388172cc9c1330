"""LoRA through ``peft``: low-rank adapters injected into the backbone's linear maps (every other weight frozen),
saved in the run's checkpoints like any weight, and merged into plain linear maps when the run is loaded for
inference or exported."""

from __future__ import annotations

import torch

from dimba.errors import UsageError


def _peft():
    try:
        import peft
    except ImportError:
        raise UsageError("finetune.lora_rank needs the peft package: pip install 'dimba[finetune]'") from None
    return peft


def add_lora(model, rank: int, alpha: float) -> list[str]:
    """Inject LoRA adapters of ``rank`` (scaling ``alpha / rank``) into every ``nn.Linear`` of ``model.backbone``
    (the conditioning MLPs included) and freeze every other parameter; returns the adapted module names."""
    peft = _peft()
    targets = [f"backbone.{name}" for name, module in model.backbone.named_modules()
               if isinstance(module, torch.nn.Linear)]
    if not targets:
        raise UsageError("finetune.lora_rank: the backbone has no linear maps to adapt: set finetune.lora_rank=0")
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0, bias="none")
    peft.inject_adapter_in_model(config, model)
    for name, param in model.named_parameters():
        param.requires_grad = "lora_" in name
    return targets


def merge_lora(model) -> int:
    """Fold every LoRA adapter of ``model`` into its linear map and put the plain ``nn.Linear`` back (the model's
    state dict then has the keys of a model without adapters); returns how many were merged."""
    from peft.tuners.lora import LoraLayer

    wrapped = [(name, module) for name, module in model.named_modules() if isinstance(module, LoraLayer)]
    for name, module in wrapped:
        module.merge()
        parent_name, _, child = name.rpartition(".")
        base = module.get_base_layer()
        base.weight.requires_grad = True
        setattr(model.get_submodule(parent_name) if parent_name else model, child, base)
    for param in model.parameters():
        param.requires_grad = True
    return len(wrapped)
