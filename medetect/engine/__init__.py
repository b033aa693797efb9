"""Training, run folders, checkpoints and inference."""

from .checkpoint import (
    CheckpointWarning, checkpoint_problem, latest_checkpoint, load_checkpoint, save_checkpoint, save_weights,
)
from .predictor import Predictor, tile_origins
from .runs import config_diff, prepare_run_dir
from .trainer import (
    TrainConfig, Trainer, TrainingDiverged, TrainingOutOfMemory, detection_collate, json_safe, seed_everything, truncate_metrics,
)

__all__ = [
    "Trainer", "TrainConfig", "TrainingDiverged", "TrainingOutOfMemory", "detection_collate", "seed_everything",
    "json_safe", "truncate_metrics",
    "prepare_run_dir", "config_diff",
    "Predictor", "tile_origins",
    "save_checkpoint", "load_checkpoint", "latest_checkpoint", "checkpoint_problem", "CheckpointWarning",
    "save_weights",
]
