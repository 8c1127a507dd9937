"""Batched rigid/affine motion correction in torch (func and dwi stages).

All volumes of a series are registered to one reference at once: one batched problem, one set of
parameters per volume, a Gaussian pyramid (shrink 4, 2, 1 by default), trilinear
``torch.nn.functional.grid_sample`` at the reference's brain-mask points. Works on "cpu" or "cuda"
(float32 images; the small 6×6 / 12×12 solves and the returned matrices are float64).

Conventions (exact)
-------------------
* Coordinates are world millimetres (RAS+, the NIfTI ``affine`` of the series: voxel -> world), so
  anisotropic voxels and oblique affines need no special care. Reference and series share one grid.
* ``transforms[k]`` is a 4×4 world matrix ``T_k`` mapping a reference-space point ``x`` to the point
  ``T_k @ x`` of volume ``k`` (the sense ANTs calls fixed -> moving). Sampling volume ``k`` at
  ``T_k(x)`` for every reference voxel centre ``x`` gives the corrected volume (``resample_series``).
* Rotation centre ``c`` = centre of the reference field of view: ``affine @ ((shape[:3] - 1) / 2)``.
* Parameters, fMRIPrep's names and order: ``trans_x, trans_y, trans_z`` (mm), ``rot_x, rot_y, rot_z``
  (radians), with ``T_k(x) = R (x - c) + c + t`` and ``R = Rx(rot_x) @ Ry(rot_y) @ Rz(rot_z)`` (right-
  handed rotations about the world axes; scipy's ``Rotation.from_euler("XYZ", ...)``, the composition
  fMRIPrep's ``FSLMotionParams`` decomposes with ``as_euler("XYZ")``). ``t = T_k(c) - c`` is the
  displacement of the centre. Unlike fMRIPrep (MCFLIRT: FSL scaled-voxel axes, centre of gravity), axes
  are world RAS axes and the centre is the FOV centre, so translations differ by ``(R - I)`` times the
  centre offset; rotations and framewise displacement (Power) are comparable. For affine transforms
  ``R`` is the rotation of the polar decomposition of the linear part.
* Framewise displacement: Power et al. 2012, radius 50 mm, first value 0 (equals nipype's
  ``FramewiseDisplacement`` given the parameters in FSL order: rotations first).
* b-vectors: a volume acquired with gradient ``g`` (world axes) and moved by ``T_k`` (rotation ``R``)
  has, once corrected into reference space, the gradient ``R.T @ g``: the tensor seen at ``T_k(x)`` is
  ``R D(x) R.T``, and ``g.T R D R.T g = (R.T g).T D (R.T g)``.

Similarity: ``"ssd"`` (same contrast: BOLD, b0s) solves inverse-compositional Gauss-Newton steps on the
sum of squared differences after a per-volume linear intensity fit (no autograd, a few ms an
iteration); ``"mi"`` (different contrast: diffusion-weighted volumes against a b0) maximises Parzen
mutual information with L-BFGS through autograd (less precise: about 0.1 mm on the phantom, against
0.01 mm for ssd).

Why ssd cannot run away (it used to). With the intensity slope ``a`` near 0 (a zeroed, noise or
dropped-out volume; a < 0 for a contrast-inverted fit) the residual is ``f̄ - f`` wherever the volume is,
so the Gauss-Newton step ``H^-1 J^T (f̄ - f)`` is the same push every iteration, cut only by the trust
region: one zeroed volume of a real BOLD went 61 mm and 15 degrees, noise 62 mm. Now a volume takes no
step unless a > 0, r >= ``MIN_CORRELATION`` (r: correlation with the reference over the points inside
its field of view) and a quarter of the points lie inside; a step is kept only while the cost ``1 - r^2``
stays within ``SLACK`` of the best (a rejected one halves that volume's trust radius, at most one voxel
of the level); pyramid levels keep at least 6 samples along each axis (a 4-slice slab crashed, 5-8
slices lost their through-plane gradient); the first reference is the volume most like the series'
median, not blindly the middle one. ``register_series`` can also bound the result
(``max_rotation_deg``, ``max_translation_mm``): volumes beyond are re-estimated from the identity and a
``MotionBoundsError`` names those that stay beyond.

API used by func and dwi: ``register_series`` (``MotionBoundsError``), ``resample_series`` (corrected
series on the same grid), ``sample_series`` (volume k at T_k of arbitrary world points: motion and
normalisation in one interpolation), ``framewise_displacement``, ``rotate_bvecs``, ``params_from_matrix``
/ ``matrix_from_params``, ``mean_displacement_error``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from .errors import BrainfuseError

PARAM_NAMES = ("trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z")
DEFAULT_LEVELS = ((4, 2.0), (2, 1.0), (1, 0.5))  # (shrink factor, Gaussian sigma in voxels of the finest axis)


@dataclass
class MotionResult:
    transforms: np.ndarray  # (N, 4, 4) float64, reference world -> volume world
    params: np.ndarray      # (N, 6) trans_x, trans_y, trans_z (mm), rot_x, rot_y, rot_z (rad)
    fd: np.ndarray          # (N,) Power framewise displacement (mm), fd[0] = 0
    reference: np.ndarray   # the reference image registered to
    center: np.ndarray      # (3,) rotation centre (mm)
    correlation: np.ndarray | None = None   # (N,) with the reference at the finest level (ssd), else None
    reference_volume: int | None = None     # the volume whose frame the reference is in (reference=None / int)
    reestimated: tuple = ()                 # volumes re-estimated from the identity (beyond the bounds)


class MotionBoundsError(BrainfuseError):
    """Motion estimates beyond the configured bounds even after re-estimation from the identity."""


# ---------------------------------------------------------------- parameters and matrices
def _rot_xyz(rx, ry, rz):
    cx, sx, cy, sy, cz, sz = np.cos(rx), np.sin(rx), np.cos(ry), np.sin(ry), np.cos(rz), np.sin(rz)
    one, zero = np.ones_like(rx), np.zeros_like(rx)
    Rx = np.stack([one, zero, zero, zero, cx, -sx, zero, sx, cx], -1).reshape(-1, 3, 3)
    Ry = np.stack([cy, zero, sy, zero, one, zero, -sy, zero, cy], -1).reshape(-1, 3, 3)
    Rz = np.stack([cz, -sz, zero, sz, cz, zero, zero, zero, one], -1).reshape(-1, 3, 3)
    return Rx @ Ry @ Rz


def fov_center(shape, affine) -> np.ndarray:
    """World coordinates (mm) of the centre of the field of view: the default rotation centre."""
    return (np.asarray(affine, float) @ np.r_[(np.asarray(shape[:3], float) - 1) / 2, 1.0])[:3]


def matrix_from_params(params, center) -> np.ndarray:
    """(N, 6) fMRIPrep-order parameters -> (N, 4, 4) ``T(x) = R (x - c) + c + t``, R = Rx Ry Rz."""
    p = np.atleast_2d(np.asarray(params, float))
    T = np.tile(np.eye(4), (len(p), 1, 1))
    T[:, :3, :3] = _rot_xyz(p[:, 3], p[:, 4], p[:, 5])
    c = np.asarray(center, float)
    T[:, :3, 3] = p[:, :3] + c - T[:, :3, :3] @ c
    return T


def rotation_part(transforms) -> np.ndarray:
    """Rotation of the polar decomposition of each linear part (the linear part itself when rigid)."""
    u, _, vt = np.linalg.svd(np.asarray(transforms, float)[..., :3, :3])
    return u @ vt


def params_from_matrix(transforms, center) -> np.ndarray:
    """Inverse of ``matrix_from_params`` (exact for |rot_y| < pi/2); affine: rotation by polar decomposition."""
    T = np.asarray(transforms, float).reshape(-1, 4, 4)
    R = rotation_part(T)
    c = np.asarray(center, float)
    trans = T[:, :3, :3] @ c + T[:, :3, 3] - c  # T(c) - c
    rot = np.stack([np.arctan2(-R[:, 1, 2], R[:, 2, 2]),
                    np.arcsin(np.clip(R[:, 0, 2], -1, 1)),
                    np.arctan2(-R[:, 0, 1], R[:, 0, 0])], axis=1)
    return np.hstack([trans, rot])


def framewise_displacement(params, radius: float = 50.0) -> np.ndarray:
    """Power et al. 2012: sum |Δtrans| + radius * sum |Δrot| (params in fMRIPrep order); FD[0] = 0."""
    d = np.abs(np.diff(np.asarray(params, float), axis=0))
    return np.r_[0.0, d[:, :3].sum(1) + radius * d[:, 3:].sum(1)]


def rotate_bvecs(bvecs, transforms, affine=None) -> np.ndarray:
    """Gradient directions in reference space: ``R_k.T @ g_k`` for each volume (see module docstring).

    ``bvecs`` is (3, N) in world axes, or, when ``affine`` is given, in FSL's convention (image axes,
    x flipped when det(affine) > 0): the world rotation is then expressed in those axes. Zero vectors
    (b0) stay zero.
    """
    g = np.asarray(bvecs, float)
    R = rotation_part(transforms)
    if affine is not None:  # Q: FSL bvec axes -> world
        Q = rotation_part(np.asarray(affine, float)[None])[0]
        if np.linalg.det(np.asarray(affine, float)[:3, :3]) > 0:
            Q = Q @ np.diag([-1.0, 1.0, 1.0])
        R = Q.T @ R @ Q
    return np.einsum("nji,jn->in", R, g)


def mean_displacement_error(T_true, T_est, points_mm, per_volume: bool = False):
    """Mean over points (M, 3) of ``||T_true(x) - T_est(x)||`` (mm); over volumes too unless per_volume."""
    x = np.c_[np.asarray(points_mm, float), np.ones(len(points_mm))]
    d = np.linalg.norm(np.einsum("nij,mj->nmi", np.asarray(T_true) - np.asarray(T_est), x)[..., :3], axis=2)
    return d.mean(1) if per_volume else float(d.mean())


# ---------------------------------------------------------------- torch helpers
def _smooth_decimate(vols: torch.Tensor, sigmas_vox, steps) -> torch.Tensor:
    """Gaussian smoothing (sigma in voxels per axis, edges replicated) then every step-th voxel, of
    (N, 1, I, J, K): one small (L_out, L) matrix per axis, a matmul each (fast on CPU and GPU)."""
    for axis, (s, step) in enumerate(zip(sigmas_vox, steps)):
        L = vols.shape[2 + axis]
        out = torch.arange(0, L, int(step), device=vols.device)
        r = int(np.ceil(3 * s)) if s > 0.05 else 0
        d = torch.arange(-r, r + 1, device=vols.device)
        w = torch.exp(-d.to(vols.dtype) ** 2 / (2 * max(s, 1e-3) ** 2))
        S = torch.zeros(len(out), L, dtype=vols.dtype, device=vols.device)
        rows = torch.arange(len(out), device=vols.device)[:, None].expand(-1, len(d))
        S.index_put_((rows, (out[:, None] + d).clamp(0, L - 1)),
                     (w / w.sum()).expand(len(out), -1), accumulate=True)
        vols = torch.movedim(torch.movedim(vols, 2 + axis, -1) @ S.T, -1, 2 + axis)
    return vols.contiguous()


def _sample(vols, Mvox, pts, mode="bilinear"):
    """Values of each volume n of (N, 1, I, J, K) at voxel coordinates Mvox[n] @ pts; also in-FOV flags."""
    size = torch.tensor(vols.shape[2:], dtype=pts.dtype, device=pts.device)
    # grid_sample wants (k, j, i) normalised to [-1, 1]: fold the axis flip and the scaling into the
    # matrix so that one batched matmul gives the grid directly (no copies of the (N, P, 3) array)
    S = torch.diag(2 / (size - 1)).flip(0)
    Mg = S @ Mvox[:, :3, :3]
    tg = (S @ Mvox[:, :3, 3:])[..., 0] - 1
    g = torch.baddbmm(tg[:, None, :], pts.expand(len(Mvox), -1, -1), Mg.transpose(1, 2))
    vals = F.grid_sample(vols, g[:, None, None], mode=mode, padding_mode="border", align_corners=True)[:, 0, 0, 0]
    return vals, (g.abs().amax(-1) <= 1).to(vals.dtype)


def _update_matrix(delta: torch.Tensor, center: torch.Tensor, dof: str) -> torch.Tensor:
    """(N, 6|12) -> (N, 4, 4) world matrices ``W(x) = L (x - c) + c + t`` (L = exp(skew w) or I + A)."""
    n = delta.shape[0]
    t = delta[:, :3]
    if dof == "rigid":
        w = delta[:, 3:]
        K = torch.zeros(n, 3, 3, dtype=delta.dtype, device=delta.device)
        K[:, 0, 1], K[:, 0, 2], K[:, 1, 2] = -w[:, 2], w[:, 1], -w[:, 0]
        L = torch.linalg.matrix_exp(K - K.transpose(1, 2))
    else:
        L = torch.eye(3, dtype=delta.dtype, device=delta.device) + delta[:, 3:].reshape(n, 3, 3)
    W = torch.eye(4, dtype=delta.dtype, device=delta.device).repeat(n, 1, 1)
    W[:, :3, :3] = L
    W[:, :3, 3] = t + center - L @ center
    return W


def _mutual_information(fixed_bin, moving, valid, bins):
    """Per-volume Mattes mutual information: fixed (P,) bin indices, moving (N, P) scaled to [0, 1]
    with a cubic B-spline Parzen window (4 bins a sample, scatter-added: cheap and differentiable)."""
    z = moving.clamp(0, 1) * (bins - 4) + 1.5
    j0 = torch.floor(z).detach() - 1
    parts_w, parts_i = [], []
    for o in range(4):
        t = (z - (j0 + o)).abs()
        parts_w.append(torch.where(t < 1, 2 / 3 - t ** 2 + t ** 3 / 2, (2 - t).clamp(min=0) ** 3 / 6))
        parts_i.append((j0 + o).long() * bins + fixed_bin)
    w = torch.stack(parts_w, -1) * valid[..., None]
    joint = torch.zeros(moving.shape[0], bins * bins, dtype=moving.dtype, device=moving.device)
    joint = joint.scatter_add(1, torch.stack(parts_i, -1).flatten(1), w.flatten(1)).view(-1, bins, bins)
    joint = joint / joint.sum((1, 2), keepdim=True).clamp(min=1e-12)
    pm, pf = joint.sum(2, keepdim=True), joint.sum(1, keepdim=True)
    return (joint * (torch.log(joint + 1e-12) - torch.log(pm * pf + 1e-12))).sum((1, 2))


# ---------------------------------------------------------------- registration
# A volume correlated less than this with the reference (noise, a dropped-out volume) takes no step: its
# Gauss-Newton steps would fit noise (noise volumes of a real BOLD: r < 0.07; a real volume 45 degrees off: 0.6).
MIN_CORRELATION = 0.2
MIN_IN_FOV = 0.25       # nor does a volume with fewer of the mask points inside its field of view
# A step is kept while its cost (1 - r^2) stays within SLACK of the best seen at the level: far from the
# optimum that stops a step that runs away; near it, Gauss-Newton's own fixed point is less biased than the
# minimum of the trilinear-interpolated cost (strict descent: 0.045 against 0.01 mm on the phantom; slack
# 1e-3: 0.24 against 0.09 mm for a real volume moved a known 1 mm / 1 deg).
SLACK = 0.005
MIN_LEVEL_SAMPLES = 6   # per axis: a thin slab decimated to 2 slices loses its through-plane gradient


def _level_grid(affine, shape, shrink, vmin):
    """Per-axis integer shrink so that spacing ~ shrink * finest voxel size, keeping at least
    ``MIN_LEVEL_SAMPLES`` samples along each axis; and the level's affine."""
    vox = np.sqrt((np.asarray(affine, float)[:3, :3] ** 2).sum(0))
    f = np.maximum(1, np.round(shrink * vmin / vox)).astype(int)
    f = np.minimum(f, np.maximum(1, np.asarray(shape[:3]) // MIN_LEVEL_SAMPLES))
    return f, np.asarray(affine, float) @ np.diag(np.r_[f, 1.0])


def _ssd_terms(w, v, fixed, J, H0, min_valid):
    """Gauss-Newton terms of each volume at its current position: samples w (N, P), in-FOV flags v.

    The intensity fit ``a (w - w̄) + f̄`` (per volume, over valid points) is clamped at a >= 0: a negative
    slope would let a contrast-inverted (e.g. flipped) position fit. Returns cost = 1 - r^2 (1 when a = 0),
    the normal equations H, b, and ``ok``: the volume carries information (a > 0, r >= MIN_CORRELATION,
    at least ``min_valid`` of the points inside its field of view).
    """
    nv = v.sum(1, keepdim=True).clamp(min=1)
    wd = (w - (w * v).sum(1, keepdim=True) / nv) * v
    fd = (fixed - (fixed * v).sum(1, keepdim=True) / nv) * v
    a = ((wd * fd).sum(1, keepdim=True) / (wd ** 2).sum(1, keepdim=True).clamp(min=1e-12)).clamp(min=0)
    e = a * wd - fd
    cost = (e.double() ** 2).sum(1) / (fd.double() ** 2).sum(1).clamp(min=1e-12)   # float64: steps near the optimum
    H = H0.expand(len(v), -1, -1)
    if (v < 1).any():  # drop the points that fell outside a volume's field of view
        H = H - (((1 - v)[..., None] * J).transpose(1, 2) @ J).double()
    b = (e[:, None, :] @ J).double()[:, 0]
    ok = (a[:, 0] > 0) & (nv[:, 0] >= min_valid * v.shape[1]) & (cost <= 1 - MIN_CORRELATION ** 2)
    return cost, H, b, ok


def _gauss_newton(mv, fixed, J, H0, pts, A64, T, c64, dof, iters, tol, max_vox, r_max, starts=()):
    """Inverse-compositional Gauss-Newton of one level with a per-volume trust region: a step is kept only
    if its cost stays within ``SLACK`` of the volume's best, a rejected one halves the volume's radius (at
    most ``max_vox``, mm: the farthest any mask point may move in one step). ``starts``: other (N, 4, 4)
    starting transforms; a volume takes one where it fits better. Returns (T, cost = 1 - r^2)."""
    dev, dt = mv.device, mv.dtype
    Ainv = torch.linalg.inv(A64)
    n = len(T)
    eye = torch.eye(J.shape[-1], dtype=torch.float64, device=dev)
    T_acc, cost_acc = T.to(dev), torch.full((n,), np.inf, dtype=torch.float64, device=dev)
    cost_best = cost_acc.clone()
    H_acc = torch.zeros(n, *eye.shape, dtype=torch.float64, device=dev)
    b_acc = torch.zeros(n, eye.shape[0], dtype=torch.float64, device=dev)
    ok_acc = torch.zeros(n, dtype=torch.bool, device=dev)
    radius = torch.full((n,), float(max_vox), dtype=torch.float64, device=dev)
    candidates = [T.to(dev)] + [torch.as_tensor(np.asarray(s), dtype=torch.float64, device=dev) for s in starts]
    for it in range(iters + len(candidates) - 1):
        T_new = candidates[it] if it < len(candidates) else T_new
        w, v = _sample(mv, (Ainv @ T_new @ A64).to(dt), pts)
        cost, H, b, ok = _ssd_terms(w, v, fixed, J, H0, MIN_IN_FOV)
        if it < len(candidates):   # another start only where it fits better, and fits at all
            keep = (cost < cost_acc) & (ok | (it == 0))
        else:                      # a step: kept unless it loses more than SLACK of the best fit
            keep = cost <= cost_best + SLACK
        cost_best = torch.minimum(cost_best, torch.where(keep, cost, cost_best))
        T_acc = torch.where(keep[:, None, None], T_new, T_acc)
        cost_acc = torch.where(keep, cost, cost_acc)
        H_acc = torch.where(keep[:, None, None], H, H_acc)
        b_acc = torch.where(keep[:, None], b, b_acc)
        ok_acc = torch.where(keep, ok, ok_acc)
        if it < len(candidates) - 1:
            continue
        if it >= len(candidates):   # the first candidate evaluated is not a step: no radius change
            radius = torch.where(keep, (2 * radius).clamp(max=max_vox), radius / 2)
        delta = torch.linalg.solve(H_acc + 1e-9 * eye, b_acc) * ok_acc[:, None]
        # no mask point moves more than the volume's radius in one step
        reach = delta[:, :3].norm(dim=1) + r_max * delta[:, 3:].abs().sum(1)
        delta = delta * (radius / reach.clamp(min=1e-12)).clamp(max=1)[:, None]
        T_new = T_acc @ torch.linalg.inv(_update_matrix(delta, c64, dof))
        if (delta[:, :3].norm(dim=1) + 50 * delta[:, 3:].abs().sum(1)).max() < tol:
            break
    return T_acc, cost_acc


def _register(vols, ref, mask, affine, T, center, dof, similarity, levels, max_iter, tol, bins,
              max_points, max_step=1.0, starts=()):
    """Refine world transforms T (N, 4, 4, float64) of vols (N, 1, I, J, K) to ref (1, 1, I, J, K).

    ssd: ``max_step`` (voxels of the level) bounds each step; ``starts`` are other starting transforms
    tried at the first level. Returns (T, cost of the last level: 1 - r^2 for ssd, None for mi)."""
    dev, dt = vols.device, vols.dtype
    vox = np.sqrt((affine[:3, :3] ** 2).sum(0))
    vmin = vox.min()
    c64 = torch.tensor(center, dtype=torch.float64, device=dev)
    cost = None
    for (shrink, sigma), iters in zip(levels, max_iter):
        f, A_l = _level_grid(affine, vols.shape[2:], shrink, vmin)
        sig = sigma * vmin / vox  # isotropic in mm
        mv = _smooth_decimate(vols, sig, f)
        rf = _smooth_decimate(ref, sig, f)[:, 0]   # (R, i, j, k): R = 1, or one reference per volume
        m = torch.as_tensor(mask, device=dev)[None, None].to(dt)
        m = F.max_pool3d(m, tuple(int(x) for x in f), ceil_mode=True)[0, 0] > 0
        pts = torch.nonzero(m).to(dt)
        if similarity == "mi" and len(pts) > max_points:  # fixed random subset, as ANTs' sampling
            pts = pts[torch.randperm(len(pts), generator=torch.Generator().manual_seed(0))[:max_points].to(dev)]
        idx = pts.long()
        fixed = rf[:, idx[:, 0], idx[:, 1], idx[:, 2]]                    # (R, P)
        A64 = torch.tensor(A_l, dtype=torch.float64, device=dev)
        Ainv = torch.linalg.inv(A64)
        world = pts.double() @ A64[:3, :3].T + A64[:3, 3]
        if similarity == "ssd":
            # reference gradient (world mm) at the points -> Jacobian of W(x; p) at p = 0
            gv = torch.stack(torch.gradient(rf, dim=(1, 2, 3)), -1)[:, idx[:, 0], idx[:, 1], idx[:, 2]]
            g = gv.double() @ torch.linalg.inv(A64[:3, :3])                  # (R, P, 3)
            r = world - c64
            level_vox = float(np.sqrt((A_l[:3, :3] ** 2).sum(0)).min())
            if dof == "rigid":
                J = torch.cat([g, torch.linalg.cross(r.expand_as(g), g, dim=-1)], -1)
            else:
                J = torch.cat([g, (g[..., :, None] * r[:, None, :]).flatten(-2)], -1)
            J = J.to(dt)                                                      # (R, P, 6|12)
            T, cost = _gauss_newton(mv, fixed, J, (J.transpose(1, 2) @ J).double(), pts, A64, T, c64, dof, iters,
                                    tol, max_step * level_vox, float(r.norm(dim=1).max()), starts)
            starts = ()
        else:
            # jittered points, the reference interpolated too: removes MI's bias towards grid alignment
            gen = torch.Generator().manual_seed(0)
            pts = pts + (torch.rand(pts.shape, generator=gen) - 0.5).to(dev, dt)
            eye = torch.eye(4, dtype=dt, device=dev)[None]
            fixed = _sample(rf[:1, None], eye, pts)[0][0]
            lo, hi = torch.quantile(fixed, 0.001), torch.quantile(fixed, 0.999)
            fixed_bin = (((fixed - lo) / (hi - lo)).clamp(0, 1) * (bins - 1)).round().long()
            flat = mv.flatten(1)[:, :: max(1, mv[0].numel() // 100000)]
            mlo, mhi = torch.quantile(flat, 0.001, dim=1)[:, None], torch.quantile(flat, 0.999, dim=1)[:, None]
            n_par = 6 if dof == "rigid" else 12
            scale = torch.tensor([1.0] * 3 + [1 / 50.0] * (n_par - 3), dtype=torch.float64, device=dev)
            p = torch.zeros(len(T), n_par, dtype=torch.float64, device=dev, requires_grad=True)
            T0 = T.to(dev)
            opt = torch.optim.LBFGS([p], lr=1, max_iter=iters, line_search_fn="strong_wolfe",
                                    tolerance_change=1e-9, tolerance_grad=1e-7)

            def closure():
                opt.zero_grad()
                M = (Ainv @ T0 @ _update_matrix(p * scale, c64, dof) @ A64).to(dt)
                w, v = _sample(mv, M, pts)
                loss = -_mutual_information(fixed_bin, (w - mlo) / (mhi - mlo), v, bins).sum()
                loss.backward()
                return loss

            opt.step(closure)
            T = (T0 @ _update_matrix(p.detach() * scale, c64, dof)).detach()
    return T, cost


def _mean_reference(data, affine, T, use=None, device="cpu") -> np.ndarray:
    """Mean of the corrected series, each voxel over the volumes whose field of view covers it, leaving out
    volumes unlike the first reference (``use`` False: zero or noise volumes). A plain mean took the zeros
    of a volume whose slab edge moved out of the field of view: 0.3 mm of bias for a real BOLD volume moved
    a known 6 mm / 4 deg (0.02 mm against this mean)."""
    use = np.ones(data.shape[3], bool) if use is None or not np.any(use) else np.asarray(use, bool)
    A = np.asarray(affine, float)
    pts = np.indices(data.shape[:3]).reshape(3, -1).T @ A[:3, :3].T + A[:3, 3]
    vals, valid = sample_series(data[..., use], A, T[use], pts, device=device)
    return ((vals * valid).sum(1) / np.maximum(valid.sum(1), 1)).reshape(data.shape[:3]).astype(np.float32)


def _centroids(data, affine) -> np.ndarray:
    """(N, 3) world intensity centroid of each volume's foreground (above 25 % of its 98th percentile),
    on every second voxel: enough to start a volume that moved by centimetres close to its position."""
    sub = np.asarray(data[::2, ::2, ::2], np.float32)
    flat = sub.reshape(-1, sub.shape[3])
    w = np.where(flat > 0.25 * np.percentile(flat, 98, axis=0), flat, 0).astype(np.float64)
    ijk = np.indices(sub.shape[:3]).reshape(3, -1).T * 2.0
    c = (w.T @ ijk) / np.maximum(w.sum(0), 1e-12)[:, None]
    return c @ np.asarray(affine, float)[:3, :3].T + np.asarray(affine, float)[:3, 3]


def central_volume(data4d) -> int:
    """The volume most correlated with the series' median image (every second voxel): the first reference.
    Not blindly the middle volume: a corrupted or moved middle volume would become every volume's target."""
    sub = np.asarray(data4d[::2, ::2, ::2], np.float32)
    med = np.median(sub, axis=3)
    m = med > 0.25 * np.percentile(med, 98)
    x = sub[m] - sub[m].mean(0)
    y = med[m] - med[m].mean()
    r = (x * y[:, None]).sum(0) / np.maximum(np.sqrt((x ** 2).sum(0) * (y ** 2).sum()), 1e-12)
    return int(np.argmax(r))


def _beyond(params, max_rotation_deg, max_translation_mm) -> np.ndarray:
    """Volumes whose |rotation| (any axis) or |translation| (any axis) exceeds the bounds (None: no bound)."""
    out = np.zeros(len(params), bool)
    if max_rotation_deg is not None:
        out |= np.degrees(np.abs(params[:, 3:])).max(1) > max_rotation_deg
    if max_translation_mm is not None:
        out |= np.abs(params[:, :3]).max(1) > max_translation_mm
    return out


def describe_params(p) -> str:
    """'trans_x 1.20 mm, ..., rot_z -52.6 deg' for one (6,) parameter vector."""
    return ", ".join([f"{k} {v:.2f} mm" for k, v in zip(PARAM_NAMES[:3], p[:3])] +
                     [f"{k} {np.degrees(v):.1f} deg" for k, v in zip(PARAM_NAMES[3:], p[3:])])


def register_series(data4d, affine, reference=None, mask=None, dof: str = "rigid", similarity: str = "ssd",
                    device="cpu", levels=DEFAULT_LEVELS, max_iter=None, tol: float = 1e-3, bins: int = 32,
                    max_points: int = 30000, init=None, max_rotation_deg: float | None = None,
                    max_translation_mm: float | None = None) -> MotionResult:
    """Register every volume of ``data4d`` (I, J, K, N) to a reference at once; see the module docstring.

    reference: a 3D image on the series grid, an int (that volume), or None: a first pass against the
    volume most like the series' median (``central_volume``), each volume started from the identity or
    from the shift between its intensity centroid and that volume's, whichever fits better; then the mean
    of that corrected series (in the frame of that volume; ``_mean_reference``); or, with ssd, a 4D
    (I, J, K, N) array: one reference per volume (e.g. each volume's model prediction).
    mask: reference-grid brain mask (default: reference > 25% of its 98th percentile); dilated by two
    voxels so that the brain's edges, which carry most of the signal, are used.
    dof: "rigid" (6) or "affine" (12). similarity: "ssd" (Gauss-Newton) or "mi" (L-BFGS).
    init: optional (N, 4, 4) starting transforms.
    max_rotation_deg / max_translation_mm (ssd, rigid; None: unbounded): a volume whose parameters exceed
    them is re-estimated from the identity without the coarsest level, half-voxel steps; the re-estimate
    is kept if it fits the reference as well (correlation within 0.005) or better; volumes still beyond
    raise ``MotionBoundsError`` naming them and their parameters.
    """
    data = _checked_series(data4d, dof, similarity)
    affine = np.asarray(affine, float)
    if max_iter is None:
        max_iter = (30, 20, 10) if similarity == "ssd" else (20, 20, 20)
    max_iter = tuple(max_iter)[: len(levels)]
    dev, n = torch.device(device), data.shape[3]
    vols = torch.as_tensor(np.moveaxis(data, 3, 0).astype(np.float32), device=dev)[:, None]
    center = fov_center(data.shape, affine)
    T = torch.as_tensor(np.eye(4)[None].repeat(n, 0) if init is None else np.asarray(init, float),
                        dtype=torch.float64, device=dev).clone()

    def run(ref_img, T, levels=levels, max_iter=max_iter, sel=slice(None), **kw):
        ref_img = np.asarray(ref_img, np.float32)
        if ref_img.shape[:3] != data.shape[:3] or ref_img.ndim not in (3, 4) \
                or (ref_img.ndim == 4 and ref_img.shape[3] != n):
            raise ValueError(f"reference shape {ref_img.shape} differs from the series grid {data.shape[:3]} "
                             f"(3D, or 4D with one reference per volume)")
        if ref_img.ndim == 4 and similarity != "ssd":
            raise ValueError("one reference per volume needs similarity='ssd'")
        m = mask if mask is not None else (lambda r: r > 0.25 * np.percentile(r, 98))(
            ref_img if ref_img.ndim == 3 else ref_img.mean(3))
        m = ndimage.binary_dilation(np.asarray(m, bool), iterations=2)
        if not m.any():
            raise ValueError("empty registration mask: no reference voxel above 25 % of its 98th percentile "
                             "(an all-zero reference?)")
        ref_t = torch.as_tensor(ref_img if ref_img.ndim == 3 else np.moveaxis(ref_img, 3, 0), device=dev)
        ref_t = ref_t[None, None] if ref_img.ndim == 3 else ref_t[:, None][sel]
        return _register(vols[sel], ref_t, m, affine, T, center, dof, similarity, levels, max_iter, tol, bins,
                         max_points, **kw)

    ref_vol = None
    if reference is None:
        ref_vol = central_volume(data)
        T, reference = _first_pass_reference(run, data, affine, T, ref_vol, init, similarity, levels, max_iter, dev)
    elif np.isscalar(reference):
        ref_vol = int(reference)
        reference = data[..., ref_vol]
    T, cost = run(reference, T)
    T = T.cpu().numpy()
    corr = None if cost is None else np.sqrt(np.clip(1 - cost.cpu().numpy(), 0, 1))
    params = params_from_matrix(T, center)
    redone = ()
    if similarity == "ssd" and dof == "rigid" and _beyond(params, max_rotation_deg, max_translation_mm).any():
        T, corr, redone = _reestimate(run, reference, T, corr, center, levels, max_iter, max_rotation_deg,
                                      max_translation_mm, ref_vol)
        params = params_from_matrix(T, center)
    return MotionResult(T, params, framewise_displacement(params), np.asarray(reference), center, corr, ref_vol,
                        redone)


def _checked_series(data4d, dof: str, similarity: str) -> np.ndarray:
    """``data4d`` as an array, refused (ValueError) unless 4D and finite, with a known dof and similarity."""
    data = np.asarray(data4d)
    if data.ndim != 4:
        raise ValueError(f"register_series needs a 4D series, got shape {data.shape}")
    if dof not in ("rigid", "affine") or similarity not in ("ssd", "mi"):
        raise ValueError(f"dof must be rigid|affine and similarity ssd|mi, got {dof!r}, {similarity!r}")
    bad = int(data.size - np.count_nonzero(np.isfinite(data)))
    if bad:     # they spread through every volume's metric: estimates silently wrong (stages check their files first)
        raise ValueError(f"register_series: the series holds {bad} NaN/Inf value(s); check the input image")
    return data


def _first_pass_reference(run, data, affine, T, ref_vol, init, similarity, levels, max_iter, dev):
    """(transforms, mean reference): a first pass against volume ``ref_vol`` (with ssd and no ``init``, each
    volume also started from its centroid shift), then the mean of that corrected series over the volumes
    that fit it (``_mean_reference``)."""
    n = data.shape[3]
    starts = ()
    if init is None and similarity == "ssd":   # large offsets start close: centroid shifts
        shift = np.tile(np.eye(4), (n, 1, 1))
        cen = _centroids(data, affine)
        shift[:, :3, 3] = cen - cen[ref_vol]
        starts = (shift,)
    # the first pass only builds the mean reference: the coarse levels are enough for that
    T, cost = run(data[..., ref_vol], T, levels[:-1] or levels, max_iter[:-1] or max_iter, starts=starts)
    use = None if cost is None else (1 - cost.cpu().numpy()) >= MIN_CORRELATION ** 2
    return T, _mean_reference(data, affine, T.cpu().numpy(), use, dev)

def _reestimate(run, reference, T, corr, center, levels, max_iter, max_rotation_deg, max_translation_mm,
                ref_vol=None):
    """Volumes beyond the bounds again from the identity, conservatively (no coarsest level, half-voxel
    steps); keep the re-estimate if it fits as well; raise MotionBoundsError for volumes still beyond."""
    bad = np.flatnonzero(_beyond(params_from_matrix(T, center), max_rotation_deg, max_translation_mm))
    lv, it = (levels[1:], max_iter[1:]) if len(levels) > 1 else (levels, max_iter)
    T2, cost2 = run(reference, torch.as_tensor(np.tile(np.eye(4), (len(bad), 1, 1))), lv, it, sel=bad,
                    max_step=0.5)
    corr2 = np.sqrt(np.clip(1 - cost2.cpu().numpy(), 0, 1))
    p2 = params_from_matrix(T2.cpu().numpy(), center)
    take = ~_beyond(p2, max_rotation_deg, max_translation_mm) & (corr2 >= corr[bad] - 0.005)
    T, corr = T.copy(), corr.copy()
    T[bad[take]], corr[bad[take]] = T2.cpu().numpy()[take], corr2[take]
    still = bad[~take]
    if len(still):
        p = params_from_matrix(T[still], center)
        listed = "; ".join(f"volume {k}: {describe_params(q)}" for k, q in zip(still[:5], p[:5]))
        more = f" (and {len(still) - 5} more)" if len(still) > 5 else ""
        raise MotionBoundsError(
            f"{len(still)} volume(s) moved beyond {max_rotation_deg} deg / {max_translation_mm} mm from the "
            f"reference{'' if ref_vol is None else f' (volume {ref_vol})'} even when re-estimated from the "
            f"identity: {listed}{more}")
    return T, corr, tuple(int(k) for k in bad)


def resample_series(data4d, affine, transforms, order: int = 1, device="cpu") -> np.ndarray:
    """Corrected series: volume k sampled at ``T_k(x)`` for each voxel centre x of the (shared) grid.

    order 0/1: torch grid_sample (nearest/trilinear, on ``device``); order >= 2: scipy spline.
    Points outside a volume's field of view get 0.
    """
    data = np.asarray(data4d)
    A = np.asarray(affine, float)
    M = np.linalg.inv(A) @ np.asarray(transforms, float) @ A  # voxel -> voxel
    if order >= 2:
        grid = np.indices(data.shape[:3]).reshape(3, -1).astype(float)
        out = [ndimage.map_coordinates(data[..., k].astype(np.float32), M[k, :3, :3] @ grid + M[k, :3, 3:],
                                       order=order, mode="constant").reshape(data.shape[:3])
               for k in range(data.shape[3])]
        return np.stack(out, axis=3)
    vals, valid = sample_series(data, affine, transforms, np.indices(data.shape[:3]).reshape(3, -1).T @ A[:3, :3].T
                                + A[:3, 3], order=order, device=device)
    return (vals * valid).reshape(data.shape)


def sample_series(data4d, affine, transforms, points_mm, order: int = 1, device="cpu"):
    """Values (P, N) of volume k at ``T_k(x)`` for world points x (P, 3) (mm), and in-FOV flags (P, N).

    One interpolation from the raw series to any grid (e.g. MNI points mapped into the BOLD frame).
    order 0/1: torch grid_sample (nearest/trilinear).
    """
    data = np.asarray(data4d)
    A = np.asarray(affine, float)
    M = np.linalg.inv(A) @ np.asarray(transforms, float) @ A  # voxel -> voxel
    pts_vox = (np.asarray(points_mm, float) - A[:3, 3]) @ np.linalg.inv(A[:3, :3]).T
    dev = torch.device(device)
    vols = torch.as_tensor(np.moveaxis(data, 3, 0).astype(np.float32), device=dev)[:, None]
    pts = torch.as_tensor(pts_vox, dtype=torch.float32, device=dev)
    vals, flags = [], []
    for k in range(0, data.shape[3], 16):  # chunks bound memory on long series
        Mk = torch.as_tensor(M[k:k + 16], dtype=torch.float32, device=dev)
        w, v = _sample(vols[k:k + 16], Mk, pts, mode="nearest" if order == 0 else "bilinear")
        vals.append(w.cpu().numpy())
        flags.append(v.cpu().numpy())
    return np.concatenate(vals).T, np.concatenate(flags).T.astype(bool)
