"""dwi stage time per subject and per volume, torch (default) against the per-volume ANTs baseline, on a
demo phantom subject (default demo: 2 b0 + 30 directions at 3 mm), with the accuracy each reaches.

    python benchmarks/bench_dwi.py                          # generate one demo subject in a temp folder
    python benchmarks/bench_dwi.py --demo-root /tmp/demo --subject 002 --threads 2
    python benchmarks/bench_dwi.py --ants-volumes 8         # ANTs timed on 8 volumes, per-volume extrapolated

Columns: correction (registration + resampling) and tensor fit seconds, seconds per volume, mean
displacement error against the phantom's true motion (mm, brain points) and FA error in white matter.
The whole-subject figure adds the b0 -> T1w registration and normalisation the stage also runs (timed once).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--demo-root", help="existing demo output (bids/, truth/); default: generate one subject")
    ap.add_argument("--subject", default=None, help="demo subject label (default: first with DWI)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--ants-volumes", type=int, default=6, help="volumes the ANTs baseline is timed on (0: skip)")
    args = ap.parse_args(argv)
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import nibabel as nib
    import torch

    from brainfuse import demo, dwi, motion

    torch.set_num_threads(args.threads)
    cfg = demo.demo_config()
    subject = next(s for s in demo.plan(cfg) if s.has_dwi and (args.subject is None or s.label == args.subject))
    tmp = tempfile.TemporaryDirectory(prefix="bench_dwi_")
    root = Path(args.demo_root or tmp.name)
    run_path = root / "bids" / f"sub-{subject.label}" / "dwi" / f"sub-{subject.label}_dir-AP_dwi.nii.gz"
    if not run_path.exists():
        t = time.perf_counter()
        demo.write_subject(cfg, subject, root, modalities=("dwi",))
        print(f"generated sub-{subject.label} in {time.perf_counter() - t:.1f} s")
    truth = root / "truth" / f"sub-{subject.label}" / "dwi" / f"sub-{subject.label}_dir-AP_desc-truth"
    H = np.load(f"{truth}_xfm.npy")
    s0 = nib.load(f"{truth}_S0.nii.gz")
    pts = np.argwhere(s0.get_fdata() > 500) @ s0.affine[:3, :3].T + s0.affine[:3, 3]
    run = dwi.load_run(run_path)
    n = len(run.bvals)
    ph = demo.SubjectPhantom(cfg, subject)
    wm = demo.tissue_at(ph.head, ph.anatomy.to_template(demo.grid_points(s0.shape, s0.affine)))["wm"].reshape(s0.shape)
    from dipy.reconst.dti import fractional_anisotropy, from_lower_triangular
    fa_true = np.nan_to_num(fractional_anisotropy(np.linalg.eigvalsh(from_lower_triangular(
        nib.load(f"{truth}_tensor.nii.gz").get_fdata()))))
    print(f"sub-{subject.label}: {run.data.shape[:3]} voxels, {n} volumes, {args.threads} thread(s)")
    print(f"{'method':<22}{'correct s':>10}{'fit s':>8}{'s/volume':>10}{'disp err mm':>13}{'FA err WM':>11}")
    rows = {}
    with tempfile.TemporaryDirectory(prefix="bench_dwi_work_") as work:
        for method, volumes in (("torch", n), ("ants", args.ants_volumes)):
            if volumes <= 0:
                continue
            p = dict(dwi.DEFAULTS, registration=method)
            r = run
            if volumes < n:   # the baseline on the first b0 and a few DW volumes, extrapolated per volume
                keep = np.r_[np.flatnonzero(run.bvals <= 50)[:1], np.flatnonzero(run.bvals > 50)[: volumes - 1]]
                r = dwi.Run(run.path, run.data[..., keep], run.affine, run.bvals[keep], run.bvecs[:, keep])
            t = time.perf_counter()
            T, _ = dwi.correct_runs([r], p, work, log=lambda *a: None)
            corr = dwi.resample(r.data, r.affine, T[0], r.affine, r.data.shape[:3], order=3)
            t_corr = time.perf_counter() - t
            keep = np.arange(n) if volumes >= n else keep
            err = motion.mean_displacement_error(H[keep], T[0], pts)
            fa_err = float("nan")
            t = time.perf_counter()
            if volumes >= n:
                bvecs = dwi.rotate_bvecs(r.bvecs, T[0], r.affine)
                mask = dwi.brain_mask(corr[..., r.bvals <= 50].mean(3))
                maps = dwi.fit_tensor(corr, r.bvals, bvecs, mask)
                sel = (wm > 0.9) & mask
                fa_err = float(np.abs(maps["fa"] - fa_true)[sel].mean())
            t_fit = time.perf_counter() - t
            rows[method] = t_corr / len(r.bvals)
            label = method if volumes >= n else f"{method} ({volumes} vols)"
            print(f"{label:<22}{t_corr:>10.1f}{t_fit:>8.1f}{t_corr / len(r.bvals):>10.2f}{err:>13.3f}{fa_err:>11.3f}")
    if "ants" in rows:
        print(f"ants per-volume time / torch per-volume time: {rows['ants'] / rows['torch']:.1f}x; "
              f"ants extrapolated to {n} volumes: {rows['ants'] * n:.0f} s")
    tmp.cleanup()


if __name__ == "__main__":
    sys.exit(main())
