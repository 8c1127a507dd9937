"""Every name brainfuse reads or writes: one module for the rules and the library alike (issue #22).

Modelled on snakebids' ``bids()``: each file name is built from entities by :func:`bids_path` (in the
specification's entity order), so a rule's declared outputs, the stage that writes them and the stage that reads
them cannot disagree. Give ``"{subject}"`` (and ``"{session}"``) as labels to get a Snakemake pattern.

* BIDS names: :func:`bids_path`, :func:`parse_name`, :func:`check_label`, :func:`sidecar`, :func:`with_ext`;
  :data:`TEMPLATE` (the template space), :data:`IMAGING` (the raw inputs' datatype and suffix);
* output root: :func:`output_dirs` (``derivatives/brainfuse``, ``templates``, ``tensors``, ``models`` ...);
* templates and atlases: :func:`template_path`, :func:`template_files`, :func:`atlas_paths` (``atlas-brainfuse``,
  the func parcellation), :func:`region_atlas_paths` (``atlas-brainfuseRegions``, the tensors' region features);
* per-subject derivatives (the Stage contract in DEVELOPERS.md): :func:`anat_paths`, :func:`dwi_paths`,
  :func:`func_paths`, :func:`qc_path`; :func:`to_mni_transforms`, the ``[warp, affine]`` list taking a T1w-space
  image to the template;
* run entities: :data:`RUN_ENTITIES` (what a BOLD run keeps in its outputs' names: the rules' ``{bold}``
  wildcard, :func:`run_key`), :data:`DWI_RUN_ENTITIES`;
* models: :func:`fold_dir`, :func:`fold_paths`, :func:`fold_checkpoints`; DICOM conversion: :func:`bids_dataset_files`,
  :func:`convert_manifest`.

Imports only :mod:`brainfuse.errors` and the standard library: the workflow imports it at parse time, and every
module may import it without pulling in a stage or raising its own layer (tests/test_layout.py,
tests/test_provenance.py's import-graph test). Indexing a dataset (which files exist) is :mod:`brainfuse.bids`.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from .errors import BrainfuseError

__all__ = ["ENTITY_ORDER", "TEMPLATE", "IMAGING", "LabelError", "check_label", "bids_path", "parse_name",
           "sidecar", "with_ext", "RUN_ENTITIES", "DWI_RUN_ENTITIES", "BOLD_RUN_REGEX", "TISSUES", "DWI_MAPS", "QC_SUFFIX", "output_dirs",
           "derivatives_description", "template_dir", "template_path", "template_files", "atlas_paths",
           "region_atlas_paths", "qc_path", "anat_paths", "to_mni_transforms", "dwi_run_entities", "dwi_paths",
           "run_entities", "run_key", "func_paths", "fold_dir", "fold_paths", "fold_checkpoints",
           "bids_subject_dir", "bids_dataset_files", "convert_verification", "convert_manifest"]

# Entity order from the BIDS specification (Appendix: entity table), the ones brainfuse uses.
ENTITY_ORDER = (
    "sub", "ses", "task", "acq", "ce", "rec", "dir", "run", "echo",
    "from", "to", "mode", "space", "cohort", "res", "den", "label", "atlas", "seg", "hemi", "model", "desc",
)
# What a BOLD run keeps of its name in its derivatives' names (the rules' {bold} wildcard, run_key).
RUN_ENTITIES = ("task", "acq", "ce", "rec", "dir", "run", "echo")
LABEL_RE = re.compile(r"^[A-Za-z0-9]+$")
TEMPLATE = "MNI152NLin2009aSym"   # nilearn's packaged ICBM152 2009a symmetric template

# Imaging inputs brainfuse processes: BIDS datatype and suffix for each.
IMAGING = {"T1w": ("anat", "T1w"), "dwi": ("dwi", "dwi"), "bold": ("func", "bold")}


class LabelError(BrainfuseError):
    """A subject/session/entity label that is not BIDS-valid (letters and digits only)."""


def check_label(value: str, what: str = "label") -> str:
    """Return ``value`` with any ``sub-``/``ses-`` prefix removed; refuse anything but [A-Za-z0-9]+.

    Labels end up in paths, so ``sub-../x`` or ``a_b`` must never get through.
    """
    value = str(value)
    for prefix in ("sub-", "ses-"):
        if value.startswith(prefix):
            value = value[len(prefix):]
    if not LABEL_RE.match(value):
        raise LabelError(f"invalid {what} {value!r}: BIDS labels may contain only letters and digits")
    return value


def bids_path(root, sub: str, datatype: str | None = None, suffix: str = "", ext: str = ".nii.gz",
              ses: str | None = None, **entities) -> str:
    """Build ``root/sub-X[/ses-Y][/datatype]/sub-X[_ses-Y][_key-value…]_suffix.ext``.

    Entities come out in the specification's order whatever order they are given in; ``None`` values
    are left out, so optional entities can be passed through. Wildcards (``{subject}``) pass unchanged,
    which lets Snakemake rules build patterns with the same function.
    """
    parts = [f"sub-{sub}"]
    folders = [f"sub-{sub}"]
    if ses:
        parts.append(f"ses-{ses}")
        folders.append(f"ses-{ses}")
    unknown = set(entities) - set(ENTITY_ORDER)
    if unknown:
        raise ValueError(f"unknown BIDS entities {sorted(unknown)}")
    for key in ENTITY_ORDER[2:]:
        value = entities.get(key)
        if value is not None and value != "":
            parts.append(f"{key}-{value}")
    name = "_".join(parts) + (f"_{suffix}" if suffix else "") + ext
    if datatype:
        folders.append(datatype)
    return os.path.join(str(root), *folders, name)


_NAME_RE = re.compile(
    r"^sub-(?P<sub>[A-Za-z0-9]+)(?:_ses-(?P<ses>[A-Za-z0-9]+))?(?P<ents>(?:_[a-z]+-[A-Za-z0-9]+)*)"
    r"_(?P<suffix>[A-Za-z0-9]+)(?P<ext>\.nii(?:\.gz)?)$"
)


def parse_name(name: str) -> dict | None:
    """Entities of a BIDS image file name, or None if it is not one."""
    m = _NAME_RE.match(name)
    if not m:
        return None
    ents = dict(kv.split("-", 1) for kv in m["ents"].split("_")[1:])
    ents.update(sub=m["sub"], suffix=m["suffix"], ext=m["ext"])
    if m["ses"]:
        ents["ses"] = m["ses"]
    return ents


def sidecar(image_path: str) -> str:
    """The JSON sidecar next to a NIfTI image."""
    return re.sub(r"\.nii(\.gz)?$", ".json", str(image_path))


def with_ext(image_path: str, ext: str) -> str:
    """Same name with another extension (``.bval``, ``.bvec``, ``.json``)."""
    return re.sub(r"\.nii(\.gz)?$", ext, str(image_path))


# ------------------------------------------------------------------------ entities, brainfuse's own
DWI_RUN_ENTITIES = ("acq", "dir", "run")      # what a DWI run keeps in its per-run outputs' names
# the {bold} wildcard: a BOLD run's entities, e.g. "task-rest_run-1" (task first, then the others in BIDS order)
BOLD_RUN_REGEX = "task-[A-Za-z0-9]+(_(" + "|".join(e for e in RUN_ENTITIES if e != "task") + ")-[A-Za-z0-9]+)*"
TISSUES = ("CSF", "GM", "WM")                 # Atropos class order: T1 intensity increases CSF < GM < WM
DWI_MAPS = ("fa", "md", "ad", "rd")           # tensor maps of the dwi stage
QC_SUFFIX = {"anat": "T1w", "dwi": "dwi", "func": "bold"}      # datatype -> suffix of the QC JSON
_TEMPLATE_ENTITIES = ("label", "atlas", "desc")                # after tpl- and res-, in BIDS order


# ------------------------------------------------------------------------------------------ output root
def output_dirs(out) -> dict:
    """The folders below ``output_dir``, by short name."""
    out = str(out).rstrip("/")
    return {"bids": f"{out}/bids",                       # converted DICOM (DICOM mode)
            "demo": f"{out}/demo",                       # the phantom: bids/, truth/, dicom/, staging/
            "deriv": f"{out}/derivatives/brainfuse",     # per-subject derivatives (BIDS derivatives dataset)
            "templates": f"{out}/templates",             # template and atlas files, every name with its resolution
            "tensors": f"{out}/tensors", "models": f"{out}/models", "reports": f"{out}/reports",
            "predictions": f"{out}/predictions", "logs": f"{out}/logs"}


def derivatives_description(deriv) -> str:
    """``DERIV/dataset_description.json``: what makes DERIV a BIDS-derivatives dataset (brainfuse.derivatives)."""
    return os.path.join(str(deriv), "dataset_description.json")


# ------------------------------------------------------------------------------- templates and atlases
def template_dir(root) -> str:
    """``<root>/tpl-T``: the folder of every template and atlas file."""
    return os.path.join(str(root), f"tpl-{TEMPLATE}")


def template_path(root, res, suffix: str, ext: str = ".nii.gz", **entities) -> str:
    """``<root>/tpl-T/tpl-T_res-{res}[_label-…][_atlas-…][_desc-…]_<suffix><ext>`` (BIDS template naming)."""
    unknown = set(entities) - set(_TEMPLATE_ENTITIES)
    if unknown:
        raise ValueError(f"unknown template entities {sorted(unknown)}; known: {_TEMPLATE_ENTITIES}")
    parts = [f"tpl-{TEMPLATE}", f"res-{int(res)}"]
    parts += [f"{key}-{entities[key]}" for key in _TEMPLATE_ENTITIES if entities.get(key)]
    return os.path.join(template_dir(root), "_".join(parts) + f"_{suffix}{ext}")


def template_files(root, res) -> dict:
    """Every file ``brainfuse templates`` writes (:func:`brainfuse.templates.build`), by short name: T1w (brain),
    mask, head (the skull-stripping target), GM, WM, CSF."""
    out = {"T1w": template_path(root, res, "T1w"), "mask": template_path(root, res, "mask", desc="brain"),
           "head": template_path(root, res, "T1w", desc="head")}
    for label in ("GM", "WM", "CSF"):
        out[label] = template_path(root, res, "probseg", label=label)
    return out


def atlas_paths(root, res) -> tuple[str, str]:
    """(dseg NIfTI, TSV) of ``atlas-brainfuse``, the func parcellation (``brainfuse func atlas``); the TSV's
    n_voxels differ by grid, so both carry the resolution."""
    return tuple(template_path(root, res, "dseg", ext, atlas="brainfuse") for ext in (".nii.gz", ".tsv"))


REGION_ATLASES = {"kmeans": "brainfuseRegions", "harvard-oxford": "HarvardOxfordJuelich"}   # tensors.region_atlas


def region_atlas_paths(root, res, region_atlas: str = "kmeans") -> tuple[str, str]:
    """(dseg NIfTI, TSV) of the tensors' region features: ``atlas-brainfuseRegions`` (whole-brain k-means
    parcels) or ``atlas-HarvardOxfordJuelich`` (named structures and tracts)."""
    atlas = REGION_ATLASES[region_atlas]
    return tuple(template_path(root, res, "dseg", ext, atlas=atlas) for ext in (".nii.gz", ".tsv"))


# ---------------------------------------------------------------------------------- subject derivatives
def qc_path(deriv, sub: str, ses: str | None, datatype: str) -> str:
    """``DERIV/sub-X[/ses-Y]/<datatype>/sub-X[_ses-Y]_desc-qc_<suffix>.json``: a stage's QC record
    (brainfuse.stageqc)."""
    return bids_path(deriv, sub, datatype, QC_SUFFIX[datatype], ".json", ses=ses, desc="qc")


def anat_paths(deriv, sub: str, ses: str | None, res) -> dict:
    """Every file the anat stage writes for one subject (session), by short name (the Stage contract)."""
    a = lambda suffix, ext=".nii.gz", **e: bids_path(deriv, sub, "anat", suffix, ext, ses=ses, **e)
    fig = lambda desc: bids_path(deriv, sub, "figures", "T1w", ".png", ses=ses, desc=desc)
    out = {
        "preproc": a("T1w", desc="preproc"),
        "mask": a("mask", desc="brain"),
        "affine": a("xfm", ".mat", **{"from": "T1w", "to": TEMPLATE, "mode": "image", "desc": "affine"}),
        "warp": a("xfm", **{"from": "T1w", "to": TEMPLATE, "mode": "image", "desc": "warp"}),
        "inverse_warp": a("xfm", **{"from": TEMPLATE, "to": "T1w", "mode": "image", "desc": "warp"}),
        "mni_t1w": a("T1w", space=TEMPLATE, res=res, desc="preproc"),
        "logjacobian": a("T1w", space=TEMPLATE, res=res, desc="logjacobian"),
        "qc_mask": fig("brainmask"),
        "qc_reg": fig("reg"),
        "qc_json": qc_path(deriv, sub, ses, "anat"),   # qc_pass, flags, metrics, thresholds (stageqc)
    }
    for t in TISSUES:
        out[f"{t}"] = a("probseg", label=t)
        out[f"mni_{t}"] = a("probseg", space=TEMPLATE, res=res, label=t)
    return out


def to_mni_transforms(anat_dir, sub: str | None = None, ses: str | None = None) -> list[str]:
    """Transform list taking a T1w-space image to the template: ``[warp, affine]`` (both must exist).

    ``anat_dir``: the subject's ``DERIV/sub-X[/ses-Y]/anat`` folder (subject and session read from its path
    when not given), or the derivatives root ``DERIV`` together with ``sub`` (and ``ses``). Use as
    ``ants.apply_transforms(fixed=tpl, moving=img, transformlist=to_mni_transforms(...) + [your_to_T1w.mat])``
    (pass ``whichtoinvert=[False] * n`` explicitly: antspyx inverts a leading .mat of a 2-element list).
    """
    anat_dir = Path(anat_dir)
    if sub is None:
        parts = anat_dir.resolve().parts
        subs = [p for p in parts if p.startswith("sub-")]
        if not subs:
            raise ValueError(f"{anat_dir}: give sub= or a DERIV/sub-X/anat folder")
        sub = subs[-1][4:]
        ses = ses or next((p[4:] for p in parts if p.startswith("ses-")), None)
        root = Path(*parts[: parts.index(subs[-1])])
    else:
        root = anat_dir
    sub = check_label(sub, "subject label")
    p = anat_paths(root, sub, ses, 0)
    missing = [x for x in (p["warp"], p["affine"]) if not os.path.exists(x)]
    if missing:
        raise BrainfuseError(f"anat transforms of sub-{sub} missing ({len(missing)} of 2)", path=missing[0],
                             fix="run the anat stage for this subject first")
    return [p["warp"], p["affine"]]


def dwi_run_entities(run_path) -> dict:
    """Entities of a DWI run kept in its per-run outputs (:data:`DWI_RUN_ENTITIES`)."""
    ents = parse_name(os.path.basename(str(run_path))) or {}
    return {k: ents[k] for k in DWI_RUN_ENTITIES if k in ents}


def dwi_paths(deriv, sub: str, ses: str | None, res, runs=()) -> dict:
    """Every file the dwi stage writes for one subject (Stage contract); per-run files under 'runs' (one dict per
    path of ``runs``, the raw DWI runs)."""
    d = lambda suffix, ext=".nii.gz", **e: bids_path(deriv, sub, "dwi", suffix, ext, ses=ses, **e)
    # bids_path has no `param` entity (it follows `model`, last here): carried in the suffix
    out = {f"{m}": d(f"param-{m}_dwimap", space="dwi", model="tensor") for m in DWI_MAPS}
    out.update({f"mni_{m}": d(f"param-{m}_dwimap", space=TEMPLATE, res=res, model="tensor") for m in DWI_MAPS})
    out["cfa"] = d("param-cfa_dwimap", space="dwi", model="tensor")
    out["mask"] = d("mask", space="dwi", desc="brain")
    out["b0"] = d("dwiref", space="dwi")
    out["xfm"] = d("xfm", ".mat", **{"from": "dwi", "to": "T1w", "mode": "image"})
    out["qc_fa"] = bids_path(deriv, sub, "figures", "dwi", ".png", ses=ses, desc="fa")
    out["qc_motion"] = bids_path(deriv, sub, "figures", "dwi", ".png", ses=ses, desc="motion")
    out["qc_json"] = qc_path(deriv, sub, ses, "dwi")     # qc_pass, flags, metrics, thresholds (stageqc)
    out["runs"] = []
    for r in runs:
        e = dwi_run_entities(r)
        out["runs"].append({"preproc": d("dwi", desc="preproc", **e), "bval": d("dwi", ".bval", desc="preproc", **e),
                            "bvec": d("dwi", ".bvec", desc="preproc", **e),
                            "motion": d("timeseries", ".tsv", desc="motion", **e)})
    return out


def run_entities(entities: dict) -> dict:
    """The entities of a BOLD run that its outputs keep (:data:`RUN_ENTITIES`), from a name's entities."""
    return {k: entities[k] for k in RUN_ENTITIES if k in entities}


def run_key(entities: dict) -> str:
    """``task-rest[_acq-…][_run-…]``: a BOLD run's kept entities as they appear in names (the ``{bold}``
    wildcard)."""
    return "_".join(f"{k}-{v}" for k, v in run_entities(entities).items())


def func_paths(deriv, sub: str, ses: str | None, res, run: str) -> dict:
    """Every file the func stage writes for one BOLD run (Stage contract), by short name. ``run``: the run's
    entities as :func:`run_key` writes them (or the rules' ``"{bold}"``)."""
    head = f"sub-{sub}" + (f"_ses-{ses}" if ses else "")

    def p(suffix, ext, datatype="func", **e):
        folder, name = os.path.split(bids_path(deriv, sub, datatype, suffix, ext, ses=ses, **e))
        return os.path.join(folder, f"{head}_{run}{name[len(head):]}")     # run entities come first (BIDS order)

    mni = {"space": TEMPLATE, "res": int(res)}
    return {
        "confounds": p("timeseries", ".tsv", desc="confounds"),
        "motion_qc": p("timeseries", ".json", desc="confounds"),   # the confounds' sidecar: motion QC
        "xfm": p("xfm", ".mat", **{"from": "bold", "to": "T1w", "mode": "image"}),
        "preproc": p("bold", ".nii.gz", **mni, desc="preproc"),
        # `stat` is not in ENTITY_ORDER: carried in the suffix, after space/res
        **{s: p(f"stat-{s}_boldmap", ".nii.gz", **mni) for s in ("alff", "falff", "reho")},
        "timeseries": p("timeseries", ".tsv", **mni, atlas="brainfuse"),
        "relmat": p("relmat", ".tsv", **mni, atlas="brainfuse", desc="fisherz"),
        "qc_motion": p("bold", ".png", "figures", desc="motion"),
        "qc_carpet": p("bold", ".png", "figures", desc="carpet"),
    }


# ------------------------------------------------------------------------------------- models, convert
def fold_dir(models, preset: str, fold) -> str:
    """``<models>/<preset>/fold-<k>``: one preset trained on one CV fold (``brainfuse train fold --out-dir``)."""
    return f"{models}/{preset}/fold-{fold}"


def fold_paths(models, preset: str, fold) -> dict:
    """checkpoint.pt and predictions.tsv (test rows) of one trained fold."""
    folder = fold_dir(models, preset, fold)
    return {"checkpoint": f"{folder}/checkpoint.pt", "predictions": f"{folder}/predictions.tsv"}


def fold_checkpoints(models, preset: str) -> list[Path]:
    """The checkpoints of a preset's trained folds that exist, sorted by path (what predict averages, in that
    order: the order of a float sum is part of byte-identical output)."""
    return sorted(Path(models).glob(fold_paths(".", preset, "*")["checkpoint"]))


def bids_subject_dir(bids_root, sub: str) -> str:
    """``<bids_root>/sub-X``: one subject's folder (what converting one subject's DICOM writes)."""
    return f"{bids_root}/sub-{sub}"


def bids_dataset_files(bids_root) -> dict:
    """The dataset-level files of a BIDS dataset brainfuse writes (``brainfuse convert dataset``), by short name:
    dataset_description.json, participants.tsv, the merged conversion manifest."""
    root = str(bids_root)
    return {"description": f"{root}/dataset_description.json", "participants": f"{root}/participants.tsv",
            "manifest": f"{root}/code/manifest.tsv"}


def convert_verification(bids_root) -> str:
    """``<bids_root>/code/verification.tsv``: the demo's DICOM round trip checked against the phantom's own BIDS
    images (``brainfuse convert verify``)."""
    return f"{bids_root}/code/verification.tsv"


def convert_manifest(bids_root, sub: str) -> str:
    """``<bids_root>/code/manifests/sub-X_manifest.tsv``: every series of a subject's DICOM and what conversion
    did with it (``brainfuse convert --manifest``)."""
    return f"{bids_root}/code/manifests/sub-{sub}_manifest.tsv"
