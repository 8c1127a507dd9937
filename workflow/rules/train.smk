# train / evaluate / predict: participant-grouped CV of the MoE presets (src/brainfuse/train.py, models.py,
# evaluate.py, predict.py). Helpers (units_with, STAGE_TARGETS, LOGS, DIRS, TENSORS) are in common.smk; names from
# brainfuse.layout.
import shlex


# The leakage canary (cv.permute_labels) writes beside the real results, never over them.
_CANARY = "/permuted" if config["cv"]["permute_labels"] else ""
MODELS = f"{DIRS['models']}{_CANARY}"
REPORTS = f"{DIRS['reports']}{_CANARY}"
TRAIN_PRESETS = config["model"]["presets"]
FOLDS = list(range(config["cv"]["n_folds"]))
# Only the cv section feeds the splits: changing epochs must not redraw them.
CV_SETTINGS = shlex.quote(json.dumps({"cv": config["cv"]}, sort_keys=True))
# Job resources do not change a model: moving training to other nodes must not rerun it.
_JOB_KEYS = {"threads", "mem_mb", "runtime", "gpus", "partition"}
_MODEL = {k: v for k, v in config["model"].items() if k not in _JOB_KEYS}
TRAIN_SETTINGS = shlex.quote(json.dumps({"model": _MODEL, "cv": config["cv"]}, sort_keys=True))


def model_job_resources():
    """Cluster resources of the training and predict jobs, from the model section (never the SLURM profile):
    a GPU (gres, which the slurm plugin passes to sbatch) only when model.device asks for CUDA, so that CPU-only
    clusters, which refuse a gres request, train too; the partition only when model.partition names one."""
    m = config["model"]
    res = {"mem_mb": m["mem_mb"], "runtime": m["runtime"]}
    if m["device"].startswith("cuda"):
        if not m["gpus"]:
            raise WorkflowError(f"config model.device is {m['device']!r} but model.gpus is 0: "
                                "set model.gpus >= 1, or model.device to cpu or auto")
        res["gres"] = f"gpu:{m['gpus']}"
    if m["partition"]:
        res["slurm_partition"] = m["partition"]
    return res


MODEL_JOB_RESOURCES = model_job_resources()
COHORT = [f"{TENSORS}/cohort.json", f"{TENSORS}/manifest.tsv"]
_fold_dir = layout.fold_dir(MODELS, "{preset}", "{fold}")

wildcard_constraints:
    preset="|".join(TRAIN_PRESETS),   # the schema checks the names; moe.py (torch) is not imported at parse time
    fold=r"\d+",


rule splits:
    """Stratified k-fold split grouped by participant (or cv.group_by), with an inner validation set."""
    input:
        COHORT,
    output:
        f"{MODELS}/splits.tsv",
    params:
        settings=CV_SETTINGS,
        code=code_version("train"),
    log:
        f"{LOGS}/splits{_CANARY.replace('/', '_')}.log",
    conda:
        "../../envs/train.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    shell:
        "{BRAINFUSE} train splits --tensors {TENSORS} --params {params.settings} --output {output} > {log} 2>&1"


rule train_fold:
    """One preset on one fold; resumes from resume.pt in its folder after an interruption."""
    input:
        COHORT,
        splits=rules.splits.output,
    output:
        **layout.fold_paths(MODELS, "{preset}", "{fold}"),   # checkpoint, predictions
    params:
        settings=TRAIN_SETTINGS,
        device=config["model"]["device"],
        outdir=_fold_dir,
        code=code_version("train"),
    log:
        f"{LOGS}/train_fold{_CANARY.replace('/', '_')}/{{preset}}_fold-{{fold}}.log",
    conda:
        "../../envs/train.yaml"
    # = the CPUs asked from SLURM (the plugin's cpus-per-task) and torch's thread count (--threads)
    threads: config["model"]["threads"]
    resources:
        **MODEL_JOB_RESOURCES,
    shell:
        "{BRAINFUSE} train fold --tensors {TENSORS} --splits {input.splits} --fold {wildcards.fold}"
        " --preset {wildcards.preset} --params {params.settings} --device {params.device}"
        " --threads {threads} --out-dir {params.outdir} > {log} 2>&1"
        " && (grep -h 'WARNING' {log} >&2 || true)"     # e.g. a damaged resume file ignored: said on the console


rule evaluate_cv:
    """Metrics with bootstrap CIs, baselines, missing-modality grid and summary, ablations, ROC, calibration,
    connectivity and utilisation plots (captions: workflow/report/)."""
    input:
        COHORT,
        splits=rules.splits.output,
        models=expand(rules.train_fold.output.checkpoint, preset=TRAIN_PRESETS, fold=FOLDS),
        predictions=expand(rules.train_fold.output.predictions, preset=TRAIN_PRESETS, fold=FOLDS),
        bayes=DEMO_BAYES if MODE == "demo" else [],
    output:
        results=report(f"{REPORTS}/results.tsv", caption="../report/results.rst", category="Results",
                       labels={"table": "metrics (long format)"}),
        predictions=f"{REPORTS}/predictions.tsv",
        summary=f"{REPORTS}/summary.json",
        figures=report(directory(f"{REPORTS}/figures"), patterns=["{name}.png"], category="Results",
                       caption="../report/figures.rst",   # one caption per figure, chosen by {name}
                       labels={"figure": "{name}"}),
    params:
        settings=TRAIN_SETTINGS,
        presets=" ".join(TRAIN_PRESETS),
        bayes=lambda w, input: f"--bayes {input.bayes}" if input.bayes else "",
        code=code_version("evaluate"),
    log:
        f"{LOGS}/evaluate{_CANARY.replace('/', '_')}.log",
    conda:
        "../../envs/train.yaml"
    threads: 2
    resources:
        mem_mb=4000,
        runtime=60,
    shell:
        "{BRAINFUSE} evaluate --tensors {TENSORS} --splits {input.splits} --models {MODELS}"
        " --presets {params.presets} --params {params.settings} {params.bayes} --threads {threads}"
        " --out-dir {REPORTS} > {log} 2>&1"
        " && (grep -h 'WARNING' {log} >&2 || true)"     # rows flagged by image QC: said on the console


def qc_figures(wildcards=None):
    """Preprocessing QC PNGs (DERIV/sub-*/figures/) among the stages' targets, for the HTML report. Called when
    the DAG is built (an input function), once every stage has filled STAGE_TARGETS: include order does not
    matter."""
    return sorted({f for s in ("anat", "dwi", "func") for f in STAGE_TARGETS.get(s, [])
                   if isinstance(f, str) and "/figures/" in f and f.endswith(".png")})


rule report_qc:
    """Collect the preprocessing QC images into one folder flagged for `snakemake --report`."""
    input:
        qc_figures,
    output:
        report(directory(f"{DIRS['reports']}/qc"), patterns=["{name}.png"], category="Preprocessing QC",
               caption="../report/qc.rst",
               labels={"figure": "{name}"}),
    params:
        code=code_version("evaluate"),
    log:
        f"{LOGS}/report_qc.log",
    conda:
        "../../envs/train.yaml"
    threads: 1
    resources:
        mem_mb=500,
        runtime=5,
    shell:
        "(mkdir -p {output} && cp {input} {output}/) > {log} 2>&1"


# Predict: the CV models (one per fold, probabilities averaged) of model.predict_preset (default: the best
# preset of this run's evaluation) applied to every row of this dataset's tensors, labelled or not.
# With model.predict_from, models trained in another run are used and nothing is trained here.
PREDICT_FROM = config["model"]["predict_from"]
if PREDICT_FROM and not config["model"]["predict_preset"]:
    raise WorkflowError("config model.predict_from is set: also set model.predict_preset (the preset to use)")


rule predict:
    """Class probabilities (or values) with per-expert weights for every subject in the tensors."""
    input:
        COHORT,
        models=([] if PREDICT_FROM else
                expand(rules.train_fold.output.checkpoint, preset=TRAIN_PRESETS, fold=FOLDS)),
        summary=[] if PREDICT_FROM or config["model"]["predict_preset"] else rules.evaluate_cv.output.summary,
    output:
        f"{DIRS['predictions']}/predictions{_CANARY.replace('/', '_')}.tsv",
    params:
        models=PREDICT_FROM or MODELS,
        preset=config["model"]["predict_preset"] or "best",
        summary=lambda w, input: f"--summary {input.summary}" if input.summary else "",
        device=config["model"]["device"],
        code=code_version("predict"),
    log:
        f"{LOGS}/predict{_CANARY.replace('/', '_')}.log",
    conda:
        "../../envs/train.yaml"
    threads: config["model"]["threads"]     # torch reads OMP_NUM_THREADS, which Snakemake sets to this
    resources:
        **MODEL_JOB_RESOURCES,
    shell:
        "{BRAINFUSE} predict --tensors {TENSORS} --models {params.models} --preset {params.preset}"
        " {params.summary} --device {params.device} --output {output} > {log} 2>&1"


if PREDICT_FROM:
    STAGE_TARGETS["train"] = []
    STAGE_TARGETS["evaluate"] = rules.predict.output
else:
    STAGE_TARGETS["train"] = expand(rules.train_fold.output, preset=TRAIN_PRESETS, fold=FOLDS)
    STAGE_TARGETS["evaluate"] = list(rules.evaluate_cv.output) + [
        lambda wildcards: list(rules.report_qc.output) if qc_figures() else []]


rule train:
    """Train every preset on every fold."""
    input:
        STAGE_TARGETS["train"],


rule evaluate:
    """Evaluation, report assets (and predictions with model.predict_from)."""
    input:
        STAGE_TARGETS["evaluate"],
