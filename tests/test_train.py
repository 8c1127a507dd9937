"""Training per fold x preset: planted signal learnt, permuted labels at chance, fold-only preprocessing,
same seed -> same model, kill + resume -> same model, checkpoints that load with weights_only=True."""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import balanced_accuracy_score

from brainfuse import config as bf_config
from brainfuse import models as bf_models
from brainfuse import splits as bf_splits
from brainfuse import train as bf_train
from brainfuse.tensors import make_cohort
from conftest import REPO

# inner_folds 1: early stopping on the splits' validation set (3x faster); the inner-fold default has its own test
FAST = {"model": {"epochs": 30, "patience": 10, "pool": 1, "batch_size": 8, "warmup_epochs": 2, "inner_folds": 1},
        "cv": {"n_folds": 3, "bootstrap": 50}}


def synthetic_cohort(n=90, seed=0):
    """Three classes; a volume modality 'mri' and a tabular 'clinical' carry the label (planted), a
    tabular 'noise' modality does not; mri and noise are missing for about 20 % of the rows each."""
    rng = np.random.default_rng(seed)
    y = rng.permutation(np.arange(n) % 3)
    mri = rng.normal(size=(n, 2, 8, 8, 8)).astype(np.float16)
    mri[:, 0, 1:5, 1:5, 1:5] += (2.0 * (y == 1))[:, None, None, None].astype(np.float16)
    mri[:, 1, 4:8, 4:8, 4:8] += (2.0 * (y == 2))[:, None, None, None].astype(np.float16)
    clinical = rng.normal(size=(n, 5)).astype(np.float32)
    clinical[:, 0] += 2.0 * (y == 1)
    clinical[:, 1] += 2.0 * (y == 2)
    clinical[rng.random((n, 5)) < 0.1] = np.nan       # scattered missing values: imputed per fold
    noise = rng.normal(size=(n, 3)).astype(np.float32)
    present = {"mri": rng.random(n) >= 0.2, "clinical": np.ones(n, bool), "noise": rng.random(n) >= 0.2}
    mri[~present["mri"]] = 0
    noise[~present["noise"]] = np.nan
    return make_cohort({"mri": mri, "clinical": clinical, "noise": noise}, y,
                       classes=["control", "PD", "iRBD"], present=present)


def settings(**cv):
    s = bf_config.settings_from_json(FAST)
    s["cv"].update(cv)
    return s


def splits_for(cohort, s):
    y, labelled = bf_models.targets(cohort, s["cv"])
    keys = bf_models.row_keys(cohort)
    return bf_splits.make_splits([k[0] for k in keys], y, cohort.task, s["cv"]["n_folds"], s["cv"]["val_fraction"],
                                 s["cv"]["seed"], sessions=[k[1] for k in keys])


def cross_validate(cohort, preset, s, root):
    table = splits_for(cohort, s)
    preds = []
    for fold in range(s["cv"]["n_folds"]):
        bf_train.train_fold(cohort, table, fold, preset, s, root / preset / f"fold-{fold}", log=lambda m: None)
        preds.append(pd.read_csv(root / preset / f"fold-{fold}" / "predictions.tsv", sep="\t"))
    return pd.concat(preds, ignore_index=True)


@pytest.mark.parametrize("preset", ["late", "neuromoe"])
def test_planted_signal_is_learnt_and_permuted_labels_fall_to_chance(tmp_path, preset):
    s = settings()
    p = cross_validate(synthetic_cohort(), preset, s, tmp_path / "real")
    assert balanced_accuracy_score(p.target, p.predicted) > 0.6          # chance 0.33
    probs = p[["prob_control", "prob_PD", "prob_iRBD"]].to_numpy()
    np.testing.assert_allclose(probs.sum(1), 1, atol=1e-5)
    if preset != "late":
        assert p.filter(like="weight_").notna().all().all() and p.filter(like="weight_").shape[1] > 0
    # the leakage canary: labels shuffled -> chance
    s_perm = settings(permute_labels=True)
    q = cross_validate(synthetic_cohort(), preset, s_perm, tmp_path / "perm")
    assert balanced_accuracy_score(q.target, q.predicted) < 0.5


@pytest.mark.slow
def test_tabular_only_regression_learns_the_score(tmp_path):
    """No images at all (a features TSV as the only modalities) and a continuous target."""
    rng = np.random.default_rng(1)
    n = 90
    feats = rng.normal(size=(n, 6)).astype(np.float32)
    score = feats[:, 0] - feats[:, 1] + 0.3 * rng.normal(size=n)
    feats[rng.random((n, 6)) < 0.05] = np.nan
    other = rng.normal(size=(n, 2)).astype(np.float32)
    cohort = make_cohort({"freesurfer": feats, "serum": other}, score, task="regression")
    p = cross_validate(cohort, "fusemoe", settings(), tmp_path)
    assert np.corrcoef(p.target, p.predicted)[0, 1] > 0.8
    assert abs(p.predicted.mean() - score.mean()) < 0.5       # predictions back on the target's scale


@pytest.mark.slow
def test_preprocessing_is_fitted_on_the_training_fold_only(tmp_path):
    """Changing every test-fold value (even to absurd ones) changes nothing the model learnt."""
    s = settings()
    cohort = synthetic_cohort()
    table = splits_for(cohort, s)
    a = bf_train.train_fold(cohort, table, 0, "fusemoe", s, tmp_path / "a", log=lambda m: None)
    test = bf_splits.fold_indices(table, 0, bf_models.row_keys(cohort))["test"]
    poisoned = synthetic_cohort()
    poisoned.arrays["clinical"][test] = 1e6
    poisoned.arrays["mri"][test] = np.float16(300)
    b = bf_train.train_fold(poisoned, table, 0, "fusemoe", s, tmp_path / "b", log=lambda m: None)
    for name in a["preprocessing"]:
        for k, v in a["preprocessing"][name].items():
            assert torch.equal(v, b["preprocessing"][name][k]), (name, k)
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    # and the statistics are those of the rows the final model is fitted on: training + validation after the
    # refit (default), never test rows (median imputation, then standardisation)
    fold_rows = bf_splits.fold_indices(table, 0, bf_models.row_keys(cohort))
    assert a["refit"] is not None
    train_rows = np.concatenate([fold_rows["train"], fold_rows["val"]])
    x = cohort.arrays["clinical"][train_rows].astype(float)
    med = np.nanmedian(x, 0)
    filled = np.where(np.isnan(x), med, x)
    np.testing.assert_allclose(a["preprocessing"]["clinical"]["fill"], med, rtol=1e-5)
    np.testing.assert_allclose(a["preprocessing"]["clinical"]["mean"], filled.mean(0), rtol=1e-4, atol=1e-6)
    # volumes: each voxel standardised against the training rows that have the scan (voxel-wise default)
    have = train_rows[cohort.present[train_rows, [m.name for m in cohort.modalities].index("mri")]]
    vol = cohort.arrays["mri"][have].astype(np.float64)
    np.testing.assert_allclose(a["preprocessing"]["mri"]["mean"], vol.mean(0), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(a["preprocessing"]["mri"]["scale"], vol.std(0), rtol=1e-3, atol=1e-4)


def test_same_seed_same_model_and_checkpoint_loads_with_weights_only(tmp_path):
    s = settings()
    cohort = synthetic_cohort()
    table = splits_for(cohort, s)
    for d in ("a", "b"):
        bf_train.train_fold(cohort, table, 1, "permmoe", s, tmp_path / d, log=lambda m: None)
    pa, pb = (pd.read_csv(tmp_path / d / "predictions.tsv", sep="\t") for d in ("a", "b"))
    pd.testing.assert_frame_equal(pa, pb)
    ckpt, model = bf_models.load_checkpoint(tmp_path / "a" / "checkpoint.pt")   # weights_only=True inside
    assert ckpt["preset"] == "permmoe" and ckpt["fold"] == 1 and not model.training
    assert not (tmp_path / "a" / "resume.pt").exists()
    raw = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)
    assert isinstance(raw, dict) and {"model", "config", "preprocessing", "history"} <= set(raw)


RESUME_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
from test_train import synthetic_cohort, settings, splits_for
from brainfuse import io as bf_io, train
if sys.argv[4:] == ["slow"]:   # the run to be killed: it pauses after each saved epoch, so that the test's poller sees
    import time                # every state however loaded the machine (results unchanged: only the pace)
    _save = bf_io.save_torch

    def save_then_pause(obj, path):
        _save(obj, path)
        if str(path).endswith("resume.pt"):
            time.sleep(0.2)
    bf_io.save_torch = save_then_pause
s = settings()
s["model"].update(epochs=int(sys.argv[2]), patience=1000, inner_folds=int(sys.argv[3]))
cohort = synthetic_cohort()
train.train_fold(cohort, splits_for(cohort, s), 0, "flexmoe", s, sys.argv[1], log=lambda m: print(m, flush=True))
"""


@pytest.mark.slow
@pytest.mark.parametrize("kill_phase", [1, 2])
def test_killed_training_resumes_and_ends_with_the_same_model(tmp_path, kill_phase):
    """SIGKILL during early-stopped training (phase 1) or the refit on train + val (phase 2, after the epoch count
    came from inner folds), then rerun: same weights and predictions as an uninterrupted run."""
    script = tmp_path / "run.py"
    script.write_text(RESUME_SCRIPT.format(tests=str(REPO / "tests")))
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    epochs, inner = "12", "1" if kill_phase == 1 else "3"
    # uninterrupted reference
    subprocess.run([sys.executable, str(script), str(tmp_path / "ref"), epochs, inner], check=True, env=env,
                   capture_output=True)
    ref = torch.load(tmp_path / "ref" / "checkpoint.pt", weights_only=True)
    assert ref["refit"]["epochs"] == ref["best_epoch"] >= 1
    # killed (SIGKILL, no clean-up) once a few epochs of the phase are saved, then rerun
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(script), str(out), epochs, inner, "slow"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "checkpoint.pt").exists():
        try:
            st = torch.load(out / "resume.pt", weights_only=True)["state"]
        except Exception:          # not written yet, or being replaced
            time.sleep(0.02)
            continue
        if st.get("phase", 1) == kill_phase and (kill_phase == 2 or st["epoch"] >= 3):
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if (out / "checkpoint.pt").exists():
        pytest.fail("training finished before it could be killed in phase %d" % kill_phase)
    st = torch.load(out / "resume.pt", weights_only=True)["state"]
    killed_at = st["epoch"]
    assert st.get("phase", 1) == kill_phase and killed_at < int(epochs)
    rerun = subprocess.run([sys.executable, str(script), str(out), epochs, inner], check=True, env=env,
                           capture_output=True, text=True)
    assert f"resuming flexmoe fold 0 in phase {kill_phase} after epoch {killed_at}" in rerun.stdout
    got = torch.load(out / "checkpoint.pt", weights_only=True)
    assert got["epochs_run"] == ref["epochs_run"] == int(epochs)     # patience 1000: every epoch (inner folds too)
    for k, v in ref["model"].items():
        assert torch.equal(v, got["model"][k]), k
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "ref" / "predictions.tsv", sep="\t"),
                                  pd.read_csv(out / "predictions.tsv", sep="\t"))


def test_stale_resume_file_from_other_settings_is_ignored(tmp_path):
    s = settings()
    cohort = synthetic_cohort()
    table = splits_for(cohort, s)
    bf_train.train_fold(cohort, table, 0, "late", s, tmp_path / "ref", log=lambda m: None)
    torch.save({"fingerprint": "other run", "state": {}}, tmp_path / "x.pt")
    (tmp_path / "run").mkdir()
    os.replace(tmp_path / "x.pt", tmp_path / "run" / "resume.pt")
    messages = []
    bf_train.train_fold(cohort, table, 0, "late", s, tmp_path / "run", log=messages.append)
    assert any("from another run" in m for m in messages)
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "ref" / "predictions.tsv", sep="\t"),
                                  pd.read_csv(tmp_path / "run" / "predictions.tsv", sep="\t"))


def test_lr_schedule_warms_up_then_decays_to_zero():
    f = [bf_train.lr_factor(s, 10, 100) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[10:], f[11:])) and f[-1] < 0.01


def test_incompatible_cohort_is_refused(tmp_path):
    s = settings()
    cohort = synthetic_cohort()
    bf_train.train_fold(cohort, splits_for(cohort, s), 0, "late", s, tmp_path, log=lambda m: None)
    ckpt, _ = bf_models.load_checkpoint(tmp_path / "checkpoint.pt")
    other = make_cohort({"mri": np.zeros((4, 2, 6, 8, 8), np.float16), "clinical": np.zeros((4, 5), np.float32),
                         "noise": np.zeros((4, 3), np.float32)}, [0, 1, 2, 0])
    with pytest.raises(ValueError, match="'mri'"):
        bf_models.check_compatible(ckpt, other, "new cohort")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pt"):
        bf_models.load_checkpoint(tmp_path / "junk.pt")


def test_wide_table_is_projected_on_components_fitted_on_the_training_fold(tmp_path):
    """A 300-column table (like connectivity edges) whose label lives in one network-wide factor: it is reduced to
    ``tabular_components`` whitened principal components of the training rows (test rows never change them), the
    model sees that width, the label is still learnt from it, and a reloaded checkpoint applies the same projection
    to new rows (the predict path) as training did."""
    rng = np.random.default_rng(1)
    n = 90
    y = rng.permutation(np.arange(n) % 3)
    factor = rng.normal(size=n) + 2.0 * (y == 1) - 2.0 * (y == 2)
    edges = (np.outer(factor, rng.normal(size=300)) + rng.normal(size=(n, 300)) * 2).astype(np.float32)
    arrays = {"edges": edges, "age": rng.normal(size=(n, 2)).astype(np.float32)}
    cohort = make_cohort(arrays, y, classes=["control", "PD", "iRBD"])
    s = settings()
    s["model"].update(tabular_components=8, tabular_reduce="pca")
    table = splits_for(cohort, s)
    ckpt = bf_train.train_fold(cohort, table, 0, "late", s, tmp_path / "a", log=lambda m: None)
    st = ckpt["preprocessing"]
    assert tuple(st["edges"]["projection"].shape) == (300, 8) and "projection" not in st["age"]
    assert {m["name"]: m["shape"] for m in ckpt["config"]["modalities"]} == {"edges": [8], "age": [2]}
    # whitened: the training rows' components have unit variance
    rows = bf_splits.fold_indices(table, 0, bf_models.row_keys(cohort))
    fit = np.concatenate([rows["train"], rows["val"]])
    z = bf_models.materialise(cohort, fit, st, 1)["inputs"]["edges"].numpy()
    np.testing.assert_allclose(z.std(0, ddof=1), 1.0, rtol=1e-3)
    # fitted on training rows only
    poisoned = make_cohort({**arrays, "edges": edges.copy()}, y, classes=["control", "PD", "iRBD"])
    poisoned.arrays["edges"][rows["test"]] = 1e3
    other = bf_train.fit_preprocessing(poisoned, fit, 1, tabular_components=8, tabular_reduce="pca")
    assert torch.equal(other["edges"]["projection"], st["edges"]["projection"])
    # learnt, and the reloaded checkpoint predicts the test rows exactly as training wrote them
    pred = pd.read_csv(tmp_path / "a" / "predictions.tsv", sep="\t")
    assert (pred[["prob_control", "prob_PD", "prob_iRBD"]].to_numpy().argmax(1) == y[rows["test"]]).mean() > 0.6
    loaded, model = bf_models.load_checkpoint(tmp_path / "a" / "checkpoint.pt")
    out = bf_models.run_model(model, bf_models.cohort_data(loaded, cohort, rows["test"]), torch.device("cpu"))
    probs = torch.softmax(out["prediction"], -1).numpy()
    np.testing.assert_allclose(probs, pred[["prob_control", "prob_PD", "prob_iRBD"]].to_numpy(), atol=1e-5)


def _focal_effect(rng, n: int, effect: float):
    """Three classes over n rows of 400 noise columns; class 1 raises column 17, class 2 lowers column 250."""
    y = rng.permutation(np.arange(n) % 3)
    X = rng.normal(size=(n, 400)).astype(np.float32)
    X[:, 17] += effect * (y == 1)
    X[:, 250] -= effect * (y == 2)
    return y, X


def test_select_keeps_the_columns_that_carry_the_label_in_the_training_fold():
    """tabular_reduce: select keeps the columns most associated with the training rows' labels (a focal effect in 2
    of 400 region columns, as the demo's putamen Jacobian), as a selection matrix; test rows never change it."""
    rng = np.random.default_rng(3)
    n = 60
    y, X = _focal_effect(rng, n, 2.5)
    cohort = make_cohort({"regions": X}, y, classes=["control", "PD", "iRBD"])
    fit, test = np.arange(45), np.arange(45, n)
    st = bf_train.fit_preprocessing(cohort, fit, 1, tabular_components=6, tabular_reduce="select", y=y)["regions"]
    proj = st["projection"].numpy()
    assert proj.shape == (400, 6) and set(np.unique(proj)) == {0.0, 1.0} and (proj.sum(0) == 1).all()
    kept = np.flatnonzero(proj.sum(1))
    assert {17, 250} <= set(kept)
    poisoned = make_cohort({"regions": X.copy()}, y, classes=["control", "PD", "iRBD"])
    poisoned.arrays["regions"][test] = rng.normal(size=(len(test), 400)) * 100
    y_poisoned = y.copy()
    y_poisoned[test] = 0
    again = bf_train.fit_preprocessing(poisoned, fit, 1, tabular_components=6, tabular_reduce="select", y=y_poisoned)
    assert torch.equal(again["regions"]["projection"], st["projection"])
    z = bf_models.materialise(cohort, test, {"regions": st}, 1)["inputs"]["regions"].numpy()
    np.testing.assert_allclose(z[:, list(kept).index(17)], (X[test, 17] - st["mean"][17].item()) / st["scale"][17].item(),
                               rtol=1e-5)


def test_inner_cv_keeps_few_columns_for_a_focal_effect_and_many_for_a_spread_one():
    """tabular_select_k: inner_cv chooses the count from the training rows: a focal effect (2 of 400 columns, as
    the putamen parcels) keeps a few, an effect spread thinly over 64 columns keeps the maximum; test rows never
    change the choice."""
    rng = np.random.default_rng(5)
    n = 120
    y, focal = _focal_effect(rng, n, 2.0)
    spread = rng.normal(size=(n, 400)).astype(np.float32)
    spread[:, :64] += 0.45 * (y == 1)[:, None] - 0.45 * (y == 2)[:, None]
    cohort = make_cohort({"focal": focal, "spread": spread}, y, classes=["control", "PD", "iRBD"])
    fit, test = np.arange(90), np.arange(90, n)

    def kept(c, yy):
        st = bf_train.fit_preprocessing(c, fit, 1, tabular_components=32, tabular_reduce="select", y=yy,
                                        select_k="inner_cv")
        return {m: np.flatnonzero(st[m]["projection"].numpy().sum(1)) for m in ("focal", "spread")}

    k = kept(cohort, y)
    assert 2 <= len(k["focal"]) <= 4 and {17, 250} <= set(k["focal"])
    assert len(k["spread"]) == 32 and (k["spread"] < 64).mean() >= 0.8
    poisoned = make_cohort({m: cohort.arrays[m].copy() for m in ("focal", "spread")}, y, classes=cohort.classes)
    for m in ("focal", "spread"):
        poisoned.arrays[m][test] = rng.normal(size=(len(test), 400)) * 100
    y_poisoned = y.copy()
    y_poisoned[test] = 0
    again = kept(poisoned, y_poisoned)
    assert all(np.array_equal(again[m], k[m]) for m in k)


def test_epoch_count_comes_from_the_mean_curve_of_inner_folds(tmp_path):
    """model.inner_folds 3: three models on grouped inner folds of train + val, side by side; the final model is
    refitted on train + val for the epoch of the lowest mean validation loss (patience on the mean)."""
    cohort = synthetic_cohort()
    s = settings()
    s["model"].update(inner_folds=3, epochs=20, patience=4)
    table = splits_for(cohort, s)
    logs = []
    ckpt = bf_train.train_fold(cohort, table, 0, "late", s, tmp_path / "a", log=logs.append)
    curve = ckpt["history"]
    val = [h["val_loss"] for h in curve]
    best = int(np.argmin(val)) + 1
    assert ckpt["best_epoch"] == best == ckpt["refit"]["epochs"]
    assert ckpt["epochs_run"] == len(curve) == min(20, best + 4)        # stopped 4 epochs after the mean's best
    assert any("3 inner folds" in m for m in logs)
    rows = bf_splits.fold_indices(table, 0, bf_models.row_keys(cohort))
    assert ckpt["refit"]["rows"] == len(rows["train"]) + len(rows["val"])
    again = bf_train.train_fold(cohort, table, 0, "late", s, tmp_path / "b", log=lambda m: None)
    assert all(torch.equal(v, again["model"][k]) for k, v in ckpt["model"].items())


def test_neuromoe_gate_takes_any_tabular_modality(tmp_path):
    """model.condition_on names the table that drives NeuroMoE's gate (need not be called clinical); a cohort
    without it conditions on its first tabular modality; a cohort with no table at all is refused in one line."""
    c = synthetic_cohort(n=45)
    arrays = {"mri": c.arrays["mri"], "demographics": c.arrays["clinical"], "noise": c.arrays["noise"]}
    present = {"mri": c.present[:, 0], "demographics": c.present[:, 1], "noise": c.present[:, 2]}
    cohort = make_cohort(arrays, c.target, classes=c.classes, present=present)
    s = settings()
    s["model"].update(epochs=3, condition_on="noise")
    table = splits_for(cohort, s)
    ckpt = bf_train.train_fold(cohort, table, 0, "neuromoe", s, tmp_path / "a", log=lambda m: None)
    assert ckpt["config"]["condition_on"] == "noise"
    s["model"]["condition_on"] = "clinical"         # the default, absent here
    ckpt = bf_train.train_fold(cohort, table, 0, "neuromoe", s, tmp_path / "b", log=lambda m: None)
    assert ckpt["config"]["condition_on"] == "demographics"
    only_mri = make_cohort({"mri": c.arrays["mri"]}, c.target, classes=c.classes)
    with pytest.raises(bf_train.BrainfuseError, match="model.condition_on='clinical'.*needs a tabular modality"):
        bf_train.train_fold(only_mri, splits_for(only_mri, s), 0, "neuromoe", s, tmp_path / "c", log=lambda m: None)


def test_too_small_a_training_part_gets_fewer_inner_folds_with_a_warning(tmp_path):
    """A cohort whose folds hold 2 rows per class cannot be split into 3 inner folds: the fold still trains, on as
    many inner folds as it can hold, or on the splits' validation set, and says so (not an error)."""
    cohort = synthetic_cohort(n=9)
    s = settings()
    s["model"].update(inner_folds=3, epochs=2)
    s["cv"].update(n_folds=3)
    table = splits_for(cohort, s)
    logs = []
    ckpt = bf_train.train_fold(cohort, table, 0, "late", s, tmp_path / "a", log=logs.append)
    warning = [m for m in logs if "WARNING" in m and "model.inner_folds=3" in m]
    assert warning and "per class [2, 2, 2]" in warning[0] and "using 2 inner folds" in warning[0], logs
    assert ckpt["refit"] is not None and (tmp_path / "a" / "predictions.tsv").exists()


def test_training_runs_with_deterministic_algorithms_without_loading_the_compiler():
    """set_determinism turns torch's deterministic algorithms on (warn-only: CPU ops without a deterministic
    kernel warn instead of failing) without importing torch._inductor, 1.2 s of every training job."""
    code = ("import sys, torch; from brainfuse.train import set_determinism; set_determinism(0, 1); "
            "print(torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(), "
            "'torch._inductor' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    assert out.stdout.split() == ["True", "True", "False"], out.stdout + out.stderr
