# Validation, the dataset index, path helpers and code versions shared by every stage. Every path and file name
# comes from brainfuse.layout (the rules and the library build them the same way); the patterns several stages
# read (RES, TEMPLATE_FILES, ANAT, converted_images, deferred_targets ...) are defined here, so the order in which
# the Snakefile includes the stages does not matter.
import json
import os
import sys
from pathlib import Path

from snakemake.logging import logger
from snakemake.settings.types import DeploymentMethod

from brainfuse import config as bf_config
from brainfuse import layout
from brainfuse.phantom import generator as bf_demo
from brainfuse.bids import check_bids_root, check_input_dir, folder_label, index_bids
from brainfuse.errors import BrainfuseError
from brainfuse.inputs import check_output_dir
from brainfuse.layout import IMAGING, bids_path
from brainfuse.provenance import code_version, source_hash

# Stops the run with a message naming the key (schema: workflow/schemas/config.schema.yaml).
try:
    _validated = bf_config.validate(config)
except bf_config.ConfigError as e:
    raise WorkflowError(str(e)) from None
config.clear()
config.update(_validated)

# Paths the config names, checked before any job is planned: one line each instead of a failure in a job.
try:
    check_output_dir(config["output_dir"])
    if config["participants_tsv"] and not Path(config["participants_tsv"]).is_file():
        raise BrainfuseError("participants_tsv does not exist or is not a file", path=config["participants_tsv"],
                             fix="set participants_tsv to your clinical table (TSV with participant_id), or null")
    MODE = bf_config.input_mode(config)  # "bids", "dicom", "tabular" (a table, no images) or "demo"
except BrainfuseError as e:
    raise WorkflowError(str(e)) from None

OUT = config["output_dir"].rstrip("/")
DIRS = layout.output_dirs(OUT)       # the folders below output_dir
DEMO = DIRS["demo"]
DEMO_PATHS = bf_demo.demo_paths(DEMO)      # the phantom's bids/, truth/, staging/, dicom/, converted/
BIDS_DIR = {"bids": config["bids_dir"], "dicom": DIRS["bids"], "demo": DEMO_PATHS["bids"], "tabular": None}[MODE]
DERIV = DIRS["deriv"]
# Template and atlas files, built per output root (never into the checkout: it may be read-only, and two runs
# there would share them); every name carries its resolution, so resolutions never overwrite each other.
TPL_ROOT = DIRS["templates"]
TENSORS = DIRS["tensors"]
LOGS = DIRS["logs"]
RES = int(config["resolution_mm"])  # the template grid (mm) of every MNI-space output: `--resolution` of the commands
SRC = str(Path(workflow.basedir) / "src")

# Rules call `brainfuse <command>` from this checkout; with --use-conda the env's python runs it.
_USE_CONDA = DeploymentMethod.CONDA in workflow.deployment_settings.deployment_method
PYTHON = "python" if _USE_CONDA else sys.executable
BRAINFUSE = f"PYTHONPATH='{SRC}'${{PYTHONPATH:+:$PYTHONPATH}} {PYTHON} -m brainfuse"

wildcard_constraints:
    subject="[A-Za-z0-9]+",
    session="[A-Za-z0-9]+",


# ----------------------------------------------------------------------------------- dataset index
def _check_subjects(found, where):
    """config `subjects` must name subjects that exist: a typo would otherwise drop a subject without a word."""
    missing = sorted(set(config["subjects"]) - set(found))
    if missing:
        raise WorkflowError(f"{where}: config key 'subjects' names {', '.join(missing)} but there is no such subject; "
                            "correct the labels, or leave subjects empty for all")


def _check_demo_folds(cohort):
    """The splits rule's label check, run on the demo's plan at parse time: labels that no fold split can take are
    said now, not after the preprocessing (~40 s per subject on 2 cores)."""
    if ("train" not in config["stages"] or config["model"]["predict_from"]   # nothing trained here
            or config["tensors"]["task"] != "classification"):
        return
    from brainfuse.splits import DegenerateLabelError, check_labels

    folds, classes, group_by = config["cv"]["n_folds"], config["demo"]["classes"], config["cv"]["group_by"]
    groups = [s.site if group_by == "site" else s.label for s in cohort]
    try:
        check_labels([classes.index(s.diagnosis) for s in cohort], "classification", folds, groups, classes,
                     label="diagnosis", group_by=group_by)
    except DegenerateLabelError as e:
        more = f"set demo.n_subjects to at least {folds * len(classes)} (and subjects to [] for all), or " \
            if group_by == "participant_id" else ""      # the generator deals the classes out in turn
        raise WorkflowError(f"the demo ({len(cohort)} subjects): {e.problem}; {more}lower cv.n_folds") from None


def _participant_rows(table):
    """The rows of a participants table as dicts, or the exception that stopped reading it. Read with csv, not
    pandas: parse time (tabular-mode units, participants without images)."""
    import csv

    try:
        with open(table, newline="", encoding="utf-8-sig") as f:
            return list(csv.DictReader(f, delimiter="\t"))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        return e


def _table_units(table):
    """Tabular-only mode: (subject, session or None) per row of the participants table; repeated rows of one
    person are told apart by a `session` (or `session_id`) column. Read with csv, not pandas: parse time."""
    from brainfuse.layout import LabelError, check_label

    rows = _participant_rows(table)
    if isinstance(rows, Exception):
        raise BrainfuseError(f"participants_tsv cannot be read ({rows})", path=table,
                             fix="give a tab-separated UTF-8 table with a participant_id column") from None
    if not rows or "participant_id" not in rows[0]:
        raise BrainfuseError("participants_tsv has no participant_id column or no rows", path=table,
                             fix="write a tab-separated header with participant_id, then one row per participant")
    ses_col = "session" if "session" in rows[0] else "session_id" if "session_id" in rows[0] else None
    units = set()
    for i, r in enumerate(rows, start=2):
        try:
            sub = check_label(str(r["participant_id"] or "").strip().removeprefix("sub-"), "participant_id")
            ses = str(r[ses_col] or "").strip().removeprefix("ses-") if ses_col else ""
            ses = check_label(ses, ses_col) if ses not in ("", "n/a") else None
        except LabelError as e:
            raise BrainfuseError(f"line {i}: {e}", path=table, fix="use letters and digits only") from None
        units.add((sub, ses))
    return sorted(units, key=lambda u: (u[0], u[1] or ""))


# Built once at parse time (never per job): the 1,000-subject dry run depends on it.
def _index():
    if MODE == "demo":
        cohort = bf_demo.plan(config["demo"])
        _check_subjects([s.label for s in cohort], f"the demo ({len(cohort)} subjects, demo.n_subjects)")
        wanted = set(config["subjects"]) or {s.label for s in cohort}
        _check_demo_folds([s for s in cohort if s.label in wanted])
        return {(s.label, None): {"T1w": True, "dwi": s.has_dwi, "bold": s.has_bold}
                for s in cohort if s.label in wanted}, {}
    if MODE == "tabular":
        units = _table_units(config["participants_tsv"])
        _check_subjects([s for s, _ in units], f"participants_tsv {config['participants_tsv']}")
        wanted = set(config["subjects"]) or {s for s, _ in units}
        return {u: {m: False for m in IMAGING} for u in units if u[0] in wanted}, {}
    if MODE == "bids":
        sessions = index_bids(check_bids_root(config["bids_dir"]), config["subjects"] or None)
        return {(s.sub, s.ses): {m: s.has(m) for m in IMAGING} for s in sessions}, \
               {(s.sub, s.ses): s.images for s in sessions}
    # dicom: subjects are the folder names; what each holds is known only after conversion.
    root = check_input_dir(config["dicom_dir"], "dicom_dir")
    labels = sorted(folder_label(p) for p in root.iterdir() if p.is_dir())
    _check_subjects(labels, f"dicom_dir {root}")
    wanted = set(config["subjects"]) or set(labels)
    return {(s, None): None for s in labels if s in wanted}, {}


try:
    AVAILABILITY, _IMAGES = _index()
except (BrainfuseError, FileNotFoundError) as e:      # index_bids: missing `subjects` (FileNotFoundError)
    raise WorkflowError(str(e)) from None
if not AVAILABILITY and MODE == "tabular":
    raise WorkflowError(f"{config['participants_tsv']}: no participant rows (participant_id) found; check the table")
if not AVAILABILITY:
    raise WorkflowError(f"{config['bids_dir'] or config['dicom_dir']}: no subject folders "
                        f"({'sub-*' if MODE == 'bids' else 'one folder per subject'}) found; check the path")
UNITS = sorted(AVAILABILITY, key=lambda u: (u[0], u[1] or ""))   # a table may mix rows with and without a session
HAS_SESSIONS = any(ses for _, ses in UNITS)
SES = "{session}" if HAS_SESSIONS else None     # the session label of a path pattern
MODALITIES = config["modalities"]
# dwi and func register every image to the subject's preprocessed T1w (anat stage): without one they cannot run.
NEEDS_T1W = ("dwi", "bold")


def unit_name(unit):
    return f"sub-{unit[0]}" + (f"_ses-{unit[1]}" if unit[1] else "")


_T1W_REPORTED = set()


def report_missing_t1w(found_by_unit, where):
    """Units with dwi/bold to process but no T1w: one warning line each (once), or, with config `strict`, stop
    with one line naming them. ``found_by_unit``: unit -> {modality: has an image}; ``where(unit)``: where the
    T1w was looked for."""
    lost = {u: [m for m in NEEDS_T1W if f[m] and m in MODALITIES] for u, f in found_by_unit.items()
            if not f["T1w"] and u not in _T1W_REPORTED}
    lost = {u: ms for u, ms in lost.items() if ms}
    _T1W_REPORTED.update(lost)
    if not lost:
        return
    if config["strict"]:
        names = "; ".join(f"{unit_name(u)}: no usable T1w ({where(u)})" for u in sorted(lost))
        raise WorkflowError(f"{names}: dwi and func need it; strict: true stops here (add a T1w, leave the "
                            "subject out with `subjects`, or set strict: false to carry it on without dwi and func)")
    if workflow.is_main_process:           # not again in every cluster job's own parse
        for unit, modalities in sorted(lost.items()):
            logger.warning(f"brainfuse: warning: {unit_name(unit)}: no usable T1w ({where(unit)}): dwi and func "
                           f"need it; carried on as missing T1w, {', '.join(modalities)}")


def _found(unit):
    """modality -> whether the unit has an image of it, regardless of MODALITIES and of the T1w rule.
    DICOM mode: from its conversion manifest, which waits for the conversion (call from input functions)."""
    if AVAILABILITY[unit] is not None:
        return AVAILABILITY[unit]
    images = converted_images(unit)
    found = {m: bool(images.get(m)) for m in IMAGING}
    report_missing_t1w({unit: found}, lambda u: f"no T1w series converted, see {converted_manifest(u)}")
    return found


def has(unit, modality):
    """Whether a subject (session) has a modality to process; in DICOM mode this waits for its conversion.
    dwi and bold count only with a T1w (NEEDS_T1W): a subject without one is carried on as missing them."""
    if modality not in MODALITIES:
        return False
    found = _found(unit)
    return found[modality] and (modality not in NEEDS_T1W or found["T1w"])


if MODE == "bids":
    report_missing_t1w(AVAILABILITY, lambda u: f"no *_T1w.nii[.gz] in {Path(BIDS_DIR, *unit_name(u).split('_'))}/anat")
    if workflow.is_main_process:
        for unit in (u for u in UNITS if not any(AVAILABILITY[u].values())):
            logger.warning(f"brainfuse: warning: {unit_name(unit)}: no T1w, DWI or BOLD image in "
                           f"{Path(BIDS_DIR, *unit_name(unit).split('_'))}: carried on with its participants.tsv "
                           "data only")


def units_with(modality):
    return [u for u in UNITS if has(u, modality)]


# Path patterns several stages read, by short name (brainfuse.layout): the template files (rule templates) and
# every anat output (rule anat_subject: the T1w, mask and [warp, affine] that dwi and func register to).
TEMPLATE_FILES = layout.template_files(TPL_ROOT, RES)       # T1w, mask, head, GM, WM, CSF
ANAT = layout.anat_paths(DERIV, "{subject}", SES, RES)
# DERIV's dataset_description.json (rule derivatives_description): a target of every stage that writes into DERIV
DERIV_DESCRIPTION = layout.derivatives_description(DERIV)
DERIV_TARGETS = [] if MODE == "tabular" else [DERIV_DESCRIPTION]     # tabular-only: no derivatives folder
# The demo (demo.smk): its BIDS images (raw_images reads them) and its Bayes rule (read by evaluate)
demo_t1w = bids_path(DEMO_PATHS["bids"], "{subject}", "anat", "T1w")
demo_dwi = bids_path(DEMO_PATHS["bids"], "{subject}", "dwi", "dwi", dir="AP")
demo_bold = bids_path(DEMO_PATHS["bids"], "{subject}", "func", "bold", task="rest")
DEMO_BAYES = DEMO_PATHS["bayes"]


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


# ------------------------------------------------------------------------- DICOM mode: what conversion found
# The per-subject conversion (checkpoint convert_subject, convert.smk) writes a manifest of every series; which
# images a subject has is known only once it has run. Per-subject manifests (known before conversion) are listed
# as inputs of whatever gathers over subjects, so that every subject's checkpoint is scheduled at once.
CONVERT_MANIFESTS = [layout.convert_manifest(BIDS_DIR, s) for s, _ in UNITS] if MODE == "dicom" else []
_CONVERTED_CACHE = {}


def converted_manifest(unit):
    """The subject's conversion manifest (DICOM mode)."""
    return layout.convert_manifest(BIDS_DIR, unit[0])


def converted_images(unit):
    """{"T1w": [...], "dwi": [...], "bold": [...]} of a subject, read from its conversion manifest (DICOM mode;
    raises Snakemake's IncompleteCheckpointException until the checkpoint has run: call it from input functions
    only)."""
    import csv

    if MODE != "dicom":
        raise WorkflowError("DICOM input needs the convert stage (workflow/rules/convert.smk)")
    manifest = checkpoints.convert_subject.get(subject=unit[0]).output.manifest
    key = (manifest, os.stat(manifest).st_mtime_ns)
    if key not in _CONVERTED_CACHE:
        by_suffix = {suffix: modality for modality, (_, suffix) in IMAGING.items()}
        images = {modality: [] for modality in IMAGING}
        with open(manifest, newline="") as f:
            for row in csv.DictReader(f, delimiter="\t"):
                if row["decision"] == "converted" and row["suffix"] in by_suffix and row["bids_name"]:
                    images[by_suffix[row["suffix"]]].append(f"{BIDS_DIR}/{row['bids_name']}")
        _CONVERTED_CACHE[key] = {m: sorted(v) for m, v in images.items()}
    return _CONVERTED_CACHE[key]


def deferred_targets(targets):
    """Stage targets that depend on what conversion found: ``targets`` is a function of no arguments
    returning the list (it may call units_with / raw_images). In DICOM mode this returns the conversion
    manifests plus an input function (evaluated once the checkpoints have run); otherwise the list itself.
    Use it for STAGE_TARGETS: calling units_with() at parse time fails in DICOM mode."""
    if MODE == "dicom":
        return CONVERT_MANIFESTS + [lambda wildcards: targets()]
    return targets()


def t1w_input(wildcards):
    """The T1w of a unit (the first, sorted, when there are several). The stage targets never ask for a unit
    without one (has()); a target named by hand gets this line instead of an IndexError."""
    images = raw_images(unit_of(wildcards), "T1w")
    if not images:
        raise WorkflowError(f"{unit_name(unit_of(wildcards))}: no T1w image, so no anat, dwi or func outputs can be "
                            "made for it; it is carried on as missing them (ask for other subjects' files)")
    return images[0]


# -------------------------------------------------------------------------- participants without images
# BIDS defines a dataset's participants by its sub-* folders (the validator reports a participants.tsv row
# without a folder as an error, PARTICIPANT_ID_MISMATCH). Such a row is most often an incomplete transfer or a
# screening failure: it is left out - not carried on as a clinical-only subject, which would change the class
# balance and folds of an imaging study without anyone asking - but never silently.
def _participant_ids(table):
    """participant_id labels of a table, or None when it cannot be read here (the tensors stage reads it with
    brainfuse.inputs.read_tsv, which names the problem)."""
    rows = _participant_rows(table)
    if isinstance(rows, Exception) or not rows or "participant_id" not in rows[0]:
        return None
    return sorted({str(r["participant_id"]).strip().removeprefix("sub-") for r in rows if r["participant_id"]})


def report_participants_without_images():
    bids_table = layout.bids_dataset_files(config["bids_dir"])["participants"] if MODE == "bids" else None
    table = config["participants_tsv"] or bids_table
    if MODE in ("demo", "tabular") or config["subjects"] or not table or not Path(table).is_file():
        return                      # a `subjects` subset leaves the others out on purpose
    ids = _participant_ids(table)
    subjects = {s for s, _ in UNITS}
    orphans = [i for i in ids or [] if i not in subjects]
    if orphans and workflow.is_main_process:
        shown = ", ".join(f"sub-{i}" for i in orphans[:20]) + (f" ... ({len(orphans)} in all)" * (len(orphans) > 20))
        logger.warning(f"brainfuse: warning: {table}: {len(orphans)} participant(s) listed with no imaging folder in "
                       f"{config['bids_dir'] or config['dicom_dir']}: {shown}; they are left out of every stage "
                       "(add their images, or remove their rows to silence this)")


report_participants_without_images()


# ------------------------------------------------------------------------------------ stage targets
# stage -> list of files; each stage's .smk fills its entry through job_targets. Snakemake reruns a job that is
# not itself a target only for the missing outputs some downstream job requests: naming one file per job, a
# stage said "Nothing to be done" with that job's other outputs deleted. Naming every output of every job fixes
# that but costs ~35 more files per subject to match to their rules: +15% CPU for the 1,000-subject dry run on a
# fresh tree (benchmarks/bench_dag.py), +45% after a complete run. job_targets names the QC figures of each job
# (the report needs them; a missing one reruns the job) plus only those other outputs that are missing: as
# cheap as the figures alone.
STAGE_TARGETS = {}


def job_targets(rule, units, always, **wildcards):
    """For each unit, the ``always`` outputs of ``rule``'s job (patterns among rule.output) and, when those all
    exist, every other declared output that does not: requested, a missing one reruns the job. Other wildcards
    as keyword arguments (e.g. bold=...). Looks each folder up once (os.scandir), not each file."""
    always = [str(p) for p in always]
    rest = [str(p) for p in rule.output if str(p) not in always]
    listings = {}

    def exists(path):
        folder, name = os.path.split(path)
        if folder not in listings:
            try:
                with os.scandir(folder or ".") as it:
                    listings[folder] = {e.name for e in it}
            except OSError:
                listings[folder] = set()
        return name in listings[folder]

    out = []
    for s, ses in units:
        first = [p.format(subject=s, session=ses, **wildcards) for p in always]
        out += first
        # the cluster jobs' own parse skips the look-ups: they run one given job, never these targets
        if workflow.is_main_process and all(map(exists, first)):
            out += [q for q in (p.format(subject=s, session=ses, **wildcards) for p in rest) if not exists(q)]
    return out


def job_outputs(rule, units, **wildcards):
    """Every declared output of ``rule``'s job for each unit (stages of few jobs: demo, convert)."""
    return [str(p).format(subject=s, session=ses, **wildcards) for s, ses in units for p in rule.output]


def all_targets():
    stages = (["demo"] if MODE == "demo" else []) + config["stages"]
    return [t for stage in stages for t in STAGE_TARGETS.get(stage, [])]


def log_path(rule_name, per_unit=True, run=None):
    """LOGS/<rule>.log, or per unit LOGS/<rule>/sub-{subject}[_ses-{session}][_<run>].log."""
    if not per_unit:
        return f"{LOGS}/{rule_name}.log"
    return f"{LOGS}/{rule_name}/sub-{{subject}}" + ("_ses-{session}" if HAS_SESSIONS else "") + \
        (f"_{run}" if run else "") + ".log"
