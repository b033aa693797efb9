"""medetect: object detection for medical images, 2D and 3D, in pure PyTorch.

Box convention (the one idea the library rests on): every box is a tensor ``[..., 2d]`` laid out
``(lo_1..lo_d, hi_1..hi_d)`` in array-axis order (2D ``(y0, x0, y1, x1)``, 3D ``(z0, y0, x0, z1, y1, x1)``),
in voxel units, half-open (size = hi - lo). Voxel ``i`` covers ``[i, i + 1)``, so its centre is ``i + 0.5``.
"""

__version__ = "0.1.0"
