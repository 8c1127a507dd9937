"""Cached fixed-shape tensors: per-subject arrays on the working MNI grid, a gathered cohort, a fast loader.

Three layers, each usable without Snakemake:

- ``build_subject``: one subject's derivatives of one modality -> ``sub-X_modality-<m>_tensor.npy`` (float16
  for volumes, float32 for tabular vectors) + a JSON sidecar (shape, grid, template, source files with
  content hashes, normalisation, code version). Inputs must already be on the working grid: a wrong
  shape, affine or space entity is refused, never resampled.
- ``gather``: every subject's caches + participants.tsv (+ any declared feature TSVs) -> ``manifest.tsv``,
  one stacked memory-mappable ``<m>.npy`` per modality, ``clinical.tsv``, ``cohort.json``. The image stages'
  QC records (``--qc``, kept in the sidecars) become the manifest's ``qc_pass`` / ``qc_flags`` columns, with a
  WARNING listing flagged rows.
- Integrity: each cache's sidecar records its content hash, ``cohort.json`` the dtype, shape and hash of every
  stacked array and of the manifest; the gather and ``load_cohort`` refuse an edited, re-saved or truncated
  file with the stage to rerun (hashing costs ~0.15 s per load of the 36-subject 3 mm demo cohort, 244 MB).
- ``load_cohort`` / ``CohortDataset``: what train/evaluate use. ``make_cohort`` builds the same object
  from in-memory arrays (synthetic data in tests).

Intensity handling (documented in the sidecars; nothing here is fitted across subjects, so nothing can
leak from test folds — scalers and imputers are fitted per training fold by train.py):
- T1w brain: arbitrary scanner units, so each subject's image is z-scored with its own mean and SD
  inside the template brain mask (0 outside). GM probability and log-Jacobian are kept as they are.
- DTI: FA is unitless; MD/AD/RD are converted from mm^2/s to um^2/ms (x1000), a fixed unit change that
  keeps them O(1) and well inside float16's normal range.
- fMRI: ALFF depends on the BOLD intensity scale, so it is divided by its mean in the brain mask
  (mALFF, as in DPABI); fALFF and ReHo (Kendall's W) are ratios and kept.
- conn: upper triangle (k=1) of the Fisher-z matrix, parcel pairs named ``a__b``; float32.
"""
from __future__ import annotations

import importlib
import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from . import cliargs
from . import io as bf_io
from .errors import BrainfuseError
from .inputs import CacheError, array_record, check_array, load_nifti, read_json, read_tsv
from .layout import (DWI_MAPS, TEMPLATE, LabelError, anat_paths, bids_path, check_label, dwi_paths, func_paths,
                     run_key)
from .provenance import code_version, file_sha256
from .schema import section_defaults

# ------------------------------------------------------------------------------------------ modalities
# name -> channels: (channel name, datatype, suffix, extra entities, pattern its file name must contain)
# Channels of each volume modality, in order: (channel name, key of the derivative in brainfuse.layout's
# anat_paths / dwi_paths / func_paths, where the stage that writes it names it).
VOLUME_CHANNELS = {
    "aMRI": [("T1w", "mni_t1w"), ("GM", "mni_GM"), ("logjacobian", "logjacobian")],
    "DTI": [(p, f"mni_{p}") for p in DWI_MAPS],
    "fMRI": [(s, s) for s in ("alff", "falff", "reho")],
}
# Which BIDS input a modality's derivatives come from (config `modalities`: T1w, dwi, bold).
SOURCE_OF = {"aMRI": "T1w", "DTI": "dwi", "fMRI": "bold", "conn": "bold"}
IMAGE_MODALITIES = ("aMRI", "DTI", "fMRI", "conn")        # built per subject from derivatives
PARTICIPANT_MODALITIES = ("clinical", "serum")             # columns of participants.tsv
DIFFUSIVITY_SCALE = 1000.0                                 # mm^2/s -> um^2/ms
AFFINE_ATOL = 1e-3                                         # mm
JSON = {"sort_keys": True, "allow_nan": False}             # sidecars and cohort.json: stable, strict JSON


class TensorError(BrainfuseError):
    """An input brainfuse will not turn into a tensor; the message names the file and the problem."""


# ------------------------------------------------------------------------------------------ image QC
# The image stages write one QC JSON per unit and datatype (brainfuse.layout.qc_path: DERIV/sub-X[/ses-Y]/
# <datatype>/sub-X[_ses-Y]_desc-qc_<suffix>.json, {"qc_pass": bool, "flags": [...], "metrics": {...}, ...}).
# suffix -> (datatype, modalities it applies to): every MNI map goes through the T1w's registration.
QC_SUFFIXES = {"T1w": ("anat", IMAGE_MODALITIES), "dwi": ("dwi", ("DTI",)), "bold": ("func", ("fMRI", "conn"))}


def read_qc(path) -> dict:
    """One QC JSON as ``{"suffix", "path", "qc_pass", "flags"}``, its content checked."""
    m = re.search(r"_desc-qc_([A-Za-z0-9]+)\.json$", os.path.basename(str(path)))
    if not m or m[1] not in QC_SUFFIXES:
        raise TensorError("not a QC file name (sub-X[_ses-Y]_desc-qc_{T1w,dwi,bold}.json)", path=path,
                          fix="pass the QC JSON the anat, dwi or func stage wrote")
    stage = QC_SUFFIXES[m[1]][0]
    qc = read_json(path, "QC file", fix=f"rerun the {stage} stage")
    flags = qc.get("flags", [])
    if not isinstance(qc.get("qc_pass"), bool) or not isinstance(flags, list):
        raise TensorError("QC file needs \"qc_pass\": true/false and \"flags\": [...]", path=path,
                          fix=f"rerun the {stage} stage")
    # one line each (they become a TSV cell): tabs and newlines folded into spaces
    return {"suffix": m[1], "path": str(path), "qc_pass": qc["qc_pass"],
            "flags": [" ".join(str(f).split()) for f in flags]}


def qc_summary(records: list) -> tuple[str, str]:
    """(qc_pass, qc_flags) manifest values of a row: "n/a" when no QC ran, else all passed, and the flags
    as "T1w: flag; dwi: flag" ("n/a" when none)."""
    if not records:
        return "n/a", "n/a"
    flags = [f"{r['suffix']}: {f}" for r in records for f in r["flags"]]
    flags += [f"{r['suffix']}: failed QC" for r in records if not r["qc_pass"] and not r["flags"]]
    return str(all(r["qc_pass"] for r in records)), "; ".join(flags) or "n/a"


def unit_key(sub: str, ses: str | None = None) -> str:
    return f"sub-{sub}" + (f"_ses-{ses}" if ses else "")


def tensor_path(tensors_dir, sub: str, modality: str, ses: str | None = None, ext: str = ".npy") -> str:
    """``<tensors>/sub-X[/ses-Y]/sub-X[_ses-Y]_modality-<m>_tensor.npy`` (ext ".json" for the sidecar)."""
    return bids_path(tensors_dir, sub, None, f"modality-{modality}_tensor", ext, ses=ses)


def unit_dir(tensors_dir, sub: str, ses: str | None = None) -> str:
    """``<tensors>/sub-X[/ses-Y]``: the folder of one subject's (session's) caches, one workflow job."""
    return os.path.dirname(tensor_path(tensors_dir, sub, "x", ses=ses))


def derivative_paths(deriv, sub: str, modality: str, res: int, ses: str | None = None,
                     run_entities: dict | None = None) -> list[str]:
    """Paths of the MNI derivatives a modality is built from, in channel order: the names the stages write
    (brainfuse.layout; DEVELOPERS.md Stage contract).

    ``run_entities``: entities of the BOLD run used (task/acq/dir/run) for fMRI and conn.
    """
    if modality == "conn":
        return [_func_paths(deriv, sub, ses, res, run_entities)["relmat"]]
    if modality not in VOLUME_CHANNELS:
        raise ValueError(f"unknown image modality {modality!r}; known: {IMAGE_MODALITIES}")
    if modality == "fMRI":
        paths = _func_paths(deriv, sub, ses, res, run_entities)
    else:
        paths = (anat_paths if modality == "aMRI" else dwi_paths)(deriv, sub, ses, res)
    return [paths[key] for _, key in VOLUME_CHANNELS[modality]]


def _func_paths(deriv, sub, ses, res, run_entities) -> dict:
    run = run_key(run_entities or {})
    if not run.startswith("task-"):
        raise ValueError(f"a BOLD run needs its task entity (got {run_entities!r})")
    return func_paths(deriv, sub, ses, res, run)


def _channel_name_tail(modality: str, key: str, res: int) -> str:
    """What a channel's file name ends with from ``_space-`` on (the same for every subject and run)."""
    path = derivative_paths("", "X", modality, res, run_entities={"task": "x"})
    name = os.path.basename(path[[k for _, k in VOLUME_CHANNELS[modality]].index(key)])
    return name[name.index("_space-"):]


def _grid(mask_path):
    img, data = load_nifti(mask_path, "template brain mask", ndim=(3,), fix="rerun the templates rule (it writes it)")
    mask = data > 0
    if mask.ndim != 3 or not mask.any():
        raise TensorError(f"{mask_path}: the template brain mask must be a non-empty 3D image")
    return mask, img.affine


def _check_name(path: str, modality: str, pattern: str, res: int):
    name = os.path.basename(path)
    if f"_space-{TEMPLATE}_" not in name or f"_res-{res}_" not in name:
        raise TensorError(f"{path}: not a derivative in space-{TEMPLATE} res-{res} (file name); tensors are built "
                          f"only from images already on the working MNI grid")
    if pattern not in name:
        raise TensorError(f"{path}: expected the {modality} channel '{pattern}' here (inputs out of order?)")


def _load_on_grid(path: str, mask: np.ndarray, affine: np.ndarray, res: int) -> np.ndarray:
    """The image's data as float64, refusing any other shape or affine (no resampling here, ever)."""
    img, data = load_nifti(path, "derivative", dtype=np.float64, fix="rerun the stage that wrote it")
    shape = img.shape[:3] if img.ndim == 4 and img.shape[3] == 1 else img.shape
    if tuple(shape) != mask.shape:
        raise TensorError(f"{path}: shape {tuple(img.shape)} does not match the {TEMPLATE} {res} mm grid "
                          f"{mask.shape}; tensors never resample — rerun the stage that wrote this file")
    if not np.allclose(img.affine, affine, atol=AFFINE_ATOL):
        raise TensorError(f"{path}: affine {np.round(img.affine, 3).tolist()} does not match the {TEMPLATE} "
                          f"{res} mm grid {np.round(affine, 3).tolist()}; tensors never resample")
    return data.reshape(mask.shape)


def _normalise(modality: str, channel: str, data: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, dict]:
    """Per-subject, per-channel fixed transforms (module docstring); returns data and a sidecar note."""
    if modality == "aMRI" and channel == "T1w":
        vals = data[mask]
        sd = float(vals.std())
        if not np.isfinite(sd) or sd == 0:
            raise TensorError("T1w brain image is constant inside the brain mask; cannot z-score it")
        out = np.where(mask, (data - vals.mean()) / sd, 0.0)
        return out, {"method": "zscore_in_template_brain_mask", "mean": float(vals.mean()), "sd": sd}
    if modality == "DTI" and channel in ("md", "ad", "rd"):
        return data * DIFFUSIVITY_SCALE, {"method": "scale", "factor": DIFFUSIVITY_SCALE,
                                          "units": "um^2/ms (1e-3 mm^2/s)"}
    if modality == "fMRI" and channel == "alff":
        m = float(data[mask].mean())
        if not np.isfinite(m) or m <= 0:
            raise TensorError("ALFF map has no positive mean inside the brain mask; cannot compute mALFF")
        return data / m, {"method": "divide_by_mean_in_template_brain_mask (mALFF)", "mean": m}
    return data, {"method": "none"}


def conn_vector(relmat_path: str) -> tuple[np.ndarray, list[str]]:
    """Upper triangle (k=1, row-major) of a square Fisher-z matrix TSV; feature names 'a__b'."""
    table = read_tsv(relmat_path, "connectivity matrix", fix="rerun the func stage")
    names = [str(c) for c in table.columns]
    if table.shape != (len(names), len(names)) or len(names) < 2:
        raise TensorError(f"{relmat_path}: expected a square matrix with a header of parcel names, got shape "
                          f"{table.shape} with {len(names)} names")
    try:
        mat = table.to_numpy(dtype=np.float64)
    except ValueError as e:
        raise TensorError(f"{relmat_path}: non-numeric entries ({e})") from None
    off = ~np.eye(len(names), dtype=bool)
    if not np.allclose(np.where(off, mat, 0), np.where(off, mat.T, 0), atol=1e-5, equal_nan=True):
        raise TensorError(f"{relmat_path}: connectivity matrix is not symmetric")
    iu = np.triu_indices(len(names), k=1)
    vec = mat[iu]
    if np.isinf(vec).any():
        raise TensorError(f"{relmat_path}: infinite off-diagonal Fisher z (a correlation of exactly ±1)")
    return vec.astype(np.float32), [f"{names[i]}__{names[j]}" for i, j in zip(*iu)]


def build_subject(modality: str, sources: list[str], mask_path: str, out: str, res: int,
                  subject: str | None = None, session: str | None = None, qc: list | None = None) -> dict:
    """Write one subject's tensor for one modality and its sidecar; returns the sidecar.

    ``qc``: :func:`read_qc` records of the unit; those that apply to ``modality`` go into the sidecar, from
    where the gather carries them into the manifest."""
    sources = [str(s) for s in sources]
    info = {"modality": modality, "template": TEMPLATE, "resolution_mm": res, "code_version": code_version("tensors"),
            "participant_id": f"sub-{subject}" if subject else None, "session": session}
    if qc is not None:
        info["qc"] = [r for r in qc if modality in QC_SUFFIXES[r["suffix"]][1]]
    if modality == "conn":
        if len(sources) != 1:
            raise TensorError(f"conn takes one Fisher-z relmat TSV, got {len(sources)} inputs")
        _check_name(sources[0], modality, "_desc-fisherz_relmat", res)
        arr, names = conn_vector(sources[0])
        info.update(kind="tabular", shape=list(arr.shape), dtype="float32", feature_names=names,
                    sources=[{"channel": "fisherz", "path": sources[0], "sha256": file_sha256(sources[0])}],
                    normalisation={"method": "none", "note": "upper triangle k=1 of the Fisher-z matrix"})
    else:
        if modality not in VOLUME_CHANNELS:
            raise TensorError(f"unknown modality {modality!r}; known: {IMAGE_MODALITIES}")
        channels = VOLUME_CHANNELS[modality]
        if len(sources) != len(channels):
            raise TensorError(f"{modality} takes {len(channels)} images ({', '.join(c[0] for c in channels)}), "
                              f"got {len(sources)}")
        mask, affine = _grid(mask_path)
        arr = np.zeros((len(channels), *mask.shape), dtype=np.float16)
        norms, srcs = {}, []
        for c, ((name, key), path) in enumerate(zip(channels, sources)):
            _check_name(path, modality, _channel_name_tail(modality, key, res), res)
            data = _load_on_grid(path, mask, affine, res)
            bad = ~np.isfinite(data)
            data[bad] = 0.0          # NaN outside a fit mask would poison every batch; counted in the sidecar
            try:
                data, norms[name] = _normalise(modality, name, data, mask)
            except TensorError as e:
                raise TensorError(f"{path}: {e}") from None
            norms[name]["n_nonfinite_set_to_0"] = int(bad.sum())
            if np.abs(data).max() > np.finfo(np.float16).max:
                raise TensorError(f"{path}: values up to {np.abs(data).max():.3g} overflow float16 after "
                                  f"normalisation ({norms[name]['method']})")
            arr[c] = data
            srcs.append({"channel": name, "path": path, "sha256": file_sha256(path)})
        info.update(kind="volume", shape=list(arr.shape), dtype="float16", channels=[c[0] for c in channels],
                    spacing=[float(s) for s in np.sqrt((affine[:3, :3] ** 2).sum(0))], affine=affine.tolist(),
                    mask={"path": str(mask_path), "sha256": file_sha256(mask_path)},
                    sources=srcs, normalisation=norms)
    bf_io.save_npy(arr, out)
    info["array_sha256"] = file_sha256(out)      # checked by the gather: an edited cache is refused
    bf_io.save_json(info, re.sub(r"\.npy$", ".json", str(out)), **JSON)
    return info


# ------------------------------------------------------------------------------------------- settings
DEFAULTS = section_defaults("tensors")   # the schema's tensors section
IMAGE_FEATURES = ("regions", "volumes")


def settings(cfg: dict | None) -> dict:
    out = json.loads(json.dumps(DEFAULTS))
    out.update(cfg or {})
    return out


def _read_tsv(path, what: str, id_column: str = "participant_id", fix: str | None = None) -> pd.DataFrame:
    """A participant table as strings (validated column by column later): readable, tab-separated, with the
    id column and at least one row."""
    if not os.path.isfile(path):
        raise TensorError(f"{what} not found" if not os.path.isdir(path) else f"{what} expected, found a folder",
                          path=path, fix=fix or "check the path")
    return read_tsv(path, what, required=(id_column,), dtype=str, keep_default_na=False)


def _missing(values: pd.Series) -> pd.Series:
    return values.str.strip().isin(["", "n/a", "NA", "NaN", "nan"])


def _levels_from_json(tsv_path) -> dict:
    side = re.sub(r"\.tsv$", ".json", str(tsv_path))
    if not os.path.exists(side):
        return {}
    meta = read_json(side, "participants table sidecar", fix="fix the JSON (BIDS participants.json) and rerun")
    return {k: list(v["Levels"]) for k, v in meta.items() if isinstance(v, dict) and isinstance(v.get("Levels"), dict)}


def encode_columns(table: pd.DataFrame, columns: list[str], levels: dict, source: str) -> tuple[np.ndarray, list[str]]:
    """Numeric columns as float (n/a -> NaN); categorical ones (declared levels) as indicators.

    A two-level column becomes one 0/1 column ``col[level2]``; more levels become one indicator per level.
    A value that is neither a number (numeric column) nor a declared level is refused, naming the row.
    No imputation: missing stays NaN.
    """
    blocks, names = [], []
    for col in columns:
        if col not in table.columns:
            raise TensorError(f"{source}: column {col!r} (declared in config tensors) is missing; "
                              f"columns are {list(table.columns)}")
        raw = table[col].astype(str)
        miss = _missing(raw)
        if col in levels:
            lv = [str(x) for x in levels[col]]
            bad = ~miss & ~raw.isin(lv)
            if bad.any():
                i = int(np.flatnonzero(bad.to_numpy())[0])
                raise TensorError(f"{source}: column {col!r} row {i + 1} ({table.iloc[i, 0]}) has value "
                                  f"{raw.iloc[i]!r}, not one of the declared levels {lv}")
            use = lv[1:] if len(lv) == 2 else lv
            for level in use:
                v = (raw == level).astype(np.float64).to_numpy()
                v[miss.to_numpy()] = np.nan
                blocks.append(v)
                names.append(f"{col}[{level}]")
        else:
            num = pd.to_numeric(raw.where(~miss, None), errors="coerce")
            bad = num.isna() & ~miss
            if bad.any():
                i = int(np.flatnonzero(bad.to_numpy())[0])
                raise TensorError(f"{source}: column {col!r} row {i + 1} ({table.iloc[i, 0]}) has non-numeric "
                                  f"value {raw.iloc[i]!r}; declare its levels in config tensors.levels "
                                  f"(or BIDS 'Levels' in the .json sidecar) if it is categorical")
            blocks.append(num.to_numpy(dtype=np.float64))
            names.append(col)
    arr = np.stack(blocks, axis=1) if blocks else np.zeros((len(table), 0))
    return arr.astype(np.float32), names


def _label(value, what: str, source: str, row: int) -> str:
    """A BIDS label from a table cell, refused with the file, row and value."""
    try:
        return check_label(value, what)
    except LabelError:
        raise TensorError(f"row {row + 1} has {what} {value!r}, not a BIDS label (letters and digits only after "
                          f"the sub-/ses- prefix)", path=source,
                          fix="write it as the dataset's folder name (e.g. sub-01) and rerun") from None


def _index_rows(table: pd.DataFrame, source: str, id_column: str = "participant_id") -> dict:
    if id_column not in table.columns:
        raise TensorError(f"no {id_column!r} column; it has {', '.join(map(str, table.columns[:8]))}", path=source,
                          fix="add the column (tab-separated) and rerun")
    ids = ["sub-" + _label(v, id_column, source, i) for i, v in enumerate(table[id_column])]
    has_ses = "session" in table.columns or "session_id" in table.columns
    ses_col = "session" if "session" in table.columns else "session_id"
    keys = []
    for i, pid in enumerate(ids):
        ses = table[ses_col].iloc[i] if has_ses else ""
        ses = "" if ses in ("", "n/a") else _label(ses, ses_col, source, i)
        keys.append((pid, ses))
    dup = pd.Series(keys).duplicated()
    if dup.any():
        raise TensorError(f"{source}: duplicate row for {keys[int(np.flatnonzero(dup)[0])]}")
    return {k: i for i, k in enumerate(keys)}


def _lookup(index: dict, pid: str, ses: str) -> int | None:
    """Row of (participant, session), else of the participant's session-less row."""
    return index.get((pid, ses), index.get((pid, "")))


# ----------------------------------------------------------------------------------------------- gather
def parse_tensor_name(path: str) -> tuple[str, str, str]:
    m = re.match(r"^sub-([A-Za-z0-9]+)(?:_ses-([A-Za-z0-9]+))?_modality-([A-Za-z0-9]+)_tensor\.npy$",
                 os.path.basename(str(path)))
    if not m:
        raise TensorError(f"{path}: not a brainfuse tensor file name (sub-X[_ses-Y]_modality-M_tensor.npy)")
    return m[1], m[2] or "", m[3]


def expand_tensor_inputs(items) -> list[str]:
    """Tensor files, with each folder (a unit's caches, as the workflow's tensors_subject writes) replaced by
    the ``*_tensor.npy`` files directly inside it."""
    out = []
    for p in items or []:
        if os.path.isdir(p):
            out += sorted(str(f) for f in Path(p).glob("*_modality-*_tensor.npy"))
        else:
            out.append(str(p))
    return out


def gather(out_dir, participants_tsv, cfg: dict | None = None, tensors: list | None = None,
           units: list | None = None, atlas: tuple | None = None) -> dict:
    """Stack the per-subject caches and participant tables into ``out_dir`` (see module docstring).

    ``tensors``: per-subject tensor files or unit folders of them (their availability defines the has_<m> flags).
    ``units``: rows of the cohort ("sub-X" or "sub-X_ses-Y"); default: the participants.tsv rows, which is
    how a dataset without images (tabular modalities only) is gathered.
    ``atlas``: (labels NIfTI, TSV) on the working grid; with ``image_features: regions`` each volume modality is
    gathered as a table of parcel means per channel (see :func:`region_means`) instead of a stack of volumes.
    """
    cfg = _gather_settings(cfg)
    out_dir = Path(out_dir)
    part = _read_participants(participants_tsv, cfg)
    found = _found_tensors(tensors)
    rows = _cohort_rows(units, part)
    modalities = _gather_modalities(cfg)
    manifest = pd.DataFrame({"participant_id": [r[0] for r in rows], "session": [r[1] or "n/a" for r in rows]})
    part.locate(rows)
    classes, classes_source = _label_and_target(manifest, cfg, part, rows)
    _group_and_site(manifest, cfg, part)
    clinical = _clinical_table(manifest, cfg, part)
    st = _Stacks(out_dir, len(rows))
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        for m in modalities:
            if m in PARTICIPANT_MODALITIES or m in cfg["tables"]:
                _stack_tabular(st, manifest, m, *_tabular_source(m, cfg, part, rows))
            else:
                _stack_image(st, manifest, m, [found.get((pid, ses, m)) for pid, ses in rows],
                             cfg["image_features"] == "regions", atlas)
        cov_names = _stack_covariates(st, clinical, cfg, part)
        if not st.specs:
            raise TensorError("no modality to gather: no subject has any of " + ", ".join(modalities))
        _add_qc(manifest, st.qc)
        info = _cohort_info(cfg, classes, classes_source, cov_names, st, part)
        _write_cohort(out_dir, st.written, clinical, manifest, info)
    finally:
        for tmp in st.tmp_paths:
            if tmp.exists():
                tmp.unlink()
    return info


def _gather_settings(cfg: dict | None) -> dict:
    """The tensors settings (defaults filled in), their image_features and task checked."""
    cfg = settings(cfg)
    if cfg["image_features"] not in IMAGE_FEATURES:
        raise TensorError(f"config tensors.image_features must be one of {IMAGE_FEATURES}, not {cfg['image_features']!r}")
    if cfg["task"] not in ("classification", "regression"):
        raise TensorError(f"config tensors.task must be classification or regression, not {cfg['task']!r}")
    return cfg


@dataclass
class _Participants:
    """The participants table and, once :meth:`locate` ran, the table row of each cohort row."""
    path: object                     # participants.tsv as given (error messages, cohort.json)
    table: pd.DataFrame              # as strings
    index: dict                      # (participant_id, session) -> table row
    levels: dict                     # categorical levels: the table's JSON sidecar, then config tensors.levels
    rows: list = field(default_factory=list)   # per cohort row: its table row, None if not in the table

    def locate(self, cohort_rows: list) -> None:
        self.rows = [_lookup(self.index, pid, ses) for pid, ses in cohort_rows]
        not_in_table = [unit_key(pid[4:], ses or None) for (pid, ses), r in zip(cohort_rows, self.rows) if r is None]
        if not_in_table:   # kept (they still get predictions), but say so: usually an ID typo
            print(f"[tensors] warning: {len(not_in_table)} rows are not in {self.path} (no label, no "
                  f"clinical/serum): {', '.join(not_in_table[:5])}{' …' if len(not_in_table) > 5 else ''}")

    def column(self, col) -> list:
        """Column ``col`` per cohort row ("n/a" for a row not in the table)."""
        if col not in self.table.columns:
            raise TensorError(f"{self.path}: column {col!r} (declared in config tensors) is missing; "
                              f"columns are {list(self.table.columns)}")
        return [self.table[col].iloc[r] if r is not None else "n/a" for r in self.rows]


def _read_participants(participants_tsv, cfg: dict) -> _Participants:
    """participants.tsv, refused without the label column or with a repeated (participant, session) row."""
    part = _read_tsv(participants_tsv, "participants table",
                     fix="set participants_tsv in the config, or add participants.tsv to the BIDS dataset")
    if cfg["label"] not in part.columns:
        raise TensorError(f"participants table has no label column {cfg['label']!r} (config tensors.label); it has "
                          f"{', '.join(map(str, part.columns[:8]))}", path=participants_tsv,
                          fix="set tensors.label to the column holding the target, or add the column (n/a where "
                              "unknown, e.g. new subjects to predict)")
    index = _index_rows(part, str(participants_tsv))
    return _Participants(participants_tsv, part, index, {**_levels_from_json(participants_tsv), **cfg["levels"]})


def _found_tensors(tensors) -> dict:
    """(participant_id, session, modality) -> cache file, from the given files and unit folders."""
    found = {}
    for p in expand_tensor_inputs(tensors):
        sub, ses, mod = parse_tensor_name(p)
        found[(f"sub-{sub}", ses, mod)] = str(p)
    return found


def _cohort_rows(units, part: _Participants) -> list:
    """Sorted (participant_id, session) rows of the cohort: the given units, else the participants.tsv rows."""
    if units:
        rows = []
        for u in units:
            m = re.match(r"^sub-([A-Za-z0-9]+)(?:_ses-([A-Za-z0-9]+))?$", u)
            if not m:
                raise TensorError(f"unit {u!r} is not sub-X or sub-X_ses-Y")
            rows.append((f"sub-{m[1]}", m[2] or ""))
    else:
        rows = list(part.index)
    rows = sorted(set(rows))
    if not rows:
        raise TensorError(f"{part.path}: no participants to gather")
    return rows


def _gather_modalities(cfg: dict) -> list:
    """Modalities to gather: config tensors.modalities, then any declared feature table not listed there."""
    tables = cfg["tables"]
    for name in tables:
        if name in IMAGE_MODALITIES + PARTICIPANT_MODALITIES + ("covariates",) or not re.fullmatch(r"[A-Za-z0-9]+", name):
            raise TensorError(f"config tensors.tables: {name!r} must be letters/digits and not a built-in name "
                              f"({', '.join(IMAGE_MODALITIES + PARTICIPANT_MODALITIES)}, covariates)")
    modalities = list(cfg["modalities"]) + [t for t in tables if t not in cfg["modalities"]]
    for m in modalities:
        if m not in IMAGE_MODALITIES + PARTICIPANT_MODALITIES and m not in tables:
            raise TensorError(f"config tensors.modalities: {m!r} is neither a built-in modality "
                              f"{IMAGE_MODALITIES + PARTICIPANT_MODALITIES} nor declared in tensors.tables")
    return modalities


def _label_and_target(manifest: pd.DataFrame, cfg: dict, part: _Participants, rows: list) -> tuple:
    """The manifest's ``label`` (as written, n/a where missing) and ``target`` columns: class index (-1: no label)
    or number (NaN: no label). Returns (classes, where they came from), both None for a regression."""
    label = pd.Series(part.column(cfg["label"]), dtype=str)
    missing_label = _missing(label).to_numpy()
    classes = None
    classes_source = None
    if cfg["task"] == "classification":
        classes, classes_source, target = _class_target(label, missing_label, cfg, part)
    else:
        num = pd.to_numeric(label.where(~pd.Series(missing_label), None), errors="coerce")
        if (num.isna() & ~missing_label).any():
            i = int(np.flatnonzero((num.isna() & ~missing_label).to_numpy())[0])
            raise TensorError(f"{part.path}: regression target {cfg['label']!r} of {rows[i][0]} is "
                              f"{label.iloc[i]!r}, not a number")
        target = num.to_numpy(dtype=np.float64)
    manifest["label"] = label.where(~pd.Series(missing_label), "n/a").to_numpy()
    manifest["target"] = target
    return classes, classes_source


def _class_target(label: pd.Series, missing_label: np.ndarray, cfg: dict, part: _Participants) -> tuple:
    """(classes, where they came from, class index per row): classes from config tensors.classes, else the
    label column's declared Levels, else its sorted values; a label outside them is refused."""
    levels = part.levels
    classes_source = ("config tensors.classes" if cfg["classes"] else
                      f"the Levels of {cfg['label']!r} in {re.sub(r'[.]tsv$', '.json', str(part.path))}"
                      if levels.get(cfg["label"]) else f"the values of column {cfg['label']!r}")
    classes = [str(c) for c in (cfg["classes"] or levels.get(cfg["label"]) or sorted(set(label[~missing_label])))]
    unknown = sorted(set(label[~missing_label]) - set(classes))
    if unknown:
        raise TensorError(f"{part.path}: labels {unknown} in column {cfg['label']!r} are not among the "
                          f"classes {classes} (config tensors.classes)")
    target = np.array([classes.index(v) if not m else -1 for v, m in zip(label, missing_label)], dtype=np.int64)
    _warn_degenerate_classes(target, classes, cfg["label"], classes_source, part.path)
    return classes, classes_source, target


def _group_and_site(manifest: pd.DataFrame, cfg: dict, part: _Participants) -> None:
    """The manifest's ``group`` column and, where the table has it, ``site`` (else cfg["site"] becomes None)."""
    group_col = cfg["group"]
    manifest["group"] = (manifest["participant_id"] if group_col == "participant_id"
                         else pd.Series(part.column(group_col)))
    if cfg["site"] and cfg["site"] not in part.table.columns:
        # optional: many tables have no site column (the default names the demo's)
        print(f"[tensors] note: {part.path} has no site column {cfg['site']!r}; manifest without site")
        cfg["site"] = None
    if cfg["site"]:
        manifest["site"] = part.column(cfg["site"])


def _clinical_table(manifest: pd.DataFrame, cfg: dict, part: _Participants) -> pd.DataFrame:
    """clinical.tsv: the role columns (label, site, clinical, serum, covariates), as validated raw values."""
    role_cols = [c for c in dict.fromkeys([cfg["label"]] + ([cfg["site"]] if cfg["site"] else [])
                                          + list(cfg["clinical"]) + list(cfg["serum"]) + list(cfg["covariates"]))]
    clinical = manifest[["participant_id", "session"]].copy()
    for c in role_cols:
        clinical[c] = part.column(c)
    return clinical


@dataclass
class _Stacks:
    """What the gather has stacked so far: temporary ``.<name>.tmp.npy`` files in ``out_dir`` (renamed at the
    end, removed whatever happens) and what cohort.json will say of each modality."""
    out_dir: Path
    n: int                                               # rows of the cohort
    tmp_paths: list = field(default_factory=list)        # every temporary file started
    written: dict = field(default_factory=dict)          # name -> its finished temporary file
    specs: list = field(default_factory=list)
    feature_names: dict = field(default_factory=dict)    # tabular (and region) modality -> column names
    channels: dict = field(default_factory=dict)         # volume modality -> channel names
    region_info: dict = field(default_factory=dict)      # region modality -> channels and atlas files
    grid: dict | None = None                             # the volumes' grid
    parcels: tuple | None = None                         # the region atlas (read_atlas), read once
    qc: list = field(default_factory=list)               # per row: QC records of its image caches, deduplicated

    def __post_init__(self):
        self.qc = [[] for _ in range(self.n)]

    def new_tmp(self, name: str) -> Path:
        tmp = self.out_dir / f".{name}.tmp.npy"
        self.tmp_paths.append(tmp)
        return tmp


def _tabular_source(m: str, cfg: dict, part: _Participants, rows: list) -> tuple:
    """(encoded values, column names, table row of each cohort row, source file) of a tabular modality: columns
    of participants.tsv (clinical, serum) or a feature table declared in config tensors.tables."""
    if m in PARTICIPANT_MODALITIES:
        cols = list(cfg[m])
        arr, names = encode_columns(part.table, cols, part.levels, str(part.path))
        return arr, names, part.rows, str(part.path)
    t = cfg["tables"][m]
    id_col = t.get("id_column", "participant_id")
    tab = _read_tsv(t["path"], f"table of tabular modality {m!r}", id_col,
                    fix=f"check config tensors.tables.{m}.path")
    tindex = _index_rows(tab, t["path"], id_col)
    cols = t.get("columns") or [c for c in tab.columns if c not in (id_col, "session", "session_id")]
    arr, names = encode_columns(tab, cols, {**part.levels, **t.get("levels", {})}, t["path"])
    return arr, names, [_lookup(tindex, pid, ses) for pid, ses in rows], t["path"]


def _stack_tabular(st: _Stacks, manifest: pd.DataFrame, m: str, arr, names: list, idx: list, src: str) -> None:
    """One tabular modality as an (N, F) float32 stack, NaN rows where absent."""
    if not names:
        raise TensorError(f"tabular modality {m!r} has no columns")
    stacked = np.full((st.n, len(names)), np.nan, dtype=np.float32)
    for i, r in enumerate(idx):
        if r is not None:
            stacked[i] = arr[r]
    present = ~np.isnan(stacked).all(axis=1)
    manifest[f"has_{m}"] = present
    manifest[f"path_{m}"] = np.where(present, src, "n/a")
    tmp = st.new_tmp(m)
    np.save(tmp, stacked)
    st.written[m] = tmp
    st.specs.append({"name": m, "kind": "tabular", "shape": [len(names)]})
    st.feature_names[m] = names


def _stack_image(st: _Stacks, manifest: pd.DataFrame, m: str, paths: list, regions: bool, atlas) -> None:
    """One image modality's per-subject caches (``paths``: per row, None if absent) stacked into a memory map:
    volumes (zeros where absent), tabular caches (NaN), or with ``regions`` each volume's parcel means."""
    have = [p for p in paths if p]
    manifest[f"has_{m}"] = [p is not None for p in paths]
    manifest[f"path_{m}"] = [p or "n/a" for p in paths]
    if not have:
        # No subject has it: keep the modality out (a model cannot learn from an all-absent input).
        manifest.drop(columns=[f"has_{m}", f"path_{m}"], inplace=True)
        return
    # shapes from the first sidecar, every other one must agree
    ref = _read_sidecar(have[0])
    shape, dtype = tuple(ref["shape"]), np.dtype(ref["dtype"])
    as_regions = regions and ref["kind"] == "volume"
    if as_regions:
        names = _region_names(st, m, ref, shape, atlas)
        out_shape, out_dtype = (len(names),), np.dtype(np.float32)
    else:
        names, out_shape, out_dtype = None, shape, dtype
    tmp = st.new_tmp(m)
    fill = 0 if ref["kind"] == "volume" and not as_regions else np.nan
    stacked = np.lib.format.open_memmap(tmp, mode="w+", dtype=out_dtype, shape=(st.n, *out_shape))
    for i, p in enumerate(paths):
        if p is None:
            stacked[i] = fill
            continue
        side, a = _checked_cache(p, ref, have[0])
        stacked[i] = region_means(a, *st.parcels[:2]) if as_regions else a
        st.qc[i] += [r for r in side.get("qc", []) if r not in st.qc[i]]
    stacked.flush()
    del stacked
    st.written[m] = tmp
    _describe_image(st, m, ref, as_regions, names, out_shape, atlas)


def _region_names(st: _Stacks, m: str, ref: dict, shape: tuple, atlas) -> list:
    """Columns ``<channel>_<parcel>`` of a volume modality gathered as parcel means; the atlas is read on first
    use (every image cache is on the one template mask's grid)."""
    if atlas is None:
        raise TensorError(f"config tensors.image_features is 'regions' but the gather got no atlas "
                          f"(--atlas NIFTI TSV) for {m}")
    if st.parcels is None:
        st.parcels = read_atlas(*atlas, shape[1:], ref["affine"])
    return [f"{c}_{name}" for c in ref["channels"] for name in st.parcels[2]]


def _checked_cache(path, ref: dict, ref_path) -> tuple[dict, np.ndarray]:
    """(sidecar, array) of one cache, refused unless its grid and layout are those of the first one (``ref``)."""
    side = _read_sidecar(path)
    a = _load_cache(path, side)
    for key in ("shape", "dtype", "template", "resolution_mm", "affine", "channels", "feature_names"):
        if side.get(key) != ref.get(key):
            raise TensorError(f"{path}: {key} {_short(side.get(key))} differs from {ref_path} "
                              f"({_short(ref.get(key))}); rebuild the caches on one grid")
    shape, dtype = tuple(ref["shape"]), np.dtype(ref["dtype"])
    if a.shape != shape or a.dtype != dtype:
        raise TensorError(f"{path}: array {a.shape} {a.dtype} does not match its sidecar {shape} {dtype}")
    return side, a


def _describe_image(st: _Stacks, m: str, ref: dict, as_regions: bool, names, out_shape: tuple, atlas) -> None:
    """What cohort.json records of a stacked image modality: its spec, and its columns, channels or grid."""
    st.specs.append({"name": m, "kind": "tabular" if as_regions else ref["kind"], "shape": list(out_shape)})
    if ref["kind"] == "tabular":
        st.feature_names[m] = ref["feature_names"]
    elif as_regions:
        st.feature_names[m] = names
        st.region_info[m] = {"channels": ref["channels"], "atlas": [{"path": str(f), "sha256": file_sha256(f)}
                                                                     for f in atlas]}
    else:
        st.channels[m] = ref["channels"]
        st.grid = {"affine": ref["affine"], "spacing": ref["spacing"], "template": ref["template"],
                   "resolution_mm": ref["resolution_mm"]}


def _stack_covariates(st: _Stacks, clinical: pd.DataFrame, cfg: dict, part: _Participants) -> list:
    """covariates.npy (config tensors.covariates, encoded like a tabular modality); returns its column names."""
    cov, cov_names = encode_columns(pd.DataFrame({c: clinical[c] for c in ["participant_id"] + list(cfg["covariates"])}),
                                    list(cfg["covariates"]), part.levels, str(part.path))
    tmp = st.new_tmp("covariates")
    np.save(tmp, cov.astype(np.float32))
    st.written["covariates"] = tmp
    return cov_names


def _add_qc(manifest: pd.DataFrame, qc: list) -> None:
    """The manifest's qc_pass / qc_flags columns from each row's image QC records, with a WARNING for flagged rows."""
    summary = [qc_summary(r) for r in qc]
    manifest["qc_pass"], manifest["qc_flags"] = [q[0] for q in summary], [q[1] for q in summary]
    _warn_qc(manifest)


def _cohort_info(cfg: dict, classes, classes_source, cov_names: list, st: _Stacks, part: _Participants) -> dict:
    """cohort.json's content (less the manifest's hash, known once it is written)."""
    info = {"task": cfg["task"], "classes": classes, "label": cfg["label"], "group": cfg["group"],
            "site": cfg["site"], "modalities": st.specs, "feature_names": st.feature_names, "channels": st.channels,
            "covariates": cov_names, "n": st.n, "settings": cfg, "code_version": code_version("tensors"),
            "participants_tsv": {"path": str(part.path), "sha256": file_sha256(part.path)},
            # dtype, shape and content hash of every stacked array, checked by load_cohort
            "arrays": {m: array_record(tmp) for m, tmp in st.written.items()}}
    if classes_source:
        info["classes_source"] = classes_source
    if st.channels:
        info["grid"] = st.grid
    if st.region_info:
        info["regions"] = st.region_info
    return info


def _write_cohort(out_dir: Path, written: dict, clinical: pd.DataFrame, manifest: pd.DataFrame, info: dict) -> None:
    """Rename all at the end, cohort.json last: a failed gather never leaves a cohort.json over a mix."""
    for old in ("cohort.json", "manifest.tsv"):
        (out_dir / old).unlink(missing_ok=True)
    for m, tmp in written.items():
        os.replace(tmp, out_dir / f"{m}.npy")
    bf_io.save_tsv(clinical, out_dir / "clinical.tsv", na_rep="n/a")
    bf_io.save_tsv(manifest, out_dir / "manifest.tsv", na_rep="n/a")
    info["tables"] = {"manifest.tsv": {"sha256": file_sha256(out_dir / "manifest.tsv")}}     # load_cohort reads it
    bf_io.save_json(info, out_dir / "cohort.json", **JSON)


def read_atlas(nii, tsv, shape, affine) -> tuple[np.ndarray, np.ndarray, list]:
    """(flat labels of the grid, the table's label values, their names): a labels NIfTI on the working grid and a
    TSV with ``index`` and ``name`` (atlas-brainfuseRegions, or a user's atlas resampled to the template grid)."""
    img, data = load_nifti(nii, "region atlas", ndim=(3,), fix="rebuild it on the working grid (rule atlas_regions)")
    if tuple(data.shape) != tuple(shape) or not np.allclose(img.affine, np.asarray(affine), atol=AFFINE_ATOL):
        raise TensorError(f"shape {data.shape} / affine differ from the tensors' {TEMPLATE} grid {tuple(shape)}; an "
                          f"atlas must be resampled (nearest neighbour) to the working grid first", path=nii)
    table = read_tsv(tsv, "region atlas table", required=("index", "name"), fix="give columns index and name")
    index = table["index"].to_numpy(dtype=np.int64)
    if index.min() < 1 or len(set(index)) != len(index):
        raise TensorError("atlas indices must be unique positive integers (0 is background)", path=tsv)
    labels = np.rint(np.asarray(data)).astype(np.int64).ravel()
    return np.where(labels > 0, labels, 0), index, [str(v) for v in table["name"]]


def region_means(volume: np.ndarray, labels: np.ndarray, index: np.ndarray) -> np.ndarray:
    """(C * P,) float32 parcel means of each channel of a (C, X, Y, Z) volume, channel-major; NaN for a parcel
    with no voxel on this grid (imputed inside each training fold like any missing value).

    Why regions: the demo's planted effects (putamen Jacobian, CST FA) sit in a few parcels among ~50,000 voxels;
    a classifier of ~30 subjects finds a few informative columns among hundreds, not among thousands of voxels
    (README, "Image features")."""
    size = max(int(labels.max()), int(index.max())) + 1
    counts = np.bincount(labels, minlength=size)[index].astype(np.float64)
    out = np.empty((volume.shape[0], len(index)), np.float64)
    for c in range(volume.shape[0]):
        sums = np.bincount(labels, weights=np.asarray(volume[c], np.float64).ravel(), minlength=size)[index]
        with np.errstate(invalid="ignore", divide="ignore"):
            out[c] = np.where(counts > 0, sums / counts, np.nan)
    return out.ravel().astype(np.float32)


def _warn_degenerate_classes(target: np.ndarray, classes: list, label: str, source: str, participants_tsv):
    """Loud warning for a label no classifier can be trained on (the splits refuse it; a cohort gathered only
    to be predicted may be unlabelled or hold one class)."""
    labelled = target[target >= 0]
    if not len(labelled):
        print(f"[tensors] note: no row has a label in column {label!r} of {participants_tsv}: this cohort can be "
              f"predicted, not trained on")
        return
    counts = np.bincount(labelled, minlength=len(classes))
    text = ", ".join(f"{c} {k}" for c, k in zip(classes, counts))
    if (counts > 0).sum() < 2:
        print(f"[tensors] WARNING: column {label!r} of {participants_tsv} holds a single class ({text} rows): "
              f"no classifier can be trained on it (brainfuse train splits refuses it)", file=sys.stderr)
    elif (counts == 0).any():
        empty = [c for c, k in zip(classes, counts) if k == 0]
        print(f"[tensors] WARNING: class(es) {', '.join(empty)} from {source} have no row in column {label!r} of "
              f"{participants_tsv} ({text} rows); drop them there to train (brainfuse train splits refuses them)",
              file=sys.stderr)


def _warn_qc(manifest: pd.DataFrame) -> None:
    """A loud warning listing every row whose image QC failed or raised flags (they stay in the cohort)."""
    flagged = manifest[(manifest["qc_pass"] == "False") | (manifest["qc_flags"] != "n/a")]
    if not len(flagged):
        return
    failed = int((flagged["qc_pass"] == "False").sum())
    print(f"[tensors] WARNING: image QC flagged {len(flagged)} of {len(manifest)} rows ({failed} failed); they stay "
          f"in the cohort (manifest.tsv columns qc_pass, qc_flags) - look at their QC figures:", file=sys.stderr)
    for pid, ses, ok, flags in zip(flagged["participant_id"], flagged["session"], flagged["qc_pass"],
                                   flagged["qc_flags"]):
        print(f"[tensors] WARNING:   {pid}{'' if ses == 'n/a' else '_ses-' + ses}: "
              f"{'FAILED' if ok == 'False' else 'passed'} - {flags}", file=sys.stderr)


def _short(v):
    s = repr(v)
    return s if len(s) < 80 else s[:77] + "..."


def _read_sidecar(npy_path) -> dict:
    side = re.sub(r"\.npy$", ".json", str(npy_path))
    if not os.path.exists(side):
        raise TensorError(f"sidecar of {os.path.basename(str(npy_path))} is missing", path=side,
                          fix=f"delete {os.path.dirname(str(npy_path))} and rerun the tensors stage")
    return read_json(side, "tensor sidecar", fix=f"delete {os.path.dirname(str(npy_path))} and rerun the tensors stage")


def _load_cache(path, side: dict):
    """A per-subject cache (memory-mapped), checked against the dtype, shape and hash its sidecar recorded."""
    record = ({"dtype": side["dtype"], "shape": side["shape"], "sha256": side["array_sha256"]}
              if "array_sha256" in side else None)       # caches of older versions: shape and dtype checked below
    try:
        return check_array(path, record, stage="tensors")
    except CacheError as e:
        raise CacheError(e.problem, path=path, fix=f"delete {os.path.dirname(str(path))} and rerun the tensors "
                                                    f"stage (snakemake tensors)") from None


# -------------------------------------------------------------------------------------------- loading
@dataclass
class Cohort:
    """Everything train/evaluate need, row i = one participant(-session)."""
    manifest: pd.DataFrame
    modalities: list                 # list[brainfuse.moe.ModalitySpec]
    arrays: dict                     # name -> (N, *shape); volumes float16, tabular float32 (NaN allowed)
    present: np.ndarray              # (N, M) bool, column order = modalities
    target: np.ndarray               # (N,) int class ids (-1: no label) or float (NaN: no label)
    classes: list | None
    task: str
    groups: np.ndarray               # (N,) ids for grouped splits (participant, or site)
    feature_names: dict              # tabular modality -> column names
    covariates: np.ndarray | None = None       # (N, K) float32, NaN allowed (config tensors.covariates)
    covariate_names: list = field(default_factory=list)
    channels: dict = field(default_factory=dict)   # volume modality -> channel names
    info: dict = field(default_factory=dict)       # cohort.json

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.modalities]

    @property
    def labelled(self) -> np.ndarray:
        """Rows with a target (unlabelled participants are kept: they still get predictions)."""
        return self.target >= 0 if self.task == "classification" else np.isfinite(self.target)

    def __len__(self) -> int:
        return len(self.target)


def _specs(items):
    # Imported by name so that provenance.code_version("tensors") does not follow it: the cache and gather
    # jobs never use the model code, and editing moe.py must not rerun them.
    ModalitySpec = importlib.import_module("brainfuse.moe").ModalitySpec

    return [m if isinstance(m, ModalitySpec) else ModalitySpec(name=m["name"], kind=m["kind"], shape=tuple(m["shape"]))
            for m in items]


def load_cohort(tensors_dir, mmap: bool = True) -> Cohort:
    """The gathered cohort in ``tensors_dir``; stacked arrays are memory-mapped (read on access)."""
    d = Path(tensors_dir)
    if not (d / "cohort.json").exists():
        raise TensorError(f"{d}: no cohort.json (run the tensors stage: snakemake tensors)")
    rerun = "rerun the gather: snakemake tensors --forcerun tensors_gather"
    info = read_json(d / "cohort.json", "cohort description", fix=rerun)
    for name, rec in info.get("tables", {}).items():       # older cohorts have no records: not checked
        if not (d / name).exists() or file_sha256(d / name) != rec["sha256"]:
            raise CacheError(f"{name} is missing or changed since the tensors stage wrote it (content hash differs)",
                             path=d / name, fix=rerun)
    manifest = read_tsv(d / "manifest.tsv", "cohort manifest", required=("participant_id", "target"), fix=rerun,
                        dtype={"participant_id": str, "session": str, "label": str, "group": str, "site": str,
                               "qc_pass": str, "qc_flags": str}, keep_default_na=False)
    for col in manifest.columns:
        if col.startswith("has_"):
            manifest[col] = manifest[col].astype(str).str.lower().eq("true")
    manifest["target"] = pd.to_numeric(manifest["target"].replace("n/a", np.nan))
    specs = _specs(info["modalities"])
    records = info.get("arrays")
    arrays = {}

    def array(name):
        # dtype, shape and content hash against what the gather recorded (~0.2 s per 100 MB)
        if records is not None and name not in records:
            raise CacheError(f"cohort.json has no record of {name}.npy", path=d / f"{name}.npy", fix=rerun)
        try:
            a = check_array(d / f"{name}.npy", None if records is None else records[name], stage="tensors")
        except CacheError as e:
            raise CacheError(e.problem, path=e.path, fix=rerun) from None
        return a if mmap else np.array(a)

    for s in specs:
        a = array(s.name)
        if a.shape != (len(manifest), *s.shape):
            raise TensorError(f"{d / (s.name + '.npy')}: shape {a.shape} does not match cohort.json "
                              f"({len(manifest)}, {s.shape}); rerun the gather")
        arrays[s.name] = a
    present = np.stack([manifest[f"has_{s.name}"].to_numpy(dtype=bool) for s in specs], 1)
    if info["task"] == "classification":
        target = manifest["target"].to_numpy(dtype=np.int64)
    else:
        target = manifest["target"].to_numpy(dtype=np.float64)
    cov = np.array(array("covariates")) if (d / "covariates.npy").exists() or "covariates" in (records or {}) else None
    return Cohort(manifest=manifest, modalities=specs, arrays=arrays, present=present, target=target,
                  classes=info["classes"], task=info["task"], groups=manifest["group"].astype(str).to_numpy(),
                  feature_names=info["feature_names"], covariates=cov, covariate_names=info.get("covariates", []),
                  channels=info.get("channels", {}), info=info)


def make_cohort(arrays: dict, target, *, task: str = "classification", classes=None, present=None, groups=None,
                participant_ids=None, feature_names=None, kinds=None, covariates=None, covariate_names=None) -> Cohort:
    """A Cohort from in-memory arrays: ``arrays`` name -> (N, C, X, Y, Z) volume or (N, F) tabular.

    ``present`` (N, M) bool in ``arrays`` order, or a dict name -> (N,) bool; default: volumes present
    where not all zero, tabular where not all NaN. ``groups`` default: one group per row.
    """
    names = list(arrays)
    n = len(target)
    kinds = kinds or {}
    specs = []
    for name in names:
        a = arrays[name]
        if a.shape[0] != n:
            raise ValueError(f"arrays[{name!r}] has {a.shape[0]} rows, target has {n}")
        kind = kinds.get(name, "volume" if a.ndim == 5 else "tabular")
        if kind == "volume" and not np.isfinite(a).all():
            raise ValueError(f"arrays[{name!r}]: volumes must be finite (absent rows: zeros + present False)")
        specs.append({"name": name, "kind": kind, "shape": a.shape[1:]})
    specs = _specs(specs)
    if present is None:
        present = np.stack([~np.isnan(arrays[s.name]).all(1) if s.kind == "tabular"
                            else np.asarray(arrays[s.name]).reshape(n, -1).any(1) for s in specs], 1)
    elif isinstance(present, dict):
        present = np.stack([np.asarray(present[nm], dtype=bool) for nm in names], 1)
    present = np.asarray(present, dtype=bool)
    if present.shape != (n, len(names)):
        raise ValueError(f"present has shape {present.shape}, expected {(n, len(names))}")
    target = np.asarray(target)
    if task == "classification":
        target = target.astype(np.int64)
        if classes is None:
            classes = [str(c) for c in range(int(target.max()) + 1)]
    else:
        target = target.astype(np.float64)
        classes = None
    pids = list(participant_ids) if participant_ids is not None else [f"sub-{i + 1:04d}" for i in range(n)]
    groups = np.asarray(groups if groups is not None else pids).astype(str)
    manifest = pd.DataFrame({"participant_id": pids, "session": "n/a", "target": target, "group": groups})
    if classes is not None:
        manifest["label"] = [classes[t] if t >= 0 else "n/a" for t in target]
    for j, nm in enumerate(names):
        manifest[f"has_{nm}"] = present[:, j]
    fn = {s.name: list((feature_names or {}).get(s.name) or [f"{s.name}_{k}" for k in range(s.shape[0])])
          for s in specs if s.kind == "tabular"}
    return Cohort(manifest=manifest, modalities=specs, arrays=dict(arrays), present=present, target=target,
                  classes=classes, task=task, groups=groups, feature_names=fn,
                  covariates=None if covariates is None else np.asarray(covariates, np.float32),
                  covariate_names=list(covariate_names or []))


class _CohortRows:
    """The torch-free part of CohortDataset (built by :func:`_dataset_class`, which sets ``cohort``, ``indices``
    and ``transforms``): tabular rows, batched loading."""

    def _tabular(self, spec, i, j) -> np.ndarray:
        """Row i of tabular modality ``spec`` (column j of present): zeros if absent, else transformed, NaN -> 0."""
        c = self.cohort
        if not c.present[i, j]:
            return np.zeros(spec.shape, dtype=np.float32)
        x = np.asarray(c.arrays[spec.name][i], dtype=np.float32)
        if spec.name in self.transforms:
            x = np.asarray(self.transforms[spec.name](x), dtype=np.float32)
        return np.ascontiguousarray(np.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0))

    def loader(self, batch_size: int, shuffle: bool = False, seed: int | None = None, drop_last: bool = False,
               **kwargs):
        """A DataLoader yielding :meth:`get_batch` batches (torch's batched-loading pattern:
        ``sampler=BatchSampler(...)``, ``batch_size=None``); ``kwargs`` go to DataLoader (num_workers…)."""
        import torch
        from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler

        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        base = RandomSampler(range(len(self)), generator=gen) if shuffle else SequentialSampler(range(len(self)))
        return DataLoader(self, sampler=BatchSampler(base, batch_size, drop_last), batch_size=None, **kwargs)


def _dataset_class():
    import torch
    from torch.utils.data import Dataset

    class CohortDataset(_CohortRows, Dataset):
        """Rows ``indices`` of a Cohort as torch items.

        item: {"inputs": {name: float32 tensor}, "present": bool (M,), "target": long/float tensor, "index": int}.
        Works with the default DataLoader; ``ds.loader(batch_size, shuffle=True)`` builds whole batches at
        once instead (several times faster for volumes: no per-item tensors to stack). An absent modality is zeros of its shape with present False. ``transforms``: modality -> callable on
        the (F,) float32 array of a present row (scalers/imputers fitted on the training fold by train.py);
        any NaN left afterwards becomes 0 so that a missing value never reaches the model as NaN.
        """

        def __init__(self, cohort: Cohort, indices=None, transforms: dict | None = None,
                     volume_dtype=torch.float32):
            self.cohort = cohort
            self.indices = np.arange(len(cohort.target)) if indices is None else np.asarray(indices, dtype=np.int64)
            self.transforms = transforms or {}
            self.volume_dtype = volume_dtype   # torch.float16 halves host memory traffic; cast on the device
            unknown = set(self.transforms) - set(cohort.names)
            if unknown:
                raise ValueError(f"transforms for unknown modalities {sorted(unknown)}; known: {cohort.names}")

        def __len__(self) -> int:
            return len(self.indices)

        def __getitem__(self, k):
            if not np.isscalar(k) and not (isinstance(k, torch.Tensor) and k.ndim == 0):
                return self.get_batch(k)
            i = int(self.indices[k])
            c = self.cohort
            inputs = {}
            for j, spec in enumerate(c.modalities):
                if spec.kind == "volume" and spec.name not in self.transforms:
                    # Cached volumes are finite by construction (build_subject, make_cohort): no NaN pass.
                    # One read of the float16 row, then torch's vectorised cast (faster than numpy's).
                    if c.present[i, j]:
                        x = torch.from_numpy(np.array(c.arrays[spec.name][i])).to(self.volume_dtype)
                    else:
                        x = torch.zeros(spec.shape, dtype=self.volume_dtype)
                    inputs[spec.name] = x
                    continue
                inputs[spec.name] = torch.from_numpy(self._tabular(spec, i, j))
            dtype = torch.long if c.task == "classification" else torch.float32
            return {"inputs": inputs, "present": torch.from_numpy(c.present[i].copy()),
                    "target": torch.tensor(c.target[i], dtype=dtype), "index": i}

        def get_batch(self, ks) -> dict:
            """Items ``ks`` already collated (the same tensors default_collate would give, with "index" a
            tensor): volumes are cast straight into one batch tensor, with no per-item copies to stack."""
            ks = np.asarray(ks, dtype=np.int64).reshape(-1)
            rows = self.indices[ks]
            c = self.cohort
            inputs = {}
            for j, spec in enumerate(c.modalities):
                if spec.kind == "volume" and spec.name not in self.transforms:
                    out = torch.empty((len(rows), *spec.shape), dtype=self.volume_dtype)
                    for b, i in enumerate(rows):
                        if c.present[i, j]:
                            out[b].copy_(torch.from_numpy(np.array(c.arrays[spec.name][i])))
                        else:
                            out[b].zero_()
                    inputs[spec.name] = out
                elif spec.kind == "volume":
                    inputs[spec.name] = torch.stack([self[int(k)]["inputs"][spec.name] for k in ks])
                else:
                    inputs[spec.name] = torch.from_numpy(np.stack([self._tabular(spec, i, j) for i in rows]))
            dtype = torch.long if c.task == "classification" else torch.float32
            return {"inputs": inputs, "present": torch.from_numpy(c.present[rows].copy()),
                    "target": torch.as_tensor(c.target[rows], dtype=dtype), "index": torch.from_numpy(rows.copy())}

    CohortDataset.__module__ = __name__
    CohortDataset.__qualname__ = "CohortDataset"
    return CohortDataset


def __getattr__(name):
    # CohortDataset subclasses torch's Dataset; built on first use so that the cache and gather jobs
    # (which never need it) do not pay for importing torch (seconds per job).
    if name == "CohortDataset":
        globals()[name] = _dataset_class()
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ------------------------------------------------------------------------------------------------ CLI
def cli(argv=None) -> int:
    args = cliargs.parser("tensors").parse_args(argv)
    # errors (TensorError, LabelError, CacheError …) reach brainfuse.cli, which prints them as one line
    if args.command == "subject":
        sub_label = check_label(args.subject, "subject (--subject)")
        ses = check_label(args.session, "session (--session)") if args.session else None
        qc = None if args.qc is None else [read_qc(p) for p in args.qc]
        for modality, *sources in args.modality:
            if modality not in IMAGE_MODALITIES:
                raise TensorError(f"--modality {modality}: not an image modality ({', '.join(IMAGE_MODALITIES)})")
            if not sources:
                raise TensorError(f"--modality {modality}: no source files given")
        for modality, *sources in args.modality:
            out = tensor_path(args.out_dir, sub_label, modality, ses=ses)
            info = build_subject(modality, sources, args.mask, out, args.resolution, subject=sub_label, session=ses,
                                 qc=qc)
            print(f"[tensors] {unit_key(sub_label, ses)} {modality}: {info['shape']} -> {out}")
        _warn_qc_unit(unit_key(sub_label, ses), qc or [])
    else:
        info = gather(args.out_dir, args.participants, json.loads(args.params), args.tensors, args.units,
                      atlas=args.atlas)
        print(f"[tensors] gathered {info['n']} rows, modalities "
              + ", ".join(f"{m['name']}{tuple(m['shape'])}" for m in info["modalities"]) + f" -> {args.out_dir}")
    return 0


def _warn_qc_unit(unit: str, qc: list) -> None:
    ok, flags = qc_summary(qc)
    if ok == "False" or flags != "n/a":
        print(f"[tensors] WARNING: {unit} image QC {'FAILED' if ok == 'False' else 'passed with flags'}: {flags} "
              f"(cached anyway; the flags go into manifest.tsv)", file=sys.stderr)
