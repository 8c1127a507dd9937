"""The Snakemake workflow: DAG on the demo and on BIDS input, config errors, code-aware reruns."""
import shutil
import subprocess
import sys

import pytest

from brainfuse.phantom import generator as demo
from conftest import REPO, job_counts


def snakemake(*args, cwd=REPO, check=True):
    proc = subprocess.run([sys.executable, "-m", "snakemake", *args], cwd=cwd, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def test_dry_run_on_demo_plans_every_subject(tmp_path):
    out = snakemake("-n", "demo", "--config", f"output_dir={tmp_path}")
    counts = job_counts(out.stdout)
    cohort = demo.plan(demo.demo_config({}))
    assert counts["demo_subject"] == len(cohort)
    assert counts["demo_dwi"] == sum(s.has_dwi for s in cohort) < len(cohort)     # missing DWI is normal
    assert counts["demo_bold"] == sum(s.has_bold for s in cohort) < len(cohort)
    assert counts["demo_dicom"] == sum(s.dicom for s in cohort)


@pytest.mark.parametrize("arg, key", [("resolution_mm=x", "resolution_mm"), ("colour=red", "colour"),
                                      ('subjects=["../x"]', "subjects")])
def test_bad_config_stops_the_run_naming_the_key(tmp_path, arg, key):
    proc = snakemake("-n", "--config", f"output_dir={tmp_path}", arg, check=False)
    assert proc.returncode != 0
    assert f"'{key}'" in proc.stdout + proc.stderr


def test_bids_input_with_bad_label_is_refused(tmp_path):
    (tmp_path / "dataset_description.json").write_text('{"Name": "x", "BIDSVersion": "1.9.0"}')
    (tmp_path / "sub-a_b" / "anat").mkdir(parents=True)
    proc = snakemake("-n", "--config", f"bids_dir={tmp_path}", f"output_dir={tmp_path}/out", check=False)
    assert proc.returncode != 0 and "sub-a_b" in proc.stdout + proc.stderr


def test_dry_run_on_bids_input(tiny_demo, tmp_path):
    root, _ = tiny_demo
    snakemake("-n", "--config", f"bids_dir={root / 'bids'}", f"output_dir={tmp_path}")


@pytest.mark.slow
def test_editing_a_module_reruns_only_its_jobs(tmp_path):
    """Code versions are params: editing the phantom generator reruns demo jobs, editing an unrelated module does not."""
    work = tmp_path / "repo"
    work.mkdir()
    for item in ("Snakefile", "workflow", "config", "src", "profiles", "envs"):
        if (REPO / item).is_dir():
            shutil.copytree(REPO / item, work / item, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(REPO / item, work / item)
    args = ("demo_dataset", "--config", f"output_dir={tmp_path}/out")
    snakemake(*args, "--cores", "1", cwd=work)
    assert "Nothing to be done" in snakemake("-n", *args, cwd=work).stdout
    (work / "src/brainfuse/cli.py").write_text((work / "src/brainfuse/cli.py").read_text() + "\n# edit\n")
    assert "Nothing to be done" in snakemake("-n", *args, cwd=work).stdout          # demo does not import cli
    gen = work / "src/brainfuse/phantom/generator.py"
    gen.write_text(gen.read_text() + "\n# edit\n")
    rerun = snakemake("-n", *args, cwd=work).stdout
    assert "demo_dataset" in rerun and "params" in rerun.lower()
