"""Training, checkpoints and inference."""

from .checkpoint import latest_checkpoint, load_checkpoint, load_weights, save_checkpoint, save_weights
from .predictor import Predictor, tile_origins
from .trainer import TrainConfig, Trainer, TrainingDiverged, TrainingOutOfMemory, detection_collate, seed_everything

__all__ = [
    "Trainer", "TrainConfig", "TrainingDiverged", "TrainingOutOfMemory", "detection_collate", "seed_everything",
    "Predictor", "tile_origins",
    "save_checkpoint", "load_checkpoint", "latest_checkpoint", "save_weights", "load_weights",
]
