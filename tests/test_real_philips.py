"""The shared Philips subject (a second vendor) from DICOM to derivatives, through the commands the rules run.

../shared/data/dicom/dcm_qa_philips_enh: a 1 mm whole-head MPRAGE and a 16-direction DTI as classic DICOM (the
DTI's instance numbers step by 2), the resting-state BOLD as dcm2niix's NIfTI (its DICOM is not shipped).
What a user relies on: every stage finishes on real data of this size, the brain mask has an adult brain's
volume, the MNI alignment is as good as plain ANTs SyN, the tensor maps are physically possible, and the
motion estimates of a still volunteer stay small.
"""
import json
import os
import shutil

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from brainfuse import layout, templates
from brainfuse.layout import TEMPLATE, bids_path
from conftest import brainfuse_cli
from test_anat import ANTS_SYN_MNI_R

RES = 3
SUB = "philips"


@pytest.fixture(scope="module")
def philips(shared_data, tmp_path_factory):
    site = shared_data / "dicom" / "dcm_qa_philips_enh"
    if not site.is_dir():
        pytest.fail(f"BRAINFUSE_SHARED_DATA is set but {site} is missing")
    work = tmp_path_factory.mktemp("philips")
    bids, deriv, logs = work / "bids", work / "deriv", work / "logs"
    logs.mkdir()
    tpl = templates.build(RES, work / "resources")
    atlas = work / "resources" / f"tpl-{TEMPLATE}" / f"tpl-{TEMPLATE}_res-{RES}_atlas-brainfuse_dseg.nii.gz"
    atlas_tsv = atlas.with_name(f"tpl-{TEMPLATE}_res-{RES}_atlas-brainfuse_dseg.tsv")
    brainfuse_cli("func", "atlas", "--gm", tpl["GM"], "--mask", tpl["mask"], "--output", atlas, "--output-tsv", atlas_tsv,
         "--n-parcels", 100, log=logs / "atlas.log")
    brainfuse_cli("convert", "--dicom-dir", site / "In", "--bids-dir", bids, "--subject", SUB,
         "--manifest", work / "manifest.tsv", "--work-dir", work, log=logs / "convert.log")
    bold = bids_path(bids, SUB, "func", "bold", task="rest")
    os.makedirs(os.path.dirname(bold), exist_ok=True)
    shutil.copyfile(site / "Nifti" / "2101_WIP_fcMRI_cl.nii.gz", bold)
    shutil.copyfile(site / "Nifti" / "2101_WIP_fcMRI_cl.json", bold.replace(".nii.gz", ".json"))
    t1w = bids_path(bids, SUB, "anat", "T1w")
    brainfuse_cli("anat", "--t1w", t1w, "--out-dir", deriv, "--subject", SUB, "--template-dir", os.path.dirname(tpl["T1w"]),
         "--resolution", RES, log=logs / "anat.log")
    a = layout.anat_paths(deriv, SUB, None, RES)
    dwis = sorted((bids / f"sub-{SUB}" / "dwi").glob("*_dwi.nii.gz"))
    brainfuse_cli("dwi", "--dwi", *dwis, "--subject", SUB, "--out-dir", deriv, "--t1w", a["preproc"], "--t1w-mask", a["mask"],
         "--transforms", a["warp"], a["affine"], "--template", tpl["T1w"], "--resolution", RES, log=logs / "dwi.log")
    brainfuse_cli("func", "--bold", bold, "--t1w", a["preproc"], "--t1w-mask", a["mask"], "--anat-dir", os.path.dirname(a["preproc"]),
         "--template", tpl["T1w"], "--template-mask", tpl["mask"], "--wm", a["mni_WM"], "--csf", a["mni_CSF"],
         "--atlas", atlas, "--atlas-tsv", atlas_tsv, "--out-dir", deriv, "--resolution", RES, log=logs / "func.log")
    return {"work": work, "bids": bids, "deriv": deriv, "anat": a, "dwis": dwis, "bold": bold}


@pytest.mark.slow
def test_convert_keeps_the_t1w_and_the_dti(philips):
    manifest = pd.read_csv(philips["work"] / "manifest.tsv", sep="\t")
    assert os.path.exists(bids_path(philips["bids"], SUB, "anat", "T1w"))
    assert len(philips["dwis"]) == 1 and nib.load(philips["dwis"][0]).shape == (128, 128, 82, 17)
    assert (manifest["decision"] == "failed").sum() == 0, manifest[["series_description", "reason"]]


def test_anat_mask_and_mni_alignment(philips):
    side = json.loads(open(philips["anat"]["mni_t1w"].replace(".nii.gz", ".json")).read())
    qc = side["QC"]
    print(f"Philips anat QC: {qc}")
    assert 1100 <= qc["mask_volume_ml"] <= 1800
    assert qc["mni_mask_dice"] > 0.95
    assert qc["mni_correlation"] >= ANTS_SYN_MNI_R["philips"] - 0.03


def test_dwi_tensor_maps_are_physically_possible(philips):
    deriv = philips["deriv"] / f"sub-{SUB}" / "dwi"
    mask = nib.load(next(deriv.glob("*space-dwi_desc-brain_mask.nii.gz"))).get_fdata() > 0
    assert mask.sum() > 50_000        # 2 mm voxels: a brain is ~150,000
    for param, hi in (("fa", 1.0), ("md", 3.5e-3), ("ad", 3.5e-3), ("rd", 3.5e-3)):
        for space in ("dwi", TEMPLATE):
            data = nib.load(next(deriv.glob(f"*space-{space}*param-{param}_dwimap.nii.gz"))).get_fdata()
            assert np.isfinite(data).all() and data.min() >= 0 and data.max() <= hi + 1e-9, (param, space)
    fa = nib.load(next(deriv.glob("*space-dwi*param-fa_dwimap.nii.gz"))).get_fdata()[mask]
    md = nib.load(next(deriv.glob("*space-dwi*param-md_dwimap.nii.gz"))).get_fdata()[mask]
    print(f"Philips DTI: median FA {np.median(fa):.3f}, median MD {np.median(md):.2e} mm^2/s")
    assert 0.15 < np.median(fa) < 0.45 and 0.6e-3 < np.median(md) < 1.2e-3   # adult brain at b = 1000


def test_func_motion_of_a_still_volunteer_is_small(philips):
    conf = next((philips["deriv"] / f"sub-{SUB}" / "func").glob("*desc-confounds_timeseries.tsv"))
    table = pd.read_csv(conf, sep="\t")
    rot = np.degrees(table[["rot_x", "rot_y", "rot_z"]].abs().to_numpy().max())
    print(f"Philips BOLD: max FD {table['framewise_displacement'].max():.2f} mm, max rotation {rot:.2f} deg")
    assert table["framewise_displacement"].max() < 2.0
    assert rot < 5.0
    relmat = next((philips["deriv"] / f"sub-{SUB}" / "func").glob("*desc-fisherz_relmat.tsv"))
    assert np.isfinite(pd.read_csv(relmat, sep="\t").to_numpy(dtype=float)).mean() > 0.95
