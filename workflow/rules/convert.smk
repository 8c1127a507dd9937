# convert stage: DICOM -> BIDS with dcm2niix (src/brainfuse/convert.py), de-identified, with a manifest of
# every series found. In DICOM mode the per-subject job is a checkpoint: which images a subject has is
# known only once it has run, and downstream stages ask `raw_images(unit, modality)`, which reads its
# manifest through `converted_images` (common.smk, with `deferred_targets`), within the same snakemake invocation.
# In demo mode the target converts the demo's DICOM export back and checks it against the demo's BIDS
# images; in BIDS mode there is nothing to convert.
import shlex

from brainfuse import resources as bf_resources

CONVERT_PARAMS = shlex.quote(json.dumps(config["convert"], sort_keys=True))
DEMO_CONVERTED = DEMO_PATHS["converted"]
_CONVERT_SHELL = (
    "{BRAINFUSE} convert --dicom-dir {input.dicom:q} --bids-dir {params.root:q} --subject {wildcards.subject}"
    " --manifest {output.manifest:q} --params {params.convert} > {log:q} 2>&1"
)


def _manifest(root):
    return layout.convert_manifest(root, "{subject}")


def _dataset_outputs(root):
    return layout.bids_dataset_files(root)


if MODE == "dicom":
    # Subject label -> folder (common.smk made the labels from these folder names).
    _DICOM_FOLDERS = {folder_label(p): str(p) for p in Path(config["dicom_dir"]).iterdir() if p.is_dir()}

    checkpoint convert_subject:
        input:
            dicom=lambda w: _DICOM_FOLDERS[w.subject],
        output:
            bids=directory(layout.bids_subject_dir(BIDS_DIR, "{subject}")),
            manifest=_manifest(BIDS_DIR),
        params:
            root=BIDS_DIR,
            convert=CONVERT_PARAMS,
            code=code_version("convert"),
        log:
            log_path("convert_subject"),
        conda:
            "../../envs/convert.yaml"
        threads: 1
        resources:
            mem_mb=bf_resources.CONVERT["mem_mb"],
            runtime=bf_resources.CONVERT["runtime"],
        shell:
            _CONVERT_SHELL

    _CONVERT_ROOT, _CONVERT_SUBJECTS = BIDS_DIR, [s for s, _ in UNITS]
    _CLINICAL = config["participants_tsv"]

elif MODE == "demo":
    _CONVERT_SUBJECTS = [s.label for s in bf_demo.plan(config["demo"]) if s.dicom and (s.label, None) in AVAILABILITY]
    _CONVERT_ROOT = DEMO_CONVERTED if _CONVERT_SUBJECTS else None      # demo.dicom_subjects may be 0
    _CLINICAL = layout.bids_dataset_files(DEMO_PATHS["bids"])["participants"]

    rule convert_demo_subject:
        """The demo's DICOM export of a subject, converted back (same command as for real DICOM)."""
        input:
            dicom=bf_demo.dicom_dir(DEMO, "{subject}"),
        output:
            bids=directory(layout.bids_subject_dir(DEMO_CONVERTED, "{subject}")),
            manifest=_manifest(DEMO_CONVERTED),
        params:
            root=DEMO_CONVERTED,
            convert=CONVERT_PARAMS,
            code=code_version("convert"),
        log:
            log_path("convert_demo_subject"),
        conda:
            "../../envs/convert.yaml"
        threads: 1
        resources:
            mem_mb=bf_resources.CONVERT["mem_mb"],
            runtime=bf_resources.CONVERT["runtime"],
        shell:
            _CONVERT_SHELL

    rule convert_demo_verify:
        """Round trip: converted images equal the demo's BIDS images, no fake identity in any output."""
        input:
            manifests=expand(_manifest(DEMO_CONVERTED), subject=_CONVERT_SUBJECTS),
            converted=expand(layout.bids_subject_dir(DEMO_CONVERTED, "{subject}"), subject=_CONVERT_SUBJECTS),
            reference=[p for s in _CONVERT_SUBJECTS for m in MODALITIES for p in raw_images((s, None), m)],
        output:
            layout.convert_verification(DEMO_CONVERTED),
        params:
            # written by rule demo_dicom next to the export
            identity=[bf_demo.identity_path(DEMO, s) for s in _CONVERT_SUBJECTS],
            converted=DEMO_CONVERTED,
            reference=DEMO_PATHS["bids"],
            code=code_version("convert"),
        log:
            log_path("convert_demo_verify", per_unit=False),
        conda:
            "../../envs/convert.yaml"
        threads: 1
        resources:
            mem_mb=2000,
            runtime=10,
        shell:
            "{BRAINFUSE} convert verify --converted {params.converted:q} --reference {params.reference:q}"
            " --manifests {input.manifests:q} --identity {params.identity:q} --output {output:q} > {log:q} 2>&1"

else:
    _CONVERT_ROOT, _CONVERT_SUBJECTS, _CLINICAL = None, [], None


if _CONVERT_ROOT:

    rule convert_dataset:
        """dataset_description.json, participants.tsv (merged with the clinical table), merged manifest."""
        input:
            manifests=expand(_manifest(_CONVERT_ROOT), subject=_CONVERT_SUBJECTS),
            clinical=[_CLINICAL] if _CLINICAL else [],
        output:
            **_dataset_outputs(_CONVERT_ROOT),
        params:
            root=_CONVERT_ROOT,
            clinical=f"--participants-tsv {shlex.quote(_CLINICAL)}" if _CLINICAL else "",
            code=code_version("convert"),
        log:
            log_path("convert_dataset", per_unit=False),
        conda:
            "../../envs/convert.yaml"
        threads: 1
        resources:
            mem_mb=2000,
            runtime=10,
        shell:
            "{BRAINFUSE} convert dataset --bids-dir {params.root:q} --subject-manifests {input.manifests:q}"
            " --manifest {output.manifest:q} {params.clinical} > {log:q} 2>&1"

    _convert_rule = rules.convert_subject if MODE == "dicom" else rules.convert_demo_subject
    STAGE_TARGETS["convert"] = list(_dataset_outputs(_CONVERT_ROOT).values()) + (
        [layout.convert_verification(DEMO_CONVERTED)] if MODE == "demo" else []
    ) + job_outputs(_convert_rule, [(s, None) for s in _CONVERT_SUBJECTS])
else:
    STAGE_TARGETS["convert"] = []


rule convert:
    """Convert DICOM to BIDS (DICOM mode), or check the demo's DICOM round trip (demo mode)."""
    input:
        STAGE_TARGETS["convert"],
