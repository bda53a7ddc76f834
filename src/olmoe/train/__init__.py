"""Training OLMoE-style models: the objective, the recipe, checkpoints, data parallelism.

`olmoe train CONFIG` (olmoe.cli.train) runs `train(load_config(CONFIG))`; see
olmoe.train.trainer for the loop and olmoe.train.config for every setting.
"""

from olmoe.train.config import TrainConfig, load_config
from olmoe.train.losses import megablocks_lb_loss, router_z_loss
from olmoe.train.schedule import learning_rate
from olmoe.train.trainer import Trainer, TrainResult, train

__all__ = [
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "learning_rate",
    "load_config",
    "megablocks_lb_loss",
    "router_z_loss",
    "train",
]
