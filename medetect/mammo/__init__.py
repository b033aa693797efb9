"""Mammography: a Faster R-CNN with lesion classes ``benign`` and ``malignant`` on mini-MIAS-layout folders.

``evaluate.py``: ``medetect evaluate --weights W --data FOLDER:SPLIT`` for such a detector (lesion FROC, image and
lesion ROC AUC with patient-bootstrap intervals, :mod:`medetect.evaluation.mammo`; sensitivity per lesion type and the
image confusion at thresholds picked on train); a detections cache (CSV) for experiments.
``preprocess.py``: mammogram preprocessing on image + boxes (DICOM VOI / MONOCHROME1 / 12-16 bit, Otsu breast mask,
chest wall to the left from laterality or the image, label removal, crop, CLAHE) and a preprocessed folder copy.
``patient.py``: the patient-level logistic regression (both breasts, tissue type) against the image-only score.
"""

CLASSES = ("benign", "malignant")

from .task import TASK  # noqa: E402  (after CLASSES, which the task module reads)

__all__ = ["CLASSES", "TASK"]
