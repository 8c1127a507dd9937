"""anat stage: recovers the phantom's known transform, brain mask and atrophy; works on a real Siemens T1w.

Ground truth (brainfuse.phantom.generator): subject T1w world points x map to template points z = to_template(x); the
stage's forward transform maps template points to T1w points, so to_template(T(z)) - z is its error.
"""
import json
import subprocess
import sys

import ants
import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from brainfuse import anat, layout, templates
from brainfuse.phantom import generator as demo
from brainfuse.layout import TEMPLATE, bids_path
from conftest import REPO

LPS = np.array([-1.0, -1.0, 1.0])
# MNI correlation (template brain, 3 mm grid) of plain ants.registration(type_of_transform="SyN") of each shared
# real T1w's skull-stripped brain (the stage's own N4 and mask) to the 1 mm template: the reference issue 17
# measures the stage against (benchmarks/bench_real.py prints it side by side for the Philips T1w; 0.701 on the
# brain of the earlier 1 mm N4 and mask, 0.696 on today's).
ANTS_SYN_MNI_R = {"xa30": 0.724, "philips": 0.696}


@pytest.fixture(scope="module")
def resources(tmp_path_factory):
    root = tmp_path_factory.mktemp("resources")
    for res in (2, 3):
        templates.build(res, root)
    return root


def _tpl(resources, res):
    return layout.template_files(resources, res)


def _dice(a, b):
    return 2 * (a & b).sum() / (a.sum() + b.sum())


def _displacement_error(paths, anatomy, mask_path):
    """|to_template(T(z)) - z| (mm) over template brain voxels z, T = the stage's [warp, affine]."""
    m = nib.load(mask_path)
    z = demo.apply_affine(m.affine, np.argwhere(m.get_fdata() > 0).astype(float))
    tl = layout.to_mni_transforms(paths["warp"].rsplit("/anat/", 1)[0] + "/anat")
    x = ants.apply_transforms_to_points(3, pd.DataFrame(z * LPS, columns=["x", "y", "z"]), tl,
                                        whichtoinvert=[False, False]).values * LPS
    return np.linalg.norm(anatomy.to_template(x) - z, axis=1)


# ------------------------------------------------------------------------------------------ templates
@pytest.mark.slow
def test_templates_partition_the_brain_and_share_world_coordinates(resources):
    for res in (2, 3):
        p = _tpl(resources, res)
        t1 = nib.load(p["T1w"])
        assert t1.header.get_zooms()[:3] == (res,) * 3
        mask = nib.load(p["mask"]).get_fdata() > 0
        tissues = sum(nib.load(p[t]).get_fdata() for t in ("GM", "WM", "CSF"))
        assert np.allclose(tissues[mask], 1, atol=1e-4) and np.allclose(tissues[~mask], 0)
        assert 1.4e6 < mask.sum() * res ** 3 < 2.0e6           # an adult brain, in mm^3
        # The head target holds the same brain at the same world coordinates (white matter = 1 in both).
        head = ants.image_read(p["head"])
        on_grid = ants.resample_image_to_target(head, ants.image_read(p["T1w"])).numpy()
        assert np.corrcoef(on_grid[mask], t1.get_fdata()[mask])[0, 1] > 0.98


# ---------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kind,message", [("4d", "must be 3D"), ("zeros", "empty"), ("nan", "NaN"),
                                          ("voxel", "voxel size")])
def test_bad_input_is_refused_with_the_file_named_and_nothing_written(tmp_path, resources, kind, message):
    data, zooms = np.random.default_rng(0).random((20, 20, 20)).astype(np.float32), (2.0, 2.0, 2.0)
    if kind == "4d":
        data = np.stack([data, data], -1)
    elif kind == "zeros":
        data = np.zeros_like(data)
    elif kind == "nan":
        data[3, 4, 5] = np.nan
    else:
        zooms = (2.0, 2.0, 40.0)
    path = tmp_path / f"sub-01_{kind}_T1w.nii.gz"
    nib.save(nib.Nifti1Image(data, np.diag([*zooms, 1.0])), path)
    with pytest.raises(anat.InputError, match=message) as err:
        anat.check_t1w(path)
    assert str(path) in str(err.value)
    out = tmp_path / "deriv"
    run = subprocess.run([sys.executable, "-m", "brainfuse", "anat", "--t1w", str(path), "--out-dir", str(out),
                          "--subject", "01", "--template-dir", str(resources / f"tpl-{TEMPLATE}"), "--resolution", "3"],
                         capture_output=True, text=True, cwd=REPO)
    assert run.returncode != 0 and str(path) in run.stderr and message in run.stderr
    assert not list(out.rglob("*.nii.gz"))


# ------------------------------------------------------------------------------------------ phantoms
@pytest.fixture(scope="module")
def phantom_2mm(tmp_path_factory):
    """Subject 001 of the tiny demo (strongest atrophy) imaged at 2 mm, with its true anatomy."""
    from conftest import TINY_DEMO

    cfg = demo.demo_config({**TINY_DEMO, "t1_voxel_mm": 2})
    root = tmp_path_factory.mktemp("phantom2")
    subject = demo.plan(cfg)[0]
    demo.write_dataset(cfg, root)
    demo.write_subject(cfg, subject, root, modalities=("T1w",))
    return root, demo.Anatomy(cfg, subject, demo.head_model(2))


@pytest.mark.slow
def test_phantom_2mm_transform_mask_and_outputs(phantom_2mm, resources, tmp_path):
    root, anatomy = phantom_2mm
    t1w = bids_path(root / "bids", "001", "anat", "T1w")
    out = anat.process(t1w, tmp_path, "001", None, resources / f"tpl-{TEMPLATE}", 2, threads=2)
    paths, tpl = out["paths"], _tpl(resources, 2)
    mni = [p for k, p in paths.items() if k.startswith("mni_") and p.endswith(".nii.gz")]
    assert len(mni) == 4 and all(nib.load(p).shape == nib.load(tpl["T1w"]).shape for p in mni)
    err = _displacement_error(paths, anatomy, tpl["mask"])
    print(f"2 mm phantom: displacement error mean {err.mean():.3f} mm, p95 {np.percentile(err, 95):.3f} mm; "
          f"timings {out['timings']}")
    assert err.mean() <= 0.5       # issue 4's target; measured 0.38 (affine alone 2.2, head-target MI SyN 0.77)
    truth = nib.load(root / "truth" / "sub-001" / "anat" / "sub-001_desc-brain_mask.nii.gz").get_fdata() > 0
    assert _dice(nib.load(paths["mask"]).get_fdata() > 0, truth) >= 0.95
    # Tissue maps: probabilities summing to one in the brain; GM in MNI space agrees with the template's.
    probs = sum(nib.load(paths[t]).get_fdata() for t in ("GM", "WM", "CSF"))
    assert np.allclose(probs[truth & (nib.load(paths["mask"]).get_fdata() > 0)], 1, atol=1e-3)
    gm = nib.load(paths["mni_GM"]).get_fdata()
    assert np.corrcoef(gm.ravel(), nib.load(tpl["GM"]).get_fdata().ravel())[0, 1] > 0.8
    side = json.loads(open(paths["mni_t1w"].replace(".nii.gz", ".json")).read())
    assert t1w in side["Sources"][0] and side["GeneratedBy"][0]["CodeVersion"]
    assert not list(tmp_path.rglob(".anat-*")) and not list(tmp_path.rglob("*.part*"))


@pytest.mark.slow
def test_phantom_atrophy_shows_in_the_log_jacobian(tiny_demo, resources, tmp_path):
    """Subject 001 (atrophy score 2.3) has a lower putamen log-Jacobian than subject 003 (score -0.35)."""
    root, cfg = tiny_demo
    scores = {s.label: s.scores["atrophy"] for s in demo.plan(cfg)}
    recovered, true, corr = {}, {}, {}
    for sub in ("001", "003"):
        out = anat.process(bids_path(root / "bids", sub, "anat", "T1w"), tmp_path, sub, None,
                           resources / f"tpl-{TEMPLATE}", 3, threads=1)
        lj = nib.load(out["paths"]["logjacobian"])
        t = nib.load(root / "truth" / f"sub-{sub}" / "anat" / f"sub-{sub}_space-{TEMPLATE}_desc-truth_logjacobian.nii.gz")
        t_on_grid = ants.resample_image_to_target(ants.image_read(str(t.get_filename())),
                                                  ants.image_read(out["paths"]["logjacobian"])).numpy()
        roi, brain = demo.putamen_roi(lj), nib.load(_tpl(resources, 3)["mask"]).get_fdata() > 0
        recovered[sub], true[sub] = lj.get_fdata()[roi].mean(), t_on_grid[roi].mean()
        corr[sub] = np.corrcoef(lj.get_fdata()[brain], t_on_grid[brain])[0, 1]
        truth_mask = nib.load(root / "truth" / f"sub-{sub}" / "anat" / f"sub-{sub}_desc-brain_mask.nii.gz").get_fdata() > 0
        assert _dice(nib.load(out["paths"]["mask"]).get_fdata() > 0, truth_mask) >= 0.95
    print(f"putamen log-Jacobian: recovered {recovered}, truth {true}, scores {scores}, map correlation {corr}")
    assert scores["001"] > scores["003"] and true["001"] < true["003"]
    assert recovered["001"] < recovered["003"]       # the stronger atrophy has the lower log-Jacobian
    assert min(corr.values()) > 0.2                  # the recovered map follows the true one (warp + atrophy)


# ------------------------------------------------------------------------------------------ real data
@pytest.mark.slow
def test_real_siemens_t1w(shared_data, resources, tmp_path):
    series = shared_data / "dicom" / "dcm_qa_xa30" / "In" / "5_anat-T1w_acq-tfl"
    conv = tmp_path / "nii"
    conv.mkdir()
    dcm2niix = REPO / ".venv" / "bin" / "dcm2niix"
    subprocess.run([str(dcm2niix if dcm2niix.exists() else "dcm2niix"), "-z", "y", "-f", "%s_%d", "-o", str(conv),
                    str(series)], check=True, capture_output=True)
    t1w = next(conv.glob("*.nii.gz"))
    out = anat.process(t1w, tmp_path / "deriv", "xa30", None, resources / f"tpl-{TEMPLATE}", 3, threads=1)
    m = out["metrics"]
    print(f"real T1w: {m}, timings {out['timings']}")
    assert m["mni_mask_dice"] > 0.95          # the native mask warped to MNI covers the template brain mask
    assert m["mni_correlation"] > 0.6          # measured 0.63; issue 17's target (ANTs - 0.03): see the end
    assert 1200 < m["mask_volume_ml"] < 2100   # the template mask (1.9 l, generous) on an adult head
    for key in ("qc_mask", "qc_reg"):
        assert open(out["paths"][key], "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    if m["mni_correlation"] < ANTS_SYN_MNI_R["xa30"] - 0.03:     # reported as XFAIL, visible in every run
        pytest.xfail(f"issue 17 item 7 not met: MNI correlation {m['mni_correlation']:.3f}, plain ANTs SyN "
                     f"{ANTS_SYN_MNI_R['xa30']}. Total-field smoothing 0 (ANTs' own) reaches 0.70-0.72 but doubles "
                     "the phantom's displacement error against its known warp (0.38-0.41 -> 0.74-0.91 mm)")


@pytest.mark.slow
def test_finer_t1w_is_processed_on_the_working_grids(phantom_2mm, resources, tmp_path):
    """A T1w finer than processing_mm: N4 and Atropos on a coarser copy, native outputs on the native grid,
    the same accuracy targets as the direct path (the 2 mm phantom processed as if 2 mm were too fine)."""
    root, anatomy = phantom_2mm
    t1w = bids_path(root / "bids", "001", "anat", "T1w")
    out = anat.process(t1w, tmp_path, "001", None, resources / f"tpl-{TEMPLATE}", 2, threads=1,
                       params={"processing_mm": 3.0})
    paths, native = out["paths"], nib.load(t1w)
    assert out["metrics"]["processing_voxel_mm"] == [3.0, 3.0, 3.0]
    for key in ("preproc", "mask", "GM", "WM", "CSF"):
        img = nib.load(paths[key])
        assert img.shape == native.shape and np.allclose(img.affine, native.affine, atol=1e-4), key
    preproc = nib.load(paths["preproc"]).get_fdata()
    assert np.isfinite(preproc).all() and preproc.min() >= 0
    truth = nib.load(root / "truth" / "sub-001" / "anat" / "sub-001_desc-brain_mask.nii.gz").get_fdata() > 0
    assert _dice(nib.load(paths["mask"]).get_fdata() > 0, truth) >= 0.95
    err = _displacement_error(paths, anatomy, _tpl(resources, 2)["mask"])
    assert err.mean() <= 0.5, err.mean()


@pytest.mark.slow
def test_same_input_gives_byte_identical_outputs(tiny_demo, resources, tmp_path):
    """Every file anat writes is the same, byte for byte, when a subject is run twice (seeded registration,
    Atropos with a constant seed; one thread, as the rules run it)."""
    root, _ = tiny_demo
    t1w = bids_path(root / "bids", "002", "anat", "T1w")
    runs = [anat.process(t1w, tmp_path / f"run{i}", "002", None, resources / f"tpl-{TEMPLATE}", 3, threads=1)
            for i in (1, 2)]
    files = sorted(p.relative_to(tmp_path / "run1") for p in (tmp_path / "run1").rglob("*") if p.is_file())
    assert len(files) >= 20
    differ = [str(f) for f in files if (tmp_path / "run1" / f).read_bytes() != (tmp_path / "run2" / f).read_bytes()]
    assert not differ, f"differ between two runs: {differ}"
    assert runs[0]["metrics"] == runs[1]["metrics"]


def test_qc_figure_keeps_world_proportions(tmp_path):
    """A sphere imaged with 1 x 1 x 3 mm voxels is drawn round, not squashed 3x (voxel aspect applied)."""
    from PIL import Image

    from brainfuse import qc

    zooms = (1.0, 1.0, 3.0)
    grid = np.indices((80, 80, 27)).astype(float) * np.array(zooms)[:, None, None, None]
    ball = (np.linalg.norm(grid - np.array([40, 40, 40])[:, None, None, None], axis=0) < 30).astype(np.float32)
    png = qc.overlay_figure(ball, tmp_path / "qc.png", n=1, zooms=zooms)
    rgb = np.asarray(Image.open(png).convert("L")).astype(float)
    bands = np.array_split(np.arange(rgb.shape[0]), 3)        # sagittal, coronal, axial rows of one panel each
    for name, rows in zip(("sagittal", "coronal", "axial"), bands):
        yy, xx = np.nonzero(rgb[rows] > 128)
        ratio = np.ptp(yy) / np.ptp(xx)
        assert 0.85 < ratio < 1.15, f"{name}: the sphere is drawn {ratio:.2f} times as high as wide"
