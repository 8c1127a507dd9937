"""tensors stage: derivatives -> per-subject caches -> gathered cohort -> torch items, on the 3 mm MNI grid.

Derivatives are synthetic NIfTI files written to the Stage contract's paths (DEVELOPERS.md) on nilearn's
MNI152 2009a 3 mm grid, so the stage is tested independently of the anat/dwi/func implementations.
"""
import json
import os
import shutil
import subprocess
import sys
import time
from collections import Counter

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from brainfuse import layout
from brainfuse.phantom import generator as demo
from brainfuse import io as bf_io
from brainfuse import tensors as T
from brainfuse.layout import TEMPLATE
from brainfuse.provenance import code_version, file_sha256
from conftest import REPO, job_counts

RES = 3
PARCELS = ["visual", "somatomotor", "default", "salience", "frontoparietal", "striatalL", "striatalR"]
# sub-001 complete, sub-002 without DWI, sub-003 without BOLD
HAS = {"001": {"dwi": True, "bold": True}, "002": {"dwi": False, "bold": True}, "003": {"dwi": True, "bold": False}}


@pytest.fixture(scope="module")
def grid():
    from nilearn.datasets import load_mni152_brain_mask

    m = load_mni152_brain_mask(resolution=RES)
    return np.asarray(m.dataobj) > 0, m.affine


def write_mask(path, grid):
    mask, affine = grid
    os.makedirs(os.path.dirname(path), exist_ok=True)
    nib.save(nib.Nifti1Image(mask.astype(np.uint8), affine), path)
    return path


def synthetic_maps(rng, mask):
    """Plausible values per channel (units as the upstream stages write them), zero outside the brain."""
    def field(lo, hi):
        return np.where(mask, rng.uniform(lo, hi, mask.shape), 0.0)
    md = field(0.6e-3, 3.0e-3)
    return {"T1w": field(200, 1100), "GM": field(0, 1), "logjacobian": np.where(mask, rng.normal(0, 0.1, mask.shape), 0),
            "fa": field(0, 0.9), "md": md, "ad": md * 1.4, "rd": md * 0.8,
            "alff": field(5, 60), "falff": field(0.1, 0.6), "reho": field(0.2, 0.9)}


def write_relmat(path, rng):
    n = len(PARCELS)
    a = rng.normal(size=(n, 40))
    z = np.arctanh(np.clip(np.corrcoef(a), -0.999999, 0.999999))
    np.fill_diagonal(z, np.inf)  # Fisher z of r=1
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pd.DataFrame(z, columns=PARCELS).to_csv(path, sep="\t", index=False)
    return z


def write_derivatives(deriv, grid, has=HAS, seed=0):
    """The MNI derivatives of each subject per the Stage contract; returns truth[sub][channel]."""
    mask, affine = grid
    truth = {}
    for i, (sub, avail) in enumerate(has.items()):
        rng = np.random.default_rng([seed, i])
        maps = synthetic_maps(rng, mask)
        truth[sub] = {}
        mods = ["aMRI"] + (["DTI"] if avail["dwi"] else []) + (["fMRI"] if avail["bold"] else [])
        for m in mods:
            run = {"task": "rest"} if m == "fMRI" else None
            for (ch, *_), path in zip(T.VOLUME_CHANNELS[m], T.derivative_paths(deriv, sub, m, RES, run_entities=run)):
                os.makedirs(os.path.dirname(path), exist_ok=True)
                nib.save(nib.Nifti1Image(maps[ch].astype(np.float32), affine), path)
                truth[sub][ch] = maps[ch].astype(np.float32).astype(np.float64)  # what the file holds
        if avail["bold"]:
            truth[sub]["conn"] = write_relmat(T.derivative_paths(deriv, sub, "conn", RES, run_entities={"task": "rest"})[0], rng)
    return truth


def build_all(deriv, out, mask_path, has=HAS):
    files = []
    for sub, avail in has.items():
        for m in T.IMAGE_MODALITIES:
            if (m == "DTI" and not avail["dwi"]) or (m in ("fMRI", "conn") and not avail["bold"]):
                continue
            run = {"task": "rest"} if m in ("fMRI", "conn") else None
            path = T.tensor_path(out, sub, m)
            T.build_subject(m, T.derivative_paths(deriv, sub, m, RES, run_entities=run), mask_path, path, RES, subject=sub)
            files.append(path)
    return files


def write_participants(path, subjects, overrides=None):
    cfg = demo.demo_config({"n_subjects": max(3, len(subjects))})
    table = demo.clinical_table(cfg, demo.plan(cfg))
    table = table[table.participant_id.isin([f"sub-{s}" for s in subjects])].reset_index(drop=True)
    for (row, col), value in (overrides or {}).items():
        table[col] = table[col].astype(object)
        table.loc[row, col] = value
    os.makedirs(os.path.dirname(path), exist_ok=True)
    table.to_csv(path, sep="\t", index=False, na_rep="n/a")
    with open(str(path).replace(".tsv", ".json"), "w") as f:
        json.dump(demo.PARTICIPANTS_JSON, f)
    return table


@pytest.fixture(scope="module")
def cohort_dir(tmp_path_factory, grid):
    root = tmp_path_factory.mktemp("tensors")
    deriv, out = root / "derivatives", root / "tensors"
    truth = write_derivatives(deriv, grid)
    mask_path = write_mask(str(root / "mask.nii.gz"), grid)
    files = build_all(deriv, out, mask_path)
    table = write_participants(root / "participants.tsv", list(HAS), {(1, "updrs_iii"): np.nan})
    T.gather(out, root / "participants.tsv", {"classes": ["control", "PD", "iRBD"], "image_features": "volumes"}, files,
             units=[f"sub-{s}" for s in HAS])
    return out, truth, table, deriv, mask_path


def test_round_trip_is_exact_up_to_float16(cohort_dir, grid):
    out, truth, _, _, _ = cohort_dir
    mask = grid[0]
    c = T.load_cohort(out)
    assert c.names == ["aMRI", "DTI", "fMRI", "conn", "clinical", "serum"]
    assert list(c.manifest.participant_id) == ["sub-001", "sub-002", "sub-003"]
    assert isinstance(c.arrays["aMRI"], np.memmap) and c.arrays["aMRI"].dtype == np.float16
    assert c.arrays["aMRI"].shape == (3, 3, *mask.shape)
    for i, sub in enumerate(HAS):
        t = truth[sub]
        vals = t["T1w"][mask]
        expected = {
            "aMRI": [np.where(mask, (t["T1w"] - vals.mean()) / vals.std(), 0), t["GM"], t["logjacobian"]],
            "DTI": [t["fa"], t["md"] * 1000, t["ad"] * 1000, t["rd"] * 1000] if "fa" in t else None,
            "fMRI": [t["alff"] / t["alff"][mask].mean(), t["falff"], t["reho"]] if "alff" in t else None,
        }
        for m, chans in expected.items():
            if chans is None:
                continue
            want = np.stack(chans).astype(np.float16)
            got = c.arrays[m][i]
            assert np.array_equal(got, want), f"{sub} {m}"
            # float16 keeps ~3 significant digits of the normalised values
            np.testing.assert_allclose(got.astype(np.float64), np.stack(chans), rtol=1e-3, atol=1e-4)
        if "conn" in t:
            iu = np.triu_indices(len(PARCELS), 1)
            assert np.array_equal(c.arrays["conn"][i], t["conn"][iu].astype(np.float32))
    assert c.feature_names["conn"][0] == "visual__somatomotor" and len(c.feature_names["conn"]) == 21
    # the T1w z-score uses the subject's own brain only: mean 0, SD 1 inside the mask
    z = c.arrays["aMRI"][0, 0].astype(np.float64)[mask]
    assert abs(z.mean()) < 1e-3 and abs(z.std() - 1) < 1e-3


def write_atlas(root, grid, n_empty=1):
    """Two parcels (the brain mask's voxels split by array index) plus empty ones, and their table."""
    mask, affine = grid
    labels = np.zeros(mask.shape, np.int16)
    idx = np.flatnonzero(mask.ravel())
    labels.ravel()[idx[: len(idx) // 3]] = 1
    labels.ravel()[idx[len(idx) // 3:]] = 2
    nii, tsv = root / "atlas_dseg.nii.gz", root / "atlas_dseg.tsv"
    nib.save(nib.Nifti1Image(labels, affine), nii)
    names = ["A", "B"] + [f"E{i}" for i in range(n_empty)]
    pd.DataFrame({"index": np.arange(1, len(names) + 1), "name": names}).to_csv(tsv, sep="\t", index=False)
    return labels, (nii, tsv)


def test_region_features_are_parcel_means_of_each_channel(cohort_dir, tmp_path, grid):
    """image_features: regions gathers each volume modality as a table of parcel means (channel-major), NaN
    for an empty parcel and for absent rows, the volume caches unchanged; conn and the tables as before."""
    out, truth, _, _, _ = cohort_dir
    labels, atlas = write_atlas(tmp_path, grid)
    root = out.parent
    files = sorted(str(p) for p in out.rglob("sub-*_*.npy"))
    info = T.gather(tmp_path / "regions", root / "participants.tsv", {"classes": ["control", "PD", "iRBD"]}, files,
                    units=[f"sub-{s}" for s in HAS], atlas=atlas)
    vol, reg = T.load_cohort(out), T.load_cohort(tmp_path / "regions")
    assert [m.kind for m in reg.modalities] == ["tabular"] * 6
    assert reg.feature_names["aMRI"] == ["T1w_A", "T1w_B", "T1w_E0", "GM_A", "GM_B", "GM_E0", "logjacobian_A",
                                         "logjacobian_B", "logjacobian_E0"]
    assert info["regions"]["DTI"]["channels"] == ["fa", "md", "ad", "rd"]
    for m in ("aMRI", "DTI", "fMRI"):
        assert reg.arrays[m].shape == (3, len(vol.channels[m]) * 3)
        for i in range(3):
            row = reg.arrays[m][i].reshape(len(vol.channels[m]), 3)
            if not vol.present[i, vol.names.index(m)]:
                assert np.isnan(row).all() and not reg.present[i, reg.names.index(m)]
                continue
            v = np.asarray(vol.arrays[m][i], np.float64)
            for c in range(len(row)):
                np.testing.assert_allclose(row[c, :2], [v[c][labels == 1].mean(), v[c][labels == 2].mean()], rtol=1e-5)
            assert np.isnan(row[:, 2]).all()
    np.testing.assert_array_equal(reg.arrays["conn"], vol.arrays["conn"])
    np.testing.assert_array_equal(reg.present, vol.present)


def test_region_features_need_an_atlas_on_the_working_grid(cohort_dir, tmp_path, grid):
    out, _, _, _, _ = cohort_dir
    files = sorted(str(p) for p in out.rglob("sub-*_modality-aMRI_tensor.npy"))
    cfg = {"classes": ["control", "PD", "iRBD"], "modalities": ["aMRI"]}
    with pytest.raises(T.TensorError, match="got no atlas"):
        T.gather(tmp_path / "a", out.parent / "participants.tsv", cfg, files, units=[f"sub-{s}" for s in HAS])
    mask, affine = grid
    nii = tmp_path / "shifted_dseg.nii.gz"
    nib.save(nib.Nifti1Image(mask.astype(np.int16)[:-1], affine), nii)
    _, (_, tsv) = write_atlas(tmp_path, grid)
    with pytest.raises(T.TensorError, match="resampled") as err:
        T.gather(tmp_path / "b", out.parent / "participants.tsv", cfg, files, units=[f"sub-{s}" for s in HAS],
                 atlas=(nii, tsv))
    assert str(nii) in str(err.value)
    assert not (tmp_path / "b" / "cohort.json").exists()


def test_missing_modalities_are_rows_with_flags_off(cohort_dir):
    out = cohort_dir[0]
    c = T.load_cohort(out)
    flags = c.manifest.set_index("participant_id")[["has_aMRI", "has_DTI", "has_fMRI", "has_conn"]]
    assert flags.loc["sub-001"].all()
    assert not flags.loc["sub-002", "has_DTI"] and flags.loc["sub-002", "has_fMRI"]
    assert not flags.loc["sub-003", "has_fMRI"] and not flags.loc["sub-003", "has_conn"]
    assert c.manifest.set_index("participant_id").loc["sub-002", "path_DTI"] == "n/a"
    ds = T.CohortDataset(c, indices=[1, 2])
    item = ds[0]
    j = c.names.index("DTI")
    assert item["index"] == 1 and not item["present"][j] and item["present"].sum() == len(c.names) - 1
    assert item["inputs"]["DTI"].shape == (4, 67, 79, 64) and not item["inputs"]["DTI"].any()
    assert item["inputs"]["aMRI"].dtype.is_floating_point and item["inputs"]["aMRI"].abs().sum() > 0
    assert not ds[1]["present"][c.names.index("conn")] and not ds[1]["inputs"]["conn"].any()


def test_sidecar_has_provenance(cohort_dir, grid):
    out, _, _, deriv, mask_path = cohort_dir
    side = json.loads(open(T.tensor_path(out, "001", "DTI", ext=".json")).read())
    assert side["shape"] == [4, 67, 79, 64] and side["dtype"] == "float16" and side["template"] == TEMPLATE
    assert side["spacing"] == [3.0, 3.0, 3.0] and np.allclose(side["affine"], grid[1])
    assert side["code_version"] == code_version("tensors") and side["channels"] == ["fa", "md", "ad", "rd"]
    for src in side["sources"]:
        assert src["sha256"] == file_sha256(src["path"]) and f"param-{src['channel']}_" in src["path"]
    assert side["normalisation"]["md"]["factor"] == 1000.0
    assert side["mask"]["sha256"] == file_sha256(mask_path)


def test_clinical_table_targets_and_groups(cohort_dir):
    out, _, table, _, _ = cohort_dir
    c = T.load_cohort(out)
    assert c.task == "classification" and c.classes == ["control", "PD", "iRBD"]
    assert [c.classes[t] for t in c.target] == list(table.diagnosis)
    assert list(c.groups) == ["sub-001", "sub-002", "sub-003"]
    assert c.feature_names["clinical"] == ["age", "sex[M]", "updrs_iii", "rbdsq"]   # Levels F, M from participants.json
    clin = c.arrays["clinical"]
    np.testing.assert_allclose(clin[:, 0], table.age, rtol=1e-6)
    assert list(clin[:, 1]) == [float(s == "M") for s in table.sex]
    assert np.isnan(clin[1, 2]) and c.present[1, c.names.index("clinical")]   # missing value kept, no imputation
    np.testing.assert_allclose(c.arrays["serum"][:, 0], table.nfl_pg_ml, rtol=1e-6)
    assert c.covariate_names == ["age", "sex[M]"] and c.covariates.shape == (3, 2)
    clinical = pd.read_csv(out / "clinical.tsv", sep="\t")
    assert list(clinical.columns[:3]) == ["participant_id", "session", "diagnosis"] and "site" in clinical
    item = T.CohortDataset(c, transforms={"clinical": lambda x: x * 2})[1]
    assert item["inputs"]["clinical"][2] == 0 and item["inputs"]["clinical"][0] == pytest.approx(2 * table.age[1])


@pytest.mark.parametrize("problem", ["shape", "affine", "space", "channel order"])
def test_wrong_grid_or_space_is_refused(tmp_path, grid, problem):
    mask, affine = grid
    deriv = tmp_path / "derivatives"
    write_derivatives(deriv, grid, has={"001": {"dwi": True, "bold": False}})
    mask_path = write_mask(str(tmp_path / "mask.nii.gz"), grid)
    paths = T.derivative_paths(deriv, "001", "DTI", RES)
    bad = paths[1]
    data = np.asarray(nib.load(bad).dataobj)
    if problem == "shape":      # a 2 mm image given to a 3 mm run
        nib.save(nib.Nifti1Image(np.zeros((99, 117, 95), np.float32), np.diag([2, 2, 2, 1]) @ np.eye(4)), bad)
    elif problem == "affine":   # same shape, shifted by half a voxel
        shifted = affine.copy()
        shifted[:3, 3] += 1.5
        nib.save(nib.Nifti1Image(data, shifted), bad)
    elif problem == "space":
        native = bad.replace(f"space-{TEMPLATE}", "space-T1w")
        shutil.copy(bad, native)
        paths[1] = bad = native
    else:
        paths[1], paths[2] = paths[2], paths[1]
        bad = paths[1]
    out = tmp_path / "tensors" / "sub-001_modality-DTI_tensor.npy"
    with pytest.raises(T.TensorError) as err:
        T.build_subject("DTI", paths, mask_path, str(out), RES, subject="001")
    assert os.path.basename(bad) in str(err.value)
    assert {"shape": "(99, 117, 95)", "affine": "affine", "space": "space-", "channel order": "param-md"}[problem] in str(err.value)
    assert not out.parent.exists() or not list(out.parent.iterdir())     # nothing half-written


def test_gather_refuses_caches_on_different_grids(cohort_dir, tmp_path):
    out = cohort_dir[0]
    files = []
    for sub in ("001", "002"):
        for ext in (".npy", ".json"):
            src = T.tensor_path(out, sub, "aMRI", ext=ext)
            dst = T.tensor_path(tmp_path / "t", sub, "aMRI", ext=ext)
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            shutil.copy(src, dst)
        files.append(T.tensor_path(tmp_path / "t", sub, "aMRI"))
    side = files[1].replace(".npy", ".json")
    info = json.load(open(side))
    info["affine"][0][3] += 3
    json.dump(info, open(side, "w"))
    write_participants(tmp_path / "participants.tsv", ["001", "002"])
    with pytest.raises(T.TensorError, match="sub-002_modality-aMRI_tensor.npy: affine"):
        T.gather(tmp_path / "cohort", tmp_path / "participants.tsv", {"modalities": ["aMRI"], "image_features": "volumes"},
                 files)
    assert not (tmp_path / "cohort" / "manifest.tsv").exists() and not list((tmp_path / "cohort").glob("*.npy"))


@pytest.mark.parametrize("overrides, cfg, message", [
    ({(0, "age"): "sixty"}, {}, "column 'age' row 1 (sub-001) has non-numeric value 'sixty'"),
    ({(1, "sex"): "X"}, {}, "column 'sex' row 2 (sub-002) has value 'X', not one of the declared levels"),
    ({}, {"clinical": ["age", "site"]}, "column 'site' row 1 (sub-001) has non-numeric value"),
    ({}, {"serum": ["crp"]}, "column 'crp' (declared in config tensors) is missing"),
    ({(2, "diagnosis"): "MSA"}, {"classes": ["control", "PD", "iRBD"]}, "labels ['MSA']"),
    ({}, {"task": "regression"}, "regression target 'diagnosis' of sub-001 is"),
])
def test_clinical_types_are_validated(tmp_path, overrides, cfg, message):
    write_participants(tmp_path / "participants.tsv", ["001", "002", "003"], overrides)
    with pytest.raises(T.TensorError) as err:
        T.gather(tmp_path / "out", tmp_path / "participants.tsv", {"modalities": ["clinical", "serum"], **cfg})
    assert message in str(err.value) and "participants.tsv" in str(err.value)


def test_dataset_without_images_trains_from_tabular_modalities(tmp_path):
    """participants.tsv + a FreeSurfer-like TSV are a complete dataset; a model learns the label from them."""
    import torch

    from brainfuse.moe import build_model

    cfg = demo.demo_config({"n_subjects": 120})
    subjects = demo.plan(cfg)
    table = demo.clinical_table(cfg, subjects)
    table.loc[5, "updrs_iii"] = np.nan
    table.to_csv(tmp_path / "participants.tsv", sep="\t", index=False, na_rep="n/a")
    rng = np.random.default_rng(1)
    fs = pd.DataFrame({"subject": [f"sub-{s.label}" for s in subjects],
                       "Left-Putamen": [4500 * (1 - 0.05 * s.scores["atrophy"]) + rng.normal(0, 60) for s in subjects],
                       "eTIV": rng.normal(1.5e6, 1e5, len(subjects)), "comment": "x"}).iloc[:-4]  # 4 not measured
    fs.to_csv(tmp_path / "aseg.tsv", sep="\t", index=False)
    settings = {"modalities": ["clinical", "serum"], "levels": {"sex": ["F", "M"]},
                "tables": {"aseg": {"path": str(tmp_path / "aseg.tsv"), "id_column": "subject",
                                    "columns": ["Left-Putamen", "eTIV"]}}}
    T.gather(tmp_path / "tensors", tmp_path / "participants.tsv", settings)
    c = T.load_cohort(tmp_path / "tensors")
    assert c.names == ["clinical", "serum", "aseg"] and len(c) == 120
    assert c.present[:, 2].sum() == 116 and not c.present[-4:, 2].any()
    assert c.classes == ["PD", "control", "iRBD"]    # sorted when neither config nor participants.json names them

    train, test = np.arange(80), np.arange(80, 120)
    transforms = {}
    for j, name in enumerate(c.names):      # scaler fitted on the training rows only
        x = c.arrays[name][train][c.present[train, j]]
        mu, sd = np.nanmean(x, 0), np.nanstd(x, 0) + 1e-6
        transforms[name] = lambda v, mu=mu, sd=sd: (v - mu) / sd
    loader = torch.utils.data.DataLoader(T.CohortDataset(c, train, transforms), batch_size=80)
    batch = next(iter(loader))
    torch.manual_seed(0)
    model = build_model("late", c.modalities, n_outputs=3, d_model=16, mlp_hidden=16, encoder_dropout=0.0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        opt.zero_grad()
        model(batch["inputs"], batch["present"], batch["target"]).loss.backward()
        opt.step()
    model.eval()
    tb = next(iter(torch.utils.data.DataLoader(T.CohortDataset(c, test, transforms), batch_size=40)))
    with torch.no_grad():
        acc = (model(tb["inputs"], tb["present"]).prediction.argmax(1) == tb["target"]).float().mean().item()
    # the table carries the atrophy score (as aMRI does): the ceiling is the Bayes rule of aMRI + clinical + serum;
    # 40 test subjects: a learnt model gets at least half-way from chance to it
    ceiling = demo.bayes_accuracy(cfg, n_samples=20000)["bayes_grid"]["aMRI+clinical+serum"]
    assert acc > 1 / 3 + 0.5 * (ceiling - 1 / 3), (acc, ceiling)


def test_make_cohort_matches_loader_items():
    rng = np.random.default_rng(0)
    vol = rng.normal(size=(5, 2, 6, 7, 8)).astype(np.float16)
    vol[3] = 0
    tab = rng.normal(size=(5, 4)).astype(np.float32)
    tab[1] = np.nan
    c = T.make_cohort({"aMRI": vol, "clinical": tab}, [0.5, 1, 2, 3, 4], task="regression", groups=list("aabbc"))
    assert c.present.tolist() == [[True, True], [True, False], [True, True], [False, True], [True, True]]
    assert c.modalities[0].kind == "volume" and c.modalities[1].shape == (4,)
    item = T.CohortDataset(c)[0]
    assert item["target"].dtype.is_floating_point and item["target"] == 0.5
    assert np.array_equal(item["inputs"]["aMRI"].numpy(), vol[0].astype(np.float32))


# ------------------------------------------------------------------------------------------- workflow
def snakemake(workdir, *args):
    proc = subprocess.run([sys.executable, "-m", "snakemake", *args, "-s", str(REPO / "Snakefile"), "-d", str(workdir),
                           "--configfile", str(REPO / "config" / "config.yaml")],
                          capture_output=True, text=True, cwd=workdir)
    if proc.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc.stdout + proc.stderr



@pytest.mark.slow
def test_workflow_caches_gathers_and_reruns_only_the_changed_subject(tmp_path, grid):
    """BIDS input + a derivatives tree on the contract's paths; upstream rules are not run (--allowed-rules),
    so the test holds whatever the anat/dwi/func rules look like. Changing one derivative reruns that
    subject's caches and the gather, nothing else."""
    bids, out = tmp_path / "bids", tmp_path / "out"
    (bids).mkdir()
    (bids / "dataset_description.json").write_text('{"Name": "t", "BIDSVersion": "1.9.0"}')
    for sub, avail in HAS.items():
        for datatype, suffix, ok in (("anat", "T1w", True), ("dwi", "dwi", avail["dwi"]), ("func", "task-rest_bold", avail["bold"])):
            if ok:
                (bids / f"sub-{sub}" / datatype).mkdir(parents=True, exist_ok=True)
                (bids / f"sub-{sub}" / datatype / f"sub-{sub}_{suffix}.nii.gz").write_bytes(b"")
    write_participants(bids / "participants.tsv", list(HAS))
    write_derivatives(out / "derivatives" / "brainfuse", grid)
    for sub, avail in HAS.items():      # the image stages' QC records, inputs of the caches (sub-002's T1w flagged)
        for datatype, ok in (("anat", True), ("dwi", avail["dwi"]), ("func", avail["bold"])):
            if ok:
                flags = ["MNI correlation 0.41 < 0.60"] if (sub, datatype) == ("002", "anat") else []
                bf_io.save_json({"qc_pass": not flags, "flags": flags, "metrics": {}, "thresholds": {}},
                                layout.qc_path(out / "derivatives" / "brainfuse", sub, None, datatype))
    write_mask(layout.template_files(out / "templates", RES)["mask"], grid)     # the templates rule writes it there
    # volumes: the DTI rows compared below are voxels (region features are tested on the gather)
    args = ["--cores", "2", "--allowed-rules", "tensors_subject", "tensors_gather", "tensors",
            "--config", f"bids_dir={bids}", f"output_dir={out}", "tensors={image_features: volumes}"]
    past = time.time() - 3600                   # inputs older than anything the run writes
    for p in list(bids.rglob("*")) + list((out / "derivatives").rglob("*")):
        os.utime(p, (past, past))
    log = snakemake(tmp_path, "tensors", *args)
    counts = job_counts(log)
    assert counts["tensors_subject"] == 3 and counts["tensors_gather"] == 1, log[-2000:]
    c = T.load_cohort(out / "tensors")
    assert c.manifest.has_DTI.tolist() == [True, False, True] and c.present.shape == (3, 6)
    assert c.manifest.qc_pass.tolist() == ["True", "False", "True"]
    assert "WARNING:   sub-002: FAILED - T1w: MNI correlation 0.41 < 0.60" in log      # on the console, not only the log

    assert "Nothing to be done" in snakemake(tmp_path, "tensors", "-n", *args)
    # a new FA map for sub-003 (a touch alone is not a change: Snakemake compares checksums of small inputs)
    fa = T.derivative_paths(out / "derivatives" / "brainfuse", "003", "DTI", RES)[0]
    img = nib.load(fa)
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj) * 0.9, img.affine), fa)
    dry = snakemake(tmp_path, "tensors", "-n", *args)
    assert job_counts(dry) == Counter({"tensors_subject": 1, "tensors_gather": 1, "tensors": 1}), dry[-2000:]
    assert "wildcards: subject=003" in dry
    row = c.manifest.participant_id.tolist().index("sub-003")
    old = np.array(c.arrays["DTI"][row], dtype=np.float32)
    before = os.path.getmtime(T.tensor_path(out / "tensors", "001", "DTI"))
    snakemake(tmp_path, "tensors", *args)
    assert os.path.getmtime(T.tensor_path(out / "tensors", "001", "DTI")) == before     # other subjects untouched
    dti = np.asarray(T.load_cohort(out / "tensors").arrays["DTI"][row], dtype=np.float32)
    assert np.allclose(dti[0], old[0] * 0.9, atol=2e-3) and np.array_equal(dti[1:], old[1:])   # new FA, same MD/AD/RD


def test_sessions_are_rows_grouped_by_participant(tmp_path, grid):
    """Two sessions of one participant: two rows sharing the participant's clinical values and group."""
    mask_path = write_mask(str(tmp_path / "mask.nii.gz"), grid)
    mask, affine = grid
    files = []
    for k, ses in enumerate(("1", "2")):
        paths = T.derivative_paths(tmp_path / "deriv", "001", "aMRI", RES, ses=ses)
        for p in paths:
            os.makedirs(os.path.dirname(p), exist_ok=True)
            nib.save(nib.Nifti1Image(np.where(mask, k + 1.0 + np.arange(mask.size).reshape(mask.shape) % 7, 0)
                                     .astype(np.float32), affine), p)
        assert f"/sub-001/ses-{ses}/anat/sub-001_ses-{ses}_space-" in paths[0]
        out = T.tensor_path(tmp_path / "tensors", "001", "aMRI", ses=ses)
        assert out.endswith(f"sub-001/ses-{ses}/sub-001_ses-{ses}_modality-aMRI_tensor.npy")
        T.build_subject("aMRI", paths, mask_path, out, RES, subject="001", session=ses)
        files.append(out)
    table = write_participants(tmp_path / "participants.tsv", ["001", "002"])
    T.gather(tmp_path / "tensors", tmp_path / "participants.tsv",
             {"modalities": ["aMRI", "clinical"], "image_features": "volumes"}, files,
             units=["sub-001_ses-1", "sub-001_ses-2", "sub-002"])
    c = T.load_cohort(tmp_path / "tensors")
    assert c.manifest.session.tolist() == ["1", "2", "n/a"] and list(c.groups) == ["sub-001", "sub-001", "sub-002"]
    assert c.present.tolist() == [[True, True], [True, True], [False, True]]
    assert c.arrays["clinical"][0, 0] == c.arrays["clinical"][1, 0] == pytest.approx(table.age[0])
    assert c.arrays["aMRI"][1, 1].max() == 8 and c.arrays["aMRI"][0, 1].max() == 7   # GM kept as is, per session


def test_batched_loader_gives_the_default_collated_batch():
    import torch
    from torch.utils.data import DataLoader

    rng = np.random.default_rng(0)
    vol = rng.normal(size=(7, 2, 5, 6, 4)).astype(np.float16)
    vol[2] = 0
    tab = rng.normal(size=(7, 3)).astype(np.float32)
    tab[4, 1] = np.nan
    tab[5] = np.nan
    c = T.make_cohort({"DTI": vol, "serum": tab}, [0, 1, 2, 0, 1, 2, 0])
    ds = T.CohortDataset(c, indices=[6, 5, 4, 3, 2], transforms={"serum": lambda x: x + 1})
    ref = list(DataLoader(ds, batch_size=2))
    got = list(ds.loader(batch_size=2))
    assert len(got) == len(ref) == 3
    for r, g in zip(ref, got):
        for name in ("DTI", "serum"):
            assert g["inputs"][name].dtype == torch.float32 and torch.equal(r["inputs"][name], g["inputs"][name])
        assert torch.equal(r["present"], g["present"]) and torch.equal(r["target"], g["target"])
        assert torch.equal(r["index"], g["index"])
    assert got[1]["inputs"]["serum"][0, 1] == 0 and not got[0]["present"][1, 1]    # NaN -> 0; absent row
    shuffled = torch.cat([b["index"] for b in ds.loader(batch_size=2, shuffle=True, seed=1)])
    assert sorted(shuffled.tolist()) == [2, 3, 4, 5, 6]
