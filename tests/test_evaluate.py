"""Evaluation: metrics against hand-computed values, CIs, baselines, the missing-modality grid recovering
which modality carries the planted signal, ablations, leakage refusal, prediction of new subjects, and the
whole train/evaluate workflow on a tabular-only dataset."""
import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from brainfuse import evaluate as bf_eval
from brainfuse import predict as bf_predict
from brainfuse import splits as bf_splits
from brainfuse import train as bf_train
from brainfuse.tensors import make_cohort
from conftest import REPO
from test_train import settings, splits_for, synthetic_cohort

PRESETS = ["late", "neuromoe"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """late + neuromoe trained on every fold of the synthetic cohort, then evaluated."""
    root = tmp_path_factory.mktemp("eval")
    cohort = synthetic_cohort()
    s = settings()
    table = splits_for(cohort, s)
    for preset in PRESETS:
        for fold in range(s["cv"]["n_folds"]):
            bf_train.train_fold(cohort, table, fold, preset, s, root / "models" / preset / f"fold-{fold}",
                                log=lambda m: None)
    res = bf_eval.evaluate(cohort, table, root / "models", PRESETS, s, root / "reports",
                           bayes={"bayes_accuracy": 0.95}, log=lambda m: None)
    return root, cohort, table, s, res


def test_classification_metrics_match_hand_computed_values():
    y = np.array([0, 0, 0, 0, 1, 1])
    prob = np.array([[.9, .1], [.8, .2], [.7, .3], [.4, .6], [.3, .7], [.6, .4]])
    m = bf_eval.classification_metrics(y, prob)
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["balanced_accuracy"] == pytest.approx((3 / 4 + 1 / 2) / 2)
    # F1: class 0 precision 3/4 recall 3/4; class 1 precision 1/2 recall 1/2
    assert m["macro_f1"] == pytest.approx((0.75 + 0.5) / 2)
    # AUROC = P(score of a positive > score of a negative): pairs (0.7 | .1,.2,.3,.6) 4/4, (0.4 | ...) 3/4
    assert m["auroc"] == pytest.approx(7 / 8)
    r = bf_eval.regression_metrics(np.array([1.0, 2.0, 3.0]), np.array([1.0, 2.0, 5.0]))
    assert r["mae"] == pytest.approx(2 / 3) and r["rmse"] == pytest.approx(np.sqrt(4 / 3))
    assert r["r2"] == pytest.approx(1 - 4 / 2)


def test_bootstrap_ci_brackets_the_estimate_and_shrinks_with_n():
    rng = np.random.default_rng(0)

    def width(n):
        y = rng.integers(0, 2, n)
        p = np.clip(0.5 + 0.3 * (2 * y - 1) + rng.normal(0, 0.3, n), 0.01, 0.99)
        prob = np.stack([1 - p, p], 1)
        s = bf_eval.bootstrap("classification", y, prob, 150, seed=1)
        v, lo, hi = s["balanced_accuracy"]
        assert lo <= v <= hi
        return hi - lo

    assert width(400) < width(40) / 2
    perfect = bf_eval.bootstrap("classification", np.array([0, 1] * 10), np.tile([[1., 0.], [0., 1.]], (10, 1)), 100)
    assert perfect["accuracy"] == (1.0, 1.0, 1.0)


@pytest.mark.slow
def test_results_table_covers_every_analysis(trained):
    root, cohort, table, s, res = trained
    assert list(res.columns) == bf_eval.RESULT_COLUMNS
    on_disk = pd.read_csv(root / "reports" / "results.tsv", sep="\t")
    assert len(on_disk) == len(res)
    bacc = res[res.metric == "balanced_accuracy"].set_index(["analysis", "model", "condition"])["value"]
    for preset in PRESETS:
        assert bacc["cv", preset, "all"] > 0.6                          # planted signal, chance 0.33
    assert bacc["baseline", "linear (all modalities)", "all"] > 0.6
    assert bacc["baseline", "linear (mri only)", "all"] > 0.8
    assert bacc["baseline", "linear (noise only)", "all"] < 0.5
    assert bacc["canary", "linear, permuted labels", "all"] < 0.5
    cv = res[res.analysis == "cv"]
    assert set(cv.metric) == {"accuracy", "balanced_accuracy", "macro_f1", "auroc"}
    assert (cv.ci_low <= cv.value).all() and (cv.value <= cv.ci_high).all()
    # grid: all 7 non-empty subsets of 3 modalities, for each preset
    grid = res[(res.analysis == "grid") & (res.metric == "balanced_accuracy")]
    assert set(grid.groupby("model").condition.nunique()) == {7}
    g = grid[grid.model == "late"].set_index("condition")["value"]
    assert g["noise"] < 0.5 and min(g["clinical"], g["mri+clinical"]) > g["noise"] + 0.2
    assert grid.set_index(["model", "condition"]).loc[("late", "mri"), "n"] == cohort.present[:, 0].sum()
    # ablations: MoE presets only, full / uniform / each expert dropped (neuromoe: one expert per modality)
    abl = res[(res.analysis == "ablation") & (res.metric == "balanced_accuracy")]
    assert set(abl.model) == {"neuromoe"}
    assert set(abl.condition) == {"full", "uniform gating", "drop mri", "drop clinical", "drop noise"}
    full = abl.set_index("condition").loc["full", "value"]
    assert full == pytest.approx(bacc["cv", "neuromoe", "all"])        # same models, same rows
    summary = json.loads((root / "reports" / "summary.json").read_text())
    assert summary["best_preset"] in PRESETS and summary["metric"] == "balanced_accuracy"
    figures = {p.name for p in (root / "reports" / "figures").glob("*.png")}
    assert {"cv_performance.png", "confusion_matrices.png", "missing_modality_grid.png", "ablations.png",
            "utilisation_neuromoe.png", "training_curves.png"} <= figures


def test_utilisation_weights_are_per_expert_distributions(trained):
    root, *_ = trained
    p = pd.read_csv(root / "reports" / "predictions.tsv", sep="\t")
    w = p[p.preset == "neuromoe"].filter(like="weight_conditioned_")
    assert list(w.columns) == ["weight_conditioned_mri", "weight_conditioned_clinical", "weight_conditioned_noise"]
    np.testing.assert_allclose(w.sum(1), 1, atol=1e-5)


def test_evaluation_refuses_leaky_splits_and_foreign_predictions(trained, tmp_path):
    root, cohort, table, s, _ = trained
    bad = table.copy()
    i = bad.index[(bad.fold == 1) & (bad.set == "test")][0]
    bad.loc[i, "set"] = "train"
    with pytest.raises(bf_splits.LeakageError):
        bf_eval.evaluate(cohort, bad, root / "models", PRESETS, s, tmp_path, log=lambda m: None)
    # splits redrawn with another seed: the trained models' test rows no longer match
    other = bf_splits.make_splits(table[table.fold == 0].participant_id, cohort.target, n_folds=3, seed=99,
                                  sessions=table[table.fold == 0].session)
    with pytest.raises(bf_splits.LeakageError, match="retrain"):
        bf_eval.evaluate(cohort, other, root / "models", PRESETS, s, tmp_path, log=lambda m: None)
    assert not (tmp_path / "results.tsv").exists()


def test_predict_new_subjects_with_missing_modalities(trained, tmp_path):
    root, cohort, *_ = trained
    rng = np.random.default_rng(5)
    n = 4
    mri = rng.normal(size=(n, 2, 8, 8, 8)).astype(np.float16)
    clinical = rng.normal(size=(n, 5)).astype(np.float32)
    noise = rng.normal(size=(n, 3)).astype(np.float32)
    present = {"mri": np.array([1, 0, 1, 0], bool), "clinical": np.array([1, 1, 0, 0], bool),
               "noise": np.array([1, 1, 1, 0], bool)}
    new = make_cohort({"mri": mri, "clinical": clinical, "noise": noise}, [-1] * n, present=present,
                      classes=["control", "PD", "iRBD"], participant_ids=["sub-n1", "sub-n2", "sub-n3", "sub-n4"])
    out = bf_predict.predict(new, bf_predict.checkpoints(root / "models", "neuromoe"), log=lambda m: None)
    assert list(out.participant_id) == ["sub-n1", "sub-n2", "sub-n3", "sub-n4"]
    probs = out[["prob_control", "prob_PD", "prob_iRBD"]]
    np.testing.assert_allclose(probs.iloc[:3].sum(1), 1, atol=1e-5)
    assert out.predicted.iloc[:3].isin(["control", "PD", "iRBD"]).all()
    assert out.iloc[3][["predicted", "prob_PD"]].isna().all()          # no modality at all: no prediction
    assert (out.n_models.iloc[:3] == 3).all()
    np.testing.assert_allclose(out.filter(like="weight_").iloc[:3].sum(1), 1, atol=1e-5)
    # the CLI, on a cohort whose shapes differ from the model's, fails with a message naming the modality
    bad = make_cohort({"mri": np.ones((2, 2, 6, 8, 8), np.float16), "clinical": clinical[:2], "noise": noise[:2]}, [0, 1])
    with pytest.raises(ValueError, match="'mri'"):
        bf_predict.predict(bad, bf_predict.checkpoints(root / "models", "neuromoe"), log=lambda m: None)


@pytest.mark.slow
def test_tabular_only_workflow_trains_evaluates_predicts_and_reports(tmp_path):
    """Tabular-only mode (README): the demo's participant table alone (clinical + serum, no images) as
    participants_tsv with modalities: [], through the Snakemake rules; no image is generated or processed."""
    from brainfuse.phantom import generator as bf_demo

    demo_cfg = bf_demo.demo_config({"n_subjects": 36})
    bf_demo.clinical_table(demo_cfg, bf_demo.plan(demo_cfg)).to_csv(tmp_path / "clinical.tsv", sep="\t", index=False)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(json.dumps({
        "participants_tsv": str(tmp_path / "clinical.tsv"), "modalities": [],
        "tensors": {"levels": {"sex": ["F", "M"]}},     # image modalities are dropped in this mode
        "model": {"presets": ["late", "neuromoe"], "epochs": 15, "patience": 5},
        "cv": {"n_folds": 2, "bootstrap": 20}}))
    out = tmp_path / "out"
    def snakemake(*args):
        return subprocess.run([sys.executable, "-m", "snakemake", *args, "--cores", "2", "--configfile",
                               "config/config.yaml", str(cfg), "--config", f"output_dir={out}"],
                              cwd=REPO, capture_output=True, text=True)

    proc = snakemake("evaluate", "predict")
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = pd.read_csv(out / "reports" / "results.tsv", sep="\t")
    bacc = res[(res.metric == "balanced_accuracy") & (res.analysis == "cv")].set_index("model")["value"]
    assert (bacc > 0.45).all()                       # clinical scores carry the diagnosis; chance 0.33
    pred = pd.read_csv(out / "predictions" / "predictions.tsv", sep="\t")
    assert len(pred) == 36 and pred.predicted.notna().all()
    # the HTML report embeds the result figures and the table
    report = tmp_path / "report.html"
    proc = snakemake("evaluate", "--report", str(report))
    assert proc.returncode == 0, proc.stderr[-3000:]
    html = report.read_text()
    for name in ("cv_performance.png", "missing_modality_grid.png", "results.tsv"):
        assert name in html
    # rerunning changes nothing; no image stage ran
    dry = snakemake("-n", "evaluate", "predict")
    assert "Nothing to be done" in dry.stdout + dry.stderr
    assert not (out / "demo").exists() and not (out / "derivatives").exists()


@pytest.mark.parametrize("k", [2, 3, 4])
def test_classification_metrics_equal_sklearn(k):
    """The numpy metrics the bootstrap uses agree with sklearn's, ties and absent classes included."""
    import warnings

    from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, roc_auc_score

    rng = np.random.default_rng(k)
    for trial in range(40):
        n = int(rng.integers(8, 60))
        y = rng.integers(0, k, n)
        prob = rng.random((n, k))
        if trial % 3 == 0:
            prob = np.round(prob, 1) + 1e-3          # many ties
        if trial % 5 == 0:
            y[y == k - 1] = 0                       # a class absent from the truth
        got = bf_eval.classification_metrics(y, prob)
        pred = prob.argmax(1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert got["accuracy"] == pytest.approx(accuracy_score(y, pred))
            assert got["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred))
            assert got["macro_f1"] == pytest.approx(f1_score(y, pred, average="macro", labels=np.arange(k),
                                                             zero_division=0))
        if len(np.unique(y)) < k:
            assert np.isnan(got["auroc"])
        else:
            p = prob / prob.sum(1, keepdims=True)
            ref = roc_auc_score(y, p[:, 1]) if k == 2 else roc_auc_score(y, p, multi_class="ovr", average="macro")
            assert got["auroc"] == pytest.approx(ref)


def test_linear_baseline_keeps_a_narrow_informative_modality_beside_a_wide_noise_one():
    """A 4-column table that carries the label next to 3,000 columns of noise (the demo's clinical table beside
    its connectivity edges): block weighting keeps the all-modality baseline near the table alone; without it
    the noise block would dominate the penalised fit (0.36 vs 0.81 on the demo)."""
    rng = np.random.default_rng(0)
    n = 90
    y = np.arange(n) % 3
    clinical = rng.normal(size=(n, 4)) + np.eye(3)[y] @ np.array([[1.6, 0, 0, 0], [0, 1.6, 0, 0], [0, 0, 1.6, 0]])
    cohort = make_cohort({"clinical": clinical, "noise": rng.normal(size=(n, 3000))}, y, classes=["a", "b", "c"])
    s = settings()
    table = splits_for(cohort, s)
    folds = range(s["cv"]["n_folds"])
    acc = {}
    for mods in (["clinical"], ["clinical", "noise"], ["noise"]):
        idx, prob = bf_eval.run_baseline(cohort, y, table, folds, mods, "classification", 3)
        acc["+".join(mods)] = bf_eval.classification_metrics(y[idx], prob)["balanced_accuracy"]
    assert acc["clinical"] > 0.7 and acc["noise"] < 0.5
    assert acc["clinical+noise"] > acc["clinical"] - 0.1, acc
    # the weighting itself: each block's columns scaled by 1/sqrt(width) when several modalities are joined
    rows = np.arange(n)
    X1 = bf_eval.baseline_features(cohort, rows, ["noise"], rows)
    X2 = bf_eval.baseline_features(cohort, rows, ["clinical", "noise"], rows)
    np.testing.assert_allclose(X2[:, 5:5 + 3000], X1[:, :3000] / np.sqrt(3000))
