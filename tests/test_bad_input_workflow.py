"""Bad input at the workflow level (Snakefile, common.smk): one line naming the file or key at parse time, loud
warnings for subjects carried on without a modality, and stage targets that rebuild any missing output."""
import csv
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from brainfuse import bids, config, layout
from conftest import REPO, job_counts


def snakemake(*args, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "snakemake", *map(str, args)], cwd=cwd, capture_output=True, text=True)


def refused(proc, *expected):
    """A run stopped at parse time: non-zero exit, no Python traceback, one line holding every expected text."""
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, f"snakemake accepted the input:\n{out[-3000:]}"
    assert "Traceback" not in out, out[-3000:]
    lines = [line for line in out.splitlines() if all(e in line for e in expected)]
    assert lines, f"no line naming {expected}:\n{out[-3000:]}"
    assert "Building DAG" not in out                      # stopped before planning any job
    return lines[0]


def repo_copy(tmp_path):
    """The workflow in a folder of its own (for edits to config/config.yaml, and runs that write resources/)."""
    work = tmp_path / "repo"
    work.mkdir()
    for item in ("Snakefile", "workflow", "config", "src", "profiles", "envs"):
        src = REPO / item
        if src.is_dir():
            shutil.copytree(src, work / item, ignore=shutil.ignore_patterns("__pycache__", "tpl-*"))
        else:
            shutil.copy(src, work / item)
    return work


def _nifti(path, shape=(4, 4, 4)):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.zeros(shape, np.int16), np.eye(4)), str(path))


def make_bids(root, subjects, participants=None):
    """A BIDS tree with tiny valid images: subjects = {label: modalities}; participants: rows of participants.tsv."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset_description.json").write_text('{"Name": "t", "BIDSVersion": "1.9.0"}')
    for sub, modalities in subjects.items():
        if "T1w" in modalities:
            _nifti(Path(layout.bids_path(root, sub, "anat", "T1w")))
        if "dwi" in modalities:
            dwi = Path(layout.bids_path(root, sub, "dwi", "dwi", dir="AP"))
            _nifti(dwi, (4, 4, 4, 3))
            dwi.with_name(dwi.name.replace(".nii.gz", ".bval")).write_text("0 1000 1000\n")
            dwi.with_name(dwi.name.replace(".nii.gz", ".bvec")).write_text("0 1 0\n0 0 1\n0 0 0\n")
        if "bold" in modalities:
            bold = Path(layout.bids_path(root, sub, "func", "bold", task="rest"))
            _nifti(bold, (4, 4, 4, 3))
            bold.with_name(bold.name.replace(".nii.gz", ".json")).write_text('{"RepetitionTime": 2.0}')
    rows = participants if participants is not None else list(subjects)
    (root / "participants.tsv").write_text("participant_id\tdiagnosis\n" + "".join(f"sub-{p}\tPD\n" for p in rows))
    return root


# ------------------------------------------------------------------------------------------ stage targets
@pytest.mark.slow
def test_stage_targets_rebuild_any_missing_output(tmp_path):
    """`snakemake anat dwi func` after deleting one output of a finished job plans that job (it used to say
    "Nothing to be done": the stage targets named the QC figures only)."""
    work = repo_copy(tmp_path)
    data = make_bids(tmp_path / "bids", {"01": ("T1w", "dwi", "bold"), "02": ("T1w", "dwi", "bold")})
    args = ["anat", "dwi", "func", "--config", f"bids_dir={data}", f"output_dir={tmp_path}/out"]
    summary = snakemake("--summary", *args, cwd=work)
    assert summary.returncode == 0, summary.stdout[-3000:] + summary.stderr[-3000:]
    outputs = [line.split("\t")[0] for line in summary.stdout.splitlines()[1:] if "\t" in line]
    assert len(outputs) > 40
    # "Finished": every output written at one time, after the inputs (what a complete run leaves).
    done = time.time()
    for f in data.rglob("*"):
        os.utime(f, (done - 100, done - 100))
    for name in outputs:
        path = work / name          # absolute names stay absolute; resources/ lands in the copy
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
        os.utime(path, (done, done))
    deleted = {
        "anat_subject": next(p for p in outputs if "sub-01" in p and "from-MNI152NLin2009aSym_to-T1w" in p),
        "dwi_subject": next(p for p in outputs if "sub-02" in p and "space-dwi" in p and "param-fa" in p),
        "func_run": next(p for p in outputs if "sub-02" in p and "stat-reho" in p),
    }
    for path in deleted.values():
        os.remove(path)
    proc = snakemake("-n", *args, cwd=work)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Job stats" in proc.stdout, f"nothing planned with outputs deleted:\n{proc.stdout[-2000:]}"
    counts = job_counts(proc.stdout)
    assert counts["anat_subject"] == 1 and counts["dwi_subject"] >= 1 and counts["func_run"] >= 1, counts
    assert not counts["templates"] and not counts["atlas"]        # the rest really counts as done
    for path in deleted.values():
        assert any(path in line for line in proc.stdout.splitlines() if "Missing output files" in line), path


# ------------------------------------------------------------------------------ subjects without a T1w
@pytest.mark.slow
def test_bids_subject_without_t1w_is_carried_on_or_stops_in_strict_mode(tmp_path):
    data = make_bids(tmp_path / "bids", {"01": ("T1w", "dwi", "bold"), "02": ("dwi", "bold")},
                     participants=["01", "02", "03"])
    args = ["-n", "anat", "dwi", "func", "--config", f"bids_dir={data}", f"output_dir={tmp_path}/out"]
    proc = snakemake(*args)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "IndexError" not in out
    warning = next(line for line in out.splitlines() if "sub-02: no usable T1w" in line)
    assert "carried on as missing T1w, dwi, bold" in warning and str(data / "sub-02" / "anat") in warning
    counts = job_counts(proc.stdout)
    assert counts["anat_subject"] == counts["dwi_subject"] == counts["func_run"] == 1   # sub-01 only
    # participants.tsv lists sub-03, which has no folder: named, and left out
    orphan = next(line for line in out.splitlines() if "no imaging folder" in line)
    assert "sub-03" in orphan and str(data / "participants.tsv") in orphan and "sub-01" not in orphan

    line = refused(snakemake(*args, "strict=true"), "sub-02: no usable T1w", "strict: true")
    assert "sub-01" not in line


def _fake_converted(root, out, subjects):
    """DICOM mode after conversion (the checkpoints' outputs, newer than the DICOM folders), without dcm2niix:
    subjects = {label: {suffix: decision}}."""
    for sub in subjects:
        (root / sub).mkdir(parents=True)
        (root / sub / "IM0001.dcm").write_bytes(b"")
    later = time.time()
    for sub, decisions in subjects.items():
        rows = []
        for suffix, decision in decisions.items():
            datatype, entities = {"T1w": ("anat", {}), "bold": ("func", {"task": "rest"}),
                                  "dwi": ("dwi", {"dir": "AP"})}[suffix]
            name = layout.bids_path("", sub, datatype, suffix, **entities).lstrip("/")
            if decision == "converted":
                _nifti(out / "bids" / name, (4, 4, 4) if suffix == "T1w" else (4, 4, 4, 3))
                (out / "bids" / name.replace(".nii.gz", ".json")).write_text('{"RepetitionTime": 2.0}')
            rows.append({"subject": sub, "decision": decision, "reason": "DERIVED image" if decision != "converted"
                         else "", "suffix": suffix, "bids_name": name if decision == "converted" else ""})
        manifest = out / "bids" / "code" / "manifests" / f"sub-{sub}_manifest.tsv"
        manifest.parent.mkdir(parents=True, exist_ok=True)
        (out / "bids" / f"sub-{sub}").mkdir(parents=True, exist_ok=True)
        with open(manifest, "w", newline="") as f:
            writer = csv.DictWriter(f, ["subject", "decision", "reason", "suffix", "bids_name"], delimiter="\t")
            writer.writeheader()
            writer.writerows(rows)
        for path in (manifest, out / "bids" / f"sub-{sub}"):
            os.utime(path, (later + 10, later + 10))


@pytest.mark.slow
def test_dicom_subject_whose_t1w_was_skipped_does_not_stop_the_others(tmp_path):
    """BOLD converted, the only T1w skipped (e.g. a defaced DERIVED export): it used to stop the whole DAG with
    "InputFunctionException in rule anat_subject: IndexError: list index out of range"."""
    dicom, out = tmp_path / "dicom", tmp_path / "out"
    _fake_converted(dicom, out, {"01": {"T1w": "converted", "bold": "converted"},
                                 "02": {"T1w": "skipped", "bold": "converted"}})
    args = ["-n", "anat", "func", "--config", f"dicom_dir={dicom}", f"output_dir={out}"]
    proc = snakemake(*args)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-3000:]
    assert "IndexError" not in text
    warning = next(line for line in text.splitlines() if "sub-02: no usable T1w" in line)
    assert "sub-02_manifest.tsv" in warning and "carried on as missing T1w, bold" in warning
    counts = job_counts(proc.stdout)
    assert counts["anat_subject"] == 1 and counts["func_run"] == 1 and not counts["convert_subject"]

    strict = snakemake(*args, "strict=true")
    text = strict.stdout + strict.stderr
    assert strict.returncode != 0 and "IndexError" not in text
    assert any("sub-02: no usable T1w" in line and "strict: true" in line for line in text.splitlines()), text[-3000:]


# ------------------------------------------------------------------------------ parse-time config errors
def test_output_dir_that_is_a_file_is_refused_at_parse_time(tmp_path):
    target = tmp_path / "results.txt"
    target.write_text("not a folder")
    line = refused(snakemake("-n", "--config", f"output_dir={target}"), str(target), "is a file")
    assert "set output_dir to a folder" in line
    assert target.read_text() == "not a folder"


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_output_dir_in_a_read_only_folder_is_refused(tmp_path):
    from brainfuse.inputs import check_output_dir
    from brainfuse.errors import BrainfuseError

    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(BrainfuseError, match="not writable"):
            check_output_dir(ro / "out")
    finally:
        ro.chmod(0o755)


@pytest.mark.slow
def test_tab_in_config_yaml_names_the_file_and_line(tmp_path):
    work = repo_copy(tmp_path)
    cfg = work / "config" / "config.yaml"
    lines = cfg.read_text().splitlines()
    number = next(i for i, line in enumerate(lines) if line.startswith("  seed:")) + 1
    lines[number - 1] = "\t" + lines[number - 1].lstrip()
    cfg.write_text("\n".join(lines) + "\n")
    line = refused(snakemake("-n", "--config", f"output_dir={tmp_path}/out", cwd=work),
                   "config/config.yaml", f"line {number}")
    assert "tab" in line


def test_tab_in_a_configfile_stops_the_run(tmp_path):
    """--configfile is read by Snakemake's command line before the Snakefile runs: Snakemake's own message (no
    file or line named) is what the user gets; brainfuse.config.read_yaml names both (checked below)."""
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"output_dir: {tmp_path}/out\ndemo:\n\tn_subjects: 4\n")
    refused(snakemake("-n", "--configfile", bad), "not valid JSON or YAML")
    with pytest.raises(config.ConfigError) as e:
        config.read_yaml(bad)
    assert str(e.value).startswith(f"{bad}: line 3, column 1:") and "tab" in str(e.value)


@pytest.mark.slow
def test_wrong_types_from_the_command_line_name_every_key(tmp_path):
    proc = snakemake("-n", "--config", f"output_dir={tmp_path}", "threads=abc", "strict=maybe")
    refused(proc, "'threads'")
    refused(proc, "'strict'")


@pytest.mark.slow
@pytest.mark.parametrize("case", ["missing", "no_description", "subjects", "folder_label", "participants_tsv"])
def test_bids_input_problems_get_one_line(tmp_path, case):
    data = make_bids(tmp_path / "bids", {"01": ("T1w",)})
    extra = []
    if case == "missing":
        data, expected = tmp_path / "nowhere", (str(tmp_path / "nowhere"), "bids_dir does not exist")
    elif case == "no_description":
        (data / "dataset_description.json").unlink()
        expected = (str(data), "no dataset_description.json")
    elif case == "subjects":
        extra, expected = ["subjects=[01,07]"], ("'subjects'", "07", "no such sub-<label> folder")
    elif case == "folder_label":
        (data / "sub-0_2" / "anat").mkdir(parents=True)
        expected = (str(data / "sub-0_2"), "not a valid subject label", "rename the folder (e.g. sub-02)")
    else:
        table = f"{tmp_path}/clinical.tsv"
        extra, expected = [f"participants_tsv={table}"], (table, "participants_tsv does not exist")
    refused(snakemake("-n", "--config", f"bids_dir={data}", f"output_dir={tmp_path}/out", *extra), *expected)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.parametrize("case", ["subjects", "folder_label"])
def test_dicom_input_problems_get_one_line(tmp_path, case):
    dicom = tmp_path / "dicom"
    (dicom / "01").mkdir(parents=True)
    extra = []
    if case == "subjects":
        extra, expected = ["subjects=[02]"], ("'subjects'", "02", str(dicom))
    else:
        (dicom / "P 01").mkdir()
        expected = (str(dicom / "P 01"), "not a valid subject label", "rename the folder (e.g. P01)")
    refused(snakemake("-n", "--config", f"dicom_dir={dicom}", f"output_dir={tmp_path}/out", *extra), *expected)


@pytest.mark.slow
def test_demo_subjects_that_do_not_exist_are_refused(tmp_path):
    refused(snakemake("-n", "--config", f"output_dir={tmp_path}/out", "subjects=[001,999]"), "'subjects'", "999")


@pytest.mark.slow
def test_a_demo_too_small_for_the_folds_is_refused_before_any_job(tmp_path):
    """12 subjects of 3 classes are 4 per class, fewer than 5 folds: the splits rule would refuse them only after
    ~10 minutes of preprocessing. Stages that stop before training are fine."""
    small = ["--config", f"output_dir={tmp_path}/out", "demo={n_subjects: 12}"]
    refused(snakemake("-n", *small), "control 4, PD 4, iRBD 4", "cv.n_folds=5", "demo.n_subjects to at least 15")
    assert snakemake("-n", *small, "cv={n_folds: 4}").returncode == 0
    # grouped by site, the folds count the demo's two sites: more subjects would not help
    line = refused(snakemake("-n", *small, "cv={n_folds: 4, group_by: site}"), "site groups (cv.group_by)")
    assert "demo.n_subjects" not in line and "lower cv.n_folds" in line
    assert snakemake("-n", *small, "stages=[convert, anat, dwi, func, tensors]").returncode == 0
    # predicted with models trained elsewhere: nothing is trained on these 12
    models = tmp_path / "models"
    assert snakemake("-n", *small, f"model={{predict_from: {models}, predict_preset: late}}").returncode == 0


def test_input_folder_checks_name_the_key_and_path(tmp_path):
    """The library side of the parse-time checks (no Snakemake start): each error names the path and the key."""
    afile = tmp_path / "data.txt"
    afile.write_text("x")
    with pytest.raises(bids.DatasetError, match="bids_dir is a file, not a folder"):
        bids.check_bids_root(afile)
    with pytest.raises(bids.DatasetError, match=f"{tmp_path / 'x'}: dicom_dir does not exist"):
        bids.check_input_dir(tmp_path / "x", "dicom_dir")
    with pytest.raises(config.ConfigError, match="'bids_dir' and 'dicom_dir' are both set"):
        config.validate({"bids_dir": str(tmp_path), "dicom_dir": str(tmp_path)})
    for text, expected in [("a: [1, 2\n", "line 2"), ("- a\n- b\n", "not keys and values"),
                           ("a: 1\n  b: 2\n", "line 2, column 4")]:
        (tmp_path / "c.yaml").write_text(text)
        with pytest.raises(config.ConfigError, match=expected):
            config.read_yaml(tmp_path / "c.yaml")
