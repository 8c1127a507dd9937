"""Small QC figure helpers shared by the stages: slices of a 3D image with outlines drawn over them.

Images are shown in RAS orientation (left of the brain on the left of each panel: neurological view)
whatever their voxel order, so QC of LAS/LPI/sagittal acquisitions looks the same.
"""
from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
from scipy import ndimage  # noqa: E402

from . import io as bf_io  # noqa: E402


def as_canonical(img, zooms: bool = False):
    """Data of a nibabel image (or path) reoriented to RAS voxel order, float32, 3D; with ``zooms``, also its
    voxel sizes (mm) along those axes, for :func:`overlay_figure` to draw in world proportions."""
    img = nib.load(str(img)) if isinstance(img, (str, os.PathLike)) else img
    img = nib.as_closest_canonical(img)
    data = np.asarray(img.dataobj, dtype=np.float32).reshape(img.shape[:3])
    return (data, tuple(float(z) for z in img.header.get_zooms()[:3])) if zooms else data


def edges(data: np.ndarray, sigma: float = 1.0, quantile: float = 0.9) -> np.ndarray:
    """Boolean edge map: gradient magnitude of the smoothed image above a quantile of its non-zero part."""
    mag = ndimage.gaussian_gradient_magnitude(np.asarray(data, dtype=np.float32), sigma)
    nz = mag[mag > 0]
    return mag > (np.quantile(nz, quantile) if nz.size else np.inf)


def _slices(shape, n: int, box=None):
    """n evenly spaced slice indices per axis, inside ``box`` ((lo, hi) per axis) when given."""
    out = []
    for ax in range(3):
        lo, hi = (0, shape[ax] - 1) if box is None else box[ax]
        out.append(np.linspace(lo + 0.15 * (hi - lo), hi - 0.15 * (hi - lo), n).round().astype(int))
    return out


def _take(vol, ax, i):
    return np.rot90(np.take(vol, i, axis=ax))     # superior / anterior up


def _aspect(zooms, ax) -> float:
    """imshow aspect of a ``_take`` slice: displayed rows follow the last remaining axis, columns the first,
    so a pixel is (zoom of the last) / (zoom of the first) times as high as wide (world proportions)."""
    if zooms is None:
        return 1.0
    first, last = (z for a, z in enumerate(zooms) if a != ax)
    return float(last) / float(first)


def overlay_figure(background, out_png, title: str = "", contours=None, points=None, n: int = 6, box_from=None,
                   zooms=None):
    """3 rows (sagittal, coronal, axial) x ``n`` slices of ``background`` with overlays.

    ``contours``: list of (volume, level, colour) drawn as iso-lines (e.g. a mask at 0.5).
    ``points``: list of (boolean volume, colour) drawn as dots (e.g. :func:`edges` of a template).
    Volumes are RAS arrays on the background's grid (see :func:`as_canonical`). ``box_from``: a volume whose
    non-zero bounding box chooses the slices (default: the background). ``zooms``: voxel sizes (mm) of the RAS
    axes (``as_canonical(..., zooms=True)``): anisotropic voxels are drawn in world proportions, not squashed.
    Written atomically to ``out_png``.
    """
    bg = np.asarray(background, dtype=np.float32)
    ref = bg if box_from is None else np.asarray(box_from)
    nz = np.argwhere(ref > 0)
    box = [(nz[:, a].min(), nz[:, a].max()) for a in range(3)] if len(nz) else None
    idx = _slices(bg.shape, n, box)
    vmax = np.percentile(bg[bg > 0], 99.5) if (bg > 0).any() else 1.0
    fig, axes = plt.subplots(3, n, figsize=(2.0 * n, 6.4), facecolor="black", squeeze=False)
    for ax_i, name in enumerate(("sagittal", "coronal", "axial")):
        for j, s in enumerate(idx[ax_i]):
            a = axes[ax_i, j]
            a.imshow(_take(bg, ax_i, s), cmap="gray", vmin=0, vmax=vmax, interpolation="nearest",
                     aspect=_aspect(zooms, ax_i))
            for vol, level, colour in contours or ():
                sl = _take(np.asarray(vol, dtype=np.float32), ax_i, s)
                if sl.min() < level < sl.max():
                    a.contour(sl, levels=[level], colors=[colour], linewidths=0.8)
            for vol, colour in points or ():
                yy, xx = np.nonzero(_take(np.asarray(vol), ax_i, s))
                a.scatter(xx, yy, s=0.3, c=colour, marker=".", linewidths=0)
            a.set_axis_off()
            if j == 0:
                a.set_title(name, color="white", fontsize=8, loc="left")
    fig.suptitle(title, color="white", fontsize=10)
    fig.tight_layout()
    bf_io.save_figure(fig, out_png, dpi=90, facecolor="black")
    return str(out_png)
