"""The per-subject QC record of the image stages (anat, dwi, func) and the strict / warn decision.

Each stage writes, per subject (session), ``DERIV/sub-X[/ses-Y]/<datatype>/sub-X[_ses-Y]_desc-qc_<suffix>.json``
(``brainfuse.layout.qc_path``) holding ``{"qc_pass": bool, "flags": [one-line strings], "metrics": {name: number},
"thresholds": {name: value}}``, keys sorted (byte-identical reruns). The tensors manifest and the report read
it. Below a threshold the stage logs a ``WARNING`` line naming the subject, the metric, its value, the
threshold and what to do, and carries on; with ``--strict`` (config key ``strict``) it stops with that line
instead, before any final-named output exists.

Light at import (standard library and brainfuse.io only): every stage imports it, and ``brainfuse qc`` (the
func QC job of every subject) starts in a fraction of the ~3 s ``brainfuse func`` needs for its imports.
"""
from __future__ import annotations

import os
import sys

from . import cliargs
from . import io as bf_io
from .errors import BrainfuseError

__all__ = ["QCError", "record", "save", "settle", "func_subject_qc"]


class QCError(BrainfuseError):
    """A subject below a QC threshold while strict mode is on."""


def record(flags: list, metrics: dict, thresholds: dict) -> dict:
    return {"qc_pass": not flags, "flags": list(flags), "metrics": dict(metrics), "thresholds": dict(thresholds)}


def save(path, flags: list, metrics: dict, thresholds: dict) -> dict:
    """Write the record atomically, keys sorted; returns it."""
    rec = record(flags, metrics, thresholds)
    bf_io.save_json(rec, path, sort_keys=True)
    return rec


def settle(flags: list, *, strict: bool, label: str, stage: str, path=None, log=print) -> None:
    """Each flag as a loud ``WARNING`` log line (the run goes on), or, with ``strict``, a :class:`QCError` with
    the first flag (and the count of the others) - raised before the caller renames any output into place."""
    if not flags:
        return
    if strict:
        more = f" (and {len(flags) - 1} more QC flag(s))" if len(flags) > 1 else ""
        raise QCError(f"{label}: {stage} QC failed: {flags[0]}{more}", path=path,
                      fix="fix the input, or set strict: false to flag the subject and carry on")
    for flag in flags:
        log(f"WARNING: {label}: {stage} QC: {flag}")


# ------------------------------------------------------------------------------------ func subject QC
def func_subject_qc(motion_qc_paths, out_path, strict: bool = False) -> dict:
    """The subject's (session's) func QC record from its runs' motion QC (``<run>_desc-confounds_timeseries.json``,
    written by ``brainfuse func``): every run's warnings as flags, the worst value of each measure over the runs
    as metrics, the runs' warning levels as thresholds. With ``strict``, a flag stops here (QCError), nothing
    is written."""
    from .inputs import read_json

    paths = sorted(str(p) for p in motion_qc_paths)
    if not paths:
        raise BrainfuseError("no motion QC file given", fix="pass every run's _desc-confounds_timeseries.json")
    flags, runs = [], []
    for p in paths:
        qc = read_json(p, "motion QC", fix="rerun the func stage for this run")
        name = os.path.basename(p).split("_desc-confounds")[0]
        runs.append(qc)
        flags += [f"{name}: {w}" for w in qc.get("Warnings", [])]
    worst = lambda key, f=max: f(float(q[key]) for q in runs if key in q)
    metrics = {"n_runs": len(runs), "mean_fd_mm": round(worst("MeanFramewiseDisplacement"), 4),
               "max_fd_mm": round(worst("MaxFramewiseDisplacement"), 4),
               "max_rotation_deg": round(worst("MaxRotation"), 4),
               "max_translation_mm": round(worst("MaxTranslation"), 4)}
    if any("MinReferenceCorrelation" in q for q in runs):
        metrics["min_reference_correlation"] = round(worst("MinReferenceCorrelation", min), 4)
    levels = runs[0].get("WarningLevels", {})
    thresholds = {"mean_fd_mm": levels.get("MeanFramewiseDisplacement"),
                  "max_fd_mm": levels.get("MaxFramewiseDisplacement"),
                  "min_reference_correlation": levels.get("ReferenceCorrelation")}
    settle(flags, strict=strict, label=os.path.basename(out_path).split("_desc-qc")[0], stage="func",
           path=paths[0], log=lambda m: print(m, file=sys.stderr))
    return save(out_path, flags, metrics, thresholds)


def cli(argv=None):
    args = cliargs.parser("qc").parse_args(argv)
    func_subject_qc(args.motion_qc, args.output, args.strict)
    return 0
