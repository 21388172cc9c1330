"""The training optimizer: AdamW, or Muon on the hidden weight matrices with AdamW on everything else.

``train.optimizer=muon`` gives the weight of every ``nn.Linear`` in the network but the output head (the
mixers' projections, the conditioning MLPs, the latent projections) to `torch.optim.Muon` (momentum orthogonalised
by Newton-Schulz, its update scaled to AdamW's RMS: Moonshot's ``match_rms_adamw``) at the peak learning rate
``train.muon_lr`` (None: ``train.lr``), and the embeddings, the head, norms, biases, convolutions and SSM
parameters to AdamW, as Muon's authors prescribe. Both follow the same warmup + cosine schedule. `MuonAdamW`
presents the two as one optimizer, so that Fabric, the schedule, clipping and checkpoints see one
``param_groups`` list and one ``state``.
"""

from __future__ import annotations

import torch
from torch import nn

from dimba.config import TrainConfig


class MuonAdamW(torch.optim.Optimizer):
    """AdamW over ``adamw_groups`` and Muon over ``muon_groups`` (2-D parameters only), stepped together.

    The param groups are those of the two inner optimizers (Muon's first), each flagged ``muon``; the state is
    one mapping that both read and write, so `state_dict` / `load_state_dict` are the standard ones.
    """

    def __init__(self, adamw_groups: list[dict], muon_groups: list[dict], lr: float, betas: tuple[float, float]):
        self._adamw = torch.optim.AdamW([{**g, "muon": False} for g in adamw_groups], lr=lr, betas=betas)
        self._muon = torch.optim.Muon([{**g, "muon": True} for g in muon_groups], lr=lr,
                                      adjust_lr_fn="match_rms_adamw")
        super().__init__(self._muon.param_groups + self._adamw.param_groups, {"lr": lr})
        self._link()

    def _link(self) -> None:
        """Point the inner optimizers at this optimizer's groups and state (after construction or loading)."""
        self._adamw.param_groups = [g for g in self.param_groups if not g["muon"]]
        self._muon.param_groups = [g for g in self.param_groups if g["muon"]]
        self._adamw.state = self._muon.state = self.state

    @torch.no_grad()
    def step(self, closure=None):
        """One AdamW step and one Muon step on the current gradients (no closure: one evaluation is all we use)."""
        if closure is not None:
            raise ValueError("MuonAdamW.step takes no closure")
        self._adamw.step()
        self._muon.step()

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._link()


def muon_names(model: nn.Module, exempt: set[str]) -> set[str]:
    """Names of the parameters Muon trains: the weights of the ``nn.Linear`` modules but the output head (tied to
    the embedding, or not), less ``exempt`` (embeddings, vectors and those flagged ``_no_weight_decay``)."""
    linear = {f"{name}.weight" for name, module in model.named_modules()
              if isinstance(module, nn.Linear) and name.split(".")[-1] != "head"}
    return {name for name, _ in model.named_parameters() if name in linear} - exempt


def build_optimizer(tc: TrainConfig, model: nn.Module, exempt: set[str], muon: set[str]) -> torch.optim.Optimizer:
    """The optimizer of ``tc.optimizer`` over ``model``'s parameters: no weight decay on ``exempt``; with muon,
    Muon on the names in ``muon`` (see `muon_names`; read before FSDP replaces the modules' parameters)."""
    named = list(model.named_parameters())  # the shards under FSDP: the optimizer comes after the sharding
    hidden = muon if tc.optimizer == "muon" else set()
    groups = [{"params": [p for n, p in named if n not in exempt and n not in hidden], "weight_decay": tc.weight_decay},
              {"params": [p for n, p in named if n in exempt], "weight_decay": 0.0}]
    if tc.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=tc.lr, betas=(tc.beta1, tc.beta2))
    matrices = {"params": [p for n, p in named if n in hidden], "weight_decay": tc.weight_decay,
                "lr": tc.muon_lr or tc.lr}
    return MuonAdamW(groups, [matrices], tc.lr, (tc.beta1, tc.beta2))


def peak_lrs(tc: TrainConfig, optimizer: torch.optim.Optimizer) -> list[float]:
    """The peak learning rate of each of ``optimizer``'s groups under ``tc``: ``train.muon_lr`` (or ``train.lr``)
    for Muon's, ``train.lr`` for the others."""
    return [(tc.muon_lr or tc.lr) if g.get("muon") else tc.lr for g in optimizer.param_groups]
