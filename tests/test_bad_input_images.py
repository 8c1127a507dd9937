"""Bad image inputs of the anat, dwi and func stages (issue 19): each is refused with one line naming the file, the
problem and what to do, before any heavy computation and with nothing left that a rerun would take as done. QC
thresholds: a WARNING line and a flag in the subject's QC JSON, or with --strict a one-line stop and no outputs.

Inputs are tiny synthetic NIfTIs; the one real anat run (tiny phantom, few iterations) checks the strict stop.
"""
import json

import nibabel as nib
import numpy as np
import pytest

from brainfuse import dwi, func, layout, stageqc
from brainfuse.layout import TEMPLATE, bids_path
from conftest import brainfuse_cli, brainfuse_error

RNG = np.random.default_rng(19)


def _nii(path, data, zooms=(2.0, 2.0, 2.0), tr=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(np.asarray(data, np.float32), np.diag([*zooms, 1.0]))
    if tr is not None:
        img.header.set_zooms((*zooms, tr))
        img.header.set_xyzt_units("mm", "sec")
    nib.save(img, path)
    return path


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    return path


def _no_files(folder):
    return not folder.exists() or not [p for p in folder.rglob("*") if p.is_file()]


def _one_line(message, *names):
    assert "\n" not in message and "Traceback" not in message, message
    for name in names:
        assert str(name) in message, (name, message)


# --------------------------------------------------------------------------------------------- anat
def _anat_cli(t1w, tmp_path, *extra):
    """The anat command as the rule runs it; templates are never reached (inputs are checked first)."""
    return brainfuse_error("anat", "--t1w", t1w, "--out-dir", tmp_path / "deriv", "--subject", "01",
                           "--template-dir", tmp_path / "no-templates", "--resolution", "3", *extra)


def test_truncated_t1w_is_named(tmp_path):
    t1w = _truncate(_nii(tmp_path / "sub-01_T1w.nii.gz", RNG.random((24, 24, 24)) * 100))
    line = _anat_cli(t1w, tmp_path)
    _one_line(line, t1w, "is truncated", "convert it again")
    assert _no_files(tmp_path / "deriv")


def test_anisotropic_t1w_is_refused_before_registration(tmp_path):
    """1 x 1 x 6 mm registered with MNI r -0.05 and flowed on: now refused, the bound and its key named."""
    t1w = _nii(tmp_path / "sub-01_T1w.nii.gz", RNG.random((24, 24, 8)) * 100, zooms=(1.0, 1.0, 6.0))
    line = _anat_cli(t1w, tmp_path)
    _one_line(line, t1w, "1 x 1 x 6 mm", "anisotropy 6.0", "anat.max_voxel_anisotropy = 3")
    assert _no_files(tmp_path / "deriv")
    # the bound is a setting: raised, the same image passes the check (and then stops at the missing templates)
    line = _anat_cli(t1w, tmp_path, "--params", json.dumps({"max_voxel_anisotropy": 8}))
    assert "anisotropy" not in line and "template files missing" in line


# --------------------------------------------------------------------------------------------- func
def _bold(folder, name="sub-01_task-rest_bold", shape=(10, 10, 8, 30), tr=2.0, zooms=(3.0, 3.0, 3.0),
          sidecar=None, data=None):
    data = RNG.random(shape) * 100 + 500 if data is None else data
    path = _nii(folder / f"{name}.nii.gz", data, zooms=zooms, tr=tr if len(shape) == 4 else None)
    text = json.dumps({"RepetitionTime": tr}) if sidecar is None else sidecar
    if text is not False:
        (folder / f"{name}.json").write_text(text)
    return path


def _func_cli(bold, tmp_path):
    return brainfuse_error("func", "--bold", bold, "--t1w", "x", "--mni-xfm", "x", "--template", "x",
                           "--template-mask", "x", "--wm", "x", "--csf", "x", "--atlas", "x", "--atlas-tsv", "x",
                           "--out-dir", tmp_path / "deriv", "--resolution", "3")


def test_millisecond_tr_stops_the_command(tmp_path):
    """Accepted before (ALFF NaN, fALFF all zero); the command's other refusals go the same way (load_bold)."""
    bold = _bold(tmp_path, tr=2000)
    _one_line(_func_cli(bold, tmp_path), bold.with_suffix("").with_suffix(".json"), "RepetitionTime 2000 s",
              "milliseconds? BIDS wants seconds: 2", "0.2-10 s")
    assert _no_files(tmp_path / "deriv")


def _nan(shape):
    data = RNG.random(shape) * 100 + 500
    data[4, 4, 4, 1] = np.nan
    return data


@pytest.mark.parametrize("case, kwargs, where, message", [
    ("truncated", dict(truncate=True), "image", "BOLD series is truncated; copy or convert it again"),
    ("nan", dict(data=_nan((10, 10, 8, 30))), "image", "BOLD series holds 1 NaN/Inf voxel(s)"),
    ("zeros", dict(data=np.zeros((10, 10, 8, 30))), "image", "BOLD series is empty: every voxel is 0"),
    ("json", dict(sidecar='{"RepetitionTime": 2.0,\n "EchoTime": 0.03,}'), "sidecar",
     "BOLD sidecar is not valid JSON (line 2, column"),
    ("no_tr", dict(sidecar='{"EchoTime": 0.03}'), "sidecar",
     "RepetitionTime is missing (the NIfTI header says 2 s;"),
    ("no_sidecar", dict(sidecar=False), "image", "no JSON sidecar"),
    ("negative_tr", dict(sidecar='{"RepetitionTime": -2}'), "sidecar", "outside 0.2-10 s"),
    ("3d", dict(shape=(10, 10, 8)), "image", "expected a 4D BOLD series"),
    ("alff", dict(shape=(10, 10, 8, 20), tr=0.5), "image", "too short for ALFF / fALFF"),
    ("anisotropic", dict(zooms=(2.0, 2.0, 10.0)), "image", "func.max_voxel_anisotropy"),
])
def test_bad_bold_is_refused_before_motion_correction(tmp_path, case, kwargs, where, message):
    """Each raised by load_bold, which runs first (the motion code used to fail on NaN / zeros with a torch
    RuntimeError, and a TR in ms gave NaN ALFF)."""
    truncate = kwargs.pop("truncate", False)
    bold = _bold(tmp_path / case, **kwargs)
    if truncate:
        _truncate(bold)
    with pytest.raises(func.FuncInputError) as e:
        func.load_bold(bold)
    _one_line(str(e.value), bold if where == "image" else bold.with_suffix("").with_suffix(".json"), message)


def test_alff_length_message_says_how_long_a_run_must_be(tmp_path):
    bold = _bold(tmp_path, shape=(10, 10, 8, 20), tr=0.5)
    with pytest.raises(func.FuncInputError, match=r"20 volumes x TR 0.5 s = 10 s .* 0 frequencies in "
                                                  r"func.alff_band 0.01-0.08 Hz, 3 are needed; use a run of at least "
                                                  r"75 volumes \(38 s\)"):
        func.load_bold(bold)
    func.load_bold(_bold(tmp_path / "ok", shape=(10, 10, 8, 75), tr=0.5))     # what it asks for passes


def test_tr_bounds_are_a_setting(tmp_path):
    bold = _bold(tmp_path, tr=12.0)
    with pytest.raises(func.FuncInputError, match="outside 0.2-10 s"):
        func.load_bold(bold)
    assert func.load_bold(bold, cfg={"repetition_time_s": [0.2, 15]})[1] == 12.0


# ---------------------------------------------------------------------------------------------- dwi
def _dwi(folder, data=None, zooms=(2.0, 2.0, 2.0), bvals="0 1000 1000 1000", sidecar=None,
         name="sub-01_dir-AP_dwi"):
    data = RNG.random((8, 8, 6, 4)) * 100 + 100 if data is None else data
    path = _nii(folder / f"{name}.nii.gz", data, zooms=zooms)
    (folder / f"{name}.bval").write_text(bvals + "\n")
    (folder / f"{name}.bvec").write_text("0 1 0 0\n0 0 1 0\n0 0 0 1\n")
    if sidecar is not None:
        (folder / f"{name}.json").write_text(sidecar)
    return path


@pytest.mark.parametrize("case, kwargs, where, message", [
    ("nan", dict(data=_nan((8, 8, 6, 4))), ".nii.gz", "DWI image holds 1 NaN/Inf voxel(s)"),
    ("zeros", dict(data=np.zeros((8, 8, 6, 4))), ".nii.gz", "DWI image is empty"),
    ("json", dict(sidecar='{"PhaseEncodingDirection": "j-"'), ".json", "DWI sidecar is not valid JSON (line 1"),
    ("anisotropic", dict(zooms=(1.0, 1.0, 8.0)), ".nii.gz", "anisotropy 8.0 is above dwi.max_voxel_anisotropy"),
    ("bval_text", dict(bvals="b0 b1000 b1000 b1000"), ".bval", "not a table of numbers"),
])
def test_bad_dwi_run_is_refused(tmp_path, case, kwargs, where, message):
    path = _dwi(tmp_path / case, **kwargs)
    with pytest.raises(dwi.InputError) as e:
        dwi.load_run(path)
    _one_line(str(e.value), str(path).replace(".nii.gz", where), message)


def test_binary_bval_is_refused(tmp_path):
    path = _dwi(tmp_path)
    path.with_suffix("").with_suffix(".bval").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    with pytest.raises(dwi.InputError, match=r"\.bval: not a table of numbers"):
        dwi.load_run(path)


def _dwi_cli(runs, tmp_path):
    dummy = tmp_path / "dummy.nii.gz"
    _nii(dummy, np.ones((4, 4, 4)))
    return brainfuse_error("dwi", "--dwi", *runs, "--subject", "01", "--out-dir", tmp_path / "deriv", "--t1w", dummy,
                           "--transforms", dummy, "--template", dummy, "--resolution", "3")


def test_truncated_dwi_and_b0_only_subject_stop_the_command(tmp_path):
    run = _truncate(_dwi(tmp_path / "a", data=RNG.random((16, 16, 12, 4)) * 100))
    _one_line(_dwi_cli([run], tmp_path), run, "DWI image is truncated")
    # b0s only in every run: refused naming the runs (one b0-only run beside a full one is fine: its b0s help)
    runs = [_dwi(tmp_path / "b", bvals="0 0 0 0", name=f"sub-01_dir-{d}_dwi") for d in ("AP", "PA")]
    line = _dwi_cli(runs, tmp_path)
    _one_line(line, str(runs[0]).replace(".nii.gz", ".bval"), "no diffusion-weighted volume",
              "sub-01_dir-AP_dwi.nii.gz, sub-01_dir-PA_dwi.nii.gz", "fmap/")
    assert _no_files(tmp_path / "deriv")


def test_dwi_qc_flags_clipped_tensors_and_motion():
    import pandas as pd

    table = lambda fd: pd.DataFrame({"framewise_displacement": [0.0, fd, fd]})
    qc = {"VoxelsFitted": 1000, "clipped": np.r_[np.ones(12, bool), np.zeros(988, bool)]}
    flags, metrics, thresholds = dwi.qc_flags({"sub-01_dir-AP": table(1.5)}, qc, dwi.DEFAULTS)
    assert flags == [] and metrics["clipped_fraction"] == 0.012
    qc["clipped"] = np.r_[np.ones(999, bool), np.zeros(1, bool)]       # b-values 10x too low: 99.97 % on Canon
    flags, metrics, _ = dwi.qc_flags({"sub-01_dir-AP": table(1.5), "sub-01_dir-PA": table(9.0)}, qc, dwi.DEFAULTS)
    assert len(flags) == 2 and "99.9% of the fitted voxels" in flags[0] and "dwi.qc_max_clipped_fraction" in flags[0]
    assert flags[1].startswith("sub-01_dir-PA: mean framewise displacement 6.00 mm is above dwi.qc_max_mean_fd_mm 5")


# ------------------------------------------------------------------------------------ QC record, strict
def test_qc_json_paths_follow_the_contract():
    assert layout.qc_path("/d", "01", "1", "anat") == "/d/sub-01/ses-1/anat/sub-01_ses-1_desc-qc_T1w.json"
    assert layout.qc_path("/d", "01", None, "dwi") == "/d/sub-01/dwi/sub-01_desc-qc_dwi.json"
    assert layout.qc_path("/d", "01", None, "func") == "/d/sub-01/func/sub-01_desc-qc_bold.json"


def _motion_qc(folder, run, warnings=(), mean_fd=0.1):
    path = folder / f"sub-01_{run}_desc-confounds_timeseries.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"MeanFramewiseDisplacement": mean_fd, "MaxFramewiseDisplacement": 0.4,
                                "MaxRotation": 0.3, "MaxTranslation": 0.5, "MinReferenceCorrelation": 0.9,
                                "Warnings": list(warnings),
                                "WarningLevels": {"MeanFramewiseDisplacement": 0.5, "MaxFramewiseDisplacement": 5.0,
                                                  "ReferenceCorrelation": 0.5}}))
    return path


def test_func_subject_qc_summarises_runs_and_strict_stops(tmp_path):
    folder = tmp_path / "deriv" / "sub-01" / "func"
    runs = [_motion_qc(folder, "task-rest_run-1"),
            _motion_qc(folder, "task-rest_run-2", ["mean framewise displacement 0.71 mm > 0.5 mm"], mean_fd=0.71)]
    out = layout.qc_path(tmp_path / "deriv", "01", None, "func")
    rec = stageqc.func_subject_qc(runs, out)
    assert json.loads(open(out).read()) == rec and set(rec) == {"qc_pass", "flags", "metrics", "thresholds"}
    assert rec["qc_pass"] is False and rec["flags"] == ["sub-01_task-rest_run-2: mean framewise displacement "
                                                        "0.71 mm > 0.5 mm"]
    assert rec["metrics"]["mean_fd_mm"] == 0.71 and rec["metrics"]["n_runs"] == 2
    assert rec["thresholds"] == {"mean_fd_mm": 0.5, "max_fd_mm": 5.0, "min_reference_correlation": 0.5}
    first = open(out, "rb").read()
    stageqc.func_subject_qc(runs[::-1], out)
    assert open(out, "rb").read() == first           # byte-identical whatever the order the runs come in
    strict_out = tmp_path / "strict" / "sub-01_desc-qc_bold.json"
    line = brainfuse_error("qc", "--motion-qc", *runs, "--output", strict_out, "--strict")
    _one_line(line, "sub-01: func QC failed: sub-01_task-rest_run-2: mean framewise displacement 0.71 mm",
              "strict: false")
    assert not strict_out.exists()


def test_strict_func_run_stops_on_motion_qc_before_writing(tmp_path):
    """A blob that jumps 6 mm in one volume and back: its motion QC warns (max FD above 5 mm); with strict the run
    stops before the BOLD -> T1w step (the other inputs are never read) and writes no file."""
    ijk = np.indices((16, 16, 12)).astype(float)
    blob = lambda x0: np.exp(-((ijk[0] - x0) ** 2 + (ijk[1] - 8) ** 2 + (ijk[2] - 6) ** 2) / 12)
    data = np.stack([blob(9.0 if k == 10 else 7.0) * 1000 + 100 for k in range(20)], -1)
    data += np.random.default_rng(0).normal(0, 1, data.shape)
    bold = _bold(tmp_path / "bids" / "sub-01" / "func", data=data, shape=data.shape)
    with pytest.raises(stageqc.QCError) as e:
        func.run(bold, "x", "x", "x", ["x"], "x", "x", tmp_path / "deriv", 3, strict=True, log=lambda m: None)
    _one_line(str(e.value), bold, "sub-01_task-rest: func (motion) QC failed: ", "framewise displacement",
              "strict: false")
    assert _no_files(tmp_path / "deriv")


# A real anat run on the tiny phantom with few iterations (~15 s): the QC is computed from the registration.
FAST = {"syn_iterations": [20, 0, 0], "skullstrip_iterations": [20, 0, 0]}


@pytest.fixture(scope="module")
def templates_3mm(tmp_path_factory):
    from brainfuse import templates

    root = tmp_path_factory.mktemp("resources")
    templates.build(3, root)
    return root / f"tpl-{TEMPLATE}"


def _anat_run(tiny_demo, templates_3mm, deriv, params, *extra, expect_error=False):
    root, _ = tiny_demo
    argv = ("anat", "--t1w", bids_path(root / "bids", "002", "anat", "T1w"), "--out-dir", deriv, "--subject", "002",
            "--template-dir", templates_3mm, "--resolution", "3", "--params", json.dumps(params), *extra)
    return brainfuse_error(*argv) if expect_error else brainfuse_cli(*argv)


@pytest.mark.slow
def test_anat_qc_below_threshold_stops_a_strict_run_and_leaves_nothing(tiny_demo, templates_3mm, tmp_path):
    """An impossible threshold (MNI r >= 0.99) with --strict: one line naming the subject, the metric, its value
    and the threshold; no output under DERIV (the check runs before anything is renamed into place)."""
    line = _anat_run(tiny_demo, templates_3mm, tmp_path / "deriv", {**FAST, "min_mni_correlation": 0.99}, "--strict",
                     expect_error=True)
    _one_line(line, "sub-002_T1w.nii.gz: sub-002: anat QC failed: MNI correlation 0.", "is below "
              "anat.min_mni_correlation 0.99", "strict: false")
    assert _no_files(tmp_path / "deriv")


@pytest.mark.slow
def test_anat_qc_below_threshold_warns_and_flags(tiny_demo, templates_3mm, tmp_path):
    """The same without --strict: the subject is carried on, a WARNING line in the job log, qc_pass false."""
    out = _anat_run(tiny_demo, templates_3mm, tmp_path, {**FAST, "min_mni_correlation": 0.99})
    warning = [line for line in out.splitlines() if line.startswith("WARNING: sub-002: anat QC: MNI correlation")]
    assert len(warning) == 1 and "below anat.min_mni_correlation 0.99" in warning[0]
    assert "sub-002_desc-reg_T1w.png" in warning[0]            # the figure to look at (written: not strict)
    rec = json.loads(open(layout.qc_path(tmp_path, "002", None, "anat")).read())
    assert rec["qc_pass"] is False and rec["flags"] == [warning[0].split("anat QC: ", 1)[1]]
    assert 0.5 < rec["metrics"]["mni_correlation"] < 0.99 and rec["thresholds"]["min_mni_correlation"] == 0.99
    assert rec["metrics"]["mni_mask_dice"] > 0.9 and 800 < rec["metrics"]["mask_volume_ml"] < 2800
