"""brainfuse.motion: batched rigid/affine registration against the phantom's known head motion.

Conventions compared here (see the module docstrings): the phantom stores H_k, a world (RAS mm) map from
reference-volume points to volume-k points with R = Rz Ry Rx about the FOV centre, volume 0 = reference;
``register_series`` returns T_k in the same sense (reference -> volume k) but its reference is the mean
image, so T_k T_0^-1 is compared with H_k. Parameters: brainfuse writes R = Rx Ry Rz (fMRIPrep), the
phantom's table uses Rz Ry Rx; the two agree to second order in the angles, matrices agree exactly.
"""
import os

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch

from brainfuse import demo, motion

torch.set_num_threads(1)


def _bold(root, sub):
    img = nib.load(root / "bids" / f"sub-{sub}" / "func" / f"sub-{sub}_task-rest_bold.nii.gz")
    truth = root / "truth" / f"sub-{sub}" / "func"
    H = np.load(truth / f"sub-{sub}_task-rest_desc-truth_xfm.npy")
    params = pd.read_csv(truth / f"sub-{sub}_task-rest_desc-truth_motion.tsv", sep="\t")
    return img.get_fdata(dtype=np.float32), img.affine, H, params


def _brain_points(ref, affine):
    return demo.apply_affine(affine, np.argwhere(ref > 0.25 * np.percentile(ref, 98)).astype(float))


@pytest.mark.parametrize("sub", ["001", "002", "003"])
def test_known_bold_motion_recovered(tiny_demo, sub):
    root, _ = tiny_demo
    data, A, H, _ = _bold(root, sub)
    res = motion.register_series(data, A)
    rel = res.transforms @ np.linalg.inv(res.transforms[0])
    pts = _brain_points(res.reference, A)
    moved = motion.mean_displacement_error(H, np.tile(np.eye(4), (len(H), 1, 1)), pts)
    err = motion.mean_displacement_error(H, rel, pts)
    assert moved > 0.1          # the phantom really moved
    assert err <= 0.1, f"sub-{sub}: mean displacement error {err:.3f} mm"
    # the parameters themselves: same rigid maps written in brainfuse's convention
    truth_T = np.array([demo.rigid(p, motion.fov_center(data.shape, A)) for p in _bold(root, sub)[3].to_numpy()])
    np.testing.assert_allclose(truth_T, H, atol=1e-6)   # the TSV is rounded
    p_rel = motion.params_from_matrix(rel, res.center)
    p_true = motion.params_from_matrix(H, res.center)
    assert np.abs(p_rel[:, :3] - p_true[:, :3]).max() < 0.1           # mm
    assert np.abs(p_rel[:, 3:] - p_true[:, 3:]).max() < 0.1 / 50      # rad (0.1 mm at 50 mm)


def test_params_matrix_round_trip_and_convention():
    rng = np.random.default_rng(0)
    p = np.c_[rng.normal(0, 2, (20, 3)), rng.normal(0, 0.1, (20, 3))]
    c = np.array([3.0, -10.0, 20.0])
    T = motion.matrix_from_params(p, c)
    np.testing.assert_allclose(motion.params_from_matrix(T, c), p, atol=1e-10)
    from scipy.spatial.transform import Rotation
    np.testing.assert_allclose(T[:, :3, :3], Rotation.from_euler("XYZ", p[:, 3:]).as_matrix(), atol=1e-12)
    np.testing.assert_allclose(T[:, :3, :3] @ c + T[:, :3, 3] - c, p[:, :3], atol=1e-10)   # t = T(c) - c


def test_fd_equals_nipype_on_true_parameters(tiny_demo, tmp_path):
    from nipype.algorithms.confounds import FramewiseDisplacement

    root, _ = tiny_demo
    data, A, H, params = _bold(root, "001")
    p = params[list(motion.PARAM_NAMES)].to_numpy()
    np.savetxt(tmp_path / "fsl.par", np.c_[p[:, 3:], p[:, :3]])   # FSL order: rotations first
    res = FramewiseDisplacement(in_file=str(tmp_path / "fsl.par"), parameter_source="FSL",
                                save_plot=False).run(cwd=str(tmp_path))
    ref = np.loadtxt(res.outputs.out_file, skiprows=1)
    ours = motion.framewise_displacement(p)
    assert ours[0] == 0 and ours.max() > 0.05
    np.testing.assert_allclose(ours[1:], ref, rtol=1e-5, atol=1e-6)
    # FD of the recovered motion tracks the truth (parameters re-expressed about the same centre)
    rec = motion.register_series(data, A)
    rel = rec.transforms @ np.linalg.inv(rec.transforms[0])
    fd_rec = motion.framewise_displacement(motion.params_from_matrix(rel, rec.center))
    fd_true = motion.framewise_displacement(motion.params_from_matrix(H, rec.center))
    assert np.corrcoef(fd_rec[1:], fd_true[1:])[0, 1] > 0.95
    assert np.abs(fd_rec - fd_true).mean() < 0.05


def test_resample_series_undoes_motion():
    """A smooth blob moved by known transforms comes back onto the reference."""
    shape, A = (32, 36, 30), np.diag([-3.0, 3.0, 3.0, 1.0])
    ijk = np.indices(shape).reshape(3, -1).T.astype(float)
    world = ijk @ A[:3, :3].T
    c = motion.fov_center(shape, A)
    blob = lambda x: np.exp(-(((x - c) / [20, 25, 15]) ** 2).sum(-1) / 2) + 0.5 * np.exp(-(((x - c - [10, 0, 5]) / 6) ** 2).sum(-1) / 2)
    ref = blob(world).reshape(shape)
    params = np.array([[0, 0, 0, 0, 0, 0], [1.5, -1.0, 0.5, 0.03, -0.02, 0.04], [-2.0, 0.5, 1.0, -0.05, 0.01, 0.0]])
    T = motion.matrix_from_params(params, c)
    # volume k holds ref(T_k^-1 x): sampling it at T_k(x) gives ref(x) back
    vols = np.stack([blob(world @ np.linalg.inv(t)[:3, :3].T + np.linalg.inv(t)[:3, 3]).reshape(shape) for t in T], 3)
    out = motion.resample_series(vols, A, T)
    inner = (slice(4, -4),) * 3
    assert np.abs(out[inner] - ref[inner][..., None]).max() < 0.05   # trilinear error on a 6 mm blob
    assert np.abs(vols[inner][..., 1] - ref[inner]).max() > 0.1
    res = motion.register_series(vols, A, reference=ref, mask=ref > 0.05)
    np.testing.assert_allclose(res.params[:, :3], params[:, :3], atol=0.05)   # mm
    np.testing.assert_allclose(res.params[:, 3:], params[:, 3:], atol=1e-3)   # rad


def test_one_reference_per_volume():
    """A 4D reference gives each volume its own target (dwi: each volume against its tensor prediction): volumes
    of different contrast, each moved, come back onto their own unmoved image."""
    shape, A = (32, 36, 30), np.diag([-3.0, 3.0, 3.0, 1.0])
    world = np.indices(shape).reshape(3, -1).T.astype(float) @ A[:3, :3].T
    c = motion.fov_center(shape, A)
    g = lambda x, m, s: np.exp(-(((x - c - m) / s) ** 2).sum(-1) / 2)
    # contrast k: a bright blob, an off-centre blob whose sign and size change with k
    img = lambda x, k: g(x, [0, 0, 0], [20, 25, 15]) + (0.6 - 0.4 * k) * g(x, [10, -5, 5], [6 + 2 * k, 6, 8])
    params = np.array([[0.8, -0.5, 0.3, 0.02, -0.01, 0.03], [-1.2, 0.4, 0.9, -0.03, 0.02, 0.0],
                       [0.3, 1.0, -0.6, 0.01, 0.03, -0.02]])
    T = motion.matrix_from_params(params, c)
    move = lambda t: world @ np.linalg.inv(t)[:3, :3].T + np.linalg.inv(t)[:3, 3]
    vols = np.stack([img(move(t), k).reshape(shape) for k, t in enumerate(T)], 3)
    refs = np.stack([img(world, k).reshape(shape) for k in range(3)], 3)
    res = motion.register_series(vols, A, reference=refs, mask=refs.mean(3) > 0.05)
    np.testing.assert_allclose(res.params[:, :3], params[:, :3], atol=0.05)   # mm
    np.testing.assert_allclose(res.params[:, 3:], params[:, 3:], atol=1e-3)   # rad
    with pytest.raises(ValueError, match="one reference per volume"):
        motion.register_series(vols, A, reference=refs[..., :2])
    with pytest.raises(ValueError, match="needs similarity='ssd'"):
        motion.register_series(vols, A, reference=refs, similarity="mi")


def test_affine_and_mi_modes_on_phantom(tiny_demo):
    """dof="affine" (12 parameters) and similarity="mi" (used for diffusion-weighted volumes) also recover
    the phantom's motion; MI is less precise, within a fifth of a voxel."""
    root, _ = tiny_demo
    data, A, H, _ = _bold(root, "003")
    for kw, tol in ((dict(dof="affine"), 0.1), (dict(similarity="mi", reference=0), 0.25)):
        res = motion.register_series(data[..., :12], A, **kw)
        rel = res.transforms @ np.linalg.inv(res.transforms[0])
        err = motion.mean_displacement_error(H[:12], rel, _brain_points(res.reference, A))
        assert err <= tol, f"{kw}: {err:.3f} mm"


def test_rotate_bvecs():
    rng = np.random.default_rng(1)
    p = np.c_[np.zeros((5, 3)), rng.normal(0, 0.1, (5, 3))]
    T = motion.matrix_from_params(p, np.zeros(3))
    g = rng.normal(size=(3, 5))
    g /= np.linalg.norm(g, axis=0)
    g[:, 0] = 0
    out = motion.rotate_bvecs(g, T)
    for k in range(5):
        np.testing.assert_allclose(out[:, k], T[k, :3, :3].T @ g[:, k], atol=1e-12)
    # FSL convention on a LAS image: x flipped, the same rotation expressed in those axes
    A = np.diag([-2.0, 2.0, 2.0, 1.0])
    Q = np.diag([-1.0, 1.0, 1.0])
    fsl = motion.rotate_bvecs(g, T, affine=A)
    for k in range(5):
        np.testing.assert_allclose(fsl[:, k], Q @ T[k, :3, :3].T @ Q @ g[:, k], atol=1e-12)


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="4D"):
        motion.register_series(np.zeros((10, 10, 10)), np.eye(4))
    with pytest.raises(ValueError, match="dof"):
        motion.register_series(np.zeros((10, 10, 10, 3)), np.eye(4), dof="nonlinear")
