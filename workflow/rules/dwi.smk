# dwi stage: see workflow/rules/common.smk for helpers (bpath, units_with, raw_images, STAGE_TARGETS).
# One job per subject (session) corrects every DWI run together, fits the tensor and normalises the maps
# (src/brainfuse/dwi.py). Per-run outputs (desc-preproc dwi/bval/bvec, desc-motion timeseries) are written
# too; only the subject-level files are declared because run entities differ between subjects.
from brainfuse import resources as bf_resources
from brainfuse import templates as bf_templates

DWI_RES = int(config["resolution_mm"])
DWI_SETTINGS = json.dumps(config["dwi"], sort_keys=True)
_dwi_map = lambda space, p, **e: bpath(DERIV, "dwi", f"param-{p}_dwimap", space=space, model="tensor", **e)
DWI_MNI = [_dwi_map(TEMPLATE, p, res=DWI_RES) for p in ("fa", "md", "ad", "rd")]
DWI_QC = [bpath(DERIV, "figures", "dwi", ".png", desc=d) for d in ("fa", "motion")]


# every run of the unit with its .bval/.bvec (a lambda: the linter wants functions in common.smk)
dwi_inputs = lambda wildcards: [f for r in sorted(raw_images(unit_of(wildcards), "dwi"))
                                for f in (r, r.replace(".nii.gz", ".bval"), r.replace(".nii.gz", ".bvec"))]


rule dwi_subject:
    """Motion/eddy correction with b-vector rotation, dipy tensor fit, FA/MD/AD/RD to the template."""
    input:
        dwi=dwi_inputs,
        t1w=bpath(DERIV, "anat", "T1w", desc="preproc"),
        mask=bpath(DERIV, "anat", "mask", desc="brain"),
        warp=bpath(DERIV, "anat", "xfm", **{"from": "T1w", "to": TEMPLATE, "mode": "image", "desc": "warp"}),
        affine=bpath(DERIV, "anat", "xfm", ".mat", **{"from": "T1w", "to": TEMPLATE, "mode": "image", "desc": "affine"}),
        template=bf_templates.template_path(TPL_ROOT, DWI_RES, "T1w"),
    output:
        maps=[_dwi_map("dwi", p) for p in ("fa", "md", "ad", "rd")],
        mni=DWI_MNI,
        xfm=bpath(DERIV, "dwi", "xfm", ".mat", **{"from": "dwi", "to": "T1w", "mode": "image"}),
        qc=DWI_QC,
        qc_json=bpath(DERIV, "dwi", "dwi", ".json", desc="qc"),   # QC record (brainfuse.stageqc): manifest, report
    params:
        runs=lambda wildcards, input: " ".join(r for r in input.dwi if r.endswith((".nii", ".nii.gz"))),
        ses=lambda wildcards: f"--session {wildcards.session}" if HAS_SESSIONS else "",
        settings=DWI_SETTINGS,
        res=DWI_RES,
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
