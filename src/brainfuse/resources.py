"""Cluster resources of each per-subject job, from its input's size (header only, no voxel data read).

The rules declare ``mem_mb`` and ``runtime`` (minutes) with these functions, so a 0.5 mm T1w or a long
multiband BOLD asks for what it needs and a 3 mm phantom does not hold a node's memory. Each model is a
fixed part (imports, templates, working-grid copies) plus a part per million voxels or values of the input;
the numbers come from ``benchmarks/bench_real.py`` (peak RSS of the stage's process on the shared Philips
subject and a 0.5 mm copy of its T1w) with a margin above the measured peaks. Light imports only: the
workflow imports this module at parse time.

A function raises FileNotFoundError naming the input while it does not exist yet; Snakemake then evaluates
the resources again once the file is there (an upstream rule or the convert checkpoint writes it).
"""
from __future__ import annotations

import errno
import functools
import math
import os

# (fixed MB, MB per million input voxels/values); (fixed minutes, minutes per million)
MODELS = {
    # native T1w, Mvoxels: Philips 1 mm (11 Mvox) peak 0.9 GB, its 0.5 mm copy (45 Mvox) 2.3 GB
    "anat": {"mem_mb": (1500, 50), "runtime": (5, 0.2)},
    # BOLD series, Mvalues (voxels x volumes): Philips rest (44 Mvalues)
    "func": {"mem_mb": (1500, 25), "runtime": (5, 0.2)},
    # DWI series (all runs) plus the T1w it registers to, Mvalues
    "dwi": {"mem_mb": (1500, 25), "runtime": (5, 0.3)},
}
CONVERT = {"mem_mb": 2000, "runtime": 30}   # not from the folder: counting a 1,000-subject tree's files at
                                            # parse time would cost more than the jobs


def _mvalues(paths) -> float:
    return _mvalues_of(tuple(str(p) for p in paths))


@functools.lru_cache(maxsize=None)      # each rule asks twice per job (mem_mb, runtime): read each header once
def _mvalues_of(paths: tuple) -> float:
    import nibabel as nib
    import numpy as np

    total = 0.0
    for path in paths:
        if not os.path.exists(path):
            raise FileNotFoundError(errno.ENOENT, "input not written yet", path)
        total += float(np.prod(nib.load(path).shape))
    return total / 1e6


def _model(stage: str, mvalues: float) -> dict:
    out = {}
    for key, (fixed, per) in MODELS[stage].items():
        out[key] = int(math.ceil(fixed + per * mvalues))
    return out


def anat(t1w) -> dict:
    """One anat job: the native T1w's size."""
    return _model("anat", _mvalues([t1w]))


def func(bold) -> dict:
    """One func job: the BOLD series' size."""
    return _model("func", _mvalues([bold]))


def dwi(runs) -> dict:
    """One dwi job: every DWI run of the subject together."""
    return _model("dwi", _mvalues([r for r in runs if str(r).endswith((".nii", ".nii.gz"))]))


def convert(dicom_dir=None) -> dict:
    """One subject's conversion."""
    return dict(CONVERT)
