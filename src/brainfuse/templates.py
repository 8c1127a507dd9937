"""The MNI152 2009a symmetric template at the working resolution, from nilearn's packaged copy (no download).

Writes into ``<root>/tpl-MNI152NLin2009aSym/`` (names: ``brainfuse.layout.template_files``, the Stage contract):

* ``tpl-T_res-{res}_T1w`` (brain-only, as nilearn ships it), ``..._desc-brain_mask``,
  ``..._label-{GM,WM,CSF}_probseg`` (CSF = brain mask - GM - WM, clipped: nilearn ships no CSF map);
* ``tpl-T_res-{res}_desc-head_T1w``: a registration target with a head around the brain (CSF, skull and
  scalp shells on a grid padded by 18 mm). No head template ships offline (ENVIRONMENT.md); skull stripping
  registers the subject's whole head to this one and maps the template brain mask back. It is the same
  synthetic head the phantom generator uses (``brainfuse.headmodel.head_model``), intensity white matter = 1.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from . import cliargs
from . import io as bf_io
from .layout import template_files

UNITS = ("mm",)      # NIfTI xyzt units: space in mm, no time axis


def build(res, root="resources") -> dict:
    """Resample nilearn's template, mask and tissue maps to ``res`` mm and write them; returns the paths."""
    from nilearn import datasets, image

    from .headmodel import head_model

    res = int(res)
    if res not in (1, 2, 3, 4):
        raise ValueError(f"template resolution {res} mm: supported are 1, 2, 3, 4")
    paths = template_files(root, res)
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
