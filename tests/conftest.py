"""Shared fixtures. Real data come from BRAINFUSE_SHARED_DATA (set by .ci/run to ../shared/data)."""
import os
from collections import Counter
from pathlib import Path

import pytest

os.environ.setdefault("NIPYPE_NO_ET", "1")
# Two cores on CI: keep ITK and torch from oversubscribing when tests run in parallel workers.
os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]

# Fixtures that run a stage on real scans or a phantom (10 s to 3 min each): a test that uses one is `slow`, so
# that `pytest -m "not slow"` (the quick loop, under 3 minutes on 2 cores) never pays for them. Tests that run a
# stage themselves carry @pytest.mark.slow.
SLOW_FIXTURES = {"philips", "phantom_outputs", "canon", "xa30_corrected", "xa30", "nih"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data. Skips when the variable is unset; fails when it is set but the data are missing."""
    value = os.environ.get("BRAINFUSE_SHARED_DATA")
    if not value:
        pytest.skip("BRAINFUSE_SHARED_DATA is not set")
    path = Path(value)
    if not (path / "dicom" / "dcm_qa_xa30").is_dir() or not (path / "dicom" / "dcm_qa_nih").is_dir():
        pytest.fail(f"BRAINFUSE_SHARED_DATA={value} is set but dicom/dcm_qa_xa30 or dicom/dcm_qa_nih is missing")
    return path


TINY_DEMO = {"n_subjects": 3, "n_b0": 1, "n_directions": 12, "n_bold_volumes": 30,
             "missing": {"dwi": 0.0, "bold": 0.0}, "dicom_subjects": 1}


@pytest.fixture(scope="session")
def tiny_demo(tmp_path_factory, request):
    """A 3-subject phantom dataset (all modalities, one DICOM export), generated once per test run.

    Shared between pytest-xdist workers through a lock in the run's common temporary folder.
    Returns (root, demo config): root/bids, root/truth, root/dicom.
    """
    from filelock import FileLock

    from brainfuse.phantom import generator as demo

    cfg = demo.demo_config(TINY_DEMO)
    base = tmp_path_factory.getbasetemp()
    worker = getattr(request.config, "workerinput", {}).get("workerid", "master")   # also without xdist
    if worker != "master":
        base = base.parent
    root = base / "tiny_demo"
    with FileLock(str(base / "tiny_demo.lock")):
        if not (root / "complete").exists():
            demo.generate(cfg, root)
            (root / "complete").write_text("ok")
    return root, cfg


def job_counts(output: str) -> Counter:
    """Parse the 'Job stats' table Snakemake prints (dry runs and real runs)."""
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("Job stats"))
    counts = Counter()
    for line in lines[start + 3:]:
        parts = line.split()
        if len(parts) != 2 or parts[0] == "total":
            break
        counts[parts[0]] = int(parts[1])
    return counts


def brainfuse_cli(*argv, log=None) -> str:
    """Run ``python -m brainfuse <argv>`` as a rule does (its own process); fail with the output's tail. ``log``:
    a file that receives the output."""
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "NIPYPE_NO_ET": "1"}
    done = subprocess.run([sys.executable, "-m", "brainfuse", *map(str, argv)], env=env, capture_output=True,
                          text=True)
    if log is not None:
        Path(log).write_text(done.stdout + done.stderr)
    assert done.returncode == 0, f"brainfuse {argv[0]} failed:\n{(done.stdout + done.stderr)[-3000:]}"
    return done.stdout + done.stderr


def brainfuse_error(*argv, env: dict | None = None) -> str:
    """Run ``python -m brainfuse <argv>`` expecting it to refuse its input: a non-zero exit, no traceback, and
    one line ``brainfuse <command>…`` last on stderr, which is returned (tests assert it names file and problem)."""
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "NIPYPE_NO_ET": "1", **(env or {})}
    env.pop("BRAINFUSE_DEBUG", None)
    done = subprocess.run([sys.executable, "-m", "brainfuse", *map(str, argv)], env=env, capture_output=True,
                          text=True)
    output = done.stdout + done.stderr
    assert done.returncode != 0, f"brainfuse {argv[0]} accepted the input:\n{output[-3000:]}"
    assert "Traceback" not in output, f"brainfuse {argv[0]} printed a traceback:\n{output[-3000:]}"
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert lines and lines[-1].startswith(f"brainfuse {argv[0]}"), f"no one-line error last:\n{output[-3000:]}"
    return lines[-1]
