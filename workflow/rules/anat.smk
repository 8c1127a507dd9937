# anat stage: template files (<output_dir>/templates/, from nilearn) and per-subject N4 / skull stripping / MNI / tissues
# (src/brainfuse/templates.py, src/brainfuse/anat.py). Helpers, RES and the path patterns TEMPLATE_FILES and ANAT
# (brainfuse.layout): workflow/rules/common.smk.
from brainfuse import resources as bf_resources

ANAT_PARAMS = json.dumps(config["anat"], sort_keys=True)


rule templates:
    """MNI152NLin2009aSym T1w, brain mask, GM/WM/CSF and a head registration target at resolution_mm."""
    output:
        **TEMPLATE_FILES,
    params:
        code=code_version("templates"),
        res=RES,
    log:
        log_path("templates", per_unit=False),
    conda:
        "../../envs/anat.yaml"
    threads: 1
    resources:
        mem_mb=3000,
        runtime=10,
    shell:
        "{BRAINFUSE} templates --resolution {params.res} --out-dir {TPL_ROOT} > {log} 2>&1"


# BIDS derivatives need a dataset_description.json (DatasetType, GeneratedBy): every stage that writes into
# DERIV names it among its targets (DERIV_TARGETS, common.smk). Run as a module (standard library only), not a
# `brainfuse` command.


rule derivatives_description:
    """derivatives/brainfuse/dataset_description.json: DatasetType derivative, GeneratedBy (version and source
    hash), SourceDatasets (the BIDS input)."""
    output:
        DERIV_DESCRIPTION,
    params:
        code=code_version("derivatives"),
        sources=source_hash(),     # every source file: the version it records (no job reads this file)
        source_dir=BIDS_DIR,
    log:
        log_path("derivatives_description", per_unit=False),
    conda:
        "../../envs/anat.yaml"
    threads: 1
    resources:
        mem_mb=500,
        runtime=5,
    shell:
        "{BRAINFUSE}.derivatives --source-dir {params.source_dir:q} --code {params.sources} --output {output:q}"
        " > {log} 2>&1"


rule anat_subject:
    """N4, brain mask, GM/WM/CSF, affine + SyN to the template, MNI maps, log-Jacobian and QC of one T1w."""
    input:
        t1w=t1w_input,
        templates=list(TEMPLATE_FILES.values()),
    output:
        **ANAT,   # QC PNGs reach the HTML report through report_qc ("Preprocessing QC"), with dwi's and func's;
                  # qc_json: the QC record (brainfuse.stageqc) the tensors manifest and the report read
    params:
        code=code_version("anat"),
        anat=ANAT_PARAMS,
        session=lambda w: f"--session {w.session}" if HAS_SESSIONS else "",
        deriv=DERIV,
        tpl_dir=layout.template_dir(TPL_ROOT),
        res=RES,
        strict="--strict" if config["strict"] else "",   # QC below threshold: fail (else WARNING + QC JSON flag)
    log:
        log_path("anat_subject"),
    conda:
        "../../envs/anat.yaml"
    threads: config["threads"]
    resources:
        # from the T1w's size (brainfuse.resources, measured by benchmarks/bench_real.py)
        mem_mb=lambda wildcards, input: bf_resources.anat(input.t1w)["mem_mb"],
        runtime=lambda wildcards, input: bf_resources.anat(input.t1w)["runtime"],
    shell:
        "{BRAINFUSE} anat --t1w {input.t1w} --out-dir {params.deriv} --subject {wildcards.subject} {params.session}"
        " --template-dir {params.tpl_dir} --resolution {params.res} --threads {threads} --params '{params.anat}'"
        " {params.strict} > {log} 2>&1"


STAGE_TARGETS["anat"] = deferred_targets(
    lambda: job_targets(rules.anat_subject, units_with("T1w"), [ANAT["qc_mask"], ANAT["qc_reg"]])) + DERIV_TARGETS


rule anat:
    """Run the anat stage for every subject (session) with a T1w image."""
    input:
        STAGE_TARGETS["anat"],
