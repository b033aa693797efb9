"""Annotation files <-> :class:`ImageAnnotation` records in the medetect box convention.

One module per format: :mod:`.voc`, :mod:`.coco`, :mod:`.csv_boxes`, :mod:`.luna` (LUNA16 world points and
submissions), :mod:`.mias`, :mod:`.masks` (instance masks, DSB2018), :mod:`.lung_pet_ct`, :mod:`.luna_patches`, :mod:`.datalist` (MONAI detection datalists);
shared types and helpers in :mod:`._common`. Every name is re-exported here.

Every reader here turns one file format into ``ImageAnnotation`` records whose ``boxes`` are ``[N, 2d]`` float64,
``(lo_1..lo_d, hi_1..hi_d)`` in ARRAY-AXIS order (2D ``(y0, x0, y1, x1)``, 3D ``(z0, y0, x0, z1, y1, x1)``), voxel units,
half-open (voxel ``i`` covers ``[i, i + 1)``). Conversions between conventions are delegated to :mod:`medetect.convert`.

Shape key: ``N`` boxes of one image, ``d`` spatial dimensions, ``M`` images.

Rules shared by all readers (each one is a decision; the format-specific ones are in each reader's docstring):

* **Errors name their place.** Bad input raises :class:`AnnotationError` (a ``ValueError``) whose message starts with
  the annotation file and the place in it: ``"line 7"`` (1-based physical line of a CSV/text file, the header is line 1),
  ``"<object> #3"`` (1-based ordinal of a VOC ``<object>`` element) or ``"annotations[12]"`` (0-based JSON index,
  as JSON tools print it). Missing columns, malformed or non-finite numbers, ``max < min``, unknown labels (when a
  class list is given), unknown ids, boxes outside a known image size (unless ``clip=True``), annotation paths that
  escape the dataset root, and annotations naming a missing image are all errors.
* **Zero-size boxes are skipped, never silently.** A box with ``hi == lo`` on some axis (after clipping) is dropped,
  counted in :attr:`AnnotationReport.skipped_zero_size`, listed in :attr:`AnnotationReport.events` as
  ``(file, where, reason)`` and logged at WARNING by the ``medetect.data.annotations`` logger. Each reader that builds
  ``ImageAnnotation`` records returns its report as the LAST element of its result.
* **Clipping is opt-in** (``clip=True``; MIAS is the one exception, see :func:`read_mias`): a box reaching outside
  ``[0, size]`` on an axis whose size is known is clipped, counted in :attr:`AnnotationReport.clipped` and logged.
  Without ``clip`` it is an error.
* **Annotation paths stay inside the root.** A path read from an annotation (VOC ``<filename>``, COCO ``file_name``,
  a CSV ``image`` cell, DSB2018 ``file``) must be relative and must not climb out of the dataset root after
  normalisation (``../../etc/passwd``, ``/etc/passwd``, ``C:\\x`` and ``a/../../x`` are rejected). The check is
  lexical (like a zip-slip check); symbolic links inside the root are the dataset owner's business. Paths are stored
  POSIX-style, normalised, relative to the root. When a ``root`` is given and ``check_images=True`` (the default),
  the image file must exist.
* **Per-box metadata** lives in ``meta`` as ``np.ndarray`` whose first axis has length ``N`` (e.g.
  ``meta['difficult']``); :meth:`ImageAnnotation.select` subsets exactly those entries. Image-level metadata uses
  scalars, strings, tuples, lists or other objects (e.g. a :class:`~medetect.convert.Geometry`).
* Writers print numbers losslessly: integral values as integers, others with Python's shortest round-trip ``repr``,
  so that ``read(write(x)) == x`` exactly.
"""

from __future__ import annotations

from ._common import (  # noqa: F401
    AnnotationError,
    AnnotationReport,
    ImageAnnotation,
    PathLike,
    _Rows,
    _axis_names,
    _build,
    _check_labels,
    _finish_boxes,
    _fmt,
    _image_path,
    _int,
    _num,
    _open_csv,
    _safe_relpath,
    _write_csv,
    _xml_text,
    logger,
)
from .voc import _read_id_list, read_voc, read_voc_folder, write_voc  # noqa: F401
from .coco import (  # noqa: F401
    _categories_map,
    _category_ids,
    _image_ids,
    _json_bbox,
    _json_num,
    _load_json,
    read_coco,
    read_coco_results,
    write_coco,
    write_coco_results,
)
from .luna import (  # noqa: F401
    LUNA_SUBMISSION_COLUMNS,
    POINT_KINDS,
    _LUNA_XYZ,
    WorldPoints,
    WorldPointsError,
    annotations_to_luna,
    csv_header,
    hits,
    read_table,
    read_world_points,
    write_world_points,
    luna_csv_to_annotations,
    read_luna_csv,
    read_luna_submission,
    write_luna_csv,
    write_luna_submission,
)
from .mias import MIAS_CLASSES, _MIAS_SEVERITY, _MIAS_TISSUE, read_mias  # noqa: F401
from .csv_boxes import _CSV_STYLES, _detect_csv_style, read_csv_boxes, write_csv_boxes  # noqa: F401
from .masks import boxes_from_instance_mask, boxes_from_masks, read_dsb2018  # noqa: F401
from .lung_pet_ct import _geometry_from_dicom, read_lung_pet_ct_boxes  # noqa: F401
from .luna_patches import read_luna16_patches  # noqa: F401
from .datalist import BOX_MODES, WORLD_BORDER_TOLERANCE, datalist_splits, image_header, read_datalist, write_datalist  # noqa: F401

__all__ = [
    "AnnotationError",
    "AnnotationReport",
    "ImageAnnotation",
    "read_voc",
    "read_voc_folder",
    "write_voc",
    "read_coco",
    "write_coco",
    "write_coco_results",
    "read_coco_results",
    "WorldPoints",
    "WorldPointsError",
    "POINT_KINDS",
    "hits",
    "read_world_points",
    "write_world_points",
    "read_luna_csv",
    "luna_csv_to_annotations",
    "annotations_to_luna",
    "write_luna_csv",
    "write_luna_submission",
    "read_luna_submission",
    "LUNA_SUBMISSION_COLUMNS",
    "MIAS_CLASSES",
    "read_mias",
    "read_csv_boxes",
    "write_csv_boxes",
    "boxes_from_instance_mask",
    "boxes_from_masks",
    "read_dsb2018",
    "read_lung_pet_ct_boxes",
    "read_luna16_patches",
    "BOX_MODES",
    "WORLD_BORDER_TOLERANCE",
    "image_header",
    "read_datalist",
    "write_datalist",
    "datalist_splits",
]

from .lidc import LidcGeometry, LidcMark, LidcNodule, LidcReport, LidcRoi, cluster_lidc_marks, read_lidc_xml  # noqa: E402

__all__ += ["LidcGeometry", "LidcMark", "LidcNodule", "LidcReport", "LidcRoi", "cluster_lidc_marks", "read_lidc_xml"]
