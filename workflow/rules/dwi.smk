# dwi stage: see workflow/rules/common.smk for helpers (units_with, raw_images, STAGE_TARGETS).
# One job per subject (session) corrects every DWI run together, fits the tensor and normalises the maps
# (src/brainfuse/dwi.py). Per-run outputs (desc-preproc dwi/bval/bvec, desc-motion timeseries) are written
# too; only the subject-level files are declared because run entities differ between subjects.
# Names: brainfuse.layout.dwi_paths (DWI) and ANAT, TEMPLATE_FILES (common.smk).
from brainfuse import resources as bf_resources

DWI_SETTINGS = json.dumps(config["dwi"], sort_keys=True)
DWI = layout.dwi_paths(DERIV, "{subject}", SES, RES)
DWI_QC = [DWI["qc_fa"], DWI["qc_motion"]]


# every run of the unit with its .bval/.bvec (a lambda: the linter wants functions in common.smk)
dwi_inputs = lambda wildcards: [f for r in sorted(raw_images(unit_of(wildcards), "dwi"))
                                for f in (r, r.replace(".nii.gz", ".bval"), r.replace(".nii.gz", ".bvec"))]


rule dwi_subject:
    """Motion/eddy correction with b-vector rotation, dipy tensor fit, FA/MD/AD/RD to the template."""
    input:
        dwi=dwi_inputs,
        t1w=ANAT["preproc"],
        mask=ANAT["mask"],
        warp=ANAT["warp"],
        affine=ANAT["affine"],
        template=TEMPLATE_FILES["T1w"],
    output:
        maps=[DWI[m] for m in layout.DWI_MAPS],
        mni=[DWI[f"mni_{m}"] for m in layout.DWI_MAPS],
        xfm=DWI["xfm"],
        qc=DWI_QC,
        qc_json=DWI["qc_json"],   # QC record (brainfuse.stageqc): manifest, report
    params:
        runs=lambda wildcards, input: " ".join(r for r in input.dwi if r.endswith((".nii", ".nii.gz"))),
        ses=lambda wildcards: f"--session {wildcards.session}" if HAS_SESSIONS else "",
        settings=DWI_SETTINGS,
        res=RES,
        code=code_version("dwi"),
        strict="--strict" if config["strict"] else "",   # QC below threshold: fail (else WARNING + QC JSON flag)
    log:
        log_path("dwi_subject"),
    conda:
        "../../envs/dwi.yaml"
    threads: config["threads"]
    resources:
        # from the DWI runs' size (brainfuse.resources, measured by benchmarks/bench_real.py)
        mem_mb=lambda wildcards, input: bf_resources.dwi(input.dwi)["mem_mb"],
        runtime=lambda wildcards, input: bf_resources.dwi(input.dwi)["runtime"],
    shell:
        "{BRAINFUSE} dwi --dwi {params.runs} --subject {wildcards.subject} {params.ses} --out-dir {DERIV}"
        " --t1w {input.t1w} --t1w-mask {input.mask} --transforms {input.warp} {input.affine}"
        " --template {input.template} --resolution {params.res} --params '{params.settings}' --threads {threads}"
        " {params.strict} > {log} 2>&1"


STAGE_TARGETS["dwi"] = deferred_targets(lambda: job_targets(rules.dwi_subject, units_with("dwi"), DWI_QC)) + DERIV_TARGETS


rule dwi:
    """DWI stage for every subject with diffusion data."""
    input:
        STAGE_TARGETS["dwi"],
