"""Per-subject anat time (each step) and accuracy on a phantom, against antspyx's default SyN in the same run.

    ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS=2 .venv/bin/python benchmarks/bench_anat.py [--res 2 3] [--threads 2]

Target (issue 21): the README demo (15 subjects, 3 mm, 2 cores, every stage) in 10 minutes, which needs the image
stages ~28 % faster than their 2026-12-07 timings (README), with the accuracy goals (displacement error, brain-mask
Dice, real-scan MNI correlation) met. Timings depend on machine load: run alone.
"""
import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

t_import = time.perf_counter()
import ants  # noqa: E402

t_import = time.perf_counter() - t_import

import nibabel as nib  # noqa: E402

from brainfuse import anat, templates  # noqa: E402
from brainfuse.phantom import generator as demo  # noqa: E402
from brainfuse.layout import TEMPLATE, bids_path  # noqa: E402

LPS = np.array([-1.0, -1.0, 1.0])


def error(tl, anatomy, mask_path):
    m = nib.load(mask_path)
    z = demo.apply_affine(m.affine, np.argwhere(m.get_fdata() > 0).astype(float))
    x = ants.apply_transforms_to_points(3, pd.DataFrame(z * LPS, columns=["x", "y", "z"]), tl,
                                        whichtoinvert=[False] * len(tl)).values * LPS
    return float(np.linalg.norm(anatomy.to_template(x) - z, axis=1).mean())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--res", type=int, nargs="+", default=[2, 3])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--params", default="{}", help='anat settings to compare, e.g. \'{"syn_iterations": [100, 70, 0]}\'')
    args = ap.parse_args()
    print(f"import ants: {t_import:.1f} s (paid once per subject job)")
    with tempfile.TemporaryDirectory(prefix="bench_anat_") as tmp:
        tmp = Path(tmp)
        for res in args.res:
            cfg = demo.demo_config({"n_subjects": 3, "t1_voxel_mm": res, "missing": {"dwi": 0.0, "bold": 0.0}})
            subject = demo.plan(cfg)[0]
            root = tmp / f"demo{res}"
            demo.write_dataset(cfg, root)
            demo.write_subject(cfg, subject, root, modalities=("T1w",))
            anatomy = demo.Anatomy(cfg, subject, demo.head_model(2 if res >= 2 else 1))
            tpl = templates.build(res, tmp / "resources")
            t1w = bids_path(root / "bids", subject.label, "anat", "T1w")
            t0 = time.perf_counter()
            out = anat.process(t1w, tmp / f"deriv{res}", subject.label, None, tmp / "resources" / f"tpl-{TEMPLATE}",
                               res, threads=args.threads, params=json.loads(args.params))
            total = time.perf_counter() - t0
            err = error([out["paths"]["warp"], out["paths"]["affine"]], anatomy, tpl["mask"])
            truth = nib.load(root / "truth" / f"sub-{subject.label}" / "anat" /
                             f"sub-{subject.label}_desc-brain_mask.nii.gz").get_fdata() > 0
            mask = nib.load(out["paths"]["mask"]).get_fdata() > 0
            dice = 2 * (truth & mask).sum() / (truth.sum() + mask.sum())
            steps = ", ".join(f"{k} {v:.1f}" for k, v in out["timings"].items())
            print(f"[{res} mm] brainfuse anat {args.params}: {total:.1f} s per subject ({steps}); "
                  f"displacement error {err:.2f} mm; brain-mask Dice {dice:.3f}")
            # Baseline: antspyx's SyN defaults on the same head/brain pair (no N4, masks or tissues).
            t0 = time.perf_counter()
            reg = ants.registration(ants.image_read(tpl["head"]), ants.image_read(t1w), "SyN",
                                    outprefix=str(tmp / f"base{res}_"))
            base = time.perf_counter() - t0
            print(f"[{res} mm] baseline ants.registration('SyN') alone: {base:.1f} s; "
                  f"displacement error {error(reg['fwdtransforms'], anatomy, tpl['mask']):.2f} mm")


if __name__ == "__main__":
    main()
