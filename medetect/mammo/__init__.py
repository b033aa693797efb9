"""Mammography (issue 8): a Faster R-CNN with lesion classes ``benign`` and ``malignant`` on mini-MIAS-layout folders.

``evaluate.py``: ``medetect evaluate --weights W --data FOLDER:SPLIT`` for such a detector (lesion FROC, image and
lesion ROC AUC with patient-bootstrap intervals, :mod:`medetect.evaluation.mammo`).
"""

CLASSES = ("benign", "malignant")
