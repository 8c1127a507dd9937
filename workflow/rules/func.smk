# func stage: see workflow/rules/common.smk for helpers (units_with, raw_images, STAGE_TARGETS).
# One job per BOLD run (src/brainfuse/func.py): motion correction, confounds, BOLD -> T1w -> MNI, denoising,
# ALFF/fALFF/ReHo, parcel time series and Fisher-z connectivity. The parcellation (rule atlas) is built once
# from the template (src/brainfuse/atlas.py). Wildcard {bold}: the run's entities, e.g. "task-rest_run-1"
# (brainfuse.layout.run_key). Names: brainfuse.layout (func_paths, atlas_paths) and ANAT, TEMPLATE_FILES (common.smk).
import os

from brainfuse.layout import parse_name
from brainfuse import resources as bf_resources

FUNC_SETTINGS = json.dumps(config["func"], sort_keys=True)
ATLAS_NII, ATLAS_TSV = layout.atlas_paths(TPL_ROOT, RES)   # the TSV's n_voxels differ by grid

wildcard_constraints:
    bold=layout.BOLD_RUN_REGEX,


# every output of one run; motion_qc: the confounds' sidecar (FD, largest rotation/translation)
FUNC_OUT = layout.func_paths(DERIV, "{subject}", SES, RES, "{bold}")
# per subject (session): the QC record of all its runs (brainfuse.stageqc; the tensors manifest and report read it)
FUNC_QC = layout.qc_path(DERIV, "{subject}", SES, "func")
FUNC_STRICT = "--strict" if config["strict"] else ""   # QC below threshold: fail (else WARNING + QC JSON flag)


def bold_runs(unit):
    """{entity string: raw BOLD path} of a unit, e.g. {"task-rest": ".../sub-01_task-rest_bold.nii.gz"}."""
    runs = {}
    for path in raw_images(unit, "bold"):
        runs[layout.run_key(parse_name(Path(path).name) or {})] = path
    return runs


def _func_bold(wildcards):
    runs = bold_runs(unit_of(wildcards))
    if wildcards.bold not in runs:
        raise WorkflowError(f"sub-{wildcards.subject}: no BOLD run with entities {wildcards.bold}")
    return {"bold": runs[wildcards.bold], "sidecar": runs[wildcards.bold].replace(".nii.gz", ".json")}


rule atlas:
    """atlas-brainfuse: k-means grey-matter parcels of the template, per hemisphere (no download)."""
    input:
        gm=TEMPLATE_FILES["GM"],
        mask=TEMPLATE_FILES["mask"],
    output:
        nii=ATLAS_NII,
        tsv=ATLAS_TSV,
    params:
        n=config["func"]["n_parcels"],
        code=code_version("atlas"),
    log:
        log_path("atlas", per_unit=False),
    conda:
        "../../envs/func.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    shell:
        "{BRAINFUSE} func atlas --gm {input.gm} --mask {input.mask} --output {output.nii} --output-tsv {output.tsv}"
        " --n-parcels {params.n} > {log} 2>&1"


rule func_run:
    """One BOLD run: motion, confounds, MNI, denoising, ALFF/fALFF/ReHo, connectivity, QC."""
    input:
        unpack(_func_bold),
        t1w=ANAT["preproc"],
        mask=ANAT["mask"],
        warp=ANAT["warp"],
        affine=ANAT["affine"],
        wm=ANAT["mni_WM"],
        csf=ANAT["mni_CSF"],
        template=TEMPLATE_FILES["T1w"],
        template_mask=TEMPLATE_FILES["mask"],
        atlas=ATLAS_NII,
        atlas_tsv=ATLAS_TSV,
    output:
        **FUNC_OUT,
    params:
        settings=FUNC_SETTINGS,
        res=RES,
        anat_dir=lambda wildcards, input: os.path.dirname(input.t1w),  # brainfuse.layout.to_mni_transforms
        code=code_version("func"),
        strict=FUNC_STRICT,
    log:
        log_path("func_run", run="{bold}"),
    conda:
        "../../envs/func.yaml"
    threads: config["threads"]
    resources:
        # from the BOLD series' size (brainfuse.resources, measured by benchmarks/bench_real.py)
        mem_mb=lambda wildcards, input: bf_resources.func(input.bold)["mem_mb"],
        runtime=lambda wildcards, input: bf_resources.func(input.bold)["runtime"],
    shell:
        "{BRAINFUSE} func --bold {input.bold} --t1w {input.t1w} --t1w-mask {input.mask}"
        " --anat-dir {params.anat_dir} --template {input.template} --template-mask {input.template_mask}"
        " --wm {input.wm} --csf {input.csf} --atlas {input.atlas} --atlas-tsv {input.atlas_tsv} --out-dir {DERIV}"
        " --resolution {params.res} --params '{params.settings}' --threads {threads} {params.strict} > {log} 2>&1"


def _func_qc_inputs(wildcards):
    """Every run's motion QC (<run>_desc-confounds_timeseries.json) of the unit."""
    unit = unit_of(wildcards)
    return [FUNC_OUT["motion_qc"].format(subject=unit[0], session=unit[1], bold=key) for key in sorted(bold_runs(unit))]


rule func_qc:
    """The subject's func QC JSON (qc_pass, flags, metrics, thresholds) from its runs' motion QC."""
    input:
        _func_qc_inputs,
    output:
        qc_json=FUNC_QC,
    params:
        code=code_version("stageqc"),
        strict=FUNC_STRICT,
    log:
        log_path("func_qc"),
    conda:
        "../../envs/func.yaml"
    threads: 1
    resources:
        mem_mb=500,
        runtime=5,
    shell:
        "{BRAINFUSE} qc --motion-qc {input} --output {output.qc_json} {params.strict} > {log} 2>&1"


def _func_targets():
    """Each run's QC figures and missing outputs (common.smk, job_targets), each unit's func QC JSON."""
    units = units_with("bold")
    figures = [FUNC_OUT["qc_motion"], FUNC_OUT["qc_carpet"]]
    out = [p for unit in units for key in sorted(bold_runs(unit))
           for p in job_targets(rules.func_run, [unit], figures, bold=key)]
    return out + job_targets(rules.func_qc, units, rules.func_qc.output)


STAGE_TARGETS["func"] = deferred_targets(_func_targets) + DERIV_TARGETS


rule func:
    """func stage for every BOLD run of every subject that has one."""
    input:
        STAGE_TARGETS["func"],
