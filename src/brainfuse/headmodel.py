"""The synthetic head: nilearn's MNI152 2009a symmetric brain with CSF, skull and scalp shells on a padded grid.

It is the registration target of real-data skull stripping (``templates.build`` writes it as
``tpl-…_desc-head_T1w``) and the anatomy of the phantom (``brainfuse.phantom.generator``), so it lives here, on the
real-data path: this module imports nothing from the phantom. Also the geometry helpers it samples with
(:func:`apply_affine`, :func:`affine_rows`, :class:`Linear`), which the phantom shares.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

T1_SHELLS = {"csf": 0.12, "skull": 0.06, "scalp": 0.85}   # T1 intensity of the shells (white matter = 1)


@dataclass
class HeadModel:
    """Template-space maps on one grid: T1 intensity, tissue probabilities, brain mask."""
    affine: np.ndarray
    t1: np.ndarray
    tissues: dict          # wm, gm, csf, skull, scalp -> probability maps summing to <= 1
    brain: np.ndarray

    def sample(self, volume: np.ndarray, points: np.ndarray, order: int = 1) -> np.ndarray:
        """Values of ``volume`` at world points (N, 3), linear interpolation, 0 outside."""
        vox = affine_rows(np.linalg.inv(self.affine), np.asarray(points).T)
        if order == 1:
            return Linear(volume.shape, vox)(volume)
        from scipy import ndimage

        return ndimage.map_coordinates(volume, vox, order=order, mode="constant", cval=0.0)

    @cached_property
    def box(self):
        """RAS bounding box (lo, hi) of the head (tissue sum > 0.05) in template mm."""
        idx = np.argwhere(sum(self.tissues.values()) > 0.05)
        corners = apply_affine(self.affine, np.array([idx.min(0), idx.max(0)], dtype=float))
        return corners.min(0), corners.max(0)

    @cached_property
    def stacked(self) -> np.ndarray:
        """(X, Y, Z, 5) tissue maps in TISSUE_ORDER: one gather samples them all."""
        return np.stack([self.tissues[k] for k in TISSUE_ORDER], -1)

    def tissues_at(self, z: np.ndarray) -> dict:
        """Tissue probabilities at template points z (N, 3)."""
        values = Linear(self.t1.shape, affine_rows(np.linalg.inv(self.affine), np.asarray(z).T))(self.stacked)
        return {k: np.ascontiguousarray(values[:, i]) for i, k in enumerate(TISSUE_ORDER)}

    def arrays(self) -> dict:
        return {"affine": self.affine, "t1": self.t1, "brain": self.brain,
                **{f"tissue_{k}": v for k, v in self.tissues.items()}}

    @classmethod
    def from_arrays(cls, f) -> "HeadModel":
        return cls(affine=f["affine"], t1=f["t1"], brain=f["brain"], tissues={k: f[f"tissue_{k}"] for k in TISSUE_ORDER})


TISSUE_ORDER = ("wm", "gm", "csf", "skull", "scalp")
HEAD_PAD_MM = 18.0
_HEADS: dict = {}       # (resolution, pad) -> HeadModel, built or loaded once per process


def head_model(resolution: int = 2, pad_mm: float = HEAD_PAD_MM) -> HeadModel:
    """nilearn's packaged (brain-only) template with CSF, skull and scalp shells, on a padded grid.

    Built once per process (the phantom generator also fills this process's copy from its cache).
    """
    key = (int(resolution), float(pad_mm))
    if key not in _HEADS:
        _HEADS[key] = _build_head_model(*key)
    return _HEADS[key]


def _build_head_model(resolution: int, pad_mm: float) -> HeadModel:
    from nilearn import datasets, image
    from scipy import ndimage

    t1 = datasets.load_mni152_template(resolution=resolution)
    pad = int(round(pad_mm / resolution))
    affine = t1.affine.copy()
    affine[:3, 3] -= pad * resolution

    def load(img):
        img = image.resample_img(img, target_affine=t1.affine, target_shape=t1.shape, interpolation="continuous",
                                 force_resample=True, copy_header=True)
        return np.pad(np.clip(img.get_fdata(dtype=np.float32), 0, None), pad)

    t1d = np.pad(t1.get_fdata(dtype=np.float32), pad)
    gm = load(datasets.load_mni152_gm_template(resolution=resolution))
    wm = load(datasets.load_mni152_wm_template(resolution=resolution))
    brain = (t1d > 0.05 * t1d.max()) | (gm + wm > 0.2)
    brain = ndimage.binary_fill_holes(ndimage.binary_closing(brain, iterations=2))
    csf = np.clip(brain - gm - wm, 0, 1) * brain
    # Smooth head outline: distance (mm) from a blurred brain envelope.
    envelope = ndimage.gaussian_filter(brain.astype(np.float32), 6.0 / resolution) > 0.3
    dist = ndimage.distance_transform_edt(~envelope) * resolution
    shells = {"csf": (0, 2.0), "skull": (2.0, 8.0), "scalp": (8.0, 14.0)}
    tissues = {"wm": wm * brain, "gm": gm * brain, "csf": csf}
    outside = ~brain
    for name, (lo, hi) in shells.items():
        shell = (outside & (dist > lo) & (dist <= hi)) | (outside & envelope & (name == "csf"))
        tissues[name] = tissues.get(name, 0) + shell.astype(np.float32)
    tissues = {k: ndimage.gaussian_filter(v.astype(np.float32), 0.5) for k, v in tissues.items()}
    head_t1 = t1d / np.percentile(t1d[wm > 0.9], 50)      # white matter = 1
    for name, value in T1_SHELLS.items():
        head_t1 = head_t1 + value * tissues[name] * outside
    return HeadModel(affine=affine, t1=head_t1.astype(np.float32), tissues=tissues, brain=brain)


# ------------------------------------------------------------------------------------------ geometry
def apply_affine(affine: np.ndarray, points: np.ndarray) -> np.ndarray:
    """``affine`` applied to points (N, 3) or one point (3,)."""
    points = np.asarray(points, dtype=np.float64)
    if points.ndim == 1:
        return affine[:3, :3] @ points + affine[:3, 3]
    return affine_rows(affine, points.T).T


def affine_rows(affine: np.ndarray, rows: np.ndarray, dtype=np.float64) -> np.ndarray:
    """``affine`` applied to points given as rows (3, N), returned as rows (3, N).

    Column by column on contiguous rows: ``points @ affine[:3, :3].T`` on (N, 3) arrays is many times
    slower (no BLAS for a 3-wide product; BLAS threads, where they kick in, fight over busy cores).
    """
    a = np.asarray(affine, dtype=dtype)
    out = np.empty((3, np.shape(rows)[1]), dtype=dtype)
    for i in range(3):
        np.multiply(rows[0], a[i, 0], out=out[i], casting="unsafe")
        out[i] += rows[1] * a[i, 1]
        out[i] += rows[2] * a[i, 2]
        out[i] += a[i, 3]
    return out


class Linear:
    """Linear interpolation weights at fixed voxel coordinates ``vox`` (3, N), reused for every volume
    sampled there: the values of ``ndimage.map_coordinates(order=1, mode="constant")`` (0 outside
    [0, n-1] on any axis), or of ``mode="nearest"`` with ``clip=True``, in float32.

    A volume is (X, Y, Z) in C or Fortran order, or (X, Y, Z, C) in C order (C channels gathered at once).
    """

    def __init__(self, shape, vox, clip: bool = False):
        self.shape = tuple(int(v) for v in shape[:3])
        self.frac, self.lo, inside = [], [], None
        for c, n in zip(vox, self.shape):
            if clip:
                c = np.clip(c, 0, n - 1)
            else:
                ok = (c >= 0) & (c <= n - 1)
                inside = ok if inside is None else np.logical_and(inside, ok, out=inside)
            lo = np.floor(c)
            np.clip(lo, 0, max(n - 2, 0), out=lo)
            self.frac.append((c - lo).astype(np.float32, copy=False))
            self.lo.append(lo.astype(np.intp))
        self.inside = None if inside is None or inside.all() else inside
        self._index = {}

    def __call__(self, volume: np.ndarray) -> np.ndarray:
        nx, ny, nz = self.shape
        if volume.ndim == 3 and volume.flags.f_contiguous and not volume.flags.c_contiguous:
            flat, strides = volume.reshape(-1, order="F"), (1, nx, nx * ny)
        else:
            volume = np.ascontiguousarray(volume)
            flat, strides = volume.reshape(nx * ny * nz, -1), (ny * nz, nz, 1)
            if flat.shape[1] == 1:
                flat = flat[:, 0]
        if strides not in self._index:
            self._index[strides] = self.lo[0] * strides[0] + self.lo[1] * strides[1] + self.lo[2] * strides[2]
        base = self._index[strides]
        sx, sy, sz = (s if nd > 1 else 0 for s, nd in zip(strides, self.shape))
        fx, fy, fz = (f if flat.ndim == 1 else f[:, None] for f in self.frac)

        def along_z(offset):      # np.take: several times faster than fancy indexing
            a = np.take(flat, base + offset, axis=0)
            return a + (np.take(flat, base + (offset + sz), axis=0) - a) * fz

        c0 = along_z(0)
        c0 += (along_z(sy) - c0) * fy
        c1 = along_z(sx)
        c1 += (along_z(sx + sy) - c1) * fy
        c0 += (c1 - c0) * fx
        if self.inside is not None:
            c0[~self.inside] = 0
        return c0
