"""The MNI152 2009a symmetric template at the working resolution, from nilearn's packaged copy (no download).

Writes into ``<root>/tpl-MNI152NLin2009aSym/`` (names from the Stage contract in DEVELOPERS.md):

* ``tpl-T_res-{res}_T1w`` (brain-only, as nilearn ships it), ``..._desc-brain_mask``,
  ``..._label-{GM,WM,CSF}_probseg`` (CSF = brain mask - GM - WM, clipped: nilearn ships no CSF map);
* ``tpl-T_res-{res}_desc-head_T1w``: a registration target with a head around the brain (CSF, skull and
  scalp shells on a grid padded by 18 mm). No head template ships offline (ENVIRONMENT.md); skull stripping
  registers the subject's whole head to this one and maps the template brain mask back. It is the same
  synthetic head the phantom generator uses (``brainfuse.headmodel.head_model``), intensity white matter = 1.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

from . import cliargs
from . import io as bf_io
from .bids import TEMPLATE

UNITS = ("mm",)      # NIfTI xyzt units: space in mm, no time axis


def template_path(root, res, suffix: str, **entities) -> str:
    """``<root>/tpl-T/tpl-T_res-{res}[_label-…][_desc-…]_<suffix>.nii.gz`` (BIDS template naming)."""
    parts = [f"tpl-{TEMPLATE}", f"res-{int(res)}"]
    for key in ("label", "desc"):
        if entities.get(key):
            parts.append(f"{key}-{entities[key]}")
    return os.path.join(str(root), f"tpl-{TEMPLATE}", "_".join(parts) + f"_{suffix}.nii.gz")


def outputs(res, root="resources") -> dict:
    """Every file :func:`build` writes, by short name."""
    out = {"T1w": template_path(root, res, "T1w"), "mask": template_path(root, res, "mask", desc="brain"),
           "head": template_path(root, res, "T1w", desc="head")}
    for label in ("GM", "WM", "CSF"):
        out[label] = template_path(root, res, "probseg", label=label)
    return out


def build(res, root="resources") -> dict:
    """Resample nilearn's template, mask and tissue maps to ``res`` mm and write them; returns the paths."""
    from nilearn import datasets, image

    from .headmodel import head_model

    res = int(res)
    if res not in (1, 2, 3, 4):
        raise ValueError(f"template resolution {res} mm: supported are 1, 2, 3, 4")
    paths = outputs(res, root)
    Path(paths["T1w"]).parent.mkdir(parents=True, exist_ok=True)
    t1 = datasets.load_mni152_template(resolution=res)

    def on_grid(img):
        img = image.resample_img(img, target_affine=t1.affine, target_shape=t1.shape, interpolation="continuous",
                                 force_resample=True, copy_header=True)
        return np.clip(img.get_fdata(dtype=np.float32), 0, 1)

    mask = datasets.load_mni152_brain_mask(resolution=res).get_fdata() > 0.5
    gm = on_grid(datasets.load_mni152_gm_template(resolution=res)) * mask
    wm = on_grid(datasets.load_mni152_wm_template(resolution=res)) * mask
    total = gm + wm
    over = total > 1                         # keep GM + WM + CSF a partition of the mask
    gm[over], wm[over] = gm[over] / total[over], wm[over] / total[over]
    csf = np.clip(mask - gm - wm, 0, 1) * mask
    t1d = t1.get_fdata(dtype=np.float32)
    t1d = t1d / np.median(t1d[wm > 0.9])      # white matter = 1, the head target's scale
    bf_io.save_nifti(t1d, paths["T1w"], affine=t1.affine, dtype=np.float32, units=UNITS)
    bf_io.save_nifti(mask, paths["mask"], affine=t1.affine, dtype=np.uint8, units=UNITS)
    for label, data in (("GM", gm), ("WM", wm), ("CSF", csf)):
        bf_io.save_nifti(data, paths[label], affine=t1.affine, dtype=np.float32, units=UNITS)
    head = head_model(res)
    bf_io.save_nifti(head.t1, paths["head"], affine=head.affine, dtype=np.float32, units=UNITS)
    return paths


def cli(argv=None):
    args = cliargs.parser("templates").parse_args(argv)
    for path in build(args.resolution, args.out_dir).values():
        print(path, file=sys.stderr)
