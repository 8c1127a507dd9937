# The embedded phantom dataset (src/brainfuse/demo.py), generated when no bids_dir/dicom_dir is given.
DEMO_PARAMS = json.dumps(config["demo"], sort_keys=True)
demo_t1w = bids_path(f"{DEMO}/bids", "{subject}", "anat", "T1w")
demo_dwi = bids_path(f"{DEMO}/bids", "{subject}", "dwi", "dwi", dir="AP")
demo_bold = bids_path(f"{DEMO}/bids", "{subject}", "func", "bold", task="rest")


rule demo_dataset:
    output:
        description=f"{DEMO}/bids/dataset_description.json",
        participants=f"{DEMO}/bids/participants.tsv",
        bayes=f"{DEMO}/truth/bayes.json",
    params:
        demo=DEMO_PARAMS,
        code=code_version("demo"),
    log:
        f"{LOGS}/demo_dataset.log",
    conda:
        "../../envs/demo.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    shell:
        "{BRAINFUSE} demo --out {DEMO} --what dataset --params '{params.demo}' > {log} 2>&1"


rule demo_T1w:
    output:
        image=demo_t1w,
        sidecar=demo_t1w.replace(".nii.gz", ".json"),
    params:
        demo=DEMO_PARAMS,
        code=code_version("demo"),
    log:
        f"{LOGS}/demo_T1w/sub-{{subject}}.log",
    conda:
        "../../envs/demo.yaml"
    group:
        "demo"
    threads: 1
    resources:
        mem_mb=3000,
        runtime=10,
    shell:
        "{BRAINFUSE} demo --out {DEMO} --what subject --subject {wildcards.subject} --modality T1w"
        " --params '{params.demo}' > {log} 2>&1"


rule demo_dwi:
    output:
        image=demo_dwi,
        sidecar=demo_dwi.replace(".nii.gz", ".json"),
        bval=demo_dwi.replace(".nii.gz", ".bval"),
        bvec=demo_dwi.replace(".nii.gz", ".bvec"),
    params:
        demo=DEMO_PARAMS,
        code=code_version("demo"),
    log:
        f"{LOGS}/demo_dwi/sub-{{subject}}.log",
    conda:
        "../../envs/demo.yaml"
    group:
        "demo"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=10,
    shell:
        "{BRAINFUSE} demo --out {DEMO} --what subject --subject {wildcards.subject} --modality dwi"
        " --params '{params.demo}' > {log} 2>&1"


rule demo_bold:
    output:
        image=demo_bold,
        sidecar=demo_bold.replace(".nii.gz", ".json"),
    params:
        demo=DEMO_PARAMS,
        code=code_version("demo"),
    log:
        f"{LOGS}/demo_bold/sub-{{subject}}.log",
    conda:
        "../../envs/demo.yaml"
    group:
        "demo"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=10,
    shell:
        "{BRAINFUSE} demo --out {DEMO} --what subject --subject {wildcards.subject} --modality bold"
        " --params '{params.demo}' > {log} 2>&1"


def _demo_subject_images(wildcards):
    unit = (wildcards.subject, None)
    return [p for m in ("T1w", "dwi", "bold") for p in raw_images(unit, m)]


rule demo_dicom:
    """DICOM export (fake identifying headers) of a few subjects, input of the convert tests and demo."""
    input:
        _demo_subject_images,
    output:
        directory(f"{DEMO}/dicom/{{subject}}"),
    params:
        demo=DEMO_PARAMS,
        code=code_version("demo"),
    log:
        f"{LOGS}/demo_dicom/sub-{{subject}}.log",
    conda:
        "../../envs/demo.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    shell:
        "{BRAINFUSE} demo --out {DEMO} --what dicom --subject {wildcards.subject}"
        " --params '{params.demo}' > {log} 2>&1"


if MODE == "demo":
    _cohort = [s for s in bf_demo.plan(config["demo"]) if (s.label, None) in AVAILABILITY]
    STAGE_TARGETS["demo"] = (
        rules.demo_dataset.output
        + [p for u in UNITS for m in MODALITIES for p in raw_images(u, m)]
        + [f"{DEMO}/dicom/{s.label}" for s in _cohort if s.dicom]
    )


rule demo:
    """Generate the demo dataset only."""
    input:
        STAGE_TARGETS.get("demo", []),
