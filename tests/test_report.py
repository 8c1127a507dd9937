"""The report's figures (evaluate): written, byte-identical on rerun, and drawing the numbers of results.tsv -
ROC AUROCs, the missing-modality summary (one cell per model x key subset, the demo's Bayes rule beside the
presets), calibration, and group-mean connectivity rebuilt from the conn edges; plus the report's captions."""
import numpy as np
import pandas as pd
import pytest

from brainfuse import evaluate as bf_eval
from brainfuse import train as bf_train
from brainfuse.tensors import make_cohort
from conftest import REPO
from test_train import settings, splits_for, synthetic_cohort

FIGURES = ["cv_performance.png", "confusion_matrices.png", "missing_modality_grid.png",
           "missing_modality_summary.png", "roc_curves.png", "calibration.png", "connectivity.png",
           "training_curves.png"]
PARCELS = ["L001", "L002", "L003", "R001", "R002", "R003"]


def cohort_with_conn():
    """The synthetic cohort (mri, clinical, noise) plus a 6-parcel conn modality whose L001-R001 edge is 1.5
    higher in PD, and a Bayes truth whose latent 'motor'/'rbd' scores are the planted clinical columns."""
    base = synthetic_cohort()
    rng = np.random.default_rng(3)
    n = len(base.target)
    y = np.asarray(base.target)
    edges = [f"{a}__{b}" for i, a in enumerate(PARCELS) for b in PARCELS[i + 1:]]
    conn = rng.normal(0, 0.2, size=(n, len(edges))).astype(np.float32)
    conn[:, edges.index("L001__R001")] += 1.5 * (y == 1)
    arrays = {name: np.asarray(base.arrays[name]) for name in ("mri", "clinical", "noise")}
    present = {name: base.present[:, i] for i, name in enumerate(("mri", "clinical", "noise"))}
    cohort = make_cohort({**arrays, "conn": conn}, y, classes=list(base.classes),
                         present={**present, "conn": np.ones(n, bool)},
                         feature_names={"conn": edges}, participant_ids=[f"sub-{i:03d}" for i in range(n)])
    clinical = np.nan_to_num(arrays["clinical"])
    bayes = {"bayes_accuracy": 0.9, "config": {"classes": list(base.classes)},
             "latent_means": {"motor": [0.0, 2.0, 0.0], "rbd": [0.0, 0.0, 2.0]},
             "score_modalities": {"motor": ["clinical"], "rbd": ["clinical"]}, "score_needs": {},
             "subjects": [{"label": f"{i:03d}", "has_dwi": True, "has_bold": True,
                           "scores": {"motor": float(clinical[i, 0]), "rbd": float(clinical[i, 1])}}
                          for i in range(n)]}
    return cohort, bayes


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    cohort, bayes = cohort_with_conn()
    s = settings(bootstrap=20)
    table = splits_for(cohort, s)
    for fold in range(s["cv"]["n_folds"]):
        bf_train.train_fold(cohort, table, fold, "late", s, root / "models" / "late" / f"fold-{fold}",
                            log=lambda m: None)
    res = bf_eval.evaluate(cohort, table, root / "models", ["late"], s, root / "a", bayes=bayes, log=lambda m: None)
    bf_eval.evaluate(cohort, table, root / "models", ["late"], s, root / "b", bayes=bayes, log=lambda m: None)
    return root, cohort, res


@pytest.mark.slow
def test_every_figure_is_written_and_byte_identical_on_rerun(report):
    root, *_ = report
    for name in FIGURES:
        a, b = (root / d / "figures" / name for d in ("a", "b"))
        assert a.stat().st_size > 5000, name
        assert a.read_bytes() == b.read_bytes(), f"{name} differs between two identical runs"


def test_roc_figure_shows_the_auroc_of_results_tsv(report, tmp_path):
    """Macro AUROC in each ROC panel = results.tsv's auroc (the preset, and a baseline rebuilt the same way)."""
    root, cohort, res = report
    auroc = res[res.metric == "auroc"].set_index(["analysis", "model", "condition"])["value"]
    p = pd.read_csv(root / "a" / "predictions.tsv", sep="\t")
    classes = list(cohort.classes)
    curves = {"late": (p.target.to_numpy(int), p[[f"prob_{c}" for c in classes]].to_numpy(float))}
    s = settings(bootstrap=20)
    y = np.asarray(cohort.target)
    idx, sc = bf_eval.run_baseline(cohort, y, splits_for(cohort, s), range(3), ["mri"], "classification", 3,
                                   only_present=True)
    curves["linear (mri only)"] = (y[idx], sc)
    shown = bf_eval.plot_roc(curves, classes, tmp_path / "roc.png")
    assert shown["late"] == pytest.approx(auroc["cv", "late", "all"], abs=1e-12)
    assert shown["linear (mri only)"] == pytest.approx(auroc["baseline", "linear (mri only)", "all"], abs=1e-12)
    assert (tmp_path / "roc.png").read_bytes() == (root / "a" / "figures" / "roc_curves.png").read_bytes()


def test_missing_modality_summary_has_one_cell_per_model_and_key_subset(report):
    """Rows: the preset and the Bayes rule; columns: each modality alone, all but each, all - the values of the
    grid; the left panel's means are the means over the subsets of each size; the Bayes rule sees only what
    the kept modalities encode (here: the clinical scores)."""
    root, cohort, res = report
    names = ["mri", "clinical", "noise", "conn"]
    by_size, table = bf_eval.missing_modality_summary(res, "balanced_accuracy", names)
    assert list(table.index) == ["late", bf_eval.BAYES_MODEL]
    assert list(table.columns) == [f"{n} only" for n in names] + [f"all but {n}" for n in names] + ["all"]
    assert table.notna().all().all()
    grid = res[(res.analysis == "grid") & (res.metric == "balanced_accuracy")].set_index("condition")["value"]
    assert len(grid) == 2 ** len(names) - 1
    assert table.loc["late", "clinical only"] == grid["clinical"]
    assert table.loc["late", "all but noise"] == grid["mri+clinical+conn"]
    assert table.loc["late", "all"] == grid["mri+clinical+noise+conn"]
    late = by_size[by_size.model == "late"].set_index("size")
    assert late.loc[2, "mean"] == pytest.approx(grid[grid.index.str.count(r"\+") == 1].mean())
    assert list(late.index) == [1, 2, 3, 4]
    bayes = table.loc[bf_eval.BAYES_MODEL]
    assert bayes["clinical only"] > 0.6 and bayes["all"] == bayes["clinical only"]
    assert bayes["all but clinical"] == pytest.approx(1 / 3)        # nothing observed: chance


def test_reliability_bins_and_expected_calibration_error():
    y = np.array([0, 0, 1, 1])
    prob = np.array([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.2, 0.8]])   # confidences .6 .7 .8 .9, right 4/4
    mc, acc, cnt, ece = bf_eval.reliability(y, prob, n_bins=2)
    np.testing.assert_allclose(mc, [0.65, 0.85])
    np.testing.assert_allclose(acc, [1.0, 1.0])
    assert list(cnt) == [2, 2] and ece == pytest.approx((0.35 + 0.15) / 2)


def test_connectivity_matrices_rebuild_the_atlas_order_and_show_the_planted_edge(report):
    root, cohort, _ = report
    y = np.asarray(cohort.target)
    parcels, mats = bf_eval.connectivity_matrices(cohort, y, np.ones(len(y), bool), list(cohort.classes))
    assert parcels == PARCELS
    assert list(mats) == [f"{c} (n=30)" for c in cohort.classes]
    for m in mats.values():
        np.testing.assert_array_equal(m, m.T)
        assert (np.diag(m) == 0).all()
    diff = mats["PD (n=30)"] - mats["control (n=30)"]
    i, j = PARCELS.index("L001"), PARCELS.index("R001")
    assert diff[i, j] == pytest.approx(1.5, abs=0.2)
    assert np.abs(np.delete(diff.ravel(), [i * 6 + j, j * 6 + i])).max() < 0.3


def test_every_report_figure_has_its_own_caption():
    """workflow/report/figures.rst, rendered as `snakemake --report` does (Jinja, the figure's {name}), gives each
    figure evaluate draws its own caption, never the generic fallback."""
    from types import SimpleNamespace

    import jinja2

    template = jinja2.Template((REPO / "workflow" / "report" / "figures.rst").read_text())
    for fig in FIGURES + ["ablations.png", "utilisation_neuromoe.png"]:
        stem = fig.removesuffix(".png")
        text = template.render(snakemake=SimpleNamespace(wildcards=SimpleNamespace(name=stem))).strip()
        assert len(text) > 80 and f"Figure {stem}" not in text, stem
    assert 'report: "workflow/report/workflow.rst"' in (REPO / "Snakefile").read_text()
