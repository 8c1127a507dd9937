"""The error layer every stage shares: the CLI's one line, --debug, a full disk, and the checked readers."""
import gzip
import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch

from brainfuse import inputs
from brainfuse.errors import BrainfuseError
from brainfuse.io import save_npy, save_torch
from conftest import REPO, brainfuse_error


def test_brainfuse_error_names_file_problem_and_fix():
    e = BrainfuseError("is truncated", path="/d/sub-01_T1w.nii.gz", fix="convert it again")
    assert str(e) == "/d/sub-01_T1w.nii.gz: is truncated; convert it again"
    assert str(BrainfuseError("plain message")) == "plain message"


def _nifti(tmp_path, shape=(12, 12, 12)):
    path = tmp_path / "sub-01_T1w.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random(shape, dtype=np.float32), np.eye(4)), path)
    return path


def _truncated_nifti(tmp_path, shape=(12, 12, 12)):
    path = _nifti(tmp_path, shape)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def test_cli_prints_one_line_and_debug_the_traceback(tmp_path):
    t1w = _truncated_nifti(tmp_path)
    argv = ("anat", "--t1w", t1w, "--out-dir", tmp_path / "deriv", "--subject", "01",
            "--template-dir", tmp_path / "tpl", "--resolution", "3")
    line = brainfuse_error(*argv)
    assert str(t1w) in line and "truncated" in line, line
    assert not (tmp_path / "deriv" / "sub-01" / "anat").exists() or not any((tmp_path / "deriv").rglob("*.nii.gz"))
    env = {"PYTHONPATH": str(REPO / "src"), "BRAINFUSE_DEBUG": "1"}
    done = subprocess.run([sys.executable, "-m", "brainfuse", *map(str, argv)], capture_output=True, text=True,
                          env={**__import__("os").environ, **env})
    assert done.returncode == 1 and "Traceback" in done.stderr and str(t1w) in done.stderr.splitlines()[-1]


def test_full_disk_names_the_output_and_leaves_no_partial_file(tmp_path):
    """RLIMIT_FSIZE makes write() fail with EFBIG ("File too large") as a full quota does (Python ignores
    SIGXFSZ); the message names the file being written, and no file carries a final name."""
    out = tmp_path / "resources"
    script = (f"ulimit -f 20; exec {sys.executable} -m brainfuse templates --resolution 3 --out-dir {out}")
    done = subprocess.run(["bash", "-c", script], capture_output=True, text=True,
                          env={**__import__("os").environ, "PYTHONPATH": str(REPO / "src")})
    line = done.stderr.strip().splitlines()[-1]
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert line.startswith("brainfuse templates: error: ") and "File too large" in line and ".nii.gz" in line
    assert "free space" in line
    assert not [p for p in out.rglob("*") if p.is_file() and not p.name.startswith(".")]
    assert not list(out.rglob("*.part*"))


def test_unexpected_failure_is_one_line_with_the_way_to_the_traceback(monkeypatch, capsys):
    """A failure brainfuse has no words for still comes as one line: its type, its message, and how to see the
    traceback; --debug prints the traceback as well."""
    import types

    from brainfuse import cli

    def broken(argv):
        raise KeyError("fa")

    monkeypatch.setitem(sys.modules, "brainfuse_broken", types.SimpleNamespace(cli=broken))
    monkeypatch.setitem(cli.COMMANDS, "broken", ("brainfuse_broken", "a command that fails"))
    assert cli.main(["broken"]) == 1
    err = capsys.readouterr().err
    assert err == ("brainfuse broken: error: unexpected error KeyError: 'fa' (rerun with --debug or "
                   "BRAINFUSE_DEBUG=1 for the traceback, and please report it)\n")
    assert cli.main(["--debug", "broken"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and err.splitlines()[-1].startswith("brainfuse broken: error: unexpected error")


def test_a_library_failure_on_a_full_disk_says_the_disk_is_full(monkeypatch, capsys, tmp_path):
    """ITK reports a full disk as its own failure (antsApplyTransforms' exit code 1 after "wrote only 0 of
    3063792 bytes", seen here when /tmp filled); the line then names the output folder's disk and the fix.
    shutil.disk_usage reports 5 MB free below tmp_path: filling a real disk would fill the machine's."""
    import collections
    import shutil
    import types

    from brainfuse import cli

    def broken(argv):
        raise RuntimeError("antsApplyTransforms returned non-zero exit code 1")

    real = shutil.disk_usage
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10 * 2 ** 30, 10 * 2 ** 30, 5 * 2 ** 20)
                        if str(p).startswith(str(tmp_path)) else real(p))
    monkeypatch.setitem(sys.modules, "brainfuse_broken", types.SimpleNamespace(cli=broken))
    monkeypatch.setitem(cli.COMMANDS, "broken", ("brainfuse_broken", "a command that fails"))
    assert cli.main(["broken", f"--out-dir={tmp_path / 'derivatives' / 'brainfuse'}"]) == 1
    assert f"the disk is full at {tmp_path} (5 MB free)" in capsys.readouterr().err    # argparse's other spelling
    assert cli.main(["broken", "--out-dir", str(tmp_path / "derivatives" / "brainfuse")]) == 1
    err = capsys.readouterr().err
    assert err == (f"brainfuse broken: error: RuntimeError: antsApplyTransforms returned non-zero exit code 1; the "
                   f"disk is full at {tmp_path} (5 MB free): free space or set output_dir (and TMPDIR) on a larger "
                   "file system, then rerun\n")


def test_read_json_names_line_and_column(tmp_path):
    side = tmp_path / "sub-01_task-rest_bold.json"
    side.write_text('{\n  "RepetitionTime": 2.0,\n  "TaskName": rest\n}\n')
    with pytest.raises(inputs.InputFileError, match=r"sub-01_task-rest_bold.json: .*not valid JSON \(line 3"):
        inputs.read_json(side, "BOLD sidecar")
    side.write_text("[1, 2]")
    with pytest.raises(inputs.InputFileError, match="JSON object"):
        inputs.read_json(side, "BOLD sidecar")


@pytest.mark.parametrize("text, problem", [(b"", "is empty"), (b"participant_id\tgroup\n", "no rows"),
                                           (b"participant_id,group\nsub-01,PD\n", "comma-separated"),
                                           (b"participant_id\tgroup\n\xff\xfe01\tPD\n", "UTF-8")])
def test_read_tsv_refuses_unusable_tables(tmp_path, text, problem):
    path = tmp_path / "participants.tsv"
    path.write_bytes(text)
    with pytest.raises(inputs.InputFileError, match=rf"participants.tsv: .*{problem}"):
        inputs.read_tsv(path, "participants table", required=("participant_id", "group"))


def test_load_nifti_refuses_truncated_and_foreign_files(tmp_path):
    with pytest.raises(inputs.InputFileError, match="T1w image is truncated"):
        inputs.load_nifti(_truncated_nifti(tmp_path), "T1w image")
    with pytest.raises(inputs.InputFileError, match="must be 4D, it has shape"):
        inputs.load_nifti(_nifti(tmp_path), ndim=(4,))
    notnifti = tmp_path / "notes.nii.gz"
    notnifti.write_bytes(gzip.compress(b"hello"))
    with pytest.raises(inputs.InputFileError, match="notes.nii.gz"):
        inputs.load_nifti(notnifti)


def test_check_finite_and_tr(tmp_path):
    a = np.zeros((4, 4, 4))
    with pytest.raises(inputs.InputFileError, match="empty"):
        inputs.check_finite(a, "x.nii.gz")
    a[0, 0, 0] = np.nan
    with pytest.raises(inputs.InputFileError, match="1 NaN"):
        inputs.check_finite(a, "x.nii.gz")
    with pytest.raises(inputs.InputFileError, match="milliseconds\\? .* 2"):
        inputs.plausible_tr(2000, "bold.json")
    assert inputs.plausible_tr("2.5", "bold.json") == 2.5


def test_array_record_catches_dtype_shape_and_content(tmp_path):
    path = tmp_path / "clinical.npy"
    save_npy(np.arange(12, dtype=np.float32).reshape(3, 4), path)
    record = inputs.array_record(path)
    assert inputs.check_array(path, record, stage="tensors").shape == (3, 4)
    np.save(path, np.arange(12, dtype=np.float64).reshape(3, 4))       # re-saved as float64, same shape
    with pytest.raises(inputs.CacheError, match=r"clinical.npy: cached array is float64 .*float32.*rerun the tensors"):
        inputs.check_array(path, record, stage="tensors")
    edited = np.arange(12, dtype=np.float32).reshape(3, 4)
    edited[0, 0] = 99
    np.save(path, edited)
    with pytest.raises(inputs.CacheError, match="content hash differs"):
        inputs.check_array(path, record, stage="tensors")
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(inputs.CacheError, match="cannot be read"):
        inputs.check_array(path, record, stage="tensors")


def test_load_torch_refuses_truncated_and_pickled_code(tmp_path):
    path = tmp_path / "model.pt"
    save_torch({"weights": torch.zeros(64)}, path)
    assert inputs.load_torch(path)["weights"].shape == (64,)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(inputs.InputFileError, match="model.pt: checkpoint is truncated, damaged.*rerun the train"):
        inputs.load_torch(path)
    torch.save({"x": object.__new__(json.JSONDecoder)}, path)      # a pickled class weights_only refuses
    with pytest.raises(inputs.InputFileError, match="model.pt"):
        inputs.load_torch(path)


def test_check_output_dir(tmp_path):
    f = tmp_path / "results"
    f.write_text("")
    with pytest.raises(BrainfuseError, match="output_dir is a file"):
        inputs.check_output_dir(f / "sub")
    assert inputs.check_output_dir(tmp_path / "new" / "out") == tmp_path / "new" / "out"


def test_top_level_help_and_version_are_instant(capsys):
    from brainfuse import cli

    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name, (_, summary) in cli.COMMANDS.items():
        assert f"  {name}" in out and summary in out
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("brainfuse 0.")
    assert cli.main([]) == 2 and "usage: brainfuse" in capsys.readouterr().err
    assert cli.main(["nonsense"]) == 2 and "unknown command 'nonsense'" in capsys.readouterr().err
