"""The phantom's ground truth is consistent with its images, and the dataset is valid BIDS."""
import json
from pathlib import Path

import ants
import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from scipy import ndimage

from brainfuse.phantom import bayes
from brainfuse.phantom import generator as demo
from brainfuse.layout import TEMPLATE, bids_path


def _load(path):
    img = nib.load(str(path))
    return img.get_fdata(), img.affine


def _move(series, H, affine):
    """Independent resampler (scipy.ndimage.affine_transform): out_k(x) = series_k(H_k^-1 x)."""
    out = np.empty_like(series)
    for k, h in enumerate(H):
        vox = np.linalg.inv(affine) @ np.linalg.inv(h) @ affine
        out[..., k] = ndimage.affine_transform(series[..., k], vox[:3, :3], vox[:3, 3], order=1, mode="constant")
    return out


def test_plan_is_deterministic_balanced_and_honours_missingness():
    cfg = demo.demo_config({"n_subjects": 300, "missing": {"dwi": 0.3, "bold": 0.1}})
    a, b = demo.plan(cfg), demo.plan(cfg)
    assert [s.__dict__ for s in a] == [s.__dict__ for s in b]
    counts = pd.Series([s.diagnosis for s in a]).value_counts()
    assert set(counts) == {100}
    assert abs(np.mean([not s.has_dwi for s in a]) - 0.3) < 0.07
    assert abs(np.mean([not s.has_bold for s in a]) - 0.1) < 0.05
    assert all(s.has_dwi and s.has_bold for s in a if s.dicom)


def test_bayes_accuracy_tracks_effect_strength():
    strong = demo.bayes_accuracy(demo.demo_config({}), 50_000)
    none = demo.bayes_accuracy(demo.demo_config({"effects": {k: 0.0 for k in
                                                              ("atrophy", "fa", "connectivity", "clinical", "serum")}}), 50_000)
    assert 0.8 < strong["bayes_accuracy"] <= strong["bayes_accuracy_all_modalities"] < 1.0
    assert abs(none["bayes_accuracy"] - 1 / 3) < 0.02


def test_cohort_bayes_rule_agrees_with_the_generator_and_scatters_on_small_cohorts():
    """The Bayes rule applied subject by subject (truth/bayes.json's cohort values, evaluate's reference row)
    converges to the Monte-Carlo Bayes accuracy on a large cohort, and on 36-subject cohorts it scatters by
    several points: the realised ceiling, not the expectation, is what a model of one cohort can reach."""
    cfg = demo.demo_config({})
    expected = demo.bayes_accuracy(cfg, 50_000)["bayes_accuracy"]
    large = demo.cohort_bayes(cfg, demo.plan({**cfg, "n_subjects": 6000}))
    assert abs(large["cohort_bayes_accuracy"] - expected) < 0.02
    small = [demo.cohort_bayes(cfg, demo.plan({**cfg, "seed": seed}))["cohort_bayes_balanced_accuracy"]
             for seed in range(40)]
    assert np.std(small) > 0.03 and min(small) < expected - 0.05
    # evaluate's reference row gives the same balanced accuracy from bayes.json's per-subject records
    from brainfuse import evaluate as bf_eval

    subjects = demo.plan(cfg)
    record = {"config": cfg, "latent_means": demo.bayes_accuracy(cfg, 1000)["latent_means"], **bayes.truth_mappings(),
              "subjects": [{"label": s.label, "scores": s.scores, "has_dwi": s.has_dwi,
                                           "has_bold": s.has_bold} for s in subjects]}
    keys = [(f"sub-{s.label}", "") for s in subjects]
    y = np.array([cfg["classes"].index(s.diagnosis) for s in subjects])
    idx, prob = bf_eval.bayes_reference(record, keys, y, np.ones(len(y), bool), cfg["classes"])
    assert bf_eval.classification_metrics(y[idx], prob)["balanced_accuracy"] == pytest.approx(
        demo.cohort_bayes(cfg, subjects)["cohort_bayes_balanced_accuracy"])


def test_t1w_is_the_template_through_the_stored_transforms(tiny_demo):
    root, cfg = tiny_demo
    sub = "001"
    tdir = root / "truth" / f"sub-{sub}" / "anat"
    spec = json.loads((tdir / f"sub-{sub}_from-T1w_to-{TEMPLATE}_xfm.json").read_text())
    head = demo.head_model(2)
    nib.save(nib.Nifti1Image(head.t1, head.affine), str(root / "head.nii.gz"))
    moving = ants.image_read(str(root / "head.nii.gz"))
    t1_path = bids_path(root / "bids", sub, "anat", "T1w")
    fixed = ants.image_read(t1_path)
    warped = ants.apply_transforms(fixed, moving, [str(tdir / f) for f in spec["ants_transformlist"]],
                                   whichtoinvert=spec["ants_whichtoinvert"], interpolator="linear").numpy() * 1000
    data, _ = _load(t1_path)
    clean, _ = _load(tdir / f"sub-{sub}_desc-noisefree_T1w.nii.gz")
    bias, _ = _load(tdir / f"sub-{sub}_desc-bias_T1w.nii.gz")
    head_voxels = clean > 100
    assert np.abs(warped - clean)[head_voxels].max() < 0.5          # ANTs reproduces the truth exactly
    residual = (data - warped * bias)[head_voxels]
    sigma = cfg["noise"]["t1"] * 1000
    assert abs(residual.mean()) < 0.1 * sigma
    assert 0.85 * sigma < residual.std() < 1.15 * sigma             # within the noise, and only noise


def test_dwi_is_the_stored_tensors_under_the_stored_motion(tiny_demo):
    root, cfg = tiny_demo
    sub = "002"
    tdir = root / "truth" / f"sub-{sub}" / "dwi"
    path = bids_path(root / "bids", sub, "dwi", "dwi", dir="AP")
    data, affine = _load(path)
    bvals = np.loadtxt(path.replace(".nii.gz", ".bval"))
    rotated = np.loadtxt(tdir / f"sub-{sub}_dir-AP_desc-truthrotated_dwi.bvec")      # voxel frame, (3, N)
    lower, _ = _load(tdir / f"sub-{sub}_dir-AP_desc-truth_tensor.nii.gz")
    s0, _ = _load(tdir / f"sub-{sub}_dir-AP_desc-truth_S0.nii.gz")
    H = np.load(tdir / f"sub-{sub}_dir-AP_desc-truth_xfm.npy")
    xx, xy, yy, xz, yz, zz = np.moveaxis(lower, -1, 0)
    g = rotated
    adc = (xx[..., None] * g[0] ** 2 + yy[..., None] * g[1] ** 2 + zz[..., None] * g[2] ** 2
           + 2 * (xy[..., None] * g[0] * g[1] + xz[..., None] * g[0] * g[2] + yz[..., None] * g[1] * g[2]))
    motion_free = s0[..., None] * np.exp(-bvals * adc)
    predicted = _move(motion_free, H, affine)
    sigma = cfg["noise"]["dwi"] * 1000
    inside = (predicted > 20 * sigma) & (ndimage.binary_erosion(s0 > 300, iterations=2)[..., None])
    residual = (data - predicted)[inside]
    assert abs(residual.mean()) < 0.15 * sigma
    assert residual.std() < 1.3 * sigma
    motion = pd.read_csv(tdir / f"sub-{sub}_dir-AP_desc-truth_motion.tsv", sep="\t")
    assert np.abs(motion[["trans_x", "trans_y", "trans_z"]].to_numpy()).max() > 0.3   # motion is really there
    # The planted effect is in the tensors: FA in pure white matter of the left CST is that of the
    # eigenvalues the fa score sets.
    subject = {s.label: s for s in demo.plan(cfg)}[sub]
    phantom = demo.SubjectPhantom(cfg, subject)
    z = phantom.anatomy.to_template(demo.grid_points(s0.shape, affine))
    pure_wm = phantom.head.sample(phantom.head.tissues["wm"], z) > 0.97
    tract = (demo.tract_mask(z) & pure_wm).reshape(s0.shape)
    delta = 0.12e-3 * subject.scores["fa"]
    l1, l2 = 1.7e-3 - delta, 0.3e-3 + delta / 2
    expected = (l1 - l2) / np.sqrt(l1 ** 2 + 2 * l2 ** 2)
    assert tract.sum() > 20
    assert abs(np.median(_fa(lower)[tract]) - expected) < 0.02


def _fa(lower):
    xx, xy, yy, xz, yz, zz = np.moveaxis(lower, -1, 0)
    D = np.stack([np.stack([xx, xy, xz], -1), np.stack([xy, yy, yz], -1), np.stack([xz, yz, zz], -1)], -2)
    ev = np.linalg.eigvalsh(D)
    md = ev.mean(-1, keepdims=True)
    return np.sqrt(1.5 * ((ev - md) ** 2).sum(-1) / np.maximum((ev ** 2).sum(-1), 1e-12))


def test_bold_is_the_stored_networks_under_the_stored_motion(tiny_demo):
    root, cfg = tiny_demo
    sub = "003"
    subject = {s.label: s for s in demo.plan(cfg)}[sub]
    tdir = root / "truth" / f"sub-{sub}" / "func"
    path = bids_path(root / "bids", sub, "func", "bold", task="rest")
    data, affine = _load(path)
    tcs = pd.read_csv(tdir / f"sub-{sub}_task-rest_desc-truth_timeseries.tsv", sep="\t")
    H = np.load(tdir / f"sub-{sub}_task-rest_desc-truth_xfm.npy")
    truth = json.loads((tdir / f"sub-{sub}_task-rest_desc-truth_networks.json").read_text())
    # The stored coupling is the correlation of the stored network courses, and follows the score.
    r = np.corrcoef(tcs["somatomotor"], tcs["striatal"])[0, 1]
    assert abs(r - truth["coupling_somatomotor_striatal"]) < 1e-6
    assert abs(r - np.tanh(0.9 - 0.45 * subject.scores["connectivity"])) < 1e-6
    phantom = demo.SubjectPhantom(cfg, subject)
    drift = np.linspace(-0.01, 0.01, len(H))
    motion_free = phantom.bold_motion_free(data.shape[:3], affine, tcs.to_numpy(), drift)
    residual = (data - _move(motion_free, H, affine))[motion_free.mean(-1) > 200]
    sigma = cfg["noise"]["bold"] * 1000
    assert abs(residual.mean()) < 0.1 * sigma
    assert residual.std() < 1.2 * sigma
    assert nib.load(path).header.get_zooms()[3] == cfg["repetition_time"]
    timing = json.loads(Path(str(path).replace(".nii.gz", ".json")).read_text())["SliceTiming"]
    assert len(timing) == data.shape[2] and max(timing) < cfg["repetition_time"]


def test_atrophy_truth_follows_the_score(tiny_demo):
    """The stored log-Jacobian is the subject's whole nonlinear map (random warp + atrophy); without the atrophy
    (same warp) it changes at the putamen centre by the planted -3 log(1 + a) (a = ATROPHY_PER_SCORE x score)."""
    root, cfg = tiny_demo
    head = demo.head_model(2)
    pts = demo.grid_points(head.t1.shape, head.affine)
    near = (np.linalg.norm(pts - demo.PUTAMEN[0], axis=1) < 3).reshape(head.t1.shape)
    for s in demo.plan(cfg):
        logjac, _ = _load(root / "truth" / f"sub-{s.label}" / "anat" /
                          f"sub-{s.label}_space-{TEMPLATE}_desc-truth_logjacobian.nii.gz")
        anatomy = demo.SubjectPhantom(cfg, s, head).anatomy
        np.testing.assert_allclose(logjac, demo.log_jacobian_truth(anatomy, head.t1.shape, head.affine), atol=1e-5)
        anatomy.atrophy = 0.0
        warp_only = demo.log_jacobian_truth(anatomy, head.t1.shape, head.affine)
        expected = -3 * np.log1p(demo.ATROPHY_PER_SCORE * s.scores["atrophy"])    # det at the centre
        # within 3 mm of the centre the bump is flat to ~4 % (sigma 10 mm); the warp's own Jacobian composes with it
        assert abs((logjac - warp_only)[near].mean() - expected) < 0.1 * abs(expected) + 0.005, s.label


def test_dataset_is_valid_bids(tiny_demo):
    from bids import BIDSLayout

    root, cfg = tiny_demo
    layout = BIDSLayout(str(root / "bids"), validate=True)
    assert sorted(layout.get_subjects()) == ["001", "002", "003"]
    assert len(layout.get(suffix="T1w", extension=".nii.gz")) == 3
    assert len(layout.get(suffix="dwi", extension=".nii.gz", direction="AP")) == 3
    bold = layout.get(suffix="bold", task="rest", extension=".nii.gz")
    assert len(bold) == 3 and bold[0].get_metadata()["RepetitionTime"] == cfg["repetition_time"]
    participants = pd.read_csv(root / "bids" / "participants.tsv", sep="\t")
    assert list(participants.participant_id) == ["sub-001", "sub-002", "sub-003"]
    assert set(participants.diagnosis) == set(cfg["classes"])
    assert participants[["updrs_iii", "rbdsq", "nfl_pg_ml", "age"]].notna().all().all()


def test_dicom_export_carries_fake_identity(tiny_demo):
    import pydicom

    root, cfg = tiny_demo
    exported = [s for s in demo.plan(cfg) if s.dicom]
    assert len(exported) == 1
    label = exported[0].label
    files = sorted((root / "dicom" / label).rglob("*.dcm"))
    assert files, "no DICOM files written"
    identity = json.loads((root / "truth" / f"sub-{label}" / f"sub-{label}_dicom_identity.json").read_text())
    ds = pydicom.dcmread(files[0], stop_before_pixels=True)
    assert str(ds.PatientName) == identity["PatientName"] and ds.PatientID == identity["PatientID"]


def test_cli_refuses_unknown_subject(tmp_path, capsys):
    with pytest.raises(SystemExit):
        demo.cli(["--out-dir", str(tmp_path), "--params", '{"n_subjects": 3}', "--subject", "999", "--what", "subject"])
    assert "999" in capsys.readouterr().err


def test_the_demo_needs_fusion():
    """Each modality informs a different contrast (issue 20): the Bayes rule of any one modality stays far below the
    rule of all of them, and truth/bayes.json holds the grid of every modality subset a model can be read against."""
    b = demo.bayes_accuracy(demo.demo_config({}), 50_000)
    grid = b["bayes_grid"]
    assert len(grid) == 2 ** len(bayes.GRID_MODALITIES) - 1
    every = grid["+".join(bayes.GRID_MODALITIES)]
    assert abs(every - b["bayes_accuracy"]) < 0.02
    singles = {m: grid[m] for m in bayes.GRID_MODALITIES}
    assert max(singles.values()) < every - 0.2, singles
    assert grid["aMRI+DTI"] > max(grid["aMRI"], grid["DTI"]) + 0.15       # the two image contrasts complement
    assert grid["clinical"] < every - 0.25                                   # the clinical scores only partly
    assert abs(grid["fMRI"] - 1 / 3) < 0.01                                  # ALFF/ReHo carry no score
