"""The phantom's Bayes rule on its latent disease scores: the generic rule (``brainfuse.reference``) bound to the
phantom's scores, their availability and the tensor modalities that encode them.

Used by the generator (its Bayes accuracy, the realised cohort's) and ``benchmarks/bench_bayes_gap.py``; the
mappings are also written into ``truth/bayes.json`` (``score_modalities``, ``score_needs``), from where ``evaluate``
reads them without importing the phantom.
"""
from __future__ import annotations

import numpy as np

from .. import reference
from ..reference import balanced_accuracy, log_likelihood

NEEDS = {"fa": "has_dwi", "connectivity": "has_bold"}   # scores observable only when that scan exists (subject field)
# The tensor modalities that encode each latent score (generator.LATENT_MEANS): the Bayes rule of a missing-modality
# condition sees only the scores of the modalities it keeps. fMRI's ALFF/ReHo maps do not follow the coupling score.
SCORE_MODALITIES = {"atrophy": ("aMRI",), "fa": ("DTI",), "connectivity": ("conn",), "motor": ("clinical",),
                    "rbd": ("clinical",), "serum": ("serum",)}
# The demo cohort's tensor modalities, in tensors.modalities order: the Bayes grid covers every subset of them.
GRID_MODALITIES = ("aMRI", "DTI", "fMRI", "conn", "clinical", "serum")


def subject_arrays(subjects, names) -> tuple[np.ndarray, np.ndarray]:
    """(scores, observed), (n, S) each, from records with ``scores`` (dict), ``has_dwi`` and ``has_bold``: the
    generator's SubjectPlan objects or the dicts of truth/bayes.json."""
    return reference.subject_arrays(subjects, names, NEEDS)


def seen_by(names, modalities) -> np.ndarray:
    """(S,) bool: which scores a model of ``modalities`` can see (their tensors encode them)."""
    return reference.seen_by(names, modalities, SCORE_MODALITIES)


def modality_grid(scores, observed, y, means, names, modalities=GRID_MODALITIES) -> dict:
    """Balanced accuracy of the Bayes rule restricted to each non-empty subset of ``modalities`` (the 2^M - 1
    grid, keys 'aMRI+DTI' in ``modalities`` order): what a model given only those inputs can reach."""
    from itertools import combinations

    out = {}
    for r in range(1, len(modalities) + 1):
        for combo in combinations(modalities, r):
            pred = log_likelihood(scores, np.asarray(observed, bool) & seen_by(names, combo), means).argmax(1)
            out["+".join(combo)] = round(balanced_accuracy(y, pred), 4)
    return out


def truth_mappings() -> dict:
    """What ``evaluate`` needs of the phantom to apply its Bayes rule to truth/bayes.json (JSON-ready)."""
    return {"score_modalities": {k: list(v) for k, v in SCORE_MODALITIES.items()}, "score_needs": dict(NEEDS)}
