"""Motion correction: brainfuse.motion (batched torch rigid) vs ants.motion_correction, same phantom, same run.

Generates one phantom BOLD run with known head motion (brainfuse.phantom.generator, 4 mm voxels by default), corrects it
with both tools and prints wall time, the speed ratio and the mean displacement error of each against the
truth (mean over brain voxels and volumes of |H_k x - T_k x|, after expressing both relative to volume 0).

    OMP_NUM_THREADS=2 ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS=2 .venv/bin/python benchmarks/bench_motion.py
    ... --volumes 40 --voxel 3 --threads 2 [--device cuda]

ANTs convention: the forward transform of ``ants.registration(fixed=reference, moving=volume)`` maps a
reference point to the volume's point (LPS), the same sense as brainfuse's T_k (RAS): T = F M F, F = diag(-1,-1,1).
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np


def ants_matrix(path):
    import ants

    tx = ants.read_transform(path)
    M = np.eye(4)
    M[:3, :3] = np.reshape(tx.parameters[:9], (3, 3))
    c = np.asarray(tx.fixed_parameters, float)
    M[:3, 3] = np.asarray(tx.parameters[9:], float) + c - M[:3, :3] @ c
    F = np.diag([-1.0, -1.0, 1.0, 1.0])
    return F @ M @ F


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--volumes", type=int, default=40)
    ap.add_argument("--voxel", type=float, default=4.0, help="BOLD voxel size (mm); the demo uses 4")
    ap.add_argument("--motion", type=float, default=1.0, help="motion scale (mm)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(args.threads)
    import ants
    import nibabel as nib
    import torch

    from brainfuse import motion
    from brainfuse.phantom import generator as demo

    torch.set_num_threads(args.threads)
    cfg = demo.demo_config({"n_bold_volumes": args.volumes, "bold_voxel_mm": args.voxel,
                            "motion_mm": {"bold": args.motion}})
    subject = demo.plan(cfg)[0]
    data, A, _, H, _, _ = demo.SubjectPhantom(cfg, subject).bold()
    data = data.astype(np.float32)
    ref = data[..., 0]
    pts = demo.apply_affine(A, np.argwhere(ref > 0.25 * np.percentile(ref, 98)).astype(float))
    still = motion.mean_displacement_error(H, np.tile(np.eye(4), (len(H), 1, 1)), pts)
    print(f"phantom: {data.shape} at {args.voxel:g} mm, {args.threads} threads; true motion: mean displacement "
          f"{still:.3f} mm, max FD {motion.framewise_displacement(motion.params_from_matrix(H, motion.fov_center(data.shape, A))).max():.2f} mm")

    motion.register_series(data[..., :4], A, device=args.device)          # warm-up (torch kernels)
    t = time.perf_counter()
    res = motion.register_series(data, A, device=args.device)
    t_bf = time.perf_counter() - t
    rel = res.transforms @ np.linalg.inv(res.transforms[0])
    err_bf = motion.mean_displacement_error(H, rel, pts)

    with tempfile.TemporaryDirectory(dir="/tmp") as td:
        path = os.path.join(td, "bold.nii.gz")
        nib.save(nib.Nifti1Image(data, A), path)
        img = ants.image_read(path)
        t = time.perf_counter()
        mc = ants.motion_correction(img, outprefix=os.path.join(td, "mc"))
        t_ants = time.perf_counter() - t
        T = np.array([ants_matrix(p[0]) for p in mc["motion_parameters"]])
    rel_a = T @ np.linalg.inv(T[0])
    err_ants = motion.mean_displacement_error(H, rel_a, pts)

    n = data.shape[3]
    print(f"ants.motion_correction : {t_ants:7.2f} s ({t_ants / n:.3f} s/volume), mean displacement error {err_ants:.4f} mm")
    print(f"brainfuse.motion       : {t_bf:7.2f} s ({t_bf / n:.3f} s/volume), mean displacement error {err_bf:.4f} mm"
          f"  [{args.device}]")
    print(f"speed ratio (ants / brainfuse): {t_ants / t_bf:.1f}x   target >= 5x at equal or better accuracy: "
          f"{'MET' if t_ants / t_bf >= 5 and err_bf <= max(err_ants, 0.1) else 'NOT MET'}")


if __name__ == "__main__":
    main()
