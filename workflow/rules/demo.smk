# The embedded phantom dataset (src/brainfuse/phantom/generator.py), generated when no bids_dir/dicom_dir is given.
# Its BIDS images (demo_t1w, demo_dwi, demo_bold) and truth/bayes.json (DEMO_BAYES): common.smk.
DEMO_PARAMS = json.dumps(config["demo"], sort_keys=True)


rule demo_dataset:
    output:
        description=layout.bids_dataset_files(DEMO_PATHS["bids"])["description"],
        participants=layout.bids_dataset_files(DEMO_PATHS["bids"])["participants"],
        bayes=DEMO_BAYES,
        # head model + BOLD band-pass operator, built once here instead of in every subject job
        cache=DEMO_PATHS["cache"],
    params:
        demo=DEMO_PARAMS,
        code=code_version("phantom.generator"),
    log:
        f"{LOGS}/demo_dataset.log",
    conda:
        "../../envs/demo.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    shell:
        "{BRAINFUSE} demo --out-dir {DEMO} --what dataset --params '{params.demo}' > {log} 2>&1"


# One process per subject (rule demo_subject) generates all its modalities: the head model, the subject's
# anatomy and the imports are shared. T1w goes straight into BIDS; DWI and BOLD, which some subjects lack
# (a rule cannot declare outputs that may not exist), go to a staging folder, from where demo_dwi and
# demo_bold hard-link them into BIDS for the subjects that have them.
DEMO_STAGE = DEMO_PATHS["staging"]


def _link(staged, bids, extensions):
    """Params function: shell that hard-links the staged files to their BIDS names (copies across file
    systems), then touches them so that they are newer than the staging folder's timestamp."""
    def command(wildcards):
        pairs = [(staged.format(subject=wildcards.subject).replace(".nii.gz", e),
                  bids.format(subject=wildcards.subject).replace(".nii.gz", e)) for e in extensions]
        return " && ".join(f"(ln -f {src} {dst} 2>/dev/null || cp -f {src} {dst}) && touch {dst}" for src, dst in pairs)

    return command


rule demo_subject:
    input:
        rules.demo_dataset.output.bayes,
        rules.demo_dataset.output.cache,
    output:
        image=demo_t1w,
        sidecar=demo_t1w.replace(".nii.gz", ".json"),
        stage=directory(layout.bids_subject_dir(DEMO_STAGE, "{subject}")),
    params:
        demo=DEMO_PARAMS,
        code=code_version("phantom.generator"),
    log:
        f"{LOGS}/demo_subject/sub-{{subject}}.log",
    conda:
        "../../envs/demo.yaml"
    threads: 1
    resources:
        mem_mb=3000,
        runtime=10,
    shell:
        "mkdir -p {output.stage} && {BRAINFUSE} demo --out-dir {DEMO} --what subject --subject {wildcards.subject}"
        " --stage {DEMO_STAGE} --params '{params.demo}' > {log} 2>&1"


_stage_dwi = bids_path(DEMO_STAGE, "{subject}", "dwi", "dwi", dir="AP")
_stage_bold = bids_path(DEMO_STAGE, "{subject}", "func", "bold", task="rest")


rule demo_dwi:
    input:
        rules.demo_subject.output.stage,
    output:
        image=demo_dwi,
        sidecar=demo_dwi.replace(".nii.gz", ".json"),
        bval=demo_dwi.replace(".nii.gz", ".bval"),
        bvec=demo_dwi.replace(".nii.gz", ".bvec"),
    params:
        code=code_version("phantom.generator"),
        link=_link(_stage_dwi, demo_dwi, (".nii.gz", ".json", ".bval", ".bvec")),
    log:
        f"{LOGS}/demo_dwi/sub-{{subject}}.log",
    conda:
        "../../envs/demo.yaml"
    threads: 1
    resources:
        mem_mb=100,
        runtime=2,
    shell:
        "({params.link}) > {log} 2>&1"


rule demo_bold:
    input:
        rules.demo_subject.output.stage,
    output:
        image=demo_bold,
        sidecar=demo_bold.replace(".nii.gz", ".json"),
    params:
        code=code_version("phantom.generator"),
        link=_link(_stage_bold, demo_bold, (".nii.gz", ".json")),
    log:
        f"{LOGS}/demo_bold/sub-{{subject}}.log",
    conda:
        "../../envs/demo.yaml"
    threads: 1
    resources:
        mem_mb=100,
        runtime=2,
    shell:
        "({params.link}) > {log} 2>&1"


def _demo_subject_images(wildcards):
    unit = (wildcards.subject, None)
    return [p for m in ("T1w", "dwi", "bold") for p in raw_images(unit, m)]


rule demo_dicom:
    """DICOM export (fake identifying headers) of a few subjects, input of the convert tests and demo."""
    input:
        _demo_subject_images,
    output:
        directory(bf_demo.dicom_dir(DEMO, "{subject}")),
    params:
        demo=DEMO_PARAMS,
        code=code_version("phantom.generator"),
    log:
        f"{LOGS}/demo_dicom/sub-{{subject}}.log",
    conda:
        "../../envs/demo.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    shell:
        "{BRAINFUSE} demo --out-dir {DEMO} --what dicom --subject {wildcards.subject}"
        " --params '{params.demo}' > {log} 2>&1"


if MODE == "demo":
    _cohort = [s for s in bf_demo.plan(config["demo"]) if (s.label, None) in AVAILABILITY]
    STAGE_TARGETS["demo"] = (
        list(rules.demo_dataset.output)
        + job_outputs(rules.demo_subject, UNITS)
        + job_outputs(rules.demo_dwi, [u for u in UNITS if "dwi" in MODALITIES and AVAILABILITY[u]["dwi"]])
        + job_outputs(rules.demo_bold, [u for u in UNITS if "bold" in MODALITIES and AVAILABILITY[u]["bold"]])
        + job_outputs(rules.demo_dicom, [(s.label, None) for s in _cohort if s.dicom])
    )


rule demo:
    """Generate the demo dataset only."""
    input:
        STAGE_TARGETS.get("demo", []),
