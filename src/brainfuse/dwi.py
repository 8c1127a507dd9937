"""dwi: motion/eddy-current correction with b-vector rotation, tensor fit (dipy), FA/MD/AD/RD in MNI space.

One process per subject handles every DWI run of the subject (e.g. dir-AP and dir-PA):

1. Input checks: 4D image, .bval/.bvec present, one value/vector per volume, at least one b0.
2. Correction, every volume to one b0 reference (the first run's first b0 frame, mean of its aligned b0s).
   ``registration: torch`` (default; ``brainfuse.motion``, batched): b0s rigid (SSD); diffusion-weighted
   (DW) volumes to their mean (SSD, rigid, then affine when ``dw_dof`` is affine, for eddy-current shear/scale),
   optionally ``refine_iterations`` rounds against their leave-one-out tensor prediction (eddy's idea; one
   batched problem, one reference per volume), then their frame placed on the b0 reference once (``dw_to_b0``,
   ``place_dw_frame``). No tensor model can tell a common shift of all DW volumes from a shifted MD map, so
   this is either the one cross-contrast step (ANTs mutual information both ways; SSD against the b0 mapped
   to DW contrast) or the eddy-current model alone (``zero_gradient``: the transforms regressed on the
   gradient direction, the zero-gradient intercept put on the b0). Default ``auto``: the cross-contrast
   step where its two measures agree within 0.1 voxel (phantom: 0.08-0.16 mm apart at 2 mm, error
   0.10-0.14 mm), else the eddy model (real single-b0 scans: 0.7-2.0 mm apart, and both pulled the DW frame
   0.5-2.5 mm along z in both phase-encode directions on two vendors; the issue's 20-slice slab showed the
   same step in every run and lost its bottom slice).
   ``registration: ants``: per-volume ``ants.registration`` (Rigid for b0s; ``dw_dof`` for DW volumes, to
   their mean, then that mean onto the b0 as above), the textbook tool; about 10x slower. Other runs are
   placed on the first run's reference by a rigid b0-to-b0 registration composed with their own corrections.
   On the XA30 data the DW volumes carry real eddy-current shifts along the phase-encode axis (about -2.8 mm
   x g_z for AP, +2.7 mm for PA) that the correction removes (log-tensor fit residual halves). Real-data
   check, each series fitted alone, PA's b0 registered onto AP's: after correction the AP and PA maps agree
   better (Canon: FA r 0.73 -> 0.77, MD r 0.82 -> 0.83, MADs lower; XA30: FA r 0.67 -> 0.75, MD r 0.74
   -> 0.73: the raw series' eddy misalignment blurs MD, and blur alone lifts that r to 0.75).
3. B-vectors rotated by each volume's rotation (polar part of its affine): ``g' = R^T g`` in world axes,
   read and written in FSL's convention (image axes, x flipped when det(affine) > 0).
4. Brain mask (dipy ``median_otsu`` on the mean b0); tensor fit (dipy ``TensorModel``, WLS or OLS) of all
   runs together, restricted to b <= ``max_bval``; FA, MD, AD, RD and colour FA. Field of view: a voxel some
   corrected volume sampled outside its acquired slab is fitted from the volumes that cover it, or left out
   (``outside_fov``); eigenvalues clipped to [0, ``max_diffusivity``]; both counted in the maps' sidecars
   (``QualityControl``) and the log.
5. Mean b0 -> T1w rigid (ANTs, mutual information, brain-masked; the T1w brain cropped and brought to the
   DWI voxel size first), appended to the anat transforms to bring the maps to the template grid; QC
   figures (FA in world proportions).

Transforms: ``T_k`` (4x4, world RAS mm) maps a reference-space point to where it is in volume k (ANTs'
fixed -> moving sense, ``brainfuse.motion``'s convention); the corrected volume is volume k sampled at T_k(x).
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from scipy import ndimage

from . import cliargs
from . import io as bf_io
from . import layout
from . import stageqc
from .antsconfig import load_ants
from .errors import BrainfuseError
from .inputs import as_stage_error, check_anisotropy, check_finite, load_nifti, read_sidecar
from .layout import DWI_MAPS as MAPS
from .layout import TEMPLATE, check_label, parse_name, sidecar, with_ext
from .provenance import code_version
from .schema import section_defaults

DEFAULTS = section_defaults("dwi")     # the schema's dwi section: every default, and why each value
PARAM_NAMES = ("trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z")
LPS = np.diag([-1.0, -1.0, 1.0, 1.0])  # RAS <-> LPS (ITK)
UNITS = ("mm", "sec")  # NIfTI xyzt units of every image written


class InputError(BrainfuseError):
    """A DWI run brainfuse cannot process; the message names the file and the problem."""


# ------------------------------------------------------------------------------------------ inputs
@dataclass
class Run:
    path: str
    data: np.ndarray          # (I, J, K, N) float32
    affine: np.ndarray
    bvals: np.ndarray         # (N,)
    bvecs: np.ndarray         # (3, N), FSL convention
    entities: dict = field(default_factory=dict)
    sidecar: dict = field(default_factory=dict)
    dtype: str = "float32"    # data type the corrected series is written in (the input's, when plain integers)


def load_run(path, b0_threshold: float = DEFAULTS["b0_threshold"],
             max_anisotropy: float = DEFAULTS["max_voxel_anisotropy"]) -> Run:
    """Read one DWI run with its .bval/.bvec, refusing anything the correction cannot use (InputError naming the
    file): truncated or unreadable image, not 4D, too anisotropic voxels, .bval/.bvec missing, unreadable or
    not one per volume, no b0, NaN/Inf or empty image, malformed sidecar."""
    path = str(path)
    with as_stage_error(InputError):
        img, _ = load_nifti(path, "DWI image", ndim=(3, 4), data=False)
        if len(img.shape) != 4 or img.shape[3] < 2:
            raise InputError(f"a DWI run must be a 4D image with several volumes, got shape {img.shape}", path=path,
                             fix="give the whole series (b0s and diffusion-weighted volumes in one 4D file)")
        check_anisotropy(img.header.get_zooms()[:3], path, "DWI", max_anisotropy, "dwi.max_voxel_anisotropy")
    n = img.shape[3]
    files = {}
    for ext in (".bval", ".bvec"):
        f = with_ext(path, ext)
        if not os.path.exists(f):
            raise InputError(f"missing ({ext} file of the DWI run {os.path.basename(path)})", path=f,
                             fix="convert the series again (dcm2niix writes .bval/.bvec next to the image)")
        try:
            files[ext] = np.atleast_1d(np.loadtxt(f, ndmin=1 if ext == ".bval" else 2))
        except (ValueError, UnicodeDecodeError) as e:
            raise InputError(f"not a table of numbers ({str(e).splitlines()[0][:120]})", path=f,
                             fix="write one line of numbers per row, separated by spaces (FSL format)") from None
    bvals = files[".bval"].ravel().astype(float)
    bvecs = files[".bvec"]
    if bvals.size != n:
        raise InputError(f"{with_ext(path, '.bval')}: {bvals.size} b-values for {n} volumes in {path}")
    if bvecs.shape != (3, n):
        if bvecs.shape == (n, 3):
            bvecs = bvecs.T    # one vector per row: tolerated (FSL writes 3 rows)
        else:
            raise InputError(f"{with_ext(path, '.bvec')}: shape {bvecs.shape}, expected 3 rows of {n} values "
                             f"(one vector per volume of {path})")
    if not np.isfinite(bvals).all() or not np.isfinite(bvecs).all() or (bvals < 0).any():
        raise InputError(f"{with_ext(path, '.bval')}/.bvec: non-finite or negative values")
    if not (bvals <= b0_threshold).any():
        raise InputError(f"no b0 volume (b <= {b0_threshold:g}; lowest b-value {bvals.min():g}); one is needed as the "
                         f"motion reference", path=with_ext(path, ".bval"),
                         fix="check the .bval file, or raise dwi.b0_threshold if your b0s are written as low b-values")
    dw = bvals > b0_threshold
    norms = np.linalg.norm(bvecs[:, dw], axis=0)
    if (np.abs(norms - 1) > 0.1).any():
        raise InputError(f"{with_ext(path, '.bvec')}: diffusion-weighted volumes need unit b-vectors, "
                         f"got norms {np.round(norms[np.abs(norms - 1) > 0.1], 3).tolist()}")
    bvecs = bvecs.astype(float).copy()
    bvecs[:, dw] /= norms
    bvecs[:, ~dw] = 0.0
    with as_stage_error(InputError):
        _, data = load_nifti(path, "DWI image", ndim=(4,), dtype=np.float32)   # read to the end: truncation
        check_finite(data, path, "DWI image")
        side = read_sidecar(path, "DWI sidecar")
    ents = parse_name(os.path.basename(path)) or {}
    slope, inter = img.header.get_slope_inter()
    dtype = img.get_data_dtype()
    plain_int = np.issubdtype(dtype, np.integer) and slope in (None, 1.0) and inter in (None, 0.0)
    return Run(path, data, img.affine.astype(float), bvals, bvecs, ents, side,
               np.dtype(dtype).name if plain_int else "float32")


# ------------------------------------------------------------------------------------ geometry
def fsl_axes(affine) -> np.ndarray:
    """Q: FSL b-vector axes -> world axes. FSL's convention (b-vectors in scaled-voxel axes, x flipped when the
    voxel-to-world determinant is positive) is taken from fslpy's ``Image.getAffine("fsl", "world")``, so the
    b-vectors brainfuse writes are read alike by FSL tools; the rotation part drops voxel sizes and shears."""
    from fsl.data.image import Image

    from .motion import rotation_part

    geometry = nib.Nifti1Image(np.zeros((1, 1, 1), np.uint8), np.asarray(affine, float))
    return rotation_part(Image(geometry).getAffine("fsl", "world")[None])[0]


def rotate_bvecs(bvecs, transforms, affine_in, affine_out=None) -> np.ndarray:
    """Corrected b-vectors ``R_k^T g_k`` (world), read in ``affine_in``'s FSL axes, written in ``affine_out``'s."""
    from .motion import rotation_part

    R = rotation_part(transforms)
    g = fsl_axes(affine_in) @ np.asarray(bvecs, float)
    g = np.einsum("nji,jn->in", R, g)
    return fsl_axes(affine_in if affine_out is None else affine_out).T @ g


FOV_MARGIN = 0.5   # voxels: a slice covers half a spacing either side of its centre (the acquired slab's edge)


def _sample_coords(vol_affine, T, ref_affine, grid):
    M = np.linalg.inv(vol_affine) @ T @ ref_affine
    return M[:3, :3] @ grid + M[:3, 3:]


def _inside(coords, vol_shape) -> np.ndarray:
    n = np.asarray(vol_shape[:3], float)[:, None]
    return ((coords >= -FOV_MARGIN) & (coords <= n - 1 + FOV_MARGIN)).all(0)


def resample(volumes, vol_affine, transforms, ref_affine, ref_shape, order: int = 3, support=None) -> np.ndarray:
    """Volume k (of (I, J, K, N)) sampled at ``T_k(x)`` for each voxel centre x of the reference grid.

    Within half a voxel outside the edge voxel centres (still inside the acquired slab) the edge value is
    extended (zero padding there would darken the edge slices of any moved volume); beyond, the result is 0:
    nothing was acquired there (``fov_coverage`` flags those points).
    ``support``: optional reference-grid mask where ``order`` is used; trilinear elsewhere (the background:
    a cubic spline costs ~4x trilinear per voxel and the head is a third of the field of view)."""
    grid = np.indices(ref_shape).reshape(3, -1).astype(np.float64)
    out = np.empty(tuple(ref_shape) + (volumes.shape[3],), np.float32)
    inside = None if support is None or order <= 1 else np.asarray(support, bool).ravel()
    for k in range(volumes.shape[3]):
        c = _sample_coords(vol_affine, transforms[k], ref_affine, grid)
        if inside is None:
            flat = ndimage.map_coordinates(volumes[..., k], c, order=order, mode="nearest").astype(np.float32)
        else:
            coeffs = ndimage.spline_filter(volumes[..., k], order=order, output=np.float32, mode="nearest")
            flat = np.empty(grid.shape[1], np.float32)
            for sel, o, src in ((inside, order, coeffs), (~inside, 1, volumes[..., k])):
                flat[sel] = ndimage.map_coordinates(src, c[:, sel], order=o, mode="nearest", prefilter=False)
        flat[~_inside(c, volumes.shape)] = 0.0
        out[..., k] = flat.reshape(ref_shape)
    return np.clip(out, 0, None)


def fov_coverage(vol_shape, vol_affine, transforms, ref_affine, ref_shape) -> np.ndarray:
    """(I, J, K, N) bool on the reference grid: where volume k's sample point ``T_k(x)`` lies inside its acquired
    field of view (edge voxel centres + half a voxel). False: ``resample`` had nothing to sample there."""
    grid = np.indices(ref_shape).reshape(3, -1).astype(np.float64)
    return np.stack([_inside(_sample_coords(vol_affine, T, ref_affine, grid), vol_shape).reshape(ref_shape)
                     for T in transforms], -1)


def signal_support(ref) -> np.ndarray:
    """Voxels with signal in the b0 reference (above 5% of its 99th percentile), dilated by two voxels."""
    ref = np.asarray(ref)
    return ndimage.binary_dilation(ref > 0.05 * np.percentile(ref, 99), iterations=2)


# ------------------------------------------------------------------------------------ ANTs helpers
def _ants_image(data, affine):
    import ants

    img = nib.Nifti1Image(np.asarray(data, np.float32), affine)
    img.header.set_xyzt_units("mm", "sec")
    return ants.from_nibabel_nifti(img)


def _ants_matrix(mat_path) -> np.ndarray:
    """World RAS 4x4 (fixed -> moving point) of an ITK affine .mat written by ANTs."""
    import ants

    tx = ants.read_transform(str(mat_path))
    p, c = np.asarray(tx.parameters, float), np.asarray(tx.fixed_parameters, float)
    M = np.eye(4)
    M[:3, :3] = p[:9].reshape(3, 3)
    M[:3, 3] = p[9:12] + c - M[:3, :3] @ c
    return LPS @ M @ LPS


def _ants_register(fixed, moving, kind: str, work: str, metric: str = "mattes", **kw):
    """ants.registration (outprefix inside ``work``) -> (RAS 4x4 fixed->moving, path of the .mat)."""
    ants = load_ants()

    prefix = tempfile.mkdtemp(dir=work) + "/x_"
    reg = ants.registration(fixed=fixed, moving=moving, type_of_transform=kind, aff_metric=metric,
                            outprefix=prefix, **kw)
    mat = [f for f in reg["fwdtransforms"] if f.endswith(".mat")][0]
    return _ants_matrix(mat), mat


def symmetric_rigid(fixed, moving, affine, work) -> np.ndarray:
    """Rigid fixed -> moving (RAS 4x4) from ANTs MI registrations in both directions, averaged on SE(3)."""
    from scipy.linalg import expm, logm

    f, m = _ants_image(fixed, affine), _ants_image(moving, affine)
    S1, _ = _ants_register(f, m, "Rigid", work)
    S2, _ = _ants_register(m, f, "Rigid", work)
    return np.real(expm((logm(S1) + logm(np.linalg.inv(S2))) / 2))


# ------------------------------------------------------------------------------------- correction
@dataclass
class Correction:
    transforms: np.ndarray    # (N, 4, 4) reference world -> volume world
    reference: np.ndarray     # mean of the run's aligned b0s, on the run's own grid
    mask: np.ndarray | None = None   # brain_mask(reference), when computed
    placement: dict = field(default_factory=dict)   # how the DW frame was put on the b0 (place_dw_frame's info)


def _tensor_predict(corr, bvals, bvecs, mask, b0):
    """Leave-one-out tensor prediction of every volume (reference space): volume k as predicted by a log-linear
    (OLS) tensor fit of all the *other* volumes, so a volume's own misalignment is not fitted into its target
    (eddy's leave-one-out idea). One design matrix serves every voxel, so the hat-matrix identity
    ``y_k - e_k / (1 - h_kk)`` gives all leave-one-out predictions at once (dipy has no such shortcut)."""
    big = ndimage.binary_dilation(mask, iterations=4)   # registration samples past the mask edge
    g = np.asarray(bvecs, float)
    b = np.asarray(bvals, float)
    X = np.stack([np.ones_like(b), *(-b * g[i] * g[j] * (1 if i == j else 2)
                                      for i, j in ((0, 0), (1, 1), (2, 2), (0, 1), (0, 2), (1, 2)))], 1)
    Hm = X @ np.linalg.pinv(X)
    y = np.log(np.maximum(corr[big], 1e-3)).astype(np.float64)        # (voxels, N)
    e = y - y @ Hm.T
    h = np.clip(np.diag(Hm), 0, 0.95)
    loo = y - e / (1 - h)
    pred = np.zeros(corr.shape, np.float32)
    pred[big] = np.exp(np.clip(loo, -20, 20))
    return pred


def brain_mask(mean_b0) -> np.ndarray:
    """dipy's median_otsu steps on the mean b0 (median filter, Otsu threshold), largest component, holes filled.
    median_otsu itself is not called: it takes scikit-image's Otsu threshold when that package is importable and
    dipy's otherwise, which differ (one voxel of the Canon mask), so the mask would depend on what else is
    installed; dipy's own threshold, the one every measurement here was made with, is named explicitly."""
    from dipy.segment.mask import multi_median
    from dipy.segment.threshold import otsu

    filtered = multi_median(np.asarray(mean_b0, np.float32), 2, 1)
    mask = filtered > otsu(filtered)
    lab, n = ndimage.label(mask)
    if n > 1:
        mask = lab == (np.argmax(np.bincount(lab.ravel())[1:]) + 1)
    return ndimage.binary_fill_holes(mask)


def b0_in_dw_contrast(b0, mean_dw, mask, bins: int = 64) -> np.ndarray:
    """The b0 image mapped to the mean DW image's contrast: ``phi(b0(x))``, phi the mean DW intensity of each
    b0 intensity bin inside ``mask`` (the conditional mean behind the correlation ratio). Pure tissues map
    one to one (b0: WM < GM < CSF; mean DW: CSF < WM < GM), so the DW mean can be registered to it by SSD."""
    r, m = b0[mask], mean_dw[mask]
    edges = np.linspace(*np.percentile(r, [0.5, 99.5]), bins + 1)
    idx = np.clip(np.digitize(r, edges) - 1, 0, bins - 1)
    count = np.bincount(idx, minlength=bins)
    ok = count > 5
    centres = (edges[:-1] + edges[1:]) / 2
    return np.interp(b0, centres[ok], np.bincount(idx, m, minlength=bins)[ok] / count[ok]).astype(np.float32)


def dw_frame_to_b0(ref, mean_dw, mask, affine, rounds: int = 2) -> np.ndarray:
    """Rigid S (4x4, b0 reference -> DW frame) placing the mean DW image on the b0 reference: SSD against the b0
    mapped to DW contrast (``b0_in_dw_contrast``), the mapping re-estimated after each round. Deterministic;
    on the phantom 0.15-0.17 mm from the truth, against 0.19-0.24 mm for ANTs mutual information both ways.
    The residual is a bias in one direction (about -0.07 mm y, +0.14 mm z on every phantom subject, also on
    noise-free images, also with torch MI either way): partial-volume voxels of three tissues have no single
    b0 -> DW intensity map, a limit of any single cross-contrast step."""
    from . import motion

    S = np.eye(4)[None]
    region = ndimage.binary_dilation(mask, iterations=3)
    for _ in range(rounds):
        moved = motion.resample_series(mean_dw[..., None], affine, S)[..., 0]
        target = b0_in_dw_contrast(ref, moved, region)
        S = motion.register_series(mean_dw[..., None], affine, reference=target, mask=mask, init=S).transforms
    return S[0]


def zero_gradient_frame(T_dw, g_world, radius: float = 50.0) -> np.ndarray:
    """Rigid S (b0 reference -> DW frame) from the eddy-current model alone, no cross-contrast step: each DW
    volume's transform is regressed on its gradient direction (eddy fields, hence eddy shifts, scale linearly
    with the gradient and flip with its sign), and the intercept, the frame an undistorted zero-gradient image
    would have, is put on the b0. Assumes the head did not move between the b0 and most DW volumes: the
    regression is least absolute deviations (IRLS on each volume's displacement over ``radius`` mm), so a few
    volumes after a jerk do not drag the block. Directions that do not span 3D (< 4 volumes, coplanar): the
    same fit with the intercept alone."""
    from .motion import rotation_part

    T_dw, g = np.asarray(T_dw, float), np.asarray(g_world, float)
    X = np.c_[np.ones(len(T_dw)), g.T]
    if len(T_dw) < 4 or np.linalg.matrix_rank(X, tol=1e-3 * np.sqrt(len(T_dw))) < 4:
        X = X[:, :1]
    Y = T_dw[:, :3, :].reshape(len(T_dw), 12)
    scale = np.tile([radius, radius, radius, 1.0], 3)      # rows of [L | t]: linear part x radius, in mm
    w = np.ones(len(T_dw))
    for _ in range(20):
        coef = np.linalg.lstsq(X * w[:, None], Y * w[:, None], rcond=None)[0]
        r = np.linalg.norm((Y - X @ coef) * scale, axis=1)
        w = 1 / np.sqrt(np.maximum(r, 1e-3))       # sqrt: weighted least squares on w^2 = 1 / |r|
    C = np.eye(4)
    C[:3] = coef[0].reshape(3, 4)
    C[:3, :3] = rotation_part(C[None])[0]          # the block is a head position: rigid
    return np.linalg.inv(C)


def _frame_distance(S1, S2, mask, affine) -> float:
    """Mean displacement (mm) between two placements over the mask's voxel centres."""
    from .motion import mean_displacement_error

    pts = np.argwhere(mask) @ np.asarray(affine)[:3, :3].T + np.asarray(affine)[:3, 3]
    return float(mean_displacement_error(S1[None], S2[None], pts))


def _average_rigid(S1, S2) -> np.ndarray:
    from scipy.linalg import expm, logm

    return np.real(expm((logm(S1) + logm(S2)) / 2))


def place_dw_frame(dw_data, T_dw, ref, mask, affine, method: str, work, g_world=None, info: dict | None = None,
                   log=print) -> np.ndarray:
    """Rigid S (b0 reference -> DW frame) for the aligned DW volumes (``T[dw] = T[dw] @ S``); ``dw_to_b0``:

    * ``auto``: both cross-contrast measures below; where they agree within a tenth of a voxel (the phantom's
      accuracy) their average, else ``zero_gradient``. Each is biased differently by the b0 / DW contrast
      (phantom at 2 mm: 0.08-0.16 mm apart, both within 0.1-0.2 mm of the truth); on real single-b0 scans
      (Canon, XA30, AP and PA) they were 0.7-2.0 mm apart and both pulled the DW frame 0.5-2.5 mm along z.
    * ``mutual_information``: ANTs MI both ways, averaged (halves one direction's interpolation bias);
    * ``mapped_ssd``: ``dw_frame_to_b0``; ``zero_gradient``: ``zero_gradient_frame`` (eddy model only);
    * ``none``: the DW volumes' mean frame is taken as the b0's (FSL eddy's --dont_peas).
    ``info`` receives what was done (method used, the two measures' disagreement in mm)."""
    from . import motion

    info = {} if info is None else info
    if method not in ("auto", "mutual_information", "mapped_ssd", "zero_gradient", "none"):
        raise ValueError(f"dwi dw_to_b0={method!r}: choose auto, mutual_information, mapped_ssd, zero_gradient or none")
    info["requested"] = method
    if method == "none":
        info["used"] = "none"
        return np.eye(4)
    if method in ("auto", "zero_gradient") and g_world is None:
        raise ValueError(f"dwi dw_to_b0={method!r} needs the DW volumes' gradient directions (g_world)")
    if method == "zero_gradient":
        info["used"] = "zero_gradient"
        return zero_gradient_frame(T_dw, g_world)
    S = {}
    if method in ("auto", "mapped_ssd"):
        S["mapped_ssd"] = dw_frame_to_b0(ref, motion.resample_series(dw_data, affine, T_dw).mean(3), mask, affine)
    if method in ("auto", "mutual_information"):
        mean_dw = resample(dw_data, affine, T_dw, affine, ref.shape, order=3).mean(3)
        S["mutual_information"] = symmetric_rigid(ref * mask, mean_dw * mask, affine, work)
    if method != "auto":
        info["used"] = method
        return S[method]
    vox = float(np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(0)).min())
    d = _frame_distance(S["mapped_ssd"], S["mutual_information"], mask, affine)
    info["cross_contrast_disagreement_mm"] = round(d, 3)
    if d <= 0.1 * vox:
        info["used"] = "cross_contrast"
        log(f"[dwi]   DW frame: the two cross-contrast measures agree within {d:.2f} mm: their average")
        return _average_rigid(S["mapped_ssd"], S["mutual_information"])
    info["used"] = "zero_gradient"
    log(f"[dwi]   DW frame: the two cross-contrast measures disagree by {d:.2f} mm (> 0.1 voxel): "
        f"placed by the eddy-current model (zero gradient) instead")
    return zero_gradient_frame(T_dw, g_world)


def correct_run_torch(run: Run, p: dict, work: str, log=print) -> Correction:
    from . import motion

    data, A = run.data, run.affine
    b0 = np.flatnonzero(run.bvals <= p["b0_threshold"])
    dw = np.flatnonzero(run.bvals > p["b0_threshold"])
    T = np.tile(np.eye(4), (len(run.bvals), 1, 1))
    rb = motion.register_series(data[..., b0], A, reference=0, dof="rigid", similarity="ssd")
    T[b0] = rb.transforms
    ref = resample(data[..., b0], A, T[b0], A, data.shape[:3], order=3).mean(3)
    if len(dw) == 0:
        return Correction(T, ref)
    mask = brain_mask(ref)
    # DW volumes among themselves (same contrast: SSD), rigid, then affine when asked (starts close), then
    # optionally each against its leave-one-out tensor prediction, all in the DW volumes' own frame ...
    t = time.perf_counter()
    mean_dw = data[..., dw].mean(3)
    for i, dof in enumerate(("rigid",) if p["dw_dof"] == "rigid" else ("rigid", p["dw_dof"])):
        if i:
            mean_dw = motion.resample_series(data[..., dw], A, T[dw]).mean(3)
        T[dw] = motion.register_series(data[..., dw], A, reference=mean_dw, mask=mask, dof=dof,
                                       similarity="ssd", init=T[dw]).transforms
    for _ in range(p["refine_iterations"]):   # one batched problem, one reference per volume
        corr = motion.resample_series(data, A, T)
        pred = _tensor_predict(corr, run.bvals, rotate_bvecs(run.bvecs, T, A), mask, b0)
        T[dw] = motion.register_series(data[..., dw], A, reference=pred[..., dw], mask=mask, dof=p["dw_dof"],
                                       similarity="ssd", init=T[dw], levels=motion.DEFAULT_LEVELS[-1:],
                                       max_iter=(10,)).transforms
    log(f"[dwi]   DW volumes aligned among themselves in {time.perf_counter() - t:.1f} s")
    # ... then that frame onto the b0 reference once (no tensor model can tell a common shift of all DW
    # volumes from a shifted MD map): the cross-contrast step or the eddy-current model, see place_dw_frame
    placement = {}
    T[dw] = T[dw] @ place_dw_frame(data[..., dw], T[dw], ref, mask, A, p["dw_to_b0"], work,
                                   fsl_axes(A) @ run.bvecs[:, dw], placement, log)
    return Correction(T, ref, mask, placement)


def correct_run_ants(run: Run, p: dict, work: str, log=print) -> Correction:
    """Per-volume ants.registration: b0s Rigid to the first b0; DW volumes (``dw_dof``) to their mean, which is
    then placed on the b0 reference rigidly. (DW straight to b0 with an affine and mutual information shrinks
    the brain to the dark CSF of the DW volumes: about 8 mm error on the phantom.)"""
    data, A = run.data, run.affine
    b0 = np.flatnonzero(run.bvals <= p["b0_threshold"])
    dw = np.flatnonzero(run.bvals > p["b0_threshold"])
    T = np.tile(np.eye(4), (len(run.bvals), 1, 1))
    first = _ants_image(data[..., b0[0]], A)
    for k in b0[1:]:
        T[k], _ = _ants_register(first, _ants_image(data[..., k], A), "Rigid", work)
    ref = resample(data[..., b0], A, T[b0], A, data.shape[:3], order=3).mean(3)
    if len(dw) == 0:
        return Correction(T, ref)
    mask = brain_mask(ref)
    fixed = _ants_image(data[..., dw].mean(3), A)
    kind = {"affine": "Affine", "rigid": "Rigid"}[p["dw_dof"]]
    for k in dw:
        T[k], _ = _ants_register(fixed, _ants_image(data[..., k], A), kind, work)
    placement = {}
    T[dw] = T[dw] @ place_dw_frame(data[..., dw], T[dw], ref, mask, A, p["dw_to_b0"], work,
                                   fsl_axes(A) @ run.bvecs[:, dw], placement, log)
    return Correction(T, ref, None, placement)


def correct_runs(runs: list[Run], p: dict, work: str, log=print, info: dict | None = None):
    """Per-run corrections composed onto the first run's b0 reference: list of (N, 4, 4) transforms.
    ``info`` (optional dict) receives ``mask``: the brain mask of that reference (None if not computed), and
    ``placement``: per run, how its DW frame was put on its b0 (``place_dw_frame``)."""
    method = {"torch": correct_run_torch, "ants": correct_run_ants}[p["registration"]]
    out, ref0 = [], None
    for i, run in enumerate(runs):
        t = time.perf_counter()
        c = method(run, p, work, log)
        T = c.transforms
        if i == 0:
            ref0 = c.reference
            if info is not None:
                info["mask"] = c.mask
        else:  # this run's reference frame onto the first run's (b0 to b0, rigid; grids may differ)
            S, _ = _ants_register(_ants_image(ref0, runs[0].affine), _ants_image(c.reference, run.affine), "Rigid", work)
            T = T @ S
        if info is not None:
            info.setdefault("placement", []).append(c.placement)
        out.append(T)
        log(f"[dwi] {os.path.basename(run.path)}: {len(run.bvals)} volumes corrected ({p['registration']}) "
            f"in {time.perf_counter() - t:.1f} s")
    return out, ref0


def motion_table(T, center) -> pd.DataFrame:
    """Motion parameters (fMRIPrep names) and Power framewise displacement of each volume."""
    from .motion import framewise_displacement, params_from_matrix

    params = params_from_matrix(T, center)
    table = pd.DataFrame(params, columns=list(PARAM_NAMES))
    table["framewise_displacement"] = framewise_displacement(params)
    return table


# ---------------------------------------------------------------------------------------- tensors
def shell_limit(bvals, max_bval=DEFAULTS["max_bval"], b0_threshold=DEFAULTS["b0_threshold"]) -> float:
    """The b-value limit of the tensor fit: ``max_bval``, or the lowest shell when every diffusion-weighted
    volume lies above it (a single-shell b=2500 acquisition still gets its DTI maps, with a warning)."""
    bvals = np.asarray(bvals, dtype=float)
    dw = bvals[bvals > b0_threshold]
    if dw.size == 0:
        raise InputError(f"no diffusion-weighted volume (b-values: {sorted(set(np.round(bvals).astype(int).tolist()))})")
    if (dw <= max_bval).any():
        return float(max_bval)
    limit = float(dw.min()) * 1.05          # one shell's b-values differ by a few s/mm^2 between directions
    print(f"[dwi] warning: no shell at b <= max_bval={max_bval}; fitting the tensor on the lowest shell "
          f"(b <= {limit:.0f})", flush=True)
    return limit


def _design(bvals, bvecs) -> np.ndarray:
    """Log-linear tensor design matrix (ln S0, Dxx, Dyy, Dzz, Dxy, Dxz, Dyz) of each volume."""
    g, b = np.asarray(bvecs, float), np.asarray(bvals, float)
    return np.stack([np.ones_like(b), *(-b * g[i] * g[j] * (1 if i == j else 2)
                                         for i, j in ((0, 0), (1, 1), (2, 2), (0, 1), (0, 2), (1, 2)))], 1)


def fit_tensor(data, bvals, bvecs, mask, max_bval=DEFAULTS["max_bval"], fit_method="WLS",
               b0_threshold=DEFAULTS["b0_threshold"], coverage=None, max_diffusivity=DEFAULTS["max_diffusivity"],
               outside_fov=DEFAULTS["outside_fov"], qc: dict | None = None) -> dict:
    """dipy tensor fit on volumes with b <= shell_limit(max_bval): fa, md, ad, rd, colour FA (float32, 0 outside
    the fitted voxels).

    ``coverage`` ((I, J, K, N) bool, ``fov_coverage``): a voxel that some volume sampled outside its acquired field
    of view is fitted from the volumes that cover it when they still determine a tensor (``outside_fov:
    covering``: a b0 and a full-rank design), else left out (``exclude``: always left out). Eigenvalues are
    clipped to [0, ``max_diffusivity``] (mm^2/s; free water at body temperature is ~3e-3) before the maps are
    computed, so every map is physically bounded and FA stays in [0, 1]. ``qc`` (optional dict) receives the
    counts: voxels fitted, left out, fitted from a subset, clipped below 0 / above the limit."""
    from dipy.core.gradients import gradient_table
    from dipy.reconst.dti import (TensorModel, axial_diffusivity, color_fa, fractional_anisotropy,
                                  mean_diffusivity, radial_diffusivity)

    bvals, bvecs, mask = np.asarray(bvals, float), np.asarray(bvecs, float), np.asarray(mask, bool)
    keep = np.flatnonzero(bvals <= shell_limit(bvals, max_bval, b0_threshold))
    evals = np.zeros(mask.shape + (3,))
    evecs = np.zeros(mask.shape + (3, 3))
    groups = [(mask, keep)]                                # (voxels, volumes fitted there)
    left_out = subset = 0
    if coverage is not None:
        cov = np.asarray(coverage, bool)[..., keep]
        full = cov.all(-1)
        partial = mask & ~full
        groups = [(mask & full, keep)]
        if partial.any():
            patterns, inverse = np.unique(cov[partial], axis=0, return_inverse=True)
            where = np.argwhere(partial)
            X = _design(bvals[keep], bvecs[:, keep])
            for i, pat in enumerate(patterns):
                sel = where[inverse.ravel() == i]
                ok = outside_fov == "covering" and (bvals[keep][pat] <= b0_threshold).any() \
                    and np.linalg.matrix_rank(X[pat], tol=1e-6 * np.abs(X).max()) == X.shape[1]
                if not ok:
                    left_out += len(sel)
                    continue
                vox = np.zeros(mask.shape, bool)
                vox[tuple(sel.T)] = True
                groups.append((vox, keep[pat]))
                subset += len(sel)
    for vox, vols in groups:
        if not vox.any():
            continue
        gt = gradient_table(bvals[vols], bvecs=bvecs[:, vols].T, b0_threshold=b0_threshold)
        fit = TensorModel(gt, fit_method=fit_method).fit(data[vox][:, vols])
        evals[vox], evecs[vox] = np.nan_to_num(fit.evals), np.nan_to_num(fit.evecs)
    fitted = np.zeros(mask.shape, bool)
    for vox, _ in groups:
        fitted |= vox
    below, above = fitted & (evals < 0).any(-1), fitted & (evals > max_diffusivity).any(-1)
    evals = np.clip(evals, 0, max_diffusivity)
    fa = np.clip(np.nan_to_num(fractional_anisotropy(evals)), 0, 1)
    maps = {"fa": fa, "md": mean_diffusivity(evals), "ad": axial_diffusivity(evals), "rd": radial_diffusivity(evals)}
    maps = {k: np.where(fitted, np.nan_to_num(v), 0).astype(np.float32) for k, v in maps.items()}
    maps["cfa"] = np.where(fitted[..., None], color_fa(fa, evecs), 0).astype(np.float32)
    if qc is not None:     # "fitted" and "clipped" (voxel masks) are for the caller, not for the sidecars
        qc.update({"fitted": fitted, "clipped": below | above,
                   "VoxelsInMask": int(mask.sum()), "VoxelsFitted": int(fitted.sum()),
                   "VoxelsExcludedOutsideFieldOfView": int(left_out), "VoxelsFittedFromCoveringVolumes": int(subset),
                   "VoxelsClippedBelowZero": int(below.sum()), "VoxelsClippedAboveMaxDiffusivity": int(above.sum()),
                   "MaxDiffusivity": float(max_diffusivity)})
    return maps


# -------------------------------------------------------------------------------------------- MNI
def to_template(images: dict, transforms: list[str], template, work: str) -> dict:
    """Images on the DWI grid -> template grid through ``transforms`` (anat's list + the dwi->T1w .mat).

    ``images``: name -> (data, affine). Linear interpolation; returns name -> float32 array on the template.
    """
    import ants

    fixed = ants.image_read(str(template))
    out = {}
    for name, (data, affine) in images.items():
        moved = ants.apply_transforms(fixed=fixed, moving=_ants_image(data, affine), transformlist=list(transforms),
                                      whichtoinvert=[False] * len(transforms), interpolator="linear")
        out[name] = moved.numpy().astype(np.float32)
    return out


def t1w_for_registration(t1w_path, t1w_mask_path, voxel_mm: float):
    """The T1w brain as the b0 registration sees it: masked, cropped to the mask's box (+2 target voxels) and,
    when finer than ``voxel_mm``, Gaussian anti-aliased (sigma (f - 1) / 2 source voxels, f the shrink factor,
    as skimage's rescale) and sampled every ``voxel_mm`` along its own axes. Returns (data, affine).

    The DWI carries no detail finer than its own voxels: registering to a native 0.5 mm T1w (160x460x512)
    took 915-1,175 s, most of it ITK's finest level on tens of millions of voxels."""
    t1 = nib.load(str(t1w_path))
    data, A = np.asarray(t1.dataobj, np.float32), t1.affine.astype(float)
    zooms = np.sqrt((A[:3, :3] ** 2).sum(0))
    if t1w_mask_path and os.path.exists(str(t1w_mask_path)):
        m = np.asarray(nib.load(str(t1w_mask_path)).dataobj) > 0
        if m.shape != data.shape[:3]:
            raise InputError(f"{t1w_mask_path}: shape {m.shape} differs from the T1w {t1w_path} {data.shape[:3]}; "
                             "give the brain mask anat wrote with this T1w")
        if m.any():
            pad = np.ceil(2 * voxel_mm / zooms).astype(int)
            idx = np.argwhere(m)
            lo, hi = np.maximum(idx.min(0) - pad, 0), np.minimum(idx.max(0) + pad + 1, m.shape)
            box = tuple(slice(int(a_), int(b_)) for a_, b_ in zip(lo, hi))
            data = data[box] * m[box]
            A = A @ np.r_[np.c_[np.eye(3), lo], [[0, 0, 0, 1]]]
    f = voxel_mm / zooms
    if (f > 1 + 1e-3).any():
        f = np.maximum(f, 1.0)
        data = ndimage.gaussian_filter(data, (f - 1) / 2, mode="constant")
        shape = np.maximum(np.floor((np.asarray(data.shape) - 1) / f).astype(int) + 1, 1)
        # new voxel i at old voxel f * i: same first voxel centre, spacing f along each T1w axis
        data = ndimage.affine_transform(data, np.diag(f), output_shape=tuple(shape), order=1, mode="nearest")
        A = A @ np.diag(np.r_[f, 1.0])
    return data, A


def register_to_t1w(mean_b0, mask, affine, t1w_path, t1w_mask_path, work: str, voxel_mm: float | None = None):
    """Mean b0 -> T1w rigid (mutual information, both brain-masked): (.mat path in ``work``, RAS matrix).

    The T1w brain is cropped and brought to ``voxel_mm`` first (default: the DWI voxel, at least 2 mm, as
    func.bold_to_t1w). dcm_qa_philips_enh (1 mm MPRAGE, 2 mm DTI, one thread): 81 s at the native T1w
    resolution, 3.8 s so, results 0.28 mm apart; that T1w upsampled to 0.5 mm: 15 s (benchmarks/bench_dwi.py)."""
    if voxel_mm is None:
        voxel_mm = max(2.0, float(np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(0)).mean()))
    t1d, t1a = t1w_for_registration(t1w_path, t1w_mask_path, voxel_mm)
    M, mat = _ants_register(_ants_image(t1d, t1a), _ants_image(mean_b0 * mask, affine), "Rigid", work)
    return mat, M


# -------------------------------------------------------------------------------------------- QC
def qc_fa(fa, cfa, affine, out_png, title):
    """FA and colour FA, three orthogonal slices through the brain centre, in world proportions (RAS display):
    each panel's pixel aspect is its two axes' voxel sizes, so thick slices are not squashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ornt = nib.orientations.io_orientation(affine)
    tr = lambda a: nib.orientations.apply_orientation(a, ornt)
    fa_r, cfa_r = tr(fa), tr(cfa)
    vox = np.empty(3)
    vox[ornt[:, 0].astype(int)] = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(0))   # voxel size per RAS axis
    c = [int(round(x)) for x in ndimage.center_of_mass(fa_r > 0.05)]
    fig, axes = plt.subplots(2, 3, figsize=(10, 6.5), facecolor="black")
    for col, ax_i in enumerate((0, 1, 2)):
        sl = [slice(None)] * 3
        sl[ax_i] = c[ax_i]
        u, v = [a for a in range(3) if a != ax_i]      # rot90: rows along v (top = high), columns along u
        for row, (img, kw) in enumerate(((fa_r, dict(cmap="gray", vmin=0, vmax=1)), (cfa_r, {}))):
            a = img[tuple(sl)]
            a = np.rot90(a) if a.ndim == 2 else np.rot90(np.clip(a, 0, 1), axes=(0, 1))
            axes[row, col].imshow(a, aspect=vox[v] / vox[u], interpolation="nearest", **kw)
            axes[row, col].axis("off")
    fig.suptitle(title, color="white")
    fig.tight_layout()
    bf_io.save_figure(fig, out_png, dpi=80, facecolor=fig.get_facecolor())


def qc_motion(tables: dict, out_png, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 1, figsize=(8, 7), sharex=True)
    offset = 0
    for run, t in tables.items():
        x = np.arange(len(t)) + offset
        for name, ax, scale in (("trans", axes[0], 1.0), ("rot", axes[1], 180 / np.pi)):
            for a, colour in zip("xyz", ("C0", "C1", "C2")):
                ax.plot(x, t[f"{name}_{a}"] * scale, colour, label=f"{name}_{a}" if offset == 0 else None)
        axes[2].plot(x, t["framewise_displacement"], "k")
        axes[0].axvline(offset - 0.5, color="grey", lw=0.5)
        axes[0].text(offset, axes[0].get_ylim()[1], run, fontsize=7, va="top")
        offset += len(t)
    axes[0].set_ylabel("translation (mm)")
    axes[1].set_ylabel("rotation (deg)")
    axes[2].set_ylabel("FD (mm)")
    axes[2].set_xlabel("volume (runs concatenated)")
    axes[0].legend(fontsize=7, ncol=3)
    axes[1].legend(fontsize=7, ncol=3)
    fig.suptitle(title)
    fig.tight_layout()
    bf_io.save_figure(fig, out_png, dpi=80, facecolor=fig.get_facecolor())


# ----------------------------------------------------------------------------------------- process
SAFE_SIDECAR_KEYS = ("PhaseEncodingDirection", "TotalReadoutTime", "EffectiveEchoSpacing", "RepetitionTime",
                     "EchoTime", "MagneticFieldStrength", "Manufacturer")   # acquisition only, nothing identifying


def qc_flags(tables: dict, qc: dict, p: dict) -> tuple[list, dict, dict]:
    """(flags, metrics, thresholds) of the subject's QC record: the share of fitted voxels whose eigenvalues were
    clipped (a wrong gradient table, corrupted volumes or failed correction push it up) and each run's mean FD."""
    fitted = max(int(qc["VoxelsFitted"]), 1)
    m = {"clipped_fraction": round(int(qc["clipped"].sum()) / fitted, 4), "voxels_fitted": int(qc["VoxelsFitted"]),
         "mean_fd_mm": round(max(float(t["framewise_displacement"].mean()) for t in tables.values()), 4),
         "max_fd_mm": round(max(float(t["framewise_displacement"].max()) for t in tables.values()), 4)}
    t = {"max_clipped_fraction": p["qc_max_clipped_fraction"], "max_mean_fd_mm": p["qc_max_mean_fd_mm"]}
    flags = []
    if not m["clipped_fraction"] <= t["max_clipped_fraction"]:
        flags.append(f"{m['clipped_fraction']:.1%} of the fitted voxels have a tensor eigenvalue outside [0, "
                     f"{p['max_diffusivity']:g}] mm^2/s (dwi.qc_max_clipped_fraction {t['max_clipped_fraction']:g}): "
                     f"check the .bval/.bvec (order, units, axes), the FA figure and the motion figure")
    for run, table in tables.items():
        fd = float(table["framewise_displacement"].mean())
        if not fd <= t["max_mean_fd_mm"]:
            flags.append(f"{run}: mean framewise displacement {fd:.2f} mm is above dwi.qc_max_mean_fd_mm "
                         f"{t['max_mean_fd_mm']:g}: much head motion; check the motion figure and the FA map")
    return flags, m, t


def _check_settings(p: dict) -> None:
    if p["registration"] not in ("torch", "ants") or p["dw_dof"] not in ("affine", "rigid") \
            or p["fit_method"] not in ("WLS", "OLS") or p["outside_fov"] not in ("exclude", "covering") \
            or not 0 < p["max_diffusivity"] < 1:
        raise ValueError(f"dwi settings: registration torch|ants, dw_dof affine|rigid, fit_method WLS|OLS, outside_fov "
                         f"exclude|covering, 0 < max_diffusivity (mm^2/s) < 1; got {p}")


def _load_inputs(dwi_paths: list[str], t1w, template, transforms, p: dict) -> list[Run]:
    """Check the anat/template inputs exist and load every run; bad input fails here, before ANTs and torch load."""
    for f in [t1w, template, *transforms]:
        if not os.path.exists(str(f)):
            raise InputError(f"missing (needed to bring the DWI maps to {TEMPLATE})", path=f,
                             fix="run the anat stage (and `brainfuse templates`) first")
    runs = [load_run(x, p["b0_threshold"], p["max_voxel_anisotropy"]) for x in dwi_paths]
    if not any((r.bvals > p["b0_threshold"]).any() for r in runs):      # one b0-only run among others is fine
        names = ", ".join(map(os.path.basename, dwi_paths))
        raise InputError(f"no diffusion-weighted volume: every b-value of {names} is <= dwi.b0_threshold "
                         f"{p['b0_threshold']:g}", path=with_ext(dwi_paths[0], ".bval"),
                         fix="check the .bval files (a b0-only series for distortion correction belongs in fmap/)")
    prefixes = [json.dumps(layout.dwi_run_entities(x), sort_keys=True) for x in dwi_paths]
    if len(set(prefixes)) != len(prefixes):
        raise InputError(f"DWI runs {dwi_paths} are not told apart by acq/dir/run entities")
    return runs


def _write_run(run: Run, corr, bvecs, table, fp: dict, placed: dict, A0, p: dict, code: str, stage) -> None:
    """Stage one corrected run: the image, .bval, rotated .bvec, motion table and sidecar."""
    # integer input (the scanner's precision): written rounded in that type (half the bytes to gzip);
    # values beyond the type's range (spline overshoot) clipped
    info_t = np.iinfo(run.dtype) if run.dtype != "float32" else None
    bf_io.save_nifti(np.clip(np.round(corr), info_t.min, info_t.max) if info_t else corr,
                     stage("preproc", fp["preproc"]), affine=A0, dtype=np.dtype(run.dtype), units=UNITS)
    np.savetxt(stage("bval", fp["bval"]), run.bvals[None], fmt="%g")
    np.savetxt(stage("bvec", fp["bvec"]), bvecs, fmt="%.6f")
    table.to_csv(stage("motion", fp["motion"]), sep="\t", index=False, float_format="%.6f")
    side = {k: run.sidecar[k] for k in SAFE_SIDECAR_KEYS if k in run.sidecar}
    side.update({"SkullStripped": False, "Sources": [os.path.basename(run.path)],
                 "Description": "Motion/eddy-current corrected on the first run's b0 reference; b-vectors "
                                "rotated by each volume's rotation (FSL convention, this image's axes).",
                 "RegistrationMethod": p["registration"], "DiffusionWeightedDOF": p["dw_dof"],
                 "MeanFramewiseDisplacement": float(table["framewise_displacement"].mean()),
                 "DWFramePlacement": placed,
                 "GeneratedBy": [{"Name": "brainfuse dwi", "CodeVersion": code}]})
    bf_io.save_json(side, stage("json", sidecar(fp["preproc"])))


def _resample_runs(runs: list[Run], transforms_runs, ref, info: dict, final: dict, p: dict, code: str, stage):
    """Every run resampled onto the first run's grid, staged (``_write_run``) and concatenated:
    (data, bvals, bvecs, FOV coverage, motion tables by run name)."""
    A0, shape0 = runs[0].affine, runs[0].data.shape[:3]
    support = signal_support(ref)
    center = np.asarray(A0 @ np.r_[(np.asarray(shape0) - 1) / 2, 1.0])[:3]
    all_data, all_bvals, all_bvecs, all_cov, tables = [], [], [], [], {}
    placements = info.get("placement", [{}] * len(runs))
    for run, T, fp, placed in zip(runs, transforms_runs, final["runs"], placements):
        corr = resample(run.data, run.affine, T, A0, shape0, order=p["interpolation"], support=support)
        all_cov.append(fov_coverage(run.data.shape, run.affine, T, A0, shape0))
        bvecs = rotate_bvecs(run.bvecs, T, run.affine, A0)
        table = motion_table(T, center)
        tables[os.path.basename(fp["preproc"]).split("_desc-")[0]] = table
        _write_run(run, corr, bvecs, table, fp, placed, A0, p, code, stage)
        all_data.append(corr)
        all_bvals.append(run.bvals)
        all_bvecs.append(bvecs)
    return (np.concatenate(all_data, 3), np.concatenate(all_bvals), np.concatenate(all_bvecs, 1),
            np.concatenate(all_cov, 3), tables)


_MAP_UNITS = {"fa": "arbitrary", "md": "mm^2/s", "ad": "mm^2/s", "rd": "mm^2/s", "cfa": "arbitrary"}


def _write_native(maps: dict, meta: dict, mask, mean_b0, A0, final: dict, stage) -> None:
    """Stage the tensor maps (with sidecars), the brain mask and the mean b0 on the DWI grid."""
    for m in (*MAPS, "cfa"):
        bf_io.save_nifti(maps[m], stage(m, final[m]), affine=A0, dtype=np.float32, units=UNITS)
        bf_io.save_json({**meta, "Units": _MAP_UNITS[m]}, stage(m, sidecar(final[m])))
    bf_io.save_nifti(mask.astype(np.uint8), stage("mask", final["mask"]), affine=A0, dtype=np.uint8, units=UNITS)
    bf_io.save_nifti(mean_b0, stage("b0", final["b0"]), affine=A0, dtype=np.float32, units=UNITS)


def _normalise(maps: dict, meta: dict, mean_b0, mask, A0, t1w, t1w_mask, transforms, template, res: int,
               final: dict, work: str, stage) -> None:
    """b0 -> T1w, then the anat chain to the template: stage the transform and the template-space maps."""
    mat, _ = register_to_t1w(mean_b0, mask, A0, t1w, t1w_mask, work)
    shutil.copy(mat, stage("xfm", final["xfm"]))
    chain = list(transforms) + [os.path.join(work, os.path.basename(final["xfm"]))]
    mni = to_template({m: (maps[m], A0) for m in MAPS}, chain, template, work)
    tpl_affine = nib.load(str(template)).affine
    for m in MAPS:
        bf_io.save_nifti(mni[m], stage(m, final[f"mni_{m}"]), affine=tpl_affine, dtype=np.float32, units=UNITS)
        bf_io.save_json({**meta, "Units": _MAP_UNITS[m], "Resolution": f"{res} mm", "SpatialReference": TEMPLATE,
                    "Transforms": [os.path.basename(x) for x in chain]}, stage(m, sidecar(final[f"mni_{m}"])))


def _map_meta(p: dict, limit: float, used: int, dwi_paths, qc: dict, code: str) -> dict:
    """The sidecar shared by every tensor map."""
    return {"Model": "tensor (dipy TensorModel)", "FitMethod": p["fit_method"], "MaxBValue": limit,
            "VolumesUsed": used, "Sources": [os.path.basename(x) for x in dwi_paths],
            # voxels a corrected volume sampled outside its acquired field of view; eigenvalues clipped
            "QualityControl": qc, "OutsideFieldOfView": p["outside_fov"],
            "GeneratedBy": [{"Name": "brainfuse dwi", "CodeVersion": code}]}


def process(dwi_paths, out_dir, sub: str, ses: str | None, t1w, t1w_mask, transforms, template, res: int,
            params: dict | None = None, threads: int = 1, log=print, strict: bool = False) -> dict:
    """Correct, fit and normalise every DWI run of one subject; all outputs written atomically. QC
    (``qc_flags``) below a threshold: a ``WARNING`` log line and a flag in the QC JSON; with ``strict``, a
    :class:`~brainfuse.stageqc.QCError` before anything is renamed into place."""
    p = {**DEFAULTS, **(params or {})}
    _check_settings(p)
    sub = check_label(sub, "subject label")
    ses = check_label(ses, "session label") if ses else None
    dwi_paths = sorted(str(x) for x in dwi_paths)
    runs = _load_inputs(dwi_paths, t1w, template, transforms, p)
    # after the input checks: bad input fails in a second, without loading ANTs and torch
    load_ants(threads)       # ITK's thread count (read at import) and the registration seed
    import torch

    torch.set_num_threads(threads)
    final = layout.dwi_paths(out_dir, sub, ses, res, dwi_paths)
    dwi_dir = Path(final["fa"]).parent
    dwi_dir.mkdir(parents=True, exist_ok=True)
    Path(final["qc_fa"]).parent.mkdir(parents=True, exist_ok=True)
    work = tempfile.mkdtemp(prefix=".dwi-", dir=dwi_dir)   # ANTs outprefix and staged outputs
    staged = {}
    timings, t_start = {}, time.perf_counter()
    label = f"sub-{sub}" + (f"_ses-{ses}" if ses else "")
    try:
        def stage(key, path):
            """Where to write ``path`` first: in ``work``, renamed into place once everything is written."""
            tmp = os.path.join(work, os.path.basename(path))
            staged[tmp] = path
            return tmp

        t0 = time.perf_counter()
        info = {}
        transforms_runs, ref = correct_runs(runs, p, work, log, info)
        timings["correction_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        A0 = runs[0].affine
        code = code_version("dwi")
        data, bvals, bvecs, coverage, tables = _resample_runs(runs, transforms_runs, ref, info, final, p, code, stage)
        timings["resampling_s"] = time.perf_counter() - t0
        mean_b0 = data[..., bvals <= p["b0_threshold"]].mean(3)
        # one run: its reference is the mean of these same aligned b0s, already masked
        mask = info.get("mask") if len(runs) == 1 and info.get("mask") is not None else brain_mask(mean_b0)
        t0 = time.perf_counter()
        limit = shell_limit(bvals, p["max_bval"], p["b0_threshold"])
        qc = {}
        maps = fit_tensor(data, bvals, bvecs, mask, limit, p["fit_method"], p["b0_threshold"], coverage=coverage,
                          max_diffusivity=p["max_diffusivity"], outside_fov=p["outside_fov"], qc=qc)
        flags, qc_metrics, thresholds = qc_flags(tables, qc, p)
        qc.pop("fitted"), qc.pop("clipped")
        timings["tensor_fit_s"] = time.perf_counter() - t0
        log(f"[dwi] sub-{sub}: tensor fit QC: " + ", ".join(f"{k} {v}" for k, v in qc.items()))
        stageqc.settle(flags, strict=strict, label=label, stage="dwi", path=dwi_paths[0], log=log)
        stageqc.save(stage("qc_json", final["qc_json"]), flags, qc_metrics, thresholds)
        meta = _map_meta(p, limit, int((bvals <= limit).sum()), dwi_paths, qc, code)
        _write_native(maps, meta, mask, mean_b0, A0, final, stage)
        t0 = time.perf_counter()
        _normalise(maps, meta, mean_b0, mask, A0, t1w, t1w_mask, transforms, template, res, final, work, stage)
        timings["normalisation_s"] = time.perf_counter() - t0
        qc_fa(maps["fa"], maps["cfa"], A0, stage("qc", final["qc_fa"]), f"{label}: FA and colour FA ({p['fit_method']})")
        qc_motion(tables, stage("qc", final["qc_motion"]), f"{label}: DWI motion ({p['registration']})")
        for tmp, dest in staged.items():
            os.replace(tmp, dest)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    timings["total_s"] = time.perf_counter() - t_start
    timings["volumes"] = int(sum(len(r.bvals) for r in runs))
    log(f"[dwi] sub-{sub}: " + ", ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}" for k, v in timings.items()))
    return {"paths": final, "timings": timings, "transforms": transforms_runs}


# -------------------------------------------------------------------------------------------- CLI
def cli(argv=None):
    args = cliargs.parser("dwi").parse_args(argv)
    try:
        process(args.dwi, args.out_dir, args.subject, args.session, args.t1w, args.t1w_mask, args.transforms, args.template,
                args.resolution, json.loads(args.params), args.threads, strict=args.strict)
    except (BrainfuseError, FileNotFoundError) as e:    # called in-process by tests too: one line, exit 1
        print(f"brainfuse dwi: error: {e}", file=sys.stderr)
        return 1
    return 0
