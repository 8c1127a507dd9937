"""How close to the generator's Bayes accuracy can a cross-validated model get, at a given cohort size?

    .venv/bin/python benchmarks/bench_bayes_gap.py [--n 36 72 144 288] [--repeats 200]

Issue 9 asks the best preset's CV balanced accuracy to lie within 5 points of ``truth/bayes.json``'s Bayes accuracy.
This script draws many cohorts from the demo's own generative model (``brainfuse.phantom.generator.plan``: latent disease
scores per subject, the configured missingness) and scores, with the workflow's 5-fold stratified CV, three
classifiers that see the *true latent scores* instead of images, i.e. a perfect imaging pipeline and perfect
feature extraction:

* ``bayes``: the Bayes rule itself, with the generator's true class means (no fitting at all): its spread is the
  sampling noise of a balanced accuracy on n subjects;
* ``lda``: class means fitted on each training fold (the Bayes rule's form, 3 x 6 parameters), missing scores
  ignored as the Bayes rule ignores them;
* ``logistic``: sklearn's logistic regression on the scores (missing scores imputed by the fold's median, the
  workflow's linear baseline given oracle features).

Printed per n: mean balanced accuracy and the share of cohorts within 5 points of the Bayes accuracy. A model of
images (thousands of voxels per modality, effects in a few regions) can only do worse than ``lda`` here.
"""
import argparse
import time

import numpy as np
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from brainfuse.phantom import bayes
from brainfuse.phantom import generator as demo


def cohort(cfg, seed):
    cfg = {**cfg, "seed": int(seed)}
    subjects = demo.plan(cfg)
    names, mu = demo.latent_class_means(cfg)
    s, observed = bayes.subject_arrays(subjects, names)
    y = np.array([cfg["classes"].index(p.diagnosis) for p in subjects])
    return s, observed, y, mu


def loglik_predict(s, observed, mu):
    return bayes.log_likelihood(s, observed, mu).argmax(1)


def cv_scores(s, observed, y, mu, k, seed):
    pred = {m: np.empty_like(y) for m in ("bayes", "lda", "logistic")}
    for train, test in StratifiedKFold(5, shuffle=True, random_state=seed).split(s, y):
        pred["bayes"][test] = loglik_predict(s[test], observed[test], mu)
        # class means from the training fold, each score over the subjects that have it
        mu_hat = np.array([[np.mean(s[train][(y[train] == c) & observed[train, j], j])
                            if ((y[train] == c) & observed[train, j]).any() else 0.0
                            for j in range(s.shape[1])] for c in range(k)])
        pred["lda"][test] = loglik_predict(s[test], observed[test], mu_hat)
        X = np.where(observed, s, np.nan)
        clf = make_pipeline(SimpleImputer(strategy="median"), StandardScaler(),
                            LogisticRegression(C=1.0, max_iter=5000, class_weight="balanced"))
        pred["logistic"][test] = clf.fit(X[train], y[train]).predict(X[test])
    return {m: float(balanced_accuracy_score(y, p)) for m, p in pred.items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, nargs="+", default=[36, 72, 144, 288])
    ap.add_argument("--repeats", type=int, default=200)
    args = ap.parse_args()
    base = demo.demo_config({})
    bayes = demo.bayes_accuracy(base)["bayes_accuracy"]
    print(f"default demo generator: Bayes accuracy {bayes:.3f} (chance {1 / len(base['classes']):.3f}); "
          f"'within 5 points' = balanced accuracy >= {bayes - 0.05:.3f}")
    k = len(base["classes"])
    s, observed, y, mu = cohort(base, base["seed"])
    same = cv_scores(s, observed, y, mu, k, 0)
    print(f"the default cohort itself (seed {base['seed']}, n = {base['n_subjects']}, cv.seed 0): "
          + "; ".join(f"{m} {v:.3f}" for m, v in same.items()))
    for n in args.n:
        t0 = time.perf_counter()
        res = {m: [] for m in ("bayes", "lda", "logistic")}
        for r in range(args.repeats):
            s, observed, y, mu = cohort({**base, "n_subjects": n}, 1000 + r)
            for m, v in cv_scores(s, observed, y, mu, k, r).items():
                res[m].append(v)
        parts = []
        for m, v in res.items():
            v = np.array(v)
            parts.append(f"{m} {v.mean():.3f} (sd {v.std():.3f}, within 5 points {np.mean(v >= bayes - 0.05):.0%})")
        print(f"n = {n:4d}: " + "; ".join(parts) + f"  [{time.perf_counter() - t0:.1f} s]")


if __name__ == "__main__":
    main()
