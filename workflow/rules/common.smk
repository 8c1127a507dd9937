# Validation, the dataset index, path helpers and code versions shared by every stage.
import json
import sys
from pathlib import Path

from snakemake.settings.types import DeploymentMethod

from brainfuse import config as bf_config
from brainfuse import demo as bf_demo
from brainfuse.bids import TEMPLATE, bids_path, check_label, index_bids
from brainfuse.provenance import code_version

# Stops the run with a message naming the key (schema: workflow/schemas/config.schema.yaml).
try:
    _validated = bf_config.validate(config)
except bf_config.ConfigError as e:
    raise WorkflowError(str(e)) from None
config.clear()
config.update(_validated)

MODE = bf_config.input_mode(config)  # "bids", "dicom" or "demo"
OUT = config["output_dir"].rstrip("/")
DEMO = f"{OUT}/demo"
BIDS_DIR = {"bids": config["bids_dir"], "dicom": f"{OUT}/bids", "demo": f"{DEMO}/bids"}[MODE]
DERIV = f"{OUT}/derivatives/brainfuse"
LOGS = f"{OUT}/logs"
SRC = str(Path(workflow.basedir) / "src")

# Rules call `brainfuse <command>` from this checkout; with --use-conda the env's python runs it.
_USE_CONDA = DeploymentMethod.CONDA in workflow.deployment_settings.deployment_method
PYTHON = "python" if _USE_CONDA else sys.executable
BRAINFUSE = f"PYTHONPATH='{SRC}'${{PYTHONPATH:+:$PYTHONPATH}} {PYTHON} -m brainfuse"

wildcard_constraints:
    subject="[A-Za-z0-9]+",
    session="[A-Za-z0-9]+",


# ----------------------------------------------------------------------------------- dataset index
# Built once at parse time (never per job): the 1,000-subject dry run depends on it.
def _index():
    if MODE == "demo":
        cohort = bf_demo.plan(config["demo"])
        wanted = set(config["subjects"]) or {s.label for s in cohort}
        return {(s.label, None): {"T1w": True, "dwi": s.has_dwi, "bold": s.has_bold}
                for s in cohort if s.label in wanted}, {}
    if MODE == "bids":
        sessions = index_bids(config["bids_dir"], config["subjects"] or None)
        return {(s.sub, s.ses): {m: s.has(m) for m in ("T1w", "dwi", "bold")} for s in sessions}, \
               {(s.sub, s.ses): s.images for s in sessions}
    # dicom: subjects are the folder names; what each holds is known only after conversion.
    root = Path(config["dicom_dir"])
    if not root.is_dir():
        raise WorkflowError(f"dicom_dir {root}: no such folder")
    labels = sorted(check_label(p.name, f"subject folder {p}") for p in root.iterdir() if p.is_dir())
    wanted = set(config["subjects"]) or set(labels)
    return {(s, None): None for s in labels if s in wanted}, {}


AVAILABILITY, _IMAGES = _index()
UNITS = sorted(AVAILABILITY)
HAS_SESSIONS = any(ses for _, ses in UNITS)
MODALITIES = config["modalities"]


def has(unit, modality):
    """Whether a subject (session) has a modality; in DICOM mode this waits for its conversion."""
    if modality not in MODALITIES:
        return False
    if AVAILABILITY[unit] is None:
        return bool(converted_images(unit).get(modality))
    return AVAILABILITY[unit][modality]


def units_with(modality):
    return [u for u in UNITS if has(u, modality)]


def bpath(root, datatype, suffix, ext=".nii.gz", **entities):
    """A path pattern with {subject} (and {session} when the dataset has sessions) wildcards."""
    return bids_path(root, "{subject}", datatype, suffix, ext, ses="{session}" if HAS_SESSIONS else None, **entities)


def expand_units(pattern, units=None):
    return [pattern.format(subject=s, session=ses) for s, ses in (UNITS if units is None else units)]


def unit_of(wildcards):
    return (wildcards.subject, getattr(wildcards, "session", None) if HAS_SESSIONS else None)


def raw_images(unit, modality):
    """Input images of a unit: from the demo plan, the BIDS index, or the converted DICOM."""
    sub, ses = unit
    if MODE == "demo":
        if not AVAILABILITY[unit][modality]:
            return []
        return [{"T1w": demo_t1w, "dwi": demo_dwi, "bold": demo_bold}[modality].format(subject=sub)]
    if MODE == "bids":
        return _IMAGES[unit].get(modality, [])
    return converted_images(unit).get(modality, [])


def converted_images(unit):
    """Replaced by the convert stage (a checkpoint) in DICOM mode."""
    raise WorkflowError("DICOM input needs the convert stage (workflow/rules/convert.smk)")


# ------------------------------------------------------------------------------------ stage targets
# stage -> list of files; each stage's .smk fills its entry. Per-subject stages list their jobs' QC figures
# only: a job in the DAG reruns when any of its outputs is missing or stale, so one file per job is enough,
# and the report needs the figures anyway. Listing every output made `rule all` ~30 inputs per subject, a
# third of the 1,000-subject dry run (benchmarks/bench_dag.py).
STAGE_TARGETS = {}


def all_targets():
    stages = (["demo"] if MODE == "demo" else []) + config["stages"]
    return [t for stage in stages for t in STAGE_TARGETS.get(stage, [])]


def log_path(rule_name, per_unit=True):
    if not per_unit:
        return f"{LOGS}/{rule_name}.log"
    return f"{LOGS}/{rule_name}/sub-{{subject}}" + ("_ses-{session}" if HAS_SESSIONS else "") + ".log"
