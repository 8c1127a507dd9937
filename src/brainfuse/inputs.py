"""Checked readers: every image, sidecar, table, checkpoint and cached array a stage reads goes through here.

Each reader turns a library's failure (``EOFError`` from a truncated ``.nii.gz``, ``JSONDecodeError``,
pandas' ``EmptyDataError``, torch's ``UnpicklingError`` …) into one :class:`~brainfuse.errors.BrainfuseError`
line naming the file, the problem and what to do. The integrity functions record dtype, shape and a content
hash of arrays when a stage writes them and check them when a later stage reads them, so a cache edited or
re-saved by hand is refused with the stage to rerun.

numpy, nibabel and pandas are imported inside the functions (every stage's environment has them); torch
never is: :func:`load_torch` uses the torch its caller imported.
"""
from __future__ import annotations

import errno
import json
import os
import sys
import zlib
from contextlib import contextmanager
from pathlib import Path

from .errors import BrainfuseError
from .provenance import file_sha256

__all__ = ["InputFileError", "CacheError", "read_json", "read_sidecar", "read_tsv", "load_nifti", "check_finite",
           "load_torch", "load_npy", "array_record", "check_array", "file_sha256", "check_output_dir",
           "plausible_tr", "check_anisotropy", "as_stage_error"]


class InputFileError(BrainfuseError):
    """A file that is missing, unreadable, truncated or malformed."""


class CacheError(BrainfuseError):
    """A cached array whose dtype, shape or content differ from what the stage that wrote it recorded."""


def _exists(path, what: str, fix: str | None) -> Path:
    path = Path(path)
    if not path.exists():
        raise InputFileError(f"{what} not found", path=path, fix=fix or "check the path")
    if path.is_dir():
        raise InputFileError(f"{what} expected, found a folder", path=path, fix="point the path at a file")
    return path


def read_json(path, what: str = "JSON file", *, fix: str | None = None) -> dict:
    """A JSON object; a syntax error is reported with its line and column."""
    path = _exists(path, what, fix)
    text = path.read_text(errors="replace")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputFileError(f"{what} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})", path=path,
                             fix=fix or "fix the JSON (e.g. with a JSON validator) and rerun") from None
    if not isinstance(value, dict):
        raise InputFileError(f"{what} must hold a JSON object, found {type(value).__name__}", path=path,
                             fix=fix or "write it as {\"Key\": value, ...}")
    return value


def read_sidecar(image_path, what: str = "sidecar") -> dict:
    """The BIDS JSON sidecar of an image (``x.nii.gz`` -> ``x.json``); {} when there is none."""
    name = str(image_path)
    for ext in (".nii.gz", ".nii"):
        if name.endswith(ext):
            name = name[: -len(ext)]
            break
    side = Path(name + ".json")
    return read_json(side, what) if side.exists() else {}


def read_tsv(path, what: str = "table", *, required: tuple = (), fix: str | None = None, **read_csv_kwargs):
    """A tab-separated table with at least one row and the ``required`` columns."""
    import pandas as pd

    path = _exists(path, what, fix)
    try:
        table = pd.read_csv(path, sep="\t", **read_csv_kwargs)
    except pd.errors.EmptyDataError:
        raise InputFileError(f"{what} is empty", path=path,
                             fix=fix or "write a header line and one row per participant") from None
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as e:
        raise InputFileError(f"{what} cannot be read as a tab-separated table ({str(e).splitlines()[0]})",
                             path=path, fix=fix or "save it as UTF-8 text with tab-separated columns") from None
    missing = [c for c in required if c not in table.columns]
    if missing:
        hint = " (is it comma-separated?)" if len(table.columns) == 1 and "," in str(table.columns[0]) else ""
        raise InputFileError(f"{what} lacks the column(s) {', '.join(missing)}{hint}; it has "
                             f"{', '.join(map(str, table.columns[:8]))}", path=path,
                             fix=fix or "add the columns (tab-separated) and rerun")
    if len(table) == 0:
        raise InputFileError(f"{what} has a header but no rows", path=path,
                             fix=fix or "add one row per participant")
    return table


def load_nifti(path, what: str = "image", *, ndim: tuple = (3, 4), data: bool = True, dtype=None,
               fix: str | None = None):
    """``(image, array)`` (array None with ``data=False``) of a NIfTI file, read to the end so that a
    truncated file fails here, with its name, instead of deep inside a registration."""
    import nibabel as nib
    import numpy as np

    path = _exists(path, what, fix)
    try:
        img = nib.load(str(path))
        array = np.asarray(img.dataobj, dtype=dtype) if data else None
    except (EOFError, zlib.error, OSError, ValueError, nib.filebasedimages.ImageFileError) as e:
        if isinstance(e, OSError) and not isinstance(e, EOFError) and e.errno is not None:
            raise       # a permission or disk problem, reported as such by the CLI
        reason = "is truncated" if isinstance(e, (EOFError, zlib.error)) or "unexpected end" in str(e).lower() \
            else f"cannot be read as NIfTI ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
        raise InputFileError(f"{what} {reason}", path=path,
                             fix=fix or "copy or convert it again from the source data") from None
    if len(img.shape) not in ndim:
        want = " or ".join(f"{n}D" for n in ndim)
        raise InputFileError(f"{what} must be {want}, it has shape {img.shape}", path=path,
                             fix=fix or "check that this is the right file")
    affine = img.affine
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise InputFileError(f"{what} has a singular or non-finite affine (voxel-to-world) matrix", path=path,
                             fix=fix or "convert it again; dcm2niix writes a valid one")
    return img, array


def check_finite(array, path, what: str = "image", *, allow_empty: bool = False) -> None:
    """Refuse NaN/Inf voxels and, unless ``allow_empty``, an image of one constant value."""
    import numpy as np

    bad = int(array.size - np.count_nonzero(np.isfinite(array)))
    if bad:
        raise InputFileError(f"{what} holds {bad} NaN/Inf voxel(s)", path=path,
                             fix="replace them (e.g. fslmaths -nan) or convert the image again")
    if not allow_empty and array.size and float(array.min()) == float(array.max()):
        raise InputFileError(f"{what} is empty: every voxel is {float(array.flat[0]):g}", path=path,
                             fix="check the export; this image holds no signal")


def plausible_tr(tr, path, low: float = 0.2, high: float = 10.0) -> float:
    """``RepetitionTime`` in seconds, refused outside [low, high] with the likely cause named."""
    try:
        tr = float(tr)
    except (TypeError, ValueError):
        raise InputFileError(f"RepetitionTime {tr!r} is not a number", path=path,
                             fix="write it in seconds, e.g. \"RepetitionTime\": 2.0") from None
    if not low <= tr <= high:
        cause = f"milliseconds? BIDS wants seconds: {tr / 1000:g}" if tr > high else "check the sidecar"
        raise InputFileError(f"RepetitionTime {tr:g} s is outside {low:g}-{high:g} s ({cause})", path=path,
                             fix="correct RepetitionTime (in seconds) in the sidecar and rerun")
    return tr


def check_anisotropy(zooms, path, what: str, limit: float, key: str) -> float:
    """Refuse voxels whose longest edge exceeds ``limit`` x the shortest (``key``: the config key of the bound);
    returns the ratio. A 1 x 1 x 6 mm T1w registered to the template with MNI correlation -0.05 and still
    flowed on: such images are acquisitions of another kind (2D slices), not a fault registration can absorb."""
    import numpy as np

    z = np.abs(np.asarray(zooms, float)[:3])
    ratio = float(z.max() / z.min()) if z.min() > 0 else float("inf")
    if ratio > limit:
        raise InputFileError(f"{what} voxels are {' x '.join(f'{v:g}' for v in z)} mm: anisotropy {ratio:.1f} is "
                             f"above {key} = {limit:g}", path=path,
                             fix=f"use a near-isotropic acquisition, or raise {key} if you accept the risk")
    return ratio


@contextmanager
def as_stage_error(error_class):
    """Re-raise an :class:`InputFileError` from these readers as the stage's own error class, same text, so that
    a caller catching e.g. ``anat.InputError`` sees every refusal of that stage's input."""
    try:
        yield
    except InputFileError as e:
        if isinstance(e, error_class):
            raise
        raise error_class(e.problem, path=e.path, fix=e.fix) from None


def load_torch(path, what: str = "checkpoint", *, map_location="cpu", stage: str = "train"):
    """``torch.load(path, weights_only=True)`` with the torch the caller imported; a truncated, tampered or
    foreign file is refused with the stage to rerun (weights_only refuses any pickled code)."""
    torch = sys.modules.get("torch")
    if torch is None:
        raise RuntimeError("brainfuse.inputs.load_torch: import torch first")
    path = _exists(path, what, f"rerun the {stage} stage")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:      # torch raises RuntimeError, UnpicklingError, EOFError, OSError … for bad files
        # a system problem (permission, disk) is reported as such; EINVAL is torch seeking inside a truncated file
        if isinstance(e, OSError) and e.errno is not None and e.errno != errno.EINVAL:
            raise
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputFileError(f"{what} is truncated, damaged or not a brainfuse file ({reason[:160]})", path=path,
                             fix=f"delete it and rerun the {stage} stage") from None


def array_record(path) -> dict:
    """What :func:`check_array` checks later: dtype, shape and the file's SHA-256, read back from disk."""
    import numpy as np

    a = np.load(path, mmap_mode="r", allow_pickle=False)
    return {"dtype": str(a.dtype), "shape": list(a.shape), "sha256": file_sha256(path)}


def check_array(path, record: dict | None, *, stage: str, hash_content: bool = True):
    """``np.load`` (memory-mapped) of a cached array after checking it against ``record`` (from
    :func:`array_record` at write time): dtype, shape, then the content hash."""
    import numpy as np

    path = Path(path)
    fix = f"rerun the {stage} stage"
    if not path.exists():
        raise CacheError("cached array is missing", path=path, fix=fix)
    try:
        a = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        if isinstance(e, OSError) and not isinstance(e, EOFError) and e.errno is not None:
            raise
        raise CacheError(f"cached array cannot be read ({str(e).splitlines()[0]})", path=path, fix=fix) from None
    if record is None:
        return a
    if str(a.dtype) != record["dtype"] or list(a.shape) != list(record["shape"]):
        raise CacheError(f"cached array is {a.dtype} {list(a.shape)}, the {stage} stage wrote {record['dtype']} "
                         f"{list(record['shape'])}", path=path, fix=fix)
    if hash_content and file_sha256(path) != record["sha256"]:
        raise CacheError(f"cached array changed since the {stage} stage wrote it (content hash differs)",
                         path=path, fix=fix)
    return a


def load_npy(path, *, stage: str):
    """An array from a stage's cache without a record (no pickles)."""
    return check_array(path, None, stage=stage)


def check_output_dir(path, what: str = "output_dir") -> Path:
    """A folder brainfuse can write in: refuse a file in its place, or a read-only location, up front."""
    path = Path(path)
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise BrainfuseError(f"{what} is a file ({probe}), not a folder", path=path,
                             fix=f"set {what} to a folder (it is created when missing)")
    if probe.exists() and not os.access(probe, os.W_OK | os.X_OK):
        raise BrainfuseError(f"{what} is not writable ({probe})", path=path,
                             fix=f"set {what} to a folder you can write to")
    return path
