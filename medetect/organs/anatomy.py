"""The organ catalogue: which organs the localiser knows, their TotalSegmentator names and label ids, and how a
folder's labels map onto them.

Organs are named as TotalSegmentator names them (``boxes.csv`` of ``organ-ct-sample``). Three organs of the
localiser are unions of several labels, as in the issue:

* ``lung_left`` = ``lung_upper_lobe_left`` + ``lung_lower_lobe_left``;
* ``lung_right`` = ``lung_upper_lobe_right`` + ``lung_middle_lobe_right`` + ``lung_lower_lobe_right``;
* ``vertebral_column`` = every ``vertebrae_*`` label (C1..S1), plus ``thoracic_spine`` (the dcmqi case's name).

:func:`organ_of` maps a label name to its organ (or None), :data:`ORGANS` is the localiser's class order.
"""

from __future__ import annotations

__all__ = ["ORGANS", "TOTALSEG_IDS", "organ_of", "VERTEBRAE"]

#: the localiser's classes, in label order 0..K-1
ORGANS: tuple[str, ...] = (
    "liver", "spleen", "kidney_left", "kidney_right", "stomach", "aorta", "heart", "lung_left", "lung_right",
    "urinary_bladder", "vertebral_column",
)

#: vertebrae top to bottom with their TotalSegmentator ("total" v2) ids
VERTEBRAE: tuple[tuple[str, int], ...] = (
    ("vertebrae_C5", 46), ("vertebrae_C6", 45), ("vertebrae_C7", 44),
    *((f"vertebrae_T{i}", 44 - i) for i in range(1, 13)),
    *((f"vertebrae_L{i}", 32 - i) for i in range(1, 6)),
    ("vertebrae_S1", 26),
)

#: TotalSegmentator "total" (v2) ids of the labels the phantoms write
TOTALSEG_IDS: dict[str, int] = {
    "spleen": 1, "kidney_right": 2, "kidney_left": 3, "liver": 5, "stomach": 6,
    "lung_upper_lobe_left": 10, "lung_lower_lobe_left": 11, "lung_upper_lobe_right": 12,
    "lung_middle_lobe_right": 13, "lung_lower_lobe_right": 14, "urinary_bladder": 21, "sacrum": 25,
    "heart": 51, "aorta": 52, **dict(VERTEBRAE),
}

_UNIONS = {
    "lung_upper_lobe_left": "lung_left", "lung_lower_lobe_left": "lung_left",
    "lung_upper_lobe_right": "lung_right", "lung_middle_lobe_right": "lung_right",
    "lung_lower_lobe_right": "lung_right", "thoracic_spine": "vertebral_column",
}


def organ_of(label_name: str) -> str | None:
    """The localiser organ a label name belongs to (``"lung_lower_lobe_left"`` -> ``"lung_left"``), or None."""
    if label_name in ORGANS:
        return label_name
    if label_name in _UNIONS:
        return _UNIONS[label_name]
    if label_name.startswith("vertebrae_"):
        return "vertebral_column"
    return None
