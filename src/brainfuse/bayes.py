"""The demo generator's Bayes rule on latent disease scores, vectorised, numpy only.

Shared by ``demo`` (the generator's Bayes accuracy, the realised cohort's), ``evaluate`` (the reference row, in
the train env, where demo's imaging imports are absent) and ``benchmarks/bench_bayes_gap.py``.
"""
from __future__ import annotations

import numpy as np

NEEDS = {"fa": "has_dwi", "connectivity": "has_bold"}   # scores observable only when that scan exists (subject field)
# The tensor modalities that encode each latent score (demo.LATENT_MEANS): the Bayes rule of a missing-modality
# condition sees only the scores of the modalities it keeps. fMRI's ALFF/ReHo maps do not follow the coupling score.
SCORE_MODALITIES = {"atrophy": ("aMRI",), "fa": ("DTI",), "connectivity": ("conn",), "motor": ("clinical",),
                    "rbd": ("clinical",), "serum": ("serum",)}
# The demo cohort's tensor modalities, in tensors.modalities order: the Bayes grid covers every subset of them.
GRID_MODALITIES = ("aMRI", "DTI", "fMRI", "conn", "clinical", "serum")


def log_likelihood(scores, observed, means) -> np.ndarray:
    """Class log-likelihoods (n, K) of unit-variance Gaussian scores (n, S) around class means (K, S), each
    subject's unobserved scores (``observed`` False) left out: what the Bayes rule compares (equal priors)."""
    s, obs, mu = np.asarray(scores, float), np.asarray(observed, bool), np.asarray(means, float)
    return -0.5 * (((s[:, None, :] - mu[None]) ** 2) * obs[:, None, :]).sum(-1)


def posterior(scores, observed, means) -> np.ndarray:
    """Class probabilities (n, K) under equal priors."""
    ll = log_likelihood(scores, observed, means)
    p = np.exp(ll - ll.max(1, keepdims=True))
    return p / p.sum(1, keepdims=True)


def subject_arrays(subjects, names) -> tuple[np.ndarray, np.ndarray]:
    """(scores, observed), (n, S) each, from records with ``scores`` (dict), ``has_dwi`` and ``has_bold``: the
    demo's SubjectPlan objects or the dicts of truth/bayes.json."""
    get = (lambda r, k: r[k]) if subjects and isinstance(subjects[0], dict) else getattr
    s = np.array([[get(r, "scores")[n] for n in names] for r in subjects], float).reshape(len(subjects), len(names))
    obs = np.array([[bool(get(r, NEEDS[n])) if n in NEEDS else True for n in names] for r in subjects],
                   bool).reshape(s.shape)
    return s, obs


def seen_by(names, modalities) -> np.ndarray:
    """(S,) bool: which scores a model of ``modalities`` can see (their tensors encode them)."""
    return np.array([bool(set(SCORE_MODALITIES.get(n, ())) & set(modalities)) for n in names])


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


def balanced_accuracy(y, pred) -> float:
    """sklearn's balanced_accuracy_score (mean recall over the classes in ``y``), in numpy: demo runs in the anat and
    demo envs, which have no scikit-learn, and Snakemake imports it at parse time."""
    y, pred = np.asarray(y), np.asarray(pred)
    return float(np.mean([(pred[y == c] == c).mean() for c in np.unique(y)]))
