"""The Bayes rule of a Gaussian latent-score model, vectorised, numpy only: the reference (ceiling) a model is
judged against when the data's generative model is known.

Generic: scores, class means, which scores each subject has observed and which tensor modalities encode which
score come from the caller. ``phantom.bayes`` binds them to the phantom's (its generator's Bayes accuracy, the
realised cohort's), ``evaluate`` to what ``truth/bayes.json`` records (the reference row, in the train env, without
importing the phantom), ``benchmarks/bench_bayes_gap.py`` to the phantom's.
"""
from __future__ import annotations

import numpy as np


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


def subject_arrays(subjects, names, needs) -> tuple[np.ndarray, np.ndarray]:
    """(scores, observed), (n, S) each, from records with ``scores`` (dict) and the availability fields that
    ``needs`` names (score -> subject field, e.g. 'fa' -> 'has_dwi': the score is observed only where that field
    is true; scores not in ``needs`` always are): the phantom's SubjectPlan objects or the dicts of
    truth/bayes.json."""
    get = (lambda r, k: r[k]) if subjects and isinstance(subjects[0], dict) else getattr
    s = np.array([[get(r, "scores")[n] for n in names] for r in subjects], float).reshape(len(subjects), len(names))
    obs = np.array([[bool(get(r, needs[n])) if n in needs else True for n in names] for r in subjects],
                   bool).reshape(s.shape)
    return s, obs


def seen_by(names, modalities, score_modalities) -> np.ndarray:
    """(S,) bool: which scores a model of ``modalities`` can see (their tensors encode them), from
    ``score_modalities`` (score -> the tensor modalities that encode it)."""
    return np.array([bool(set(score_modalities.get(n, ())) & set(modalities)) for n in names])


def balanced_accuracy(y, pred) -> float:
    """sklearn's balanced_accuracy_score (mean recall over the classes in ``y``), in numpy: the phantom runs in the
    demo env, which has no scikit-learn, and Snakemake imports the generator at parse time."""
    y, pred = np.asarray(y), np.asarray(pred)
    return float(np.mean([(pred[y == c] == c).mean() for c in np.unique(y)]))
