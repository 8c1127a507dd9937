"""Atomic file writes: every stage's outputs go through here, so a half-written file never carries a final name.

:func:`atomic_path` yields a temporary path in the destination's folder (a hidden ``.<name>.<random>.part``
file, so the final rename is atomic on one file system) and renames it over the final path only when the
``with`` block finishes; on any error the temporary file is removed and an existing final file is left
untouched. The ``save_*`` functions are thin writers on top of it. Their defaults are the libraries'
defaults; where a stage writes differently (JSON key order, ``n/a`` for missing values, figure dpi …) it
says so in its call, so the bytes each stage writes are its own choice, not this module's.

Light at import: numpy and nibabel are imported inside the functions that need them (the demo's
per-subject job keeps its imports to a minimum); pandas, matplotlib and torch never are: a DataFrame,
a figure or a tensor comes with its library already imported (and tests/test_envs.py holds each stage's
environment to every import of the modules it uses, so a lazy ``import torch`` here would put PyTorch
into the demo's and anat's environments).
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

__all__ = ["atomic_path", "save_bytes", "save_figure", "save_json", "save_nifti", "save_npy", "save_text",
           "save_torch", "save_tsv"]

_UMASK = os.umask(0)
os.umask(_UMASK)
_COMPRESSED = (".gz", ".bz2", ".xz", ".zst")


def _extension(name: str) -> str:
    """The extension a writer may pick its format from: ``.nii.gz`` for ``x.nii.gz``, ``.png`` for ``x.png``."""
    stem, ext = os.path.splitext(name)
    if ext in _COMPRESSED:
        ext = os.path.splitext(stem)[1] + ext
    return ext


@contextmanager
def atomic_path(path, *, keep_extension: bool = False, name: str | None = None, mkdir: bool = True) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it to ``path``, on error delete it.

    The temporary file is ``.<name>.<random>.part``, hidden, in the destination's folder (so the rename is
    atomic), and gets the mode a plain ``open()`` would give it (0666 less the umask). ``keep_extension``: end
    it with the final name's extension (``….part.nii.gz``), for writers that choose the format from the name
    (nibabel, matplotlib); by default it ends in ``.part``, so that globs for the final extension never see a
    file being written. ``name``: the temporary file's own name, inside a private hidden folder next to the
    target, for writers that record their file's name in it (``torch.save`` names its zip records after it).
    ``mkdir``: create the destination's folder first.
    """
    path = Path(path)
    if mkdir:
        path.parent.mkdir(parents=True, exist_ok=True)
    suffix = ".part" + (_extension(path.name) if keep_extension else "")
    folder = None
    if name is None:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
        os.close(fd)
        tmp = Path(tmp)
    else:
        folder = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix))
        tmp = folder / name
    try:
        yield tmp
        if folder is None:
            os.chmod(tmp, 0o666 & ~_UMASK)      # mkstemp files are private (0600)
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.filename is None:
            e.filename = str(path)      # a full disk raises from write() with no file named: name the output
        raise
    finally:
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)


def save_text(text: str, path, encoding: str | None = None) -> None:
    """``text`` as is (no newline added); ``encoding`` as ``Path.write_text`` takes it (None: the locale's)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding=encoding)


def save_bytes(data: bytes, path) -> None:
    """``data`` as is."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def save_json(obj, path, *, indent: int | None = 2, sort_keys: bool = False, allow_nan: bool = True,
              newline: bool = True, default=None) -> None:
    """``json.dumps(obj, indent=indent, sort_keys=sort_keys, allow_nan=allow_nan, default=default)``, plus a
    trailing newline unless ``newline=False``."""
    text = json.dumps(obj, indent=indent, sort_keys=sort_keys, allow_nan=allow_nan, default=default)
    save_text(text + "\n" if newline else text, path)


def save_tsv(table, path, *, index: bool = False, na_rep: str = "", float_format: str | None = None) -> None:
    """A pandas DataFrame as ``table.to_csv(sep="\\t", index=index, na_rep=na_rep, float_format=float_format)``
    (pandas' defaults otherwise: missing values as empty fields, floats as their shortest repr)."""
    with atomic_path(path) as tmp:
        table.to_csv(tmp, sep="\t", index=index, na_rep=na_rep, float_format=float_format)


def save_nifti(image, path, *, affine=None, dtype=None, units: tuple | None = None, zooms=None,
               fast_gzip: bool = False) -> None:
    """A NIfTI-1 image: a nibabel image, or an array with ``affine`` (and ``dtype``: the array is cast to it).

    ``units``: ``header.set_xyzt_units(*units)``, e.g. ``("mm", "sec")`` or ``("mm",)``; ``zooms``:
    ``header.set_zooms(zooms)``. Written by ``nib.save`` (the format from the extension: ``.nii`` or
    ``.nii.gz``, nibabel's gzip level), or with ``fast_gzip``: a ``.nii.gz`` deflated at level 1 with the
    run-length strategy, as small as nibabel's on noisy images and ~1.7x faster to write (any gzip reader
    reads it). Only an array input imports nibabel.
    """
    if not hasattr(image, "to_bytes"):
        import nibabel as nib
        import numpy as np

        data = np.asarray(image)
        image = nib.Nifti1Image(data if dtype is None else data.astype(dtype), affine)
    elif affine is not None or dtype is not None:
        raise TypeError("save_nifti: affine and dtype go with an array, not with an image")
    if units is not None:
        image.header.set_xyzt_units(*units)
    if zooms is not None:
        image.header.set_zooms(zooms)
    if fast_gzip:
        if not str(path).endswith(".gz"):
            raise ValueError(f"save_nifti: fast_gzip writes gzip, but {path} does not end in .gz")
        packer = zlib.compressobj(1, zlib.DEFLATED, 31, 9, zlib.Z_RLE)     # wbits 31: gzip container
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            f.write(packer.compress(image.to_bytes()))
            f.write(packer.flush())
        return
    import nibabel as nib

    with atomic_path(path, keep_extension=True) as tmp:
        nib.save(image, tmp)


def save_npy(array, path, *, allow_pickle: bool = False) -> None:
    """``np.save`` to exactly ``path`` (no ``.npy`` appended); object arrays only with ``allow_pickle``."""
    import numpy as np

    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array, allow_pickle=allow_pickle)


def save_figure(fig, path, **savefig_kwargs) -> None:
    """``fig.savefig(path, **savefig_kwargs)`` (format from the extension unless ``format=`` is given), then
    close the figure (also when saving fails)."""
    try:
        with atomic_path(path, keep_extension=True) as tmp:
            fig.savefig(tmp, **savefig_kwargs)
    finally:
        pyplot = sys.modules.get("matplotlib.pyplot")     # a figure made without pyplot is not pyplot's to close
        if pyplot is not None:
            pyplot.close(fig)


def save_torch(obj, path) -> None:
    """``torch.save(obj, path)``, with the torch the caller imported (this module never imports torch or
    matplotlib: the environments of stages that use neither have neither). torch names the zip records after
    the file it writes, less its extension; the file is written as ``<name>.part`` in a private folder, so
    the records are ``<name>/…`` whatever the temporary name: the same object, the same bytes, every run."""
    torch = sys.modules.get("torch")
    if torch is None:
        raise RuntimeError("brainfuse.io.save_torch: import torch first (brainfuse.io does not import it)")
    path = Path(path)
    with atomic_path(path, name=path.name + ".part") as tmp:
        torch.save(obj, tmp)
