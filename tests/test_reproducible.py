"""Same input, same settings -> byte-identical derivatives: dwi and func run twice on one phantom subject.

(anat's own twice-run check is tests/test_anat.py::test_same_input_gives_byte_identical_outputs.) The commands
are the ones the rules run, one process each, one thread, as the workflow runs them by default.
"""
import os

import pytest

from brainfuse import anat, atlas, templates
from brainfuse.layout import TEMPLATE, bids_path
from conftest import brainfuse_cli

RES = 3
SUB = "002"


def _files(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def subject(tiny_demo, tmp_path_factory):
    root, _ = tiny_demo
    work = tmp_path_factory.mktemp("repro")
    tpl = templates.build(RES, work / "resources")
    tpl["atlas"], tpl["atlas_tsv"] = atlas.build(tpl["GM"], work / "atlas.nii.gz", work / "atlas.tsv", tpl["mask"])
    out = anat.process(bids_path(root / "bids", SUB, "anat", "T1w"), work / "anat", SUB, None,
                       work / "resources" / f"tpl-{TEMPLATE}", RES, threads=1)
    return root, work, tpl, out["paths"]


@pytest.mark.slow
def test_dwi_twice_is_byte_identical(subject):
    root, work, tpl, a = subject
    dwi = bids_path(root / "bids", SUB, "dwi", "dwi", dir="AP")
    for run in ("run1", "run2"):
        brainfuse_cli("dwi", "--dwi", dwi, "--subject", SUB, "--out-dir", work / run, "--t1w", a["preproc"], "--t1w-mask", a["mask"],
             "--transforms", a["warp"], a["affine"], "--template", tpl["T1w"], "--resolution", RES, "--threads", 1)
    first, second = _files(work / "run1"), _files(work / "run2")
    assert len(first) >= 15 and first.keys() == second.keys()
    assert not [str(k) for k in first if first[k] != second[k]], "dwi outputs differ between two runs"


@pytest.mark.slow
def test_func_twice_is_byte_identical(subject):
    root, work, tpl, a = subject
    bold = bids_path(root / "bids", SUB, "func", "bold", task="rest")
    for run in ("func1", "func2"):
        brainfuse_cli("func", "--bold", bold, "--t1w", a["preproc"], "--t1w-mask", a["mask"],
             "--anat-dir", os.path.dirname(a["preproc"]), "--template", tpl["T1w"], "--template-mask", tpl["mask"],
             "--wm", a["mni_WM"], "--csf", a["mni_CSF"], "--atlas", tpl["atlas"], "--atlas-tsv", tpl["atlas_tsv"],
             "--out-dir", work / run, "--resolution", RES, "--threads", 1)
    first, second = _files(work / "func1"), _files(work / "func2")
    assert len(first) >= 10 and first.keys() == second.keys()
    assert not [str(k) for k in first if first[k] != second[k]], "func outputs differ between two runs"
