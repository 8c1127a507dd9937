"""brainfuse.io: a file under its final name is always complete; the writers round-trip what they write."""
import gzip
import json
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from brainfuse import io as bf_io


class Boom(Exception):
    pass


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_a_failed_write_leaves_neither_the_final_name_nor_a_temporary_file(tmp_path):
    final = tmp_path / "out" / "table.tsv"
    with pytest.raises(Boom):
        with bf_io.atomic_path(final) as tmp:
            tmp.write_text("half a tab")
            raise Boom
    assert not final.exists()
    assert list(final.parent.iterdir()) == []


def test_a_failed_write_leaves_an_existing_file_untouched(tmp_path):
    final = tmp_path / "sub-01_T1w.json"
    final.write_text('{"old": true}\n')
    with pytest.raises(Boom):
        with bf_io.atomic_path(final) as tmp:
            tmp.write_text('{"new": ')
            raise Boom
    assert final.read_text() == '{"old": true}\n'
    assert [p.name for p in tmp_path.iterdir()] == [final.name]


def test_an_interrupt_cleans_up_too(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with bf_io.atomic_path(tmp_path / "x.npy") as tmp:
            tmp.write_bytes(b"\x93NUMPY")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_a_writer_that_fails_before_writing_leaves_the_old_file(tmp_path):
    final = tmp_path / "cohort.json"
    final.write_text("{}\n")
    with pytest.raises(ValueError):
        bf_io.save_json({"x": float("nan")}, final, allow_nan=False)
    assert final.read_text() == "{}\n" and [p.name for p in tmp_path.iterdir()] == ["cohort.json"]


def test_temporary_name_is_hidden_next_to_the_target_and_the_file_gets_the_usual_mode(tmp_path):
    final = tmp_path / "sub-01_desc-preproc_T1w.nii.gz"
    with bf_io.atomic_path(final) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(f".{final.name}.") and tmp.name.endswith(".part")
        tmp.write_bytes(b"x")
    with bf_io.atomic_path(final, keep_extension=True) as tmp:      # for writers that read the extension
        assert tmp.name.startswith(".") and tmp.name.endswith(".part.nii.gz")
        tmp.write_bytes(b"y")
    assert final.read_bytes() == b"y"
    assert final.stat().st_mode & 0o777 == 0o666 & ~_umask()
    assert [p.name for p in tmp_path.iterdir()] == [final.name]


def test_json_text_and_options(tmp_path):
    obj = {"b": 1, "a": [1.5, None]}
    bf_io.save_json(obj, tmp_path / "a.json")
    assert (tmp_path / "a.json").read_text() == json.dumps(obj, indent=2) + "\n"
    bf_io.save_json(obj, tmp_path / "b.json", sort_keys=True, newline=False)
    assert (tmp_path / "b.json").read_text() == json.dumps(obj, indent=2, sort_keys=True)
    assert json.loads((tmp_path / "b.json").read_text()) == obj
    bf_io.save_text("a\tb\n", tmp_path / "c.tsv")
    assert (tmp_path / "c.tsv").read_text() == "a\tb\n"


def test_tsv_round_trip_and_formatting(tmp_path):
    df = pd.DataFrame({"participant_id": ["sub-01", "sub-02"], "fd": [0.123456789, np.nan], "n": [3, 4]})
    bf_io.save_tsv(df, tmp_path / "plain.tsv")
    assert (tmp_path / "plain.tsv").read_text() == "participant_id\tfd\tn\nsub-01\t0.123456789\t3\nsub-02\t\t4\n"
    bf_io.save_tsv(df, tmp_path / "bids.tsv", na_rep="n/a", float_format="%.6g")
    assert (tmp_path / "bids.tsv").read_text() == "participant_id\tfd\tn\nsub-01\t0.123457\t3\nsub-02\tn/a\t4\n"
    back = pd.read_csv(tmp_path / "plain.tsv", sep="\t")
    pd.testing.assert_frame_equal(back, df)


@pytest.mark.parametrize("name", ["img.nii.gz", "img.nii"])
def test_nifti_from_an_array_round_trips(tmp_path, name):
    data = np.arange(24, dtype=np.float64).reshape(2, 3, 4) / 7
    affine = np.diag([-2.0, 2.0, 2.0, 1.0])
    path = tmp_path / name
    bf_io.save_nifti(data, path, affine=affine, dtype=np.float32, units=("mm", "sec"))
    img = nib.load(path)
    assert img.get_data_dtype() == np.float32 and np.allclose(img.affine, affine)
    assert np.array_equal(np.asarray(img.dataobj), data.astype(np.float32))
    assert img.header.get_xyzt_units() == ("mm", "sec")
    assert (path.read_bytes()[:2] == b"\x1f\x8b") == name.endswith(".gz")
    assert [p.name for p in tmp_path.iterdir()] == [name]


def test_nifti_image_with_fast_gzip_is_plain_gzip_of_the_same_image(tmp_path):
    data = np.random.default_rng(0).integers(0, 1000, (5, 6, 7, 2)).astype(np.int16)
    img = nib.Nifti1Image(data, np.eye(4))
    bf_io.save_nifti(img, tmp_path / "fast.nii.gz", zooms=(1, 1, 1, 2.5), fast_gzip=True)
    bf_io.save_nifti(img, tmp_path / "nib.nii.gz")
    fast, ref = nib.load(tmp_path / "fast.nii.gz"), nib.load(tmp_path / "nib.nii.gz")
    assert np.array_equal(np.asarray(fast.dataobj), data) and fast.header.get_zooms() == (1, 1, 1, 2.5)
    assert gzip.decompress((tmp_path / "fast.nii.gz").read_bytes()) == img.to_bytes()
    assert np.array_equal(np.asarray(ref.dataobj), data)
    with pytest.raises(ValueError):
        bf_io.save_nifti(img, tmp_path / "x.nii", fast_gzip=True)
    with pytest.raises(TypeError):
        bf_io.save_nifti(img, tmp_path / "y.nii.gz", affine=np.eye(4))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fast.nii.gz", "nib.nii.gz"]


def test_npy_round_trip_to_exactly_the_name_given(tmp_path):
    a = np.arange(12, dtype=np.float16).reshape(3, 4)
    bf_io.save_npy(a, tmp_path / "sub-01_modality-DTI_tensor.npy")
    bf_io.save_npy(a, tmp_path / "cache.bin")                       # np.save would append .npy to a name
    for name in ("sub-01_modality-DTI_tensor.npy", "cache.bin"):
        b = np.load(tmp_path / name)
        assert b.dtype == a.dtype and np.array_equal(a, b)
    with pytest.raises(ValueError):                                 # object arrays only with allow_pickle
        bf_io.save_npy(np.array([{}, None], dtype=object), tmp_path / "obj.npy")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache.bin", "sub-01_modality-DTI_tensor.npy"]


def test_figure_is_saved_as_its_extension_says_and_closed(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(2, 1))
    ax.plot([0, 1])
    bf_io.save_figure(fig, tmp_path / "qc" / "sub-01_fa.png", dpi=50)
    assert (tmp_path / "qc" / "sub-01_fa.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not plt.fignum_exists(fig.number)
    assert [p.name for p in (tmp_path / "qc").iterdir()] == ["sub-01_fa.png"]


def test_torch_round_trip_with_the_bytes_of_a_direct_save(tmp_path):
    import zipfile

    torch = pytest.importorskip("torch")
    obj = {"model": {"w": torch.arange(3.0)}, "epoch": 2}
    bf_io.save_torch(obj, tmp_path / "checkpoint.pt")
    back = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert back["epoch"] == 2 and torch.equal(back["model"]["w"], obj["model"]["w"])
    # torch names the zip records after the file it writes: not after a random temporary name
    assert all(n.startswith("checkpoint.pt/") for n in zipfile.ZipFile(tmp_path / "checkpoint.pt").namelist())
    (tmp_path / "direct").mkdir()
    torch.save(obj, tmp_path / "direct" / "checkpoint.pt.tmp")
    assert (tmp_path / "checkpoint.pt").read_bytes() == (tmp_path / "direct" / "checkpoint.pt.tmp").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt", "direct"]


def test_a_named_temporary_in_a_private_folder_is_cleaned_up_on_failure(tmp_path):
    with pytest.raises(Boom):
        with bf_io.atomic_path(tmp_path / "resume.pt", name="resume.pt.part") as tmp:
            assert tmp.name == "resume.pt.part" and tmp.parent.parent == tmp_path
            tmp.write_bytes(b"PK")
            raise Boom
    assert list(tmp_path.iterdir()) == []


def test_importing_brainfuse_io_imports_no_heavy_library():
    code = ("import sys, brainfuse.io; heavy = {'numpy', 'nibabel', 'pandas', 'matplotlib', 'torch'}; "
            "print(sorted(heavy & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=os.environ)
    assert out.stdout.strip() == "[]"


def test_save_torch_uses_the_callers_torch_and_says_so_without_one(tmp_path):
    code = ("import brainfuse.io as b, sys\ntry: b.save_torch({}, sys.argv[1])\n"
            "except RuntimeError as e: print(e)")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "x.pt")], capture_output=True, text=True,
                         check=True, env=os.environ)
    assert "import torch first" in out.stdout and list(tmp_path.iterdir()) == []
