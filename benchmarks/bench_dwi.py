"""dwi stage time per subject and per volume on a demo phantom subject (default: 2 b0 + 30 directions at
2 mm, the voxel size of issue 17's accuracy target: mean displacement error <= 0.2 mm, a tenth of a voxel),
with the accuracy reached, and the torch correction against the per-volume ANTs baseline.

    python benchmarks/bench_dwi.py                          # generate one demo subject in a temp folder
    python benchmarks/bench_dwi.py --n-b0 1 --n-directions 12 --ants-volumes 0    # single-b0 phantom
    python benchmarks/bench_dwi.py --demo-root /tmp/demo --subject 002 --threads 2
    python benchmarks/bench_dwi.py --ants-volumes 0         # skip the ANTs baseline
    python benchmarks/bench_dwi.py --t1w T1w.nii.gz --real-dwi dwi.nii.gz   # b0 -> T1w time, real data (part 3)

1. The whole stage as the workflow runs it: ``brainfuse dwi`` in a fresh process (imports included), the
   T1w -> template transform given (one ANTs affine, computed before and not timed). Printed: wall seconds
   per subject and per volume, the stage's own breakdown, mean displacement error against the phantom's
   true motion (mm, brain points), worst b-vector angle error (degrees) and FA error in white matter.
2. Correction only (registration + resampling), torch against ``ants.registration`` per volume (timed on
   a few volumes, extrapolated per volume).
3. With ``--t1w`` and ``--real-dwi``: the b0 -> T1w registration as the stage runs it (the T1w brain cropped
   and brought to the DWI voxel size) against the same registration at the T1w's native resolution (the
   baseline), and how far apart their results are (mm over the b0 brain). The T1w brain mask is ``--t1w-mask``,
   else the DWI's b0 brain mask carried onto the T1w grid (same scanner frame) and dilated by 3 voxels.
   Measured (dcm_qa_philips_enh: 1 mm MPRAGE, 2 mm DTI; 2 cores): native 81 s, stage 3.8 s, 0.28 mm apart;
   the same T1w upsampled to 0.5 mm (340x512x512): stage 15 s (issue 17: 915-1,175 s at native 0.5 mm).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
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
    ap.add_argument("--stage-only", action="store_true", help="time the whole stage only (skip part 2)")
    ap.add_argument("--dwi-voxel-mm", type=float, default=2.0, help="phantom DWI voxel size (generated subjects)")
    ap.add_argument("--n-b0", type=int, default=None, help="phantom b0 volumes (default: the demo's, 2)")
    ap.add_argument("--n-directions", type=int, default=None, help="phantom directions (default: the demo's, 30)")
    ap.add_argument("--t1w", help="part 3: a real T1w (e.g. a converted dcm_qa_philips_enh 1301)")
    ap.add_argument("--t1w-mask", help="part 3: its brain mask (default: the b0 brain mask carried over)")
    ap.add_argument("--real-dwi", help="part 3: a real DWI run of the same session (with .bval/.bvec)")
    ap.add_argument("--skip-native", action="store_true", help="part 3: skip the native-resolution baseline")
    args = ap.parse_args(argv)
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    os.environ.setdefault("NIPYPE_NO_ET", "1")
    import nibabel as nib
    import torch

    from brainfuse import dwi, layout, motion, templates
    from brainfuse.phantom import generator as demo

    torch.set_num_threads(args.threads)
    if args.t1w and args.real_dwi:
        return bench_t1w(args)
    over = {"dwi_voxel_mm": args.dwi_voxel_mm}
    over.update({k: v for k, v in (("n_b0", args.n_b0), ("n_directions", args.n_directions)) if v is not None})
    cfg = demo.demo_config(over)
    subject = next(s for s in demo.plan(cfg) if s.has_dwi and (args.subject is None or s.label == args.subject))
    sub = subject.label
    tmp = tempfile.TemporaryDirectory(prefix="bench_dwi_")
    root = Path(args.demo_root or tmp.name)
    run_path = root / "bids" / f"sub-{sub}" / "dwi" / f"sub-{sub}_dir-AP_dwi.nii.gz"
    t1w = root / "bids" / f"sub-{sub}" / "anat" / f"sub-{sub}_T1w.nii.gz"
    if not run_path.exists() or not t1w.exists():
        t = time.perf_counter()
        demo.write_subject(cfg, subject, root, modalities=("T1w", "dwi"))
        print(f"generated sub-{sub} in {time.perf_counter() - t:.1f} s")
    truth = root / "truth" / f"sub-{sub}" / "dwi" / f"sub-{sub}_dir-AP_desc-truth"
    H = np.load(f"{truth}_xfm.npy")
    s0 = nib.load(f"{truth}_S0.nii.gz")
    pts = np.argwhere(s0.get_fdata() > 500) @ s0.affine[:3, :3].T + s0.affine[:3, 3]
    true_bvec = np.loadtxt(str(truth) + "rotated_dwi.bvec")
    run = dwi.load_run(run_path)
    n = len(run.bvals)
    ph = demo.SubjectPhantom(cfg, subject)
    wm = demo.tissue_at(ph.head, ph.anatomy.to_template(demo.grid_points(s0.shape, s0.affine)))["wm"].reshape(s0.shape)
    from dipy.reconst.dti import fractional_anisotropy, from_lower_triangular
    fa_true = np.nan_to_num(fractional_anisotropy(np.linalg.eigvalsh(from_lower_triangular(
        nib.load(f"{truth}_tensor.nii.gz").get_fdata()))))

    def accuracy(T, bvecs, fa, mask):
        err = motion.mean_displacement_error(H, T, pts)
        dw = np.linalg.norm(true_bvec, axis=0) > 0
        angle = np.degrees(np.arccos(np.clip(np.abs((bvecs * true_bvec).sum(0)[dw]), 0, 1))).max()
        sel = (wm > 0.9) & mask
        return err, angle, float(np.abs(fa - fa_true)[sel].mean())

    print(f"sub-{sub}: {run.data.shape[:3]} voxels of {args.dwi_voxel_mm:g} mm, {n} volumes "
          f"({int((run.bvals <= 50).sum())} b0), {args.threads} thread(s)")
    with tempfile.TemporaryDirectory(prefix="bench_dwi_work_") as work:
        import ants

        work = Path(work)
        tpl = templates.build(3, work / "resources")["T1w"]
        mask_t1 = root / "truth" / f"sub-{sub}" / "anat" / f"sub-{sub}_desc-brain_mask.nii.gz"
        brain = ants.image_read(str(t1w)) * ants.image_read(str(mask_t1))
        reg = ants.registration(fixed=ants.image_read(tpl), moving=brain, type_of_transform="Affine",
                                outprefix=str(work / "anat_"))
        # 1. the whole stage, one fresh process as in the workflow
        cmd = [sys.executable, "-m", "brainfuse", "dwi", "--dwi", str(run_path), "--subject", sub, "--out-dir",
               str(work / "deriv"), "--t1w", str(t1w), "--t1w-mask", str(mask_t1), "--transforms",
               *reg["fwdtransforms"], "--template", tpl, "--resolution", "3", "--threads", str(args.threads)]
        t, c = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - t
        c2 = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = c2.ru_utime + c2.ru_stime - c.ru_utime - c.ru_stime
        if proc.returncode:
            print(proc.stdout, proc.stderr)
            return 1
        breakdown = re.findall(r"\[dwi\] sub-[^_\s]+: (.*)", proc.stdout)[-1]
        paths = layout.dwi_paths(work / "deriv", sub, None, 3, [str(run_path)])
        table = np.genfromtxt(paths["runs"][0]["motion"], names=True, delimiter="\t")
        T = motion.matrix_from_params(np.stack([table[c] for c in dwi.PARAM_NAMES], 1),
                                      motion.fov_center(s0.shape, s0.affine))
        err, angle, fa_err = accuracy(T, np.loadtxt(paths["runs"][0]["bvec"]), nib.load(paths["fa"]).get_fdata(),
                                      nib.load(paths["mask"]).get_fdata() > 0)
        print(f"dwi stage (brainfuse dwi, fresh process): {wall:.1f} s per subject, {wall / n:.2f} s per volume "
              f"(CPU {cpu:.1f} s: wall time on a busy machine overstates it)")
        print(f"  stage breakdown (s): {breakdown}")
        side = json.loads(Path(str(paths["runs"][0]["preproc"]).replace(".nii.gz", ".json")).read_text())
        print(f"  mean displacement error {err:.3f} mm (target <= {0.1 * args.dwi_voxel_mm:.2f} mm, a tenth of a "
              f"voxel), "
              f"worst b-vector angle {angle:.3f} deg, FA error in white matter {fa_err:.4f}; DW frame placement "
              f"{side.get('DWFramePlacement')}")

        # 2. correction only: torch against per-volume ANTs
        if args.stage_only:
            return 0
        print(f"{'correction':<22}{'correct s':>10}{'s/volume':>10}{'disp err mm':>13}")
        rows = {}
        for method, volumes in (("torch", n), ("ants", args.ants_volumes)):
            if volumes <= 0:
                continue
            p = dict(dwi.DEFAULTS, registration=method)
            r, keep = run, np.arange(n)
            if volumes < n:   # the baseline on the first b0 and a few DW volumes, extrapolated per volume
                keep = np.r_[np.flatnonzero(run.bvals <= 50)[:1], np.flatnonzero(run.bvals > 50)[: volumes - 1]]
                r = dwi.Run(run.path, run.data[..., keep], run.affine, run.bvals[keep], run.bvecs[:, keep])
            t = time.perf_counter()
            T, ref = dwi.correct_runs([r], p, str(work), log=lambda *a: None)
            dwi.resample(r.data, r.affine, T[0], r.affine, r.data.shape[:3], order=3, support=dwi.signal_support(ref))
            t_corr = time.perf_counter() - t
            rows[method] = t_corr / len(r.bvals)
            label = method if volumes >= n else f"{method} ({volumes} vols)"
            err = motion.mean_displacement_error(H[keep], T[0], pts)
            print(f"{label:<22}{t_corr:>10.1f}{t_corr / len(r.bvals):>10.2f}{err:>13.3f}")
    if "ants" in rows:
        print(f"ants per-volume time / torch per-volume time: {rows['ants'] / rows['torch']:.1f}x; "
              f"ants extrapolated to {n} volumes: {rows['ants'] * n:.0f} s")
    tmp.cleanup()
    return 0


def bench_t1w(args):
    """Part 3: b0 -> T1w as the stage runs it against the native-resolution registration (the baseline)."""
    import nibabel as nib
    from nilearn import image
    from scipy import ndimage

    from brainfuse import dwi, motion
    from brainfuse.antsconfig import load_ants

    load_ants(args.threads)
    run = dwi.load_run(args.real_dwi)
    b0 = run.data[..., run.bvals <= 50].mean(3)
    mask = dwi.brain_mask(b0)
    t1 = nib.load(args.t1w)
    print(f"T1w {t1.shape} at {np.round(t1.header.get_zooms()[:3], 2)} mm; DWI {run.data.shape[:3]} at "
          f"{np.round(np.sqrt((run.affine[:3, :3] ** 2).sum(0)), 2)} mm; {args.threads} thread(s)")
    with tempfile.TemporaryDirectory(prefix="bench_dwi_t1w_") as work:
        mask_path = args.t1w_mask
        if not mask_path:
            carried = image.resample_to_img(nib.Nifti1Image(mask.astype(np.float32), run.affine), t1,
                                            interpolation="linear", force_resample=True, copy_header=True)
            mask_path = os.path.join(work, "t1w_mask.nii.gz")
            nib.save(nib.Nifti1Image(ndimage.binary_dilation(carried.get_fdata() > 0.5, iterations=3).astype(np.uint8),
                                     t1.affine), mask_path)
        pts = np.argwhere(mask) @ run.affine[:3, :3].T + run.affine[:3, 3]
        t = time.perf_counter()
        _, M = dwi.register_to_t1w(b0, mask, run.affine, args.t1w, mask_path, work)
        t_stage = time.perf_counter() - t
        print(f"b0 -> T1w, stage (T1w brain cropped, at the DWI voxel size): {t_stage:.1f} s")
        if not args.skip_native:
            t = time.perf_counter()
            t1d = np.asarray(t1.dataobj, np.float32) * (np.asarray(nib.load(mask_path).dataobj) > 0)
            M0, _ = dwi._ants_register(dwi._ants_image(t1d, t1.affine), dwi._ants_image(b0 * mask, run.affine),
                                       "Rigid", work)
            t_native = time.perf_counter() - t
            print(f"b0 -> T1w, native T1w resolution (baseline): {t_native:.1f} s ({t_native / t_stage:.0f}x); "
                  f"results {motion.mean_displacement_error(M0[None], M[None], pts):.2f} mm apart over the b0 brain")
    return 0


if __name__ == "__main__":
    sys.exit(main())
