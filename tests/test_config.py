"""The schema stops bad configs with messages naming the key; bad labels never reach a path."""
import json
import os
from pathlib import Path

import pytest

from brainfuse import bids, config, layout


def test_default_config_is_valid_and_filled():
    cfg = config.load()
    assert cfg["demo"]["n_subjects"] >= 3 and cfg["resolution_mm"] in (1, 2, 3, 4)
    assert cfg["demo"]["noise"]["t1"] > 0            # nested defaults are filled in
    assert config.input_mode(cfg) == "demo"


@pytest.mark.parametrize("bad, key", [
    ({"resolution_mm": "x"}, "resolution_mm"),
    ({"resolution_mm": 5}, "resolution_mm"),
    ({"output_dirr": "x"}, "output_dirr"),
    ({"demo": {"n_subjects": "many"}}, "demo.n_subjects"),
    ({"demo": {"effects": {"atrophy": -1}}}, "demo.effects.atrophy"),
    ({"demo": {"bogus": 1}}, "demo.bogus"),
    ({"modalities": ["T1w", "PET"]}, "modalities.1"),
    ({"subjects": ["../x"]}, "subjects"),
    ({"bids_dir": "a", "dicom_dir": "b"}, "dicom_dir"),
])
def test_bad_config_names_the_key(bad, key):
    with pytest.raises(config.ConfigError) as e:
        config.validate(bad)
    assert f"'{key}'" in str(e.value)


def test_nested_command_line_values_get_their_schema_types():
    # Snakemake hands nested --config values over as strings (YAML BaseLoader): the schema's types apply.
    from snakemake.cli import parse_config

    cli = parse_config(["demo={n_subjects: 4, missing: {dwi: 0.2}, classes: [a, b]}", "model={refit: false}"])
    assert cli["demo"]["n_subjects"] == "4"          # what Snakemake gives the workflow
    cfg = config.validate(cli)
    assert cfg["demo"]["n_subjects"] == 4 and cfg["demo"]["missing"]["dwi"] == 0.2
    assert cfg["demo"]["classes"] == ["a", "b"] and cfg["model"]["refit"] is False
    with pytest.raises(config.ConfigError, match="'demo.n_subjects'"):
        config.validate(parse_config(["demo={n_subjects: many}"]))


@pytest.mark.parametrize("label", ["../x", "a_b", "a-b", "", "sub-", "x/y", "é"])
def test_bad_labels_are_refused(label):
    with pytest.raises(layout.LabelError):
        layout.check_label(label)


def test_good_labels_lose_their_prefix():
    assert layout.check_label("sub-01") == "01" and layout.check_label("ses-baseline") == "baseline"


def test_bids_path_orders_entities():
    p = layout.bids_path("/d", "01", "dwi", "dwi", ses="1", run=2, dir="AP", desc=None)
    assert p == "/d/sub-01/ses-1/dwi/sub-01_ses-1_dir-AP_run-2_dwi.nii.gz"
    assert layout.parse_name(os.path.basename(p)) == {"sub": "01", "ses": "1", "dir": "AP", "run": "2",
                                                    "suffix": "dwi", "ext": ".nii.gz"}
    with pytest.raises(ValueError):
        layout.bids_path("/d", "01", "anat", "T1w", colour="red")


def _tree(root, names):
    (root / "dataset_description.json").write_text(json.dumps({"Name": "t", "BIDSVersion": "1.9.0"}))
    for n in names:
        p = root / n
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"")


def test_index_finds_modalities_and_sessions(tmp_path):
    _tree(tmp_path, ["sub-01/anat/sub-01_T1w.nii.gz", "sub-01/dwi/sub-01_dir-AP_dwi.nii.gz",
                     "sub-02/ses-a/anat/sub-02_ses-a_T1w.nii.gz", "sub-02/ses-a/func/sub-02_ses-a_task-rest_bold.nii.gz",
                     "sub-02/ses-a/func/sub-02_ses-a_task-rest_events.tsv"])
    index = {s.key: s for s in bids.index_bids(tmp_path)}
    assert set(index) == {"sub-01", "sub-02_ses-a"}
    assert index["sub-01"].has("dwi") and not index["sub-01"].has("bold")
    assert index["sub-02_ses-a"].has("bold") and not index["sub-02_ses-a"].has("dwi")


def test_index_refuses_bad_folder_labels(tmp_path):
    _tree(tmp_path, ["sub-01/anat/sub-01_T1w.nii.gz", "sub-a_b/anat/sub-a_b_T1w.nii.gz"])
    with pytest.raises(layout.LabelError, match="sub-a_b"):
        bids.index_bids(tmp_path)
    with pytest.raises(FileNotFoundError, match="dataset_description"):
        bids.index_bids(tmp_path / "sub-01")


@pytest.mark.parametrize("stage", ["anat", "dwi", "func", "tensors"])
def test_a_library_user_gets_the_workflows_defaults(stage):
    """A stage called without a config (the CLI, the library) runs with the settings the workflow validates an
    empty config section to: a default changed in one place only would give the two users different results."""
    import importlib

    from brainfuse import config as bf_config

    module = importlib.import_module(f"brainfuse.{stage}")
    validated = bf_config.validate({})[stage]
    assert module.DEFAULTS and module.DEFAULTS == validated, stage


def test_defaults_are_written_only_in_the_schema():
    """No module keeps its own literal table of settings defaults (they drifted from the schema before)."""
    import ast

    src = Path(__file__).resolve().parents[1] / "src" / "brainfuse"
    literal = []
    for f in sorted(src.rglob("*.py")):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict) and any(
                    isinstance(t, ast.Name) and t.id == "DEFAULTS" for t in node.targets):
                literal.append(f"{f.relative_to(src)}:{node.lineno}")
    assert not literal, f"DEFAULTS written as a dict literal (use schema.section_defaults): {literal}"
