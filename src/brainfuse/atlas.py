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
"""
from __future__ import annotations

import sys

import nibabel as nib
import numpy as np
import pandas as pd

from . import cliargs
from . import io as bf_io

GM_THRESHOLD = 0.3   # GM probability for a voxel to be parcelled (catches the striatum at 3-4 mm)
COVERAGE = ("gm", "brain")


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
    present = set(np.unique(labels)) - {0}
    table["n_voxels"] = [int((labels == i).sum()) for i in table["index"]]
    if len(present) < len(table):
        # a parcel too small for a coarse grid stays in the table (columns are fixed) but is empty
        print(f"[atlas] {len(table) - len(present)} parcels have no voxel on this grid", file=sys.stderr)
    img = nib.Nifti1Image(labels, gm.affine)
    img.header.set_data_dtype(np.int16)
    bf_io.save_nifti(img, out_nii)
    bf_io.save_tsv(table, out_tsv)
    return out_nii, out_tsv


def cli(argv=None):
    args = cliargs.parser("func atlas").parse_args(argv)
    build(args.gm, args.output, args.output_tsv, args.mask, args.n_parcels, coverage=args.coverage)
    return 0
