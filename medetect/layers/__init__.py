"""Detection layers: RoIAlign / RoIPool (any number of spatial dims)."""

from .roi_align import RoIAlign, RoIPool, roi_align, roi_pool

__all__ = ["roi_align", "roi_pool", "RoIAlign", "RoIPool"]
