# tensors stage: per-subject fixed-shape caches of the MNI derivatives, then one gathered cohort
# (src/brainfuse/tensors.py). Helpers (units_with, raw_images, STAGE_TARGETS), RES, TENSORS and
# TEMPLATE_FILES are in common.smk; names from brainfuse.layout.
import functools
import shlex

from brainfuse import tensors as bf_tensors
from brainfuse.layout import parse_name

TENSOR_SETTINGS = dict(config["tensors"])
if MODE == "demo" and not TENSOR_SETTINGS["classes"]:
    TENSOR_SETTINGS["classes"] = config["demo"]["classes"]
if MODE == "tabular":   # no images: the default list's image modalities would only be empty columns
    TENSOR_SETTINGS["modalities"] = [m for m in TENSOR_SETTINGS["modalities"] if m not in bf_tensors.IMAGE_MODALITIES]
TEMPLATE_MASK = TEMPLATE_FILES["mask"]
# DICOM input: convert merges participants_tsv into the converted dataset's table; BIDS/demo: the given
# clinical table, else the dataset's own participants.tsv.
PARTICIPANTS_TSV = (f"{BIDS_DIR}/participants.tsv" if MODE == "dicom"
                    else config["participants_tsv"] or f"{BIDS_DIR}/participants.tsv")
IMAGE_TENSORS = [m for m in TENSOR_SETTINGS["modalities"] if m in bf_tensors.IMAGE_MODALITIES]
# image_features: regions -> the volume modalities are gathered as parcel-mean tables of this atlas
# (atlas-brainfuseRegions built below, or the user's tensors.atlas on the working grid)
REGION_VOLUMES = [m for m in IMAGE_TENSORS if m in bf_tensors.VOLUME_CHANNELS]
if TENSOR_SETTINGS["image_features"] == "regions" and REGION_VOLUMES:
    _user_atlas = TENSOR_SETTINGS.get("atlas")
    REGION_ATLAS = ([_user_atlas["nifti"], _user_atlas["tsv"]] if _user_atlas else
                    list(layout.region_atlas_paths(TPL_ROOT, RES, TENSOR_SETTINGS["region_atlas"])))
else:
    REGION_ATLAS = []

def bold_run_entities(unit):
    """Entities of the BOLD run the tensors use: the first task-rest run (sorted), else the first run."""
    runs = sorted(raw_images(unit, "bold"), key=lambda p: Path(p).name)
    rest = [p for p in runs if parse_name(Path(p).name).get("task") == "rest"]
    return layout.run_entities(parse_name(Path((rest or runs)[0]).name))


def unit_modalities(unit):
    """The image modalities a unit gets a cache of: those whose source scan it has (none is never an error)."""
    return [m for m in IMAGE_TENSORS if has(unit, bf_tensors.SOURCE_OF[m])]


@functools.lru_cache(maxsize=None)        # asked by input and params of every job: build each unit's once
def unit_sources(unit):
    """{modality: derivative paths in channel order} of one unit (do not mutate: it is cached)."""
    out = {}
    for m in unit_modalities(unit):
        run = bold_run_entities(unit) if bf_tensors.SOURCE_OF[m] == "bold" else None
        out[m] = bf_tensors.derivative_paths(DERIV, unit[0], m, RES, ses=unit[1], run_entities=run)
    return out


def tensor_sources(wildcards):
    return [p for paths in unit_sources(unit_of(wildcards)).values() for p in paths]


def unit_qc(wildcards):
    """The image stages' QC JSONs behind the unit's caches (anat: every image modality goes through the T1w's
    registration; dwi: DTI; func: fMRI, conn), carried into the sidecars and the manifest."""
    unit = unit_of(wildcards)
    mods = unit_modalities(unit)
    datatypes = (["anat"] if mods and has(unit, "T1w") else []) + (["dwi"] if "DTI" in mods else []) \
        + (["func"] if {"fMRI", "conn"} & set(mods) else [])
    return [layout.qc_path(DERIV, unit[0], unit[1], d) for d in datatypes]


def tensor_args(wildcards):
    return " ".join(f"--modality {m} " + " ".join(paths) for m, paths in unit_sources(unit_of(wildcards)).items())


def all_unit_tensors(wildcards):
    """One cache folder per unit with at least one image modality."""
    return [bf_tensors.unit_dir(TENSORS, *u) for u in UNITS if unit_modalities(u)]


_unit_dir = bf_tensors.unit_dir(TENSORS, "{subject}", SES)


rule tensors_subject:
    """One subject's (session's) MNI derivatives -> one float16 tensor + provenance sidecar per modality
    (no resampling). One job per subject: a changed derivative reruns that subject's caches (seconds)."""
    input:
        sources=tensor_sources,
        mask=TEMPLATE_MASK,
        qc=unit_qc,
    output:
        directory(_unit_dir),
    params:
        res=RES,
        session=lambda w: f"--session {w.session}" if HAS_SESSIONS else "",
        modalities=tensor_args,
        out_dir=TENSORS,
        code=code_version("tensors"),
    log:
        log_path("tensors_subject"),
    conda:
        "../../envs/tensors.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    shell:
        "{BRAINFUSE} tensors subject --subject {wildcards.subject} {params.session} --resolution {params.res}"
        " --mask {input.mask} --out-dir {params.out_dir} {params.modalities} --qc {input.qc} > {log} 2>&1"


rule atlas_regions:
    """The region features' atlas (tensors.region_atlas): atlas-brainfuseRegions, k-means parcels of the whole
    template brain (GM, WM, deep nuclei) per hemisphere, or atlas-HarvardOxfordJuelich, named structures and tracts
    (no download; src/brainfuse/atlas.py)."""
    input:
        gm=TEMPLATE_FILES["GM"],
        mask=TEMPLATE_MASK,
    output:
        nii=layout.region_atlas_paths(TPL_ROOT, RES, TENSOR_SETTINGS["region_atlas"])[0],
        tsv=layout.region_atlas_paths(TPL_ROOT, RES, TENSOR_SETTINGS["region_atlas"])[1],
    params:
        n=TENSOR_SETTINGS["region_parcels"],
        coverage="anatomical" if TENSOR_SETTINGS["region_atlas"] == "harvard-oxford" else "brain",
        code=code_version("atlas"),
    log:
        f"{LOGS}/atlas_regions.log",
    conda:
        "../../envs/func.yaml"
    threads: 1
    resources:
        mem_mb=2000,   # harvard-oxford: 1.2 GB peak (one 1 mm probability atlas at a time), measured at 3 mm
        runtime=10,
    shell:
        "{BRAINFUSE} func atlas --coverage {params.coverage} --gm {input.gm} --mask {input.mask} --output {output.nii}"
        " --output-tsv {output.tsv} --n-parcels {params.n} > {log} 2>&1"


rule tensors_gather:
    """Stack every cache and the participant tables: manifest.tsv, <modality>.npy, clinical.tsv, cohort.json."""
    input:
        tensors=all_unit_tensors,
        participants=PARTICIPANTS_TSV,
        tables=[t["path"] for t in TENSOR_SETTINGS["tables"].values()],
        atlas=REGION_ATLAS,
    output:
        # <modality>.npy and covariates.npy are written beside these (which modalities exist is known
        # only once the caches are; cohort.json lists them and load_cohort checks them).
        manifest=f"{TENSORS}/manifest.tsv",
        clinical=f"{TENSORS}/clinical.tsv",
        cohort=f"{TENSORS}/cohort.json",
    params:
        out_dir=TENSORS,
        settings=shlex.quote(json.dumps(TENSOR_SETTINGS, sort_keys=True)),
        units=" ".join(f"sub-{s}" + (f"_ses-{ses}" if ses else "") for s, ses in UNITS),
        atlas=lambda w, input: f"--atlas {input.atlas[0]} {input.atlas[1]}" if input.atlas else "",
        code=code_version("tensors"),
    log:
        f"{LOGS}/tensors_gather.log",
    conda:
        "../../envs/tensors.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    shell:
        # its WARNING lines (image QC flags, degenerate labels) are repeated on the console, not only in the log
        "{BRAINFUSE} tensors gather --out-dir {params.out_dir} --participants {input.participants}"
        " --params {params.settings} --units {params.units} {params.atlas} --tensors {input.tensors} > {log} 2>&1"
        " && (grep -h 'WARNING' {log} >&2 || true)"


STAGE_TARGETS["tensors"] = list(rules.tensors_gather.output)   # it requests every tensors_subject folder


rule tensors:
    """Cache every subject's tensors and gather the cohort."""
    input:
        STAGE_TARGETS["tensors"],
