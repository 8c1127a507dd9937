"""Where brainfuse writes and what it reads (issue #21): the BIDS-derivatives dataset_description.json, template
and atlas files under the output root keyed by resolution, and the tabular-only input mode. One layout module
(issue #22, brainfuse.layout) names every path, for the rules and the library alike."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from brainfuse import config, derivatives, layout, provenance, tensors
from brainfuse.layout import TEMPLATE
from brainfuse.errors import BrainfuseError
from brainfuse.phantom import generator as bf_demo
from conftest import REPO, job_counts
from test_bad_input_workflow import make_bids, refused


def snakemake(*args):
    return subprocess.run([sys.executable, "-m", "snakemake", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True)


# ------------------------------------------------------------------------- derivatives dataset_description
def check_against_bids_schema(desc: dict):
    """The BIDS schema's rules for a dataset_description.json (required fields, and GeneratedBy for a
    derivative) and each field's JSON type."""
    import jsonschema
    from bidsschematools import schema

    bids = schema.load_schema()
    rules = bids.rules.json.dataset
    required = [f for rule in (rules.dataset_description, rules.derivative_description)
                for f, level in rule.fields.items() if level == "required"]
    assert {"Name", "BIDSVersion", "GeneratedBy"} <= set(required)
    assert set(required) <= set(desc), set(required) - set(desc)
    for field, value in desc.items():
        spec = bids.objects.metadata[field].to_dict()
        jsonschema.validate(value, spec, format_checker=jsonschema.FormatChecker())


def test_derivatives_description_is_bids_valid_light_and_byte_identical(tmp_path):
    source = make_bids(tmp_path / "bids", {"01": ("T1w",)})
    out = tmp_path / "derivatives" / "brainfuse" / "dataset_description.json"
    desc = derivatives.write(out, source)
    first = out.read_bytes()
    check_against_bids_schema(desc)
    assert desc["DatasetType"] == "derivative" and desc["SourceDatasets"] == [{"URL": source.resolve().as_uri()}]
    by = desc["GeneratedBy"][0]
    assert by["Name"] == "brainfuse" and re.fullmatch(r"\d+\.\d+\.\d+\+code\.[0-9a-f]{12}", by["Version"])
    # pybids reads the folder as a derivatives dataset of the input (it refuses one without GeneratedBy)
    import bids

    layout = bids.BIDSLayout(source, derivatives=str(out.parent), validate=False)
    assert list(layout.derivatives) == ["brainfuse"]
    # the rule's command: same input and code, same bytes; standard library only (it runs in every imaging run)
    proc = subprocess.run([sys.executable, "-c", "import sys; from brainfuse.derivatives import cli; "
                           f"cli(['--source-dir', {str(source)!r}, '--output', {str(out)!r}]); "
                           "assert not {'numpy', 'pandas'} & set(sys.modules), sorted(sys.modules)"],
                          cwd=REPO, env={"PYTHONPATH": str(REPO / "src")}, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes() == first


@pytest.mark.parametrize("stage", ["anat", "dwi", "func"])
def test_each_imaging_stage_writes_the_description_and_only_under_the_output_root(tmp_path, stage):
    """Every per-subject derivatives stage requests dataset_description.json; every planned output (templates and
    atlas included) lies under output_dir, with the resolution in the template and atlas names."""
    source = make_bids(tmp_path / "bids", {"01": ("T1w", "dwi", "bold")})
    out = tmp_path / "out"
    args = ["--cores", "1", stage, "--config", f"bids_dir={source}", f"output_dir={out}", "resolution_mm=4"]
    if stage == "anat":     # the rule itself, run only if the anat target needs it (--until): the library's content
        proc = snakemake(*args, "--until", "derivatives_description")
        assert proc.returncode == 0, proc.stderr[-3000:]
        target = out / "derivatives" / "brainfuse" / "dataset_description.json"
        written = json.loads(target.read_text())
        code = written["GeneratedBy"][0]["Version"].split("+code.")[1]   # sources may change while a test runs
        assert written == derivatives.description(source, code)
        return
    proc = snakemake("-n", *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    counts = job_counts(proc.stdout + proc.stderr)
    assert counts["derivatives_description"] == 1 and counts["templates"] == 1, counts
    outputs = [p.strip() for line in re.findall(r"^\s+output: (.+)$", proc.stdout, re.M) for p in line.split(",")]
    assert outputs and all(p.startswith(f"{out}/") for p in outputs), [p for p in outputs if not p.startswith(str(out))]
    planned_templates = [p for p in outputs if "/templates/" in p]
    assert planned_templates and all("_res-4_" in p for p in planned_templates), planned_templates
    assert counts["atlas"] == (stage == "func")


def test_two_resolutions_never_share_a_template_or_atlas_file(tmp_path):
    def files(res):
        return set(layout.template_files(tmp_path, res).values()) | set(layout.atlas_paths(tmp_path, res)) | \
            set(layout.region_atlas_paths(tmp_path, res))

    two, three = files(2), files(3)
    assert len(two) == len(three) == 10     # T1w, mask, head, GM, WM, CSF, atlas and region atlas NIfTI + TSV
    assert not two & three
    assert all(str(p).startswith(str(tmp_path)) for p in two | three)


# ------------------------------------------------------------------------------------- tabular-only mode
@pytest.mark.parametrize("keys,mode", [
    ({}, "demo"),
    ({"participants_tsv": "t.tsv", "modalities": []}, "tabular"),
    ({"participants_tsv": "t.tsv", "bids_dir": "b"}, "bids"),
    ({"participants_tsv": "t.tsv", "dicom_dir": "d"}, "dicom"),
])
def test_input_mode(keys, mode):
    assert config.input_mode(config.validate(keys)) == mode


@pytest.mark.parametrize("keys,expected", [
    ({"participants_tsv": "t.tsv"}, ("t.tsv: config key 'participants_tsv' is set but neither bids_dir nor "
                                     "dicom_dir", "modalities is [T1w, dwi, bold]", "set modalities: []")),
    ({"modalities": []}, ("config key 'modalities' is [] (tabular-only) but participants_tsv is not set",)),
    ({"tensors": {"tables": {"aseg": {"path": "a.tsv"}}}}, ("config key 'tensors.tables' is set",)),
])
def test_half_configured_tabular_input_is_refused_not_run_as_the_demo(keys, expected):
    with pytest.raises(config.ConfigError) as e:
        config.input_mode(config.validate(keys))
    assert all(x in str(e.value) for x in expected) and "\n" not in str(e.value), str(e.value)


def test_half_configured_input_stops_the_workflow_with_one_line(tmp_path):
    table = tmp_path / "clinical.tsv"
    table.write_text("participant_id\tdiagnosis\nsub-01\tPD\n")
    refused(snakemake("-n", "--config", f"participants_tsv={table}", f"output_dir={tmp_path}/out"),
            str(table), "set modalities: [] for a tabular-only run")
    assert not (tmp_path / "out" / "demo").exists()


def test_tabular_mode_plans_no_image_job_and_keeps_sessions_apart(tmp_path):
    """A table with two rows (sessions) per person: only the tabular jobs are planned, and the gathered cohort
    has one row per person and session."""
    cfg = bf_demo.demo_config({"n_subjects": 12})
    table = bf_demo.clinical_table(cfg, bf_demo.plan(cfg))
    table = table.assign(session="1")._append(table.assign(session="2"), ignore_index=True)
    table.to_csv(tmp_path / "clinical.tsv", sep="\t", index=False)
    cfg = tmp_path / "cfg.yaml"     # sex is categorical: its levels (the demo writes them to participants.json)
    cfg.write_text(json.dumps({"participants_tsv": str(tmp_path / "clinical.tsv"), "modalities": [],
                               "tensors": {"levels": {"sex": ["F", "M"]}}, "output_dir": str(tmp_path / "out")}))
    args = ["--cores", "1", "--configfile", "config/config.yaml", cfg]
    dry = snakemake("-n", *args)
    assert dry.returncode == 0, dry.stderr[-3000:]
    counts = job_counts(dry.stdout + dry.stderr)
    assert set(counts) - {"all", "total"} == {"tensors_gather", "splits", "train_fold", "evaluate_cv"}, counts
    proc = snakemake("tensors", *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cohort = tensors.load_cohort(tmp_path / "out" / "tensors")
    rows = set(zip(cohort.manifest.participant_id, cohort.manifest.session.astype(str)))
    assert len(rows) == 24 and {ses for _, ses in rows} == {"1", "2"}
    assert [m.name for m in cohort.modalities] == ["clinical", "serum"]     # the image modalities dropped
    assert not (tmp_path / "out" / "derivatives").exists() and not (tmp_path / "out" / "demo").exists()


# ------------------------------------------------------------------------------------ one layout module (#22)
def test_layout_sits_low_in_the_import_graph():
    """brainfuse.layout imports brainfuse.errors only (standard library: the rules import it at parse time, and a
    module naming files through it stays on the layer it was); func reaches the anat transforms through it, not
    through the anat stage; no module but the workflow's dataset index needs brainfuse.bids."""
    assert provenance.local_imports("layout") == {"errors"}
    src = REPO / "src" / "brainfuse"
    users = {str(p.relative_to(src).with_suffix("")).replace("/", ".") for p in src.rglob("*.py")}
    assert {m for m in users if "bids" in provenance.local_imports(m)} == set()
    assert "anat" not in provenance.local_imports("func")
    for stage in ("anat", "dwi", "func", "templates"):
        assert "layout" in provenance.local_imports(stage), stage
    proc = subprocess.run([sys.executable, "-c", "import sys, brainfuse.layout; "
                           "print(sorted({'numpy', 'pandas', 'nibabel'} & set(sys.modules)))"],
                          cwd=REPO, env={"PYTHONPATH": str(REPO / "src")}, capture_output=True, text=True)
    assert proc.stdout.strip() == "[]", proc.stdout + proc.stderr


def test_rules_build_no_template_or_transform_name_by_hand():
    for smk in sorted((REPO / "workflow" / "rules").glob("*.smk")):
        text = smk.read_text()
        assert "tpl-" not in text and "_xfm" not in text, smk.name
        # the phantom's folders (phantom.generator.demo_paths) and a subject's folder (layout.bids_subject_dir)
        names = "\n".join(line for line in text.splitlines() if "LOGS" not in line)      # logs: common.log_path
        assert not re.search(r'f"\{DEMO[_A-Z]*\}/|/sub-\{\{subject\}\}"', names), smk.name
        assert 'config["resolution_mm"]' not in text or smk.name == "common.smk", f"{smk.name}: use RES (common.smk)"
        assert not re.search(r"^def (converted_images|deferred_targets)\b", text, re.M) or smk.name == "common.smk"


def test_include_order_does_not_matter(tmp_path):
    """The stages' .smk files read what they share from common.smk: included in reverse order they plan the same
    jobs with the same outputs."""
    text = (REPO / "Snakefile").read_text()
    includes = re.findall(r'^include: "(workflow/rules/\w+\.smk)"$', text, re.M)
    assert includes[0] == "workflow/rules/common.smk" and len(includes) == 8
    reordered = text.replace('str(Path(workflow.basedir) / "src")', repr(str(REPO / "src")))
    reordered = reordered.replace('report: "workflow/', f'report: "{REPO}/workflow/')
    block = "\n".join(f'include: "{REPO / i}"' for i in includes[:1] + includes[:0:-1])
    reordered = re.sub(r'^include: .*(?:\n\s*include: .*)*', lambda m: block, reordered, count=1, flags=re.M)
    assert re.findall(r'^include: "(.+)"$', reordered, re.M) == [str(REPO / i) for i in includes[:1] + includes[:0:-1]]
    (tmp_path / "Snakefile").write_text(reordered)

    def planned(*snakefile):
        proc = snakemake(*snakefile, "-n", "--cores", "1", "--config", f"output_dir={tmp_path}/out")
        assert proc.returncode == 0, proc.stderr[-3000:]
        return sorted(re.findall(r"^\s+output: (.+)$", proc.stdout, re.M))

    normal = planned()
    assert any("/reports/qc" in line for line in normal)      # report_qc collects every stage's QC figures
    assert planned("-s", tmp_path / "Snakefile") == normal


def test_layout_names_follow_the_stage_contract():
    t = f"/t/tpl-{TEMPLATE}/tpl-{TEMPLATE}_res-3"
    assert layout.template_files("/t", 3)["mask"] == f"{t}_desc-brain_mask.nii.gz"
    assert layout.atlas_paths("/t", 3) == (f"{t}_atlas-brainfuse_dseg.nii.gz", f"{t}_atlas-brainfuse_dseg.tsv")
    assert layout.region_atlas_paths("/t", 3)[1] == f"{t}_atlas-brainfuseRegions_dseg.tsv"
    assert layout.region_atlas_paths("/t", 3, "harvard-oxford")[0] == f"{t}_atlas-HarvardOxfordJuelich_dseg.nii.gz"
    a = layout.anat_paths("/d", "01", "2", 3)
    assert a["warp"] == f"/d/sub-01/ses-2/anat/sub-01_ses-2_from-T1w_to-{TEMPLATE}_mode-image_desc-warp_xfm.nii.gz"
    assert a["affine"] == f"/d/sub-01/ses-2/anat/sub-01_ses-2_from-T1w_to-{TEMPLATE}_mode-image_desc-affine_xfm.mat"
    assert a["qc_json"] == layout.qc_path("/d", "01", "2", "anat") == \
        "/d/sub-01/ses-2/anat/sub-01_ses-2_desc-qc_T1w.json"
    assert layout.dwi_paths("/d", "01", None, 2, ["/raw/sub-01_acq-b1_dir-AP_run-2_dwi.nii.gz"])["runs"][0]["bval"] \
        == "/d/sub-01/dwi/sub-01_acq-b1_dir-AP_run-2_desc-preproc_dwi.bval"
    ents = {"sub": "01", "ses": "2", "task": "rest", "echo": "1", "acq": "mb", "suffix": "bold", "ext": ".nii.gz"}
    key = layout.run_key(ents)
    assert key == "task-rest_acq-mb_echo-1" and re.fullmatch(layout.BOLD_RUN_REGEX, key)
    f = layout.func_paths("/d", "01", "2", 3, key)
    assert f["reho"] == f"/d/sub-01/ses-2/func/sub-01_ses-2_{key}_space-{TEMPLATE}_res-3_stat-reho_boldmap.nii.gz"
    assert f["qc_carpet"] == "/d/sub-01/ses-2/figures/sub-01_ses-2_task-rest_acq-mb_echo-1_desc-carpet_bold.png"
    # the rules' pattern, filled in, is the library's name
    pattern = layout.func_paths("/d", "{subject}", "{session}", 3, "{bold}")
    assert {k: p.format(subject="01", session="2", bold=key) for k, p in pattern.items()} == f


def test_to_mni_transforms_reads_the_labels_from_the_folder(tmp_path):
    a = layout.anat_paths(tmp_path, "01", "2", 3)
    with pytest.raises(BrainfuseError, match="anat transforms of sub-01 missing \\(2 of 2\\)"):
        layout.to_mni_transforms(tmp_path, "01", "2")
    for key in ("warp", "affine"):
        Path(a[key]).parent.mkdir(parents=True, exist_ok=True)
        Path(a[key]).write_bytes(b"")
    assert layout.to_mni_transforms(tmp_path / "sub-01" / "ses-2" / "anat") == [a["warp"], a["affine"]]
    assert layout.to_mni_transforms(tmp_path, "sub-01", "2") == [a["warp"], a["affine"]]
