"""Training: `setup` (config -> `TrainState`), `train_step` (one optimizer step), `fit` (the loop), checkpoints
(single-file and FSDP-sharded), the metrics log and the FSDP strategy."""

from dimba.training.loop import DivergenceError, finetune, fit
from dimba.training.setup import TrainState, setup
from dimba.training.step import train_step

__all__ = ["DivergenceError", "TrainState", "finetune", "fit", "setup", "train_step"]
