"""Region proposals without a learned network: selective search (Uijlings et al. 2013, through OpenCV's
``cv2.ximgproc.segmentation``) and sliding-window / uniform baselines. Boxes come back in the medetect convention
``(y0, x0, y1, x1)`` in pixels of the image given, ranked (best first; the baselines have no ranking)."""

from .selective_search import SS_MODES, selective_search
from .windows import sliding_windows, uniform_boxes

__all__ = ["SS_MODES", "selective_search", "sliding_windows", "uniform_boxes"]
