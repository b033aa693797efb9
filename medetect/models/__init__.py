"""Detectors (Faster R-CNN and RetinaNet for any d), the 3D false-positive-reduction classifier, model files."""

from .detector import ARCHITECTURES, BACKBONES, Detector, DetectorConfig, build_detector
from .io import Preprocess, load_model, save_model

__all__ = ["Detector", "DetectorConfig", "build_detector", "ARCHITECTURES", "BACKBONES", "load_model", "save_model", "Preprocess"]
