"""3D organ localisation (Xu et al., IEEE TMI 2019): multi-organ torso phantoms, organ boxes from label maps, a 3D
Faster R-CNN with a focal-loss RPN on a downsampled whole CT that keeps one box per organ, and per-organ metrics
(:mod:`medetect.evaluation.organs`). See docs/tasks.md and docs/results.md."""

from .anatomy import ORGANS, organ_of


from .task import TASK  # noqa: E402

__all__ = ["ORGANS", "TASK", "organ_of"]
