"""Where brainfuse writes and what it reads (issue #21): the BIDS-derivatives dataset_description.json, template
and atlas files under the output root keyed by resolution, and the tabular-only input mode."""
import json
import re
import subprocess
import sys

import pytest

from brainfuse import atlas, config, derivatives, templates, tensors
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
                           f"cli(['--source-dir', {str(source)!r}, '--out', {str(out)!r}]); "
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
        return set(templates.outputs(res, tmp_path).values()) | set(atlas.atlas_paths(res, tmp_path)) | \
            {tensors.template_mask_path(res, tmp_path)}

    two, three = files(2), files(3)
    assert len(two) == len(three) == 8      # T1w, mask, head, GM, WM, CSF, atlas NIfTI + TSV (the mask is shared)
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
