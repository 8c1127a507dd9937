"""func stage on phantoms (known motion, registration, planted connectivity change) and on real BOLD.

Without the anat stage's outputs, the template -> T1w transform is the phantom's true affine (inverted,
written as an ITK .mat): the phantom's small nonlinear warp (about a millimetre) is left out, which the
tolerances allow for. Template maps are built here from nilearn's packaged template, as the templates
stage does.
"""
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch

from brainfuse import atlas, func, motion
from brainfuse.phantom import generator as demo
from brainfuse.layout import TEMPLATE

torch.set_num_threads(1)
RES = 3
F_LPS = np.diag([-1.0, -1.0, 1.0])


@pytest.fixture(scope="module")
def tpl(tmp_path_factory):
    """Template T1w, brain mask, GM/WM/CSF maps at 3 mm and the atlas built from them."""
    from nilearn import datasets, image

    d = tmp_path_factory.mktemp("tpl")
    t1 = datasets.load_mni152_template(resolution=RES)
    on = lambda img: image.resample_to_img(img, t1, interpolation="continuous", force_resample=True,
                                           copy_header=True).get_fdata()
    mask = datasets.load_mni152_brain_mask(resolution=RES).get_fdata() > 0.5
    gm, wm = on(datasets.load_mni152_gm_template(resolution=2)) * mask, on(datasets.load_mni152_wm_template(resolution=2)) * mask
    csf = np.clip(1 - gm - wm, 0, 1) * mask
    paths = {}
    for name, data in (("T1w", t1.get_fdata()), ("mask", mask), ("GM", gm), ("WM", wm), ("CSF", csf)):
        paths[name] = str(d / f"{name}.nii.gz")
        nib.save(nib.Nifti1Image(np.asarray(data, np.float32), t1.affine), paths[name])
    paths["atlas"], paths["atlas_tsv"] = atlas.build(paths["GM"], d / "atlas.nii.gz", d / "atlas.tsv", paths["mask"])
    return paths


def _inverse_affine_mat(A, path):
    """ITK .mat of x = A^-1 y (template point y -> subject point x), A being the phantom's RAS affine."""
    import ants

    Ainv = np.linalg.inv(A)
    tx = ants.create_ants_transform(transform_type="AffineTransform", dimension=3, matrix=F_LPS @ Ainv[:3, :3] @ F_LPS,
                                    translation=F_LPS @ Ainv[:3, 3], center=(0.0, 0.0, 0.0))
    ants.write_transform(tx, str(path))
    return str(path)


def _run_tiny(tiny_demo, tpl, sub, deriv, **kw):
    root, _ = tiny_demo
    truth = json.loads((root / "truth" / f"sub-{sub}" / "anat" / f"sub-{sub}_from-T1w_to-{TEMPLATE}_xfm.json").read_text())
    inv = _inverse_affine_mat(np.array(truth["affine_ras"]), Path(deriv) / f"inv-{sub}.mat")
    return func.run(root / "bids" / f"sub-{sub}" / "func" / f"sub-{sub}_task-rest_bold.nii.gz",
                    root / "bids" / f"sub-{sub}" / "anat" / f"sub-{sub}_T1w.nii.gz", tpl["T1w"], tpl["mask"], [inv],
                    tpl["atlas"], tpl["atlas_tsv"], deriv, RES, wm=tpl["WM"], csf=tpl["CSF"],
                    t1w_mask=root / "truth" / f"sub-{sub}" / "anat" / f"sub-{sub}_desc-brain_mask.nii.gz", **kw)


@pytest.fixture(scope="module")
def tiny_run(tiny_demo, tpl, tmp_path_factory):
    deriv = tmp_path_factory.mktemp("deriv")
    return _run_tiny(tiny_demo, tpl, "001", deriv), tiny_demo[0], deriv


@pytest.mark.slow
def test_outputs_follow_the_stage_contract(tiny_run, tpl):
    out, _, deriv = tiny_run
    stem = f"{deriv}/sub-001/func/sub-001_task-rest"
    mni = f"space-{TEMPLATE}_res-{RES}"
    expected = [f"{stem}_desc-confounds_timeseries.tsv", f"{stem}_desc-confounds_timeseries.json",
                f"{stem}_from-bold_to-T1w_mode-image_xfm.mat",
                f"{stem}_{mni}_desc-preproc_bold.nii.gz", f"{stem}_{mni}_atlas-brainfuse_timeseries.tsv",
                f"{stem}_{mni}_atlas-brainfuse_desc-fisherz_relmat.tsv",
                f"{deriv}/sub-001/figures/sub-001_task-rest_desc-motion_bold.png",
                f"{deriv}/sub-001/figures/sub-001_task-rest_desc-carpet_bold.png"] + \
               [f"{stem}_{mni}_stat-{s}_boldmap.nii.gz" for s in ("alff", "falff", "reho")]
    for p in expected:
        assert os.path.getsize(p) > 0, p
    assert not list(Path(deriv).rglob("*.part*")) and not list(Path(deriv).rglob(".func-*"))
    tpl_img = nib.load(tpl["T1w"])
    pre = nib.load(out["preproc"])
    assert pre.shape == (*tpl_img.shape, 30) and np.allclose(pre.affine, tpl_img.affine)
    assert pre.header.get_zooms()[3] == pytest.approx(2.0)
    for s in ("alff", "falff", "reho"):
        m = nib.load(out[s]).get_fdata()
        brain = nib.load(tpl["mask"]).get_fdata() > 0
        assert np.isfinite(m).all() and (m[brain] > 0).mean() > 0.95, s
    falff = nib.load(out["falff"]).get_fdata()[brain]
    reho = nib.load(out["reho"]).get_fdata()[brain]
    assert falff.max() <= 1 and reho.max() <= 1
    names = list(pd.read_csv(tpl["atlas_tsv"], sep="\t")["name"])
    z = pd.read_csv(out["relmat"], sep="\t")
    assert list(z.columns) == names and z.shape == (len(names), len(names))
    zz = z.to_numpy()
    assert np.allclose(np.diag(zz), 0) and np.allclose(zz, zz.T, equal_nan=True)


def test_confounds_have_fmriprep_columns_and_true_motion(tiny_run):
    out, root, _ = tiny_run
    conf = pd.read_csv(out["confounds"], sep="\t", na_values="n/a")
    base = ["trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z"]
    motion24 = [f"{b}{s}" for b in base for s in ("", "_derivative1", "_power2", "_derivative1_power2")]
    for c in motion24 + ["framewise_displacement", "dvars", "std_dvars", "global_signal", "white_matter", "csf"]:
        assert c in conf.columns, c
    assert len(conf) == 30
    assert conf.loc[0, ["framewise_displacement", "dvars", "std_dvars", "trans_x_derivative1"]].isna().all()
    assert conf.iloc[1:].notna().all().all()
    # motion in mm/rad about the FOV centre: the phantom's truth, relative to volume 0
    H = np.load(root / "truth" / "sub-001" / "func" / "sub-001_task-rest_desc-truth_xfm.npy")
    img = nib.load(root / "bids" / "sub-001" / "func" / "sub-001_task-rest_bold.nii.gz")
    c = motion.fov_center(img.shape, img.affine)
    T = motion.matrix_from_params(conf[base].to_numpy(), c)
    rel = T @ np.linalg.inv(T[0])
    ref = img.get_fdata()[..., 0]
    pts = demo.apply_affine(img.affine, np.argwhere(ref > 0.25 * np.percentile(ref, 98)).astype(float))
    assert motion.mean_displacement_error(H, rel, pts) <= 0.1
    # FD is nipype's on the written parameters
    np.testing.assert_allclose(conf["framewise_displacement"][1:], motion.framewise_displacement(conf[base].to_numpy())[1:],
                               rtol=1e-4, atol=1e-5)
    # the motion QC sidecar summarises the same table
    qc = json.loads(Path(out["motion_qc"]).read_text())
    fd = conf["framewise_displacement"].to_numpy()
    assert qc["MaxFramewiseDisplacement"] == pytest.approx(np.nanmax(fd), rel=1e-4)
    assert qc["MeanFramewiseDisplacement"] == pytest.approx(np.nanmean(fd), rel=1e-4)
    assert qc["MaxRotation"] == pytest.approx(np.degrees(conf[base[3:]].abs().to_numpy().max()), rel=1e-4)
    assert qc["MaxTranslation"] == pytest.approx(conf[base[:3]].abs().to_numpy().max(), rel=1e-4)
    assert qc["MinReferenceCorrelation"] > 0.95 and qc["Warnings"] == [] and 0 < qc["MaxFramewiseDisplacement"] < 2


def test_dvars_equal_nipype(tiny_demo, tmp_path):
    root, _ = tiny_demo
    img = nib.load(root / "bids" / "sub-002" / "func" / "sub-002_task-rest_bold.nii.gz")
    data = img.get_fdata(dtype=np.float32)
    mask = func._bold_mask(data.mean(3))
    ref = func.nipype_dvars(img, nib.Nifti1Image(mask.astype(np.uint8), img.affine), tmp_path)
    ours = func.dvars(data, mask)
    for a, b in zip(ours, ref):
        np.testing.assert_allclose(a[1:], b[1:], rtol=1e-4)
        assert np.isnan(a[0]) and np.isnan(b[0])


def test_nipype_confounds_take_relative_work_dirs(tmp_path, monkeypatch):
    """The README's run passes relative paths (output_dir: results); nipype's run(cwd=...) changes directory, so
    a relative input path used to be looked up inside the work folder (FileNotFoundError in every func job)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "wd").mkdir()
    params = np.zeros((5, 6))
    params[:, 0] = [0, 0.5, 0.5, 1.5, 1.5]          # trans_x steps of 0.5 and 1 mm
    fd = func.nipype_fd(params, "wd")
    np.testing.assert_allclose(fd[1:], [0.5, 0, 1.0, 0], atol=1e-6)
    img = nib.Nifti1Image(np.random.default_rng(0).normal(100, 1, (6, 6, 6, 8)).astype(np.float32), np.eye(4))
    d, s = func.nipype_dvars(img, nib.Nifti1Image(np.ones((6, 6, 6), np.uint8), np.eye(4)), "wd")
    assert len(d) == 8 and np.isfinite(d[1:]).all()


def test_bold_to_t1w_recovers_the_shared_frame(tiny_run):
    """The phantom's BOLD and T1w share the subject's world frame: the registration is the identity."""
    import ants

    out, root, _ = tiny_run
    tx = ants.read_transform(out["xfm"])
    M = np.eye(4)
    M[:3, :3] = np.reshape(tx.parameters[:9], (3, 3))
    M[:3, 3] = tx.parameters[9:] + tx.fixed_parameters - M[:3, :3] @ tx.fixed_parameters
    img = nib.load(root / "bids" / "sub-001" / "func" / "sub-001_task-rest_bold.nii.gz")
    ref = img.get_fdata()[..., 0]
    pts = demo.apply_affine(img.affine, np.argwhere(ref > 0.25 * np.percentile(ref, 98)).astype(float)) @ F_LPS
    err = np.linalg.norm(pts @ M[:3, :3].T + M[:3, 3] - pts, axis=1).mean()
    assert err < 1.5, f"BOLD -> T1w mean displacement {err:.2f} mm (BOLD voxels are 4 mm)"


def test_mni_coordinates_compose_constructed_transforms(tmp_path, tpl):
    """Template points pushed through [affine A, affine B] land at B(A(y)) in the BOLD frame (ANTs order:
    the first transform of the list is applied first to a template point)."""
    import ants

    bold = nib.Nifti1Image(np.zeros((40, 48, 40), np.float32), np.diag([-4.0, 4.0, 4.0, 1.0]) @ np.c_[np.eye(4)[:, :3], [-19.5, -23.5, -19.5, 1]])
    rng = np.random.default_rng(3)
    mats = []
    for i in range(2):
        R = motion.matrix_from_params(np.r_[rng.normal(0, 3, 3), rng.normal(0, 0.05, 3)], np.zeros(3))[0]
        tx = ants.create_ants_transform(transform_type="AffineTransform", dimension=3, matrix=F_LPS @ R[:3, :3] @ F_LPS,
                                        translation=F_LPS @ R[:3, 3], center=(0.0, 0.0, 0.0))
        ants.write_transform(tx, str(tmp_path / f"m{i}.mat"))
        mats.append(R)
    tpl_img = nib.load(tpl["T1w"])
    pts, inside = func.mni_coordinates(tpl_img, [str(tmp_path / "m0.mat"), str(tmp_path / "m1.mat")], bold, tmp_path)
    y = np.indices(tpl_img.shape).reshape(3, -1).T @ tpl_img.affine[:3, :3].T + tpl_img.affine[:3, 3]
    expect = (np.c_[y, np.ones(len(y))] @ (mats[1] @ mats[0]).T)[:, :3]
    mask = (nib.load(tpl["mask"]).get_fdata() > 0).reshape(-1)
    vox = (pts - bold.affine[:3, 3]) @ np.linalg.inv(bold.affine[:3, :3]).T
    brain = mask & inside & (vox >= 0).all(1) & (vox <= np.array(bold.shape) - 1).all(1)
    assert brain.sum() > 0.9 * mask.sum()
    assert np.abs(pts[brain] - expect[brain]).max() < 0.01


def _phantom_run(tmp, tpl, label, index, score, n_volumes=80):
    """A BOLD-only phantom subject with a chosen connectivity score, processed with the true transforms."""
    import ants

    cfg = demo.demo_config({"n_bold_volumes": n_volumes})
    plan = demo.SubjectPlan(label=label, index=index, diagnosis="control", has_dwi=False, has_bold=True, age=60.0,
                            sex="F", site="A", scores={**{k: 0.0 for k in demo.LATENT_MEANS}, "connectivity": score})
    ph = demo.SubjectPhantom(cfg, plan)
    data, aff, _, _, _, coupling = ph.bold()
    bold = Path(tmp) / "bids" / f"sub-{label}" / "func" / f"sub-{label}_task-rest_bold.nii.gz"
    bold.parent.mkdir(parents=True, exist_ok=True)
    demo.save_nifti(data, aff, bold, np.float32)
    bold.with_name(bold.name.replace(".nii.gz", ".json")).write_text(json.dumps({"RepetitionTime": cfg["repetition_time"]}))
    ident = Path(tmp) / "identity.mat"
    ants.write_transform(ants.create_ants_transform(transform_type="AffineTransform", dimension=3), str(ident))
    inv = _inverse_affine_mat(ph.anatomy.A, Path(tmp) / f"inv-{label}.mat")
    # BOLD and T1w share the phantom's world frame: the bold->T1w step is the identity (tested above)
    out = func.run(bold, None, tpl["T1w"], tpl["mask"], [inv], tpl["atlas"], tpl["atlas_tsv"], Path(tmp) / "deriv", RES,
                   wm=tpl["WM"], csf=tpl["CSF"], bold_to_t1w_mat=str(ident))
    return out, coupling


def _parcel_at(tpl, points):
    lab = nib.load(tpl["atlas"])
    L = np.asarray(lab.dataobj)
    table = pd.read_csv(tpl["atlas_tsv"], sep="\t").set_index("index")
    idx = np.argwhere(L > 0)
    xyz = idx @ lab.affine[:3, :3].T + lab.affine[:3, 3]
    return [table.loc[L[tuple(idx[np.argmin(((xyz - p) ** 2).sum(1))])], "name"] for p in np.asarray(points, float)]


@pytest.mark.slow
def test_planted_connectivity_change_is_recovered(tpl, tmp_path):
    """Somatomotor-striatal coupling tanh(0.9 - 0.45 s) across subjects with spread scores is recovered, in
    order and in size, from the default pipeline's Fisher-z matrices (parcels found at the network nodes)."""
    sm = _parcel_at(tpl, demo.NETWORKS["somatomotor"])
    st = _parcel_at(tpl, demo.NETWORKS["striatal"])
    truth, recovered, within = [], [], []
    for i, score in enumerate((-1.0, 1.5, 3.5)):
        out, coupling = _phantom_run(tmp_path, tpl, f"9{i}", 900 + i, score)
        z = pd.read_csv(out["relmat"], sep="\t")
        z.index = z.columns
        truth.append(coupling)
        recovered.append(float(np.tanh(z.loc[sm, st].to_numpy()).mean()))
        within.append(float(np.tanh(z.loc[sm[0], sm[1]])))
    assert np.argsort(recovered).tolist() == np.argsort(truth).tolist(), (truth, recovered)
    assert np.corrcoef(truth, recovered)[0, 1] > 0.95, (truth, recovered)
    assert np.abs(np.array(recovered) - truth).max() < 0.35, (truth, recovered)
    assert min(within) > 0.7        # the two somatomotor nodes share one time course


@pytest.mark.slow
def test_scrubbing_drops_high_motion_volumes(tiny_demo, tpl, tmp_path):
    out = _run_tiny(tiny_demo, tpl, "003", tmp_path, cfg={"fd_threshold": 0.3, "min_volumes": 10, "acompcor": True})
    conf = pd.read_csv(out["confounds"], sep="\t", na_values="n/a")
    acc = [f"a_comp_cor_{i:02d}" for i in range(5)]
    assert all(c in conf.columns for c in acc) and np.isfinite(conf[acc].to_numpy()).all()
    n_keep = int((conf["framewise_displacement"].fillna(0) <= 0.3).sum())
    assert 10 <= n_keep < 30
    assert len(pd.read_csv(out["timeseries"], sep="\t")) == n_keep
    assert out["summary"]["n_scrubbed"] == 30 - n_keep
    # fd_threshold is also the QC's max-FD warning level
    qc = json.loads(Path(out["motion_qc"]).read_text())
    assert qc["WarningLevels"]["MaxFramewiseDisplacement"] == 0.3
    assert [w for w in qc["Warnings"] if w.startswith("max framewise displacement")], qc["Warnings"]


def test_bad_inputs_name_the_file(tmp_path, tiny_demo):
    root, _ = tiny_demo
    src = root / "bids" / "sub-001" / "func" / "sub-001_task-rest_bold.nii.gz"
    img = nib.load(src)
    d = tmp_path / "sub-01" / "func"
    d.mkdir(parents=True)
    three_d = d / "sub-01_task-rest_bold.nii.gz"
    nib.save(nib.Nifti1Image(img.get_fdata()[..., 0], img.affine), three_d)
    three_d.with_suffix("").with_suffix(".json").write_text('{"RepetitionTime": 2}')
    with pytest.raises(func.FuncInputError, match=f"{three_d}.*4D"):
        func.load_bold(three_d)
    short = d / "sub-01_task-short_bold.nii.gz"
    nib.save(nib.Nifti1Image(img.get_fdata()[..., :5], img.affine), short)
    short.with_suffix("").with_suffix(".json").write_text('{"RepetitionTime": 2}')
    with pytest.raises(func.FuncInputError, match=f"{short}.*only 5 volumes"):
        func.load_bold(short)
    no_tr = d / "sub-01_task-notr_bold.nii.gz"
    shutil.copy(src, no_tr)
    with pytest.raises(func.FuncInputError, match="no JSON sidecar.*RepetitionTime"):
        func.load_bold(no_tr)
    no_tr.with_suffix("").with_suffix(".json").write_text('{"EchoTime": 0.03}')
    with pytest.raises(func.FuncInputError, match="sub-01_task-notr_bold.json: RepetitionTime is missing"):
        func.load_bold(no_tr)
    # the CLI reports it and writes nothing
    r = subprocess.run([os.sys.executable, "-m", "brainfuse", "func", "--bold", str(no_tr), "--t1w", "x", "--mni-xfm", "x",
                        "--template", "x", "--template-mask", "x", "--wm", "x", "--csf", "x", "--atlas", "x",
                        "--atlas-tsv", "x", "--out-dir", str(tmp_path / "deriv"), "--resolution", "3"],
                       capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(Path(func.__file__).parents[1])})
    assert r.returncode == 1 and "RepetitionTime is missing" in r.stderr
    assert not (tmp_path / "deriv").exists()


def test_real_bold_motion_and_confounds(shared_data, tmp_path):
    """Siemens XA30 BOLD (20 volumes, converted here): plausible motion (sub-millimetre FD, rotations under
    3 degrees), finite confounds, tSNR not degraded. The GE slice-order series (10 volumes): the head really
    turned (volume 3: 52 degrees about z, ANTs against volume 0 agrees: 52.1), so with the default bounds the
    run stops naming the volumes; with wider bounds the confounds are finite."""
    exe = Path(os.sys.executable).parent / "dcm2niix"
    subprocess.run([str(exe), "-z", "y", "-f", "%s_%d", "-o", str(tmp_path),
                    str(shared_data / "dicom" / "dcm_qa_xa30" / "In" / "7_func-bold_task-fa_run-1")],
                   check=True, capture_output=True)
    runs = [tmp_path / "7_func-bold_task-fa_run-1.nii.gz",
            shared_data / "dicom" / "dcm_qa_nih" / "Ref" / "DCM2NIIX_regression_test_4.nii"]
    for path in runs:
        img = nib.load(path)
        data = img.get_fdata(dtype=np.float32)
        cfg = None
        if "nih" in str(path):
            with pytest.raises(func.FuncInputError, match=rf"{re.escape(str(path))}: head motion .*volume 3: "
                                                          rf"trans_x .*rot_z -5\d\.\d deg.*func\.max_rotation_deg"):
                func.native_confounds(data, img.affine, workdir=tmp_path, name=str(path))
            cfg = {"max_rotation_deg": 90, "max_translation_mm": 60}
        conf, mc, corrected = func.native_confounds(data, img.affine, cfg, workdir=tmp_path)
        fd = conf["framewise_displacement"].to_numpy()[1:]
        assert np.isfinite(conf.iloc[1:].to_numpy()).all()
        func.motion_figure(conf, tmp_path / f"{Path(path).name}_motion.png", title=Path(path).name)
        if "nih" in str(path):
            assert np.degrees(np.abs(mc.params[:, 5])).max() > 45
            assert [w for w in func.motion_qc(conf, mc, cfg)["Warnings"] if "max framewise" in w]
            continue
        assert fd.max() < 2.0 and np.median(fd) < 0.5, (path, fd)
        assert np.abs(conf[["rot_x", "rot_y", "rot_z"]].to_numpy()).max() < np.radians(3)
        # corrected series is at least as stable as the raw one (temporal SNR in the brain)
        m = func._bold_mask(data.mean(3))
        tsnr = lambda x: np.median(x[m].mean(1) / np.maximum(x[m].std(1), 1e-6))
        assert tsnr(corrected) >= 0.95 * tsnr(data)


def test_too_little_brain_in_the_field_of_view_is_explained(tiny_demo, tpl, tmp_path):
    """A BOLD->T1w transform 400 mm off (a failed registration) leaves no brain in the BOLD field of view: the
    error gives the voxel counts, the field of view in mm and where to look, and nothing is written in MNI."""
    import ants

    bad = tmp_path / "bad_bold2t1w.mat"
    ants.write_transform(ants.create_ants_transform(transform_type="AffineTransform", dimension=3,
                                                    translation=(400.0, 0.0, 0.0)), str(bad))
    root, _ = tiny_demo
    bold = root / "bids" / "sub-002" / "func" / "sub-002_task-rest_bold.nii.gz"
    img = nib.load(bold)
    fov = " x ".join(f"{v:.0f}" for v in np.array(img.shape[:3]) * np.array(img.header.get_zooms()[:3]))
    deriv = tmp_path / "deriv"
    deriv.mkdir()
    with pytest.raises(func.FuncInputError) as e:
        _run_tiny(tiny_demo, tpl, "002", deriv, bold_to_t1w_mat=str(bad))
    msg = str(e.value)
    assert msg.startswith(f"{bold}: too little brain inside the BOLD field of view")
    assert re.search(r": 0 of \d+ template brain voxels, 0 white-matter and 0 CSF voxels", msg), msg
    xfm = func.outputs(deriv, bold, RES)["xfm"]
    assert f"BOLD field of view {fov} mm" in msg and f"check {xfm} and the motion (max rotation" in msg
    assert "\n" not in msg
    assert not list(deriv.rglob("*_bold.nii.gz")) and not list(deriv.rglob("*_timeseries.*"))


def test_anatomical_atlas_names_the_deep_nuclei_and_tracts_where_they_are(tpl, tmp_path):
    """atlas-HarvardOxfordJuelich (tensors.region_atlas: harvard-oxford) on the working grid: named structures
    inside the brain mask, each putamen and corticospinal tract on its own side at its MNI position (putamen
    centre about (+-25, 1, 0) mm), deep white matter that has a label mostly in a tract (about half of it lies in
    no Juelich tract at 25 % and stays unlabelled), the same file when built twice."""
    nii, tsv = atlas.build_anatomical(tpl["GM"], tmp_path / "a.nii.gz", tmp_path / "a.tsv", tpl["mask"])
    img, table = nib.load(nii), pd.read_csv(tsv, sep="\t").set_index("name")
    labels, mask = np.asarray(img.dataobj), nib.load(tpl["mask"]).get_fdata() > 0
    assert labels.dtype == np.int16 and not (labels[~mask] > 0).any() and (labels[mask] > 0).mean() > 0.6
    assert set(np.unique(labels)) - {0} <= set(table["index"])
    for side, sign in (("Left", -1), ("Right", 1)):
        put = table.loc[f"{side}_Putamen"]
        assert put["hemisphere"] == side[0] and put["n_voxels"] > 100
        assert np.linalg.norm(put[["x", "y", "z"]].to_numpy(float) - [sign * 25, 1, 0]) < 5, put
        cst = table.loc[f"WM_Corticospinal_tract_{side[0]}"]
        assert sign * cst["x"] > 10 and cst["n_voxels"] > 100
    assert not any("Ventric" in n for n in table.index) and all(n.replace("_", "").isalnum() for n in table.index)
    wm = (nib.load(tpl["WM"]).get_fdata() > 0.9) & mask
    tract_index = table.loc[[n for n in table.index if n.startswith("WM_")], "index"]
    labelled = labels[wm][labels[wm] > 0]
    assert np.isin(labelled, tract_index).mean() > 0.6
    again = atlas.build_anatomical(tpl["GM"], tmp_path / "b.nii.gz", tmp_path / "b.tsv", tpl["mask"])
    assert Path(again[0]).read_bytes() == Path(nii).read_bytes() and Path(again[1]).read_bytes() == Path(tsv).read_bytes()


def test_whole_brain_atlas_labels_every_brain_voxel_by_hemisphere(tpl, tmp_path):
    """atlas-brainfuseRegions (coverage brain): every brain-mask voxel of the grid in a parcel, white matter and
    deep nuclei included, left parcels left of the midline; the GM atlas leaves white matter out."""
    nii, tsv = atlas.build(tpl["GM"], tmp_path / "r.nii.gz", tmp_path / "r.tsv", tpl["mask"], n_parcels=8,
                           coverage="brain")
    img, table = nib.load(nii), pd.read_csv(tsv, sep="\t")
    labels, mask = np.asarray(img.dataobj), nib.load(tpl["mask"]).get_fdata() > 0
    assert ((labels > 0) == mask).all() and set(np.unique(labels[mask])) == set(table["index"])
    x = (np.argwhere(labels > 0) @ img.affine[:3, :3].T + img.affine[:3, 3])[:, 0]
    hemi = table.set_index("index")["hemisphere"].to_dict()
    sides = np.array([hemi[v] for v in labels[labels > 0]])
    assert (x[sides == "L"] < 0).all() and (x[sides == "R"] >= 0).all()
    wm = (nib.load(tpl["WM"]).get_fdata() > 0.9) & mask
    assert (labels[wm] > 0).all() and (np.asarray(nib.load(tpl["atlas"]).dataobj)[wm] == 0).mean() > 0.9
