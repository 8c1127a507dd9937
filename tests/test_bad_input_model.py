"""Bad input to the model side (tensors, splits, train, evaluate, predict): one line naming the file (or config
key), the problem and what to do; no output a rerun would take as done; loud warnings where the run goes on.

Cohorts are tiny and built here: a 30-row participants table (the demo's clinical columns, tabular modalities
only) and, for the image caches, 8^3-voxel maps on a made-up 3 mm grid.
"""
import json
import os
import shutil

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch

from brainfuse.phantom import generator as demo
from brainfuse import config as bf_config
from brainfuse import evaluate as bf_eval
from brainfuse import models as bf_models
from brainfuse import predict as bf_predict
from brainfuse import splits as bf_splits
from brainfuse import tensors as T
from brainfuse import train as bf_train
from brainfuse.inputs import CacheError, InputFileError
from conftest import brainfuse_cli, brainfuse_error

TAB = {"modalities": ["clinical", "serum"], "levels": {"sex": ["F", "M"]}}
CLASSES = {"classes": ["control", "PD", "iRBD"]}
FAST = {"model": {"epochs": 3, "patience": 2, "batch_size": 8, "warmup_epochs": 1},
        "cv": {"n_folds": 2, "bootstrap": 10, "missing_grid": False, "ablations": False, "baselines": False}}


def write_participants(path, n=30, edit=None):
    cfg = demo.demo_config({"n_subjects": n})
    table = demo.clinical_table(cfg, demo.plan(cfg))
    if edit is not None:
        table = edit(table)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    table.to_csv(path, sep="\t", index=False, na_rep="n/a")
    return table


def gather_tabular(root, edit=None, **cfg):
    write_participants(root / "participants.tsv", edit=edit)
    T.gather(root / "tensors", root / "participants.tsv", {**TAB, **cfg})
    return root / "tensors"


def not_done(folder):
    """No file a rerun would take as the finished output of a gather."""
    return not any((folder / f).exists() for f in ("cohort.json", "manifest.tsv", "clinical.tsv"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tabular cohort, its splits and the 'late' preset trained on both folds (seconds)."""
    root = tmp_path_factory.mktemp("model")
    tensors = gather_tabular(root, **CLASSES)
    s = bf_config.settings_from_json(FAST)
    cohort = T.load_cohort(tensors)
    keys = bf_models.row_keys(cohort)
    table = bf_splits.make_splits([k[0] for k in keys], cohort.target, cohort.task, 2, 0.2, 0,
                                  sessions=[k[1] for k in keys])
    bf_splits.write_tsv(table, root / "splits.tsv")
    for fold in (0, 1):
        bf_train.train_fold(cohort, table, fold, "late", s, root / "models" / "late" / f"fold-{fold}",
                            log=lambda m: None)
    return root, tensors, s, table


# ------------------------------------------------------------------------------------- participants.tsv
@pytest.mark.parametrize("case, content, expected", [
    ("empty", "", "participants table is empty"),
    ("no participant_id", "subject\tdiagnosis\nsub-001\tPD\n", "lacks the column(s) participant_id"),
    ("comma-separated", "participant_id,diagnosis\nsub-001,PD\n", "(is it comma-separated?)"),
    ("no label column", "participant_id\tage\nsub-001\t60\n", "no label column 'diagnosis' (config tensors.label)"),
    ("header only", "participant_id\tdiagnosis\n", "has a header but no rows"),
])
def test_unusable_participants_table_is_one_line(tmp_path, case, content, expected):
    (tmp_path / "participants.tsv").write_text(content)
    line = brainfuse_error("tensors", "gather", "--out-dir", tmp_path / "tensors", "--participants",
                           tmp_path / "participants.tsv", "--params", json.dumps(TAB))
    assert f"{tmp_path / 'participants.tsv'}: " in line and expected in line, line
    assert not_done(tmp_path / "tensors")


def test_invalid_bids_label_is_one_line(tmp_path):
    """Formerly a LabelError traceback: in participants.tsv (row named) and on the command line."""
    write_participants(tmp_path / "participants.tsv",
                       edit=lambda t: t.assign(participant_id=t.participant_id.where(t.index != 4, "sub-005_x")))
    line = brainfuse_error("tensors", "gather", "--out-dir", tmp_path / "tensors", "--participants",
                           tmp_path / "participants.tsv", "--params", json.dumps(TAB))
    assert "participants.tsv: row 5 has participant_id 'sub-005_x', not a BIDS label" in line, line
    assert not_done(tmp_path / "tensors")
    line = brainfuse_error("tensors", "subject", "--subject", "01_a", "--modality", "aMRI", "x.nii.gz",
                           "--mask", "m.nii.gz", "--resolution", "3", "--out-dir", tmp_path / "tensors")
    assert "invalid subject (--subject) '01_a': BIDS labels may contain only letters and digits" in line, line
    assert not (tmp_path / "tensors").exists()


# ---------------------------------------------------------------------------------- feature tables
@pytest.mark.parametrize("case, expected", [
    ("missing file", "table of tabular modality 'aseg' not found; check config tensors.tables.aseg.path"),
    ("no id column", "lacks the column(s) participant_id"),
    ("non-numeric", "column 'eTIV' row 3 (sub-003) has non-numeric value 'big'"),
])
def test_unusable_feature_table_is_one_line(tmp_path, case, expected):
    write_participants(tmp_path / "participants.tsv")
    aseg = tmp_path / "aseg.tsv"
    if case != "missing file":
        ids = [f"sub-{i:03d}" for i in range(1, 31)]
        table = pd.DataFrame({"participant_id": ids, "eTIV": np.linspace(1.4e6, 1.6e6, 30).astype(object)})
        if case == "no id column":
            table = table.rename(columns={"participant_id": "subject"})
        else:
            table.loc[2, "eTIV"] = "big"
        table.to_csv(aseg, sep="\t", index=False)
    cfg = {**TAB, "tables": {"aseg": {"path": str(aseg)}}}
    line = brainfuse_error("tensors", "gather", "--out-dir", tmp_path / "tensors", "--participants",
                           tmp_path / "participants.tsv", "--params", json.dumps(cfg))
    assert str(aseg) in line and expected in line, line
    assert not_done(tmp_path / "tensors")


# ------------------------------------------------------------------------------------ degenerate labels
def only(classes):
    return lambda t: t[t.diagnosis.isin(classes)].reset_index(drop=True)


def few_irbd(t):
    keep = t.diagnosis.ne("iRBD") | (t.diagnosis.eq("iRBD").cumsum() <= 3)
    return t[keep].reset_index(drop=True)


@pytest.mark.parametrize("case, edit, expected", [
    ("single class", only(["PD"]),
     "column 'diagnosis' holds a single class among the labelled rows (participants: control 0, PD 10, iRBD 0): a "
     "classifier needs at least two"),
    ("class without rows", only(["PD", "control"]),
     "class(es) iRBD of column 'diagnosis' have no labelled rows (participants: control 10, PD 10, iRBD 0); drop them "
     "from config tensors.classes, or add their participants"),
    ("class below the fold count", few_irbd,
     "class(es) iRBD of column 'diagnosis' have fewer participants than cv.n_folds=5 (participants: control 10, PD 10, "
     "iRBD 3), so some test folds would lack them; set cv.n_folds to 3 or fewer, or drop the class from config "
     "tensors.classes"),
])
@pytest.mark.slow
def test_degenerate_labels_are_refused_before_any_split(tmp_path, capsys, case, edit, expected):
    """Formerly trained without a word (a single class: accuracy 1.0 by construction). The gather warns (a cohort
    only to be predicted may be so); the splits refuse, naming the participants table, and write nothing."""
    tensors = gather_tabular(tmp_path, edit=edit, **CLASSES)
    warned = capsys.readouterr().err
    if case != "class below the fold count":
        assert "WARNING" in warned and "participants.tsv" in warned and "brainfuse train splits refuses" in warned
    argv = ["splits", "--tensors", tensors, "--params", json.dumps({"cv": {"n_folds": 5}}), "--output",
            tmp_path / "splits.tsv"]
    if case == "single class":          # the command line prints one line
        line = brainfuse_error("train", *argv)
        assert line.startswith(f"brainfuse train: error: {tmp_path / 'participants.tsv'}: ") and expected in line, line
    else:                               # the same command in this process (no second torch start-up)
        with pytest.raises(bf_splits.DegenerateLabelError) as err:
            bf_train.cli(list(map(str, argv)))
        assert str(err.value).startswith(f"{tmp_path / 'participants.tsv'}: ") and expected in str(err.value)
    assert not (tmp_path / "splits.tsv").exists()


def test_constant_regression_target_is_refused():
    with pytest.raises(bf_splits.DegenerateLabelError, match="all 12 labelled values of column 'age' are 60"):
        bf_splits.make_splits([f"sub-{i}" for i in range(12)], np.full(12, 60.0), "regression", 3, label="age")


# ------------------------------------------------------------------------------------- cache integrity
@pytest.mark.parametrize("case, expected", [
    ("re-saved as float64", "covariates.npy: cached array is float64 [30, 2], the tensors stage wrote float32 [30, 2]"),
    ("truncated", "clinical.npy: cached array cannot be read"),
    ("one value edited", "serum.npy: cached array changed since the tensors stage wrote it (content hash differs)"),
    ("manifest edited", "manifest.tsv: manifest.tsv is missing or changed since the tensors stage wrote it"),
])
@pytest.mark.slow
def test_edited_cohort_cache_is_refused_with_the_stage_to_rerun(tmp_path, case, expected):
    tensors = gather_tabular(tmp_path, **CLASSES)
    ref = T.load_cohort(tensors)                 # intact: accepted
    if case == "re-saved as float64":
        np.save(tensors / "covariates.npy", np.load(tensors / "covariates.npy").astype(np.float64))
    elif case == "truncated":
        data = (tensors / "clinical.npy").read_bytes()
        (tensors / "clinical.npy").write_bytes(data[: len(data) - 40])
    elif case == "one value edited":
        a = np.load(tensors / "serum.npy")
        a[3, 0] += 1.0
        np.save(tensors / "serum.npy", a)
    else:
        text = (tensors / "manifest.tsv").read_text()
        (tensors / "manifest.tsv").write_text(text.replace("\tPD\t", "\tcontrol\t", 1))
    with pytest.raises(CacheError) as err:
        T.load_cohort(tensors)
    assert expected in str(err.value)
    assert "rerun the gather: snakemake tensors --forcerun tensors_gather" in str(err.value)
    assert len(ref) == 30
    if case == "re-saved as float64":          # and through a stage's command line: one line
        line = brainfuse_error("train", "splits", "--tensors", tensors, "--output", tmp_path / "splits.tsv")
        assert expected in line and "rerun the gather" in line, line
        assert not (tmp_path / "splits.tsv").exists()


GRID = np.diag([3.0, 3.0, 3.0, 1.0])


def write_unit(deriv, sub, seed=0):
    """aMRI derivatives of one subject on an 8^3 grid, named as the Stage contract says."""
    rng = np.random.default_rng(seed)
    paths = T.derivative_paths(deriv, sub, "aMRI", 3)
    for p in paths:
        os.makedirs(os.path.dirname(p), exist_ok=True)
        nib.save(nib.Nifti1Image(rng.uniform(0.1, 1, (8, 8, 8)).astype(np.float32), GRID), p)
    return paths


def write_qc(deriv, sub, qc_pass, flags, datatype="anat", suffix="T1w"):
    path = deriv / f"sub-{sub}" / datatype / f"sub-{sub}_desc-qc_{suffix}.json"
    os.makedirs(path.parent, exist_ok=True)
    path.write_text(json.dumps({"qc_pass": qc_pass, "flags": flags, "metrics": {}, "thresholds": {}}))
    return path


@pytest.fixture(scope="module")
def image_units(tmp_path_factory):
    """Three units' aMRI caches with QC: sub-001 passed, sub-002 failed (built by the CLI), sub-003 none."""
    root = tmp_path_factory.mktemp("units")
    deriv, out = root / "deriv", root / "tensors"
    mask = root / "mask.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((8, 8, 8), np.uint8), GRID), mask)
    T.build_subject("aMRI", write_unit(deriv, "001", 0), mask, T.tensor_path(out, "001", "aMRI"), 3, subject="001",
                    qc=[T.read_qc(write_qc(deriv, "001", True, []))])
    T.build_subject("aMRI", write_unit(deriv, "003", 2), mask, T.tensor_path(out, "003", "aMRI"), 3, subject="003")
    qc = [write_qc(deriv, "002", False, ["MNI correlation 0.41 < 0.60: registration failed"]),
          write_qc(deriv, "002", True, ["max FD 1.2 mm > 0.5 mm"], "func", "bold")]
    log = brainfuse_cli("tensors", "subject", "--subject", "002", "--resolution", "3", "--mask", mask, "--out-dir", out,
                        "--modality", "aMRI", *write_unit(deriv, "002", 1), "--qc", *qc)
    assert "WARNING: sub-002 image QC FAILED: T1w: MNI correlation 0.41 < 0.60: registration failed" in log
    write_participants(root / "participants.tsv", n=3)
    return root, deriv, out


def test_edited_subject_cache_is_refused_at_the_gather(image_units, tmp_path):
    root, _, out = image_units
    out = shutil.copytree(out, tmp_path / "tensors")
    cache = T.tensor_path(out, "002", "aMRI")
    a = np.load(cache)
    a[0, 1, 1, 1] = 0
    np.save(cache, a)
    units = [T.unit_dir(out, s) for s in ("001", "002", "003")]
    line = brainfuse_error("tensors", "gather", "--out-dir", out, "--participants", root / "participants.tsv",
                           "--params", json.dumps({"modalities": ["aMRI"], "image_features": "volumes"}), "--tensors", *units)
    assert f"{cache}: cached array changed since the tensors stage wrote it" in line, line
    assert f"delete {T.unit_dir(out, '002')} and rerun the tensors stage" in line
    assert not_done(out)


def test_qc_flags_reach_the_manifest_with_a_loud_warning(image_units):
    root, deriv, out = image_units
    side = json.loads(open(T.tensor_path(out, "002", "aMRI", ext=".json")).read())
    assert [q["suffix"] for q in side["qc"]] == ["T1w"]          # func QC does not apply to aMRI
    log = brainfuse_cli("tensors", "gather", "--out-dir", out, "--participants", root / "participants.tsv",
                        "--params", json.dumps({"modalities": ["aMRI", "clinical"], "levels": {"sex": ["F", "M"]},
                                               "image_features": "volumes"}),
                        "--tensors", *[T.unit_dir(out, s) for s in ("001", "002", "003")])
    assert "WARNING: image QC flagged 1 of 3 rows (1 failed)" in log
    assert "WARNING:   sub-002: FAILED - T1w: MNI correlation 0.41 < 0.60: registration failed" in log
    man = T.load_cohort(out).manifest.set_index("participant_id")
    assert man.qc_pass.tolist() == ["True", "False", "n/a"]
    assert man.loc["sub-002", "qc_flags"] == "T1w: MNI correlation 0.41 < 0.60: registration failed"
    assert man.loc["sub-001", "qc_flags"] == "n/a"


def test_malformed_qc_file_is_one_line(image_units):
    root, deriv, out = image_units
    bad = write_qc(deriv, "004", True, [])
    bad.write_text('{"flags": []}')
    paths = write_unit(deriv, "004")
    line = brainfuse_error("tensors", "subject", "--subject", "004", "--resolution", "3", "--mask",
                           root / "mask.nii.gz", "--out-dir", out, "--modality", "aMRI", *paths, "--qc", bad)
    assert f"{bad}: QC file needs \"qc_pass\": true/false" in line and "rerun the anat stage" in line, line
    assert not os.path.exists(T.unit_dir(out, "004"))


# ---------------------------------------------------------------------------------- device, checkpoints
@pytest.mark.slow
def test_cuda_without_a_gpu_names_the_config_key(trained, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    root, tensors, s, _ = trained
    line = brainfuse_error("train", "fold", "--tensors", tensors, "--splits", root / "splits.tsv", "--fold", "0",
                           "--preset", "late", "--params", json.dumps(FAST), "--device", "cuda",
                           "--out-dir", tmp_path / "fold")
    assert "config model.device (--device) is 'cuda' but" in line and "set model.device to auto or cpu" in line, line
    assert not (tmp_path / "fold" / "checkpoint.pt").exists()


@pytest.mark.slow
def test_truncated_checkpoint_in_evaluate_is_one_line(trained, tmp_path):
    root, tensors, s, _ = trained
    models = shutil.copytree(root / "models", tmp_path / "models")
    ckpt = models / "late" / "fold-1" / "checkpoint.pt"
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[: len(data) // 2])
    line = brainfuse_error("evaluate", "--tensors", tensors, "--splits", root / "splits.tsv", "--models", models,
                           "--presets", "late", "--params", json.dumps(FAST), "--out-dir", tmp_path / "reports")
    assert f"{ckpt}: checkpoint is truncated, damaged or not a brainfuse file" in line, line
    assert "delete it and rerun the train stage" in line
    assert not (tmp_path / "reports").exists()


class Payload:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ.get('PAYLOAD_MARK', '/nonexistent/x')}",))


@pytest.mark.slow
def test_tampered_checkpoint_in_predict_is_refused_and_never_runs(trained, tmp_path, monkeypatch):
    root, tensors, s, _ = trained
    models = shutil.copytree(root / "models", tmp_path / "models")
    mark = tmp_path / "PAYLOAD_RAN"
    monkeypatch.setenv("PAYLOAD_MARK", str(mark))
    ckpt = models / "late" / "fold-0" / "checkpoint.pt"
    torch.save({"format": bf_models.CHECKPOINT_FORMAT, "x": Payload()}, ckpt)    # a pickle that runs a command
    out = tmp_path / "predictions.tsv"
    line = brainfuse_error("predict", "--tensors", tensors, "--models", models, "--preset", "late", "--output", out)
    assert f"{ckpt}: checkpoint is truncated, damaged or not a brainfuse file" in line, line
    assert not mark.exists() and not out.exists()


def test_checkpoint_with_edited_content_is_refused(trained, tmp_path):
    root, *_ = trained
    ckpt = torch.load(root / "models" / "late" / "fold-0" / "checkpoint.pt", weights_only=True)
    name = next(iter(ckpt["model"]))
    ckpt["model"][name] = torch.zeros(3, 3, 3)
    torch.save(ckpt, tmp_path / "checkpoint.pt")
    with pytest.raises(InputFileError, match=r"checkpoint.pt: checkpoint content is damaged \(RuntimeError"):
        bf_models.load_checkpoint(tmp_path / "checkpoint.pt")


@pytest.mark.parametrize("damage", ["truncated", "wrong content"])
def test_damaged_resume_file_is_ignored_loudly_and_training_gives_the_same_bytes(trained, tmp_path, damage):
    """A resume file only saves time and training is seeded: a damaged one is discarded with a WARNING, and the
    fold trained afresh ends with the bytes of an undisturbed run."""
    root, tensors, s, table = trained
    cohort = T.load_cohort(tensors)
    out = tmp_path / "fold-0"
    out.mkdir()
    if damage == "truncated":
        data = (root / "models" / "late" / "fold-0" / "checkpoint.pt").read_bytes()
        (out / "resume.pt").write_bytes(data[:100])
    else:      # this run's fingerprint, but weights of another model
        rows = bf_splits.fold_indices(table, 0, bf_models.row_keys(cohort))
        rows["train_val"] = np.concatenate([rows["train"], rows["val"]])
        fp = bf_train.fingerprint(s, "late", 0, rows, len(cohort))
        torch.save({"fingerprint": fp, "state": {"phase": 1, "epoch": 2}, "model": {"w": torch.zeros(2)},
                    "optimizer": {}, "rng": {}}, out / "resume.pt")
    messages = []
    bf_train.train_fold(cohort, table, 0, "late", s, out, log=messages.append)
    assert any(m.startswith(f"[train] WARNING: {out / 'resume.pt'} is damaged") for m in messages), messages
    ref = root / "models" / "late" / "fold-0"
    assert (out / "predictions.tsv").read_bytes() == (ref / "predictions.tsv").read_bytes()
    assert (out / "checkpoint.pt").read_bytes() == (ref / "checkpoint.pt").read_bytes()
    assert not (out / "resume.pt").exists()


# ------------------------------------------------------------------------------------------ QC in evaluate
def test_evaluation_lists_rows_flagged_by_image_qc(trained, tmp_path):
    """Flagged rows are named in results.tsv (analysis qc), predictions.tsv and summary.json, and each preset is
    also scored without them (condition 'QC passed')."""
    root, tensors, s, table = trained
    cohort = T.load_cohort(tensors)
    man = cohort.manifest
    man.loc[2, ["qc_pass", "qc_flags"]] = ["False", "T1w: MNI correlation 0.41 < 0.60"]
    man.loc[5, ["qc_pass", "qc_flags"]] = ["True", "bold: max FD 1.2 mm > 0.5 mm"]
    messages = []
    res = bf_eval.evaluate(cohort, table, root / "models", ["late"], s, tmp_path, log=messages.append)
    p2, p5 = man.participant_id[2], man.participant_id[5]
    qc = res[res.analysis == "qc"].set_index("condition")["value"]
    assert qc.to_dict() == {f"{p2}: T1w: MNI correlation 0.41 < 0.60": 0.0, f"{p5}: bold: max FD 1.2 mm > 0.5 mm": 1.0}
    clean = res[(res.analysis == "cv") & (res.condition == "QC passed") & (res.metric == "accuracy")]
    assert clean.n.tolist() == [28]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["qc_flagged"] == [f"{p2}: failed; T1w: MNI correlation 0.41 < 0.60",
                                     f"{p5}: passed; bold: max FD 1.2 mm > 0.5 mm"]
    assert summary["n"] == 30                      # the main result still covers every row
    preds = pd.read_csv(tmp_path / "predictions.tsv", sep="\t", keep_default_na=False).set_index("participant_id")
    assert preds.loc[p2, "qc_pass"] == "False" and preds.qc_pass.value_counts()["n/a"] == 28
    assert any("WARNING: image QC flagged 2 evaluated rows" in m for m in messages)
    new = bf_predict.predict(cohort, bf_predict.checkpoints(root / "models", "late"), log=lambda m: None)
    assert new.set_index("participant_id").loc[p2, ["qc_pass", "qc_flags"]].tolist() == [
        "False", "T1w: MNI correlation 0.41 < 0.60"]


def test_cuda_index_beyond_the_gpus_is_refused(monkeypatch):
    """(No GPU here: torch's own answers stand in for a one-GPU machine.)"""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(bf_models.DeviceError, match=r"'cuda:2' but this machine has 1 CUDA GPU\(s\) \(cuda:0 to"):
        bf_models.pick_device("cuda:2")
    assert bf_models.pick_device("cuda:0") == torch.device("cuda:0")
