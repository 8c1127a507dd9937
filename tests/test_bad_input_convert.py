"""convert: every bad input gets one clear line (file or series, problem, what to do) or a loud warning, and a
refused series never leaves a BIDS image behind while the subject's other series still convert (issue #19).

Tiny series (10 x 12 x 8 T1w, 8 x 8 x 6 x 3 BOLD) exported by brainfuse.phantom.dicom_export and converted by the
real dcm2niix; two cases use the real XA30 export (skipped without BRAINFUSE_SHARED_DATA)."""
import json
import logging
import re
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pydicom
import pytest

from brainfuse.convert import (ConvertConfigError, _convert_section, convert_subject, load_mapping, read_manifest,
                               write_dataset_files)
from brainfuse.errors import BrainfuseError, one_line
from conftest import brainfuse_cli, brainfuse_error

PATIENT = {"PatientName": "Doe^Jane", "PatientID": "BF0001"}
T1, BOLD = "005_t1", "007_bold"
T1_NAME = "sub-s01/anat/sub-s01_T1w.nii.gz"
BOLD_NAME = "sub-s01/func/sub-s01_task-rest_bold.nii.gz"


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """A T1w and a BOLD series as a scanner exports them (one file per slice), and the images they hold."""
    from brainfuse.phantom.dicom_export import export_series

    root = tmp_path_factory.mktemp("export")
    affine = np.diag([-2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = [10, -10, -5]
    t1 = (np.arange(10 * 12 * 8).reshape(10, 12, 8) % 97 + 1).astype(np.int16)
    bold = (np.arange(8 * 8 * 6 * 3).reshape(8, 8, 6, 3) % 89 + 1).astype(np.int16)
    for name, data in (("t1", t1), ("bold", bold)):
        nib.save(nib.Nifti1Image(data, affine), root / f"{name}.nii.gz")
    export_series(root / "t1.nii.gz", root / "sub" / T1, 5, "t1_mprage", PATIENT, repetition_time=2.3, echo_time=0.003)
    export_series(root / "bold.nii.gz", root / "sub" / BOLD, 7, "bold_rest", PATIENT, repetition_time=2.0,
                  echo_time=0.03, slice_timing=[0.0, 1.0, 0.33, 1.33, 0.66, 1.66])
    return root / "sub", {"T1w": t1}


def subject(export, tmp_path, *series) -> Path:
    """A copy of the export (only ``series`` if given) to damage."""
    src, _ = export
    dst = tmp_path / "dicom" / "s01"
    for name in series or (T1, BOLD):
        shutil.copytree(src / name, dst / name)
    return dst


def convert(dicom, tmp_path, **kw):
    return convert_subject(dicom, tmp_path / "bids", "s01", work_dir=tmp_path, **kw)


def written(tmp_path) -> list:
    """Every file in the BIDS tree, and any temporary or work folder left behind."""
    left = sorted(str(p.relative_to(tmp_path / "bids")) for p in (tmp_path / "bids").rglob("*") if p.is_file())
    return left + sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("brainfuse-convert"))


def bids_files(name):
    stem = name[: -len(".nii.gz")]
    return [f"{stem}.json", name]


def row_of(manifest, number):
    (row,) = manifest[manifest["series_number"] == str(number)].to_dict("records")
    return row


def errors(caplog, level=logging.ERROR):
    return [r.getMessage() for r in caplog.records if r.levelno >= level and r.name == "brainfuse.convert"]


# ------------------------------------------------------------------------- 1. a series cut short at its end
@pytest.mark.parametrize("cut, name, problem", [
    (lambda b: b[:-50], "IM005_00008.dcm", r"corrupt DICOM: truncated pixel data \(190 of 240 bytes\)"),
    (lambda b: b[:600], "IM005_00008.dcm", r"corrupt DICOM: image object without pixel data"),
    (lambda b: b[:100], "IM005_00008.dcm", r"corrupt DICOM: 100 bytes, cut short before its header"),
    # cut inside the pixel data element's length field: pydicom gives up; the series UID is found in the raw bytes
    (lambda b: b[:b.find(b"\xe0\x7f\x10\x00") + 8], "renamed.part", r"corrupt DICOM: unreadable header"),
], ids=["pixel-data", "header", "preamble", "unparsable-renamed"])
def test_truncated_last_slice_refuses_the_series_and_the_rest_converts(export, tmp_path, caplog, cut, name, problem):
    dicom = subject(export, tmp_path)
    last = sorted((dicom / T1).iterdir())[-1]
    last.rename(dicom / T1 / name)
    (dicom / T1 / name).write_bytes(cut((dicom / T1 / name).read_bytes()))
    manifest = convert(dicom, tmp_path)
    t1 = row_of(manifest, 5)
    assert t1["decision"] == "failed" and t1["n_files"] == "8"
    assert re.search(rf"^incomplete series: 1 of its 8 files unreadable, .*: {T1}/{name}: {problem}.*; "
                     r"copy the whole series again from the scanner or PACS$", t1["reason"])
    assert any(re.search(rf"series 5 't1_mprage' failed: .*{T1}/{name}", m) for m in errors(caplog))
    # never a T1w a slice short; the BOLD converts as it would have
    assert written(tmp_path) == bids_files(BOLD_NAME)


def test_rerun_outside_the_workflow_warns_about_an_earlier_runs_image(export, tmp_path, caplog):
    dicom = subject(export, tmp_path)
    convert(dicom, tmp_path)
    last = sorted((dicom / T1).iterdir())[-1]
    last.write_bytes(last.read_bytes()[:-50])
    assert row_of(convert(dicom, tmp_path), 5)["decision"] == "failed"
    warnings = [m for m in errors(caplog, logging.WARNING) if "not written by this conversion" in m]
    assert warnings == [f"sub-s01: 1 image(s) in {tmp_path / 'bids' / 'sub-s01'} were not written by this conversion "
                        f"(left from an earlier run?), e.g. {T1_NAME}; remove that folder and rerun so that only this "
                        f"run's images remain"]


def test_missing_end_slice_is_found_from_the_header_count(export, tmp_path):
    dicom = subject(export, tmp_path, T1)
    sorted((dicom / T1).iterdir())[-1].unlink()          # the last slice never arrived: no gap to see
    t1 = row_of(convert(dicom, tmp_path), 5)
    assert t1["decision"] == "failed"
    assert t1["reason"].startswith("incomplete series: 7 images over 7 slice positions, the header "
                                   "(ImagesInAcquisition) says 8 images per acquisition")
    assert written(tmp_path) == []


def test_complete_series_convert_to_the_exported_image(export, tmp_path):
    """The checks above refuse nothing whole: the exported T1w comes back voxel for voxel."""
    manifest = convert(subject(export, tmp_path), tmp_path)
    assert set(manifest["decision"]) == {"converted"}
    img = nib.as_closest_canonical(nib.load(tmp_path / "bids" / T1_NAME))
    ref = nib.as_closest_canonical(nib.Nifti1Image(export[1]["T1w"], np.diag([-2.0, 2.0, 2.0, 1.0])))
    assert np.array_equal(np.asanyarray(img.dataobj), np.asanyarray(ref.dataobj))


@pytest.mark.shared_data
def test_real_enhanced_series_truncated_or_a_volume_short(shared_data, tmp_path, caplog):
    """XA30 enhanced DICOM: a T1w file cut mid-pixel data, and a BOLD whose last volume file is missing, are
    refused; the intact second T1w still converts."""
    src = shared_data / "dicom/dcm_qa_xa30/In"
    dicom = tmp_path / "dicom" / "s01"
    for name in ("5_anat-T1w_acq-tfl", "6_anat-T1w_acq-tfl"):
        shutil.copytree(src / name, dicom / name)
    (dicom / "7_bold").mkdir()
    for p in sorted((src / "7_func-bold_task-fa_run-1").iterdir(), key=lambda p: pydicom.dcmread(
            p, stop_before_pixels=True, specific_tags=["InstanceNumber"]).InstanceNumber)[:-1]:
        (dicom / "7_bold" / p.name).symlink_to(p)
    (cut,) = (dicom / "5_anat-T1w_acq-tfl").iterdir()
    cut.write_bytes(cut.read_bytes()[:2_000_000])
    manifest = convert(dicom, tmp_path)
    t1 = row_of(manifest, 5)
    assert t1["decision"] == "failed"
    # the file named (digits of its name that are also an identifying header value are scrubbed)
    assert re.search(r"^damaged series: its only file is unreadable: 5_anat-T1w_acq-tfl/0001_[^ ]*\.dcm: "
                     r"corrupt DICOM: truncated pixel data "
                     r"\(1710386 of 3145728 bytes\); copy the whole series again", t1["reason"])
    bold = row_of(manifest, 7)
    assert bold["decision"] == "failed"
    assert bold["reason"].startswith("incomplete series: 19 files holding whole volumes, the header "
                                     "(NumberOfTemporalPositions) says 20 volumes: 1 missing")
    assert row_of(manifest, 6)["bids_name"] == "sub-s01/anat/sub-s01_acq-tfl_rec-norm_T1w.nii.gz"
    assert not list((tmp_path / "bids").rglob("*_bold.*")) and not list((tmp_path / "bids").rglob("*acq-tfl_T1w*"))


# ------------------------------------------------------------------------ 2. the only T1w skipped
def _defaced(dicom):
    for p in (dicom / T1).iterdir():          # a defaced T1w re-exported by a de-identification tool
        ds = pydicom.dcmread(p)
        ds.ImageType = ["DERIVED", "SECONDARY", "M", "DEFACED"]
        ds.SeriesDescription = "t1_mprage_defaced"
        ds.save_as(p)


def test_skipped_t1w_warns_loudly_and_the_suggested_rule_accepts_it(export, tmp_path):
    dicom = subject(export, tmp_path)
    _defaced(dicom)
    manifest, outputs = tmp_path / "m.tsv", tmp_path / "outputs.json"
    args = ["convert", "--dicom-dir", dicom, "--bids-dir", tmp_path / "bids", "--subject", "s01",
            "--manifest", manifest, "--outputs", outputs, "--work-dir", tmp_path]
    text = brainfuse_cli(*args)
    (line,) = [line for line in text.splitlines() if "has no T1w" in line]
    assert re.search(r"WARNING sub-s01 has no T1w: series 5 't1_mprage_defaced' \(folder 005_t1\) was skipped: "
                     r"derived image .*\(rule derived\); if it is the T1w to use, add to convert.rules: "
                     r"\{match: \{SeriesDescription: .*\}, datatype: anat, suffix: T1w\}; until then sub-s01 goes "
                     r"on without anatomy", line)
    # what the workflow reads: no converted T1w row in the manifest; the outputs JSON says so in words
    table = read_manifest(manifest)
    assert not ((table["decision"] == "converted") & (table["suffix"] == "T1w")).any()
    assert "the subject has no other T1w" in row_of(table, 5)["reason"]
    info = json.loads(outputs.read_text())
    assert info["images"] == {"T1w": [], "dwi": [], "bold": [BOLD_NAME]} and info["missing"] == ["T1w", "dwi"]
    assert written(tmp_path) == bids_files(BOLD_NAME)
    # the rule the warning suggests, as written, converts the series
    rule = re.search(r"add to convert.rules: (\{.*\}); until", line)[1]
    pattern = re.search(r"SeriesDescription: '(.*)'\}, datatype", rule)[1]
    params = json.dumps({"rules": [{"match": {"SeriesDescription": pattern}, "datatype": "anat", "suffix": "T1w"}]})
    brainfuse_cli(*args, "--params", params)
    assert json.loads(outputs.read_text())["missing"] == ["dwi"]
    assert (tmp_path / "bids" / T1_NAME).is_file()


def test_strict_mode_stops_a_subject_without_t1w_before_writing(export, tmp_path):
    dicom = subject(export, tmp_path)
    _defaced(dicom)
    manifest = tmp_path / "m.tsv"
    line = brainfuse_error("convert", "--dicom-dir", dicom, "--bids-dir", tmp_path / "bids", "--subject", "s01",
                           "--manifest", manifest, "--work-dir", tmp_path, "--strict")
    assert line.startswith(f"brainfuse convert: error: {dicom}: sub-s01 has no T1w: series 5 't1_mprage_defaced'")
    assert line.endswith("or set strict: false to carry the subject on without anatomy")
    assert not manifest.exists() and written(tmp_path) == []


# ---------------------------------------------------------------- 3. no DICOM folder, or nothing readable in it
def test_missing_dicom_folder_is_one_line(tmp_path):
    manifest = tmp_path / "m.tsv"
    line = brainfuse_error("convert", "--dicom-dir", tmp_path / "nowhere", "--bids-dir", tmp_path / "bids",
                           "--subject", "s01", "--manifest", manifest)
    assert line == (f"brainfuse convert: error: {tmp_path / 'nowhere'}: DICOM folder of sub-s01 does not exist; "
                    f"point --dicom-dir (or the config's dicom_dir) at a folder holding one folder of DICOM files "
                    f"per subject")
    assert not manifest.exists() and not (tmp_path / "bids").exists()


def test_dicom_folder_that_is_a_file(tmp_path):
    (tmp_path / "s01.zip").write_bytes(b"PK\x03\x04")
    with pytest.raises(BrainfuseError) as e:
        convert(tmp_path / "s01.zip", tmp_path)
    assert one_line(e.value).startswith(f"{tmp_path / 's01.zip'}: DICOM folder of sub-s01 is a file, not a folder; ")
    assert not (tmp_path / "bids").exists()


@pytest.mark.parametrize("files, reason", [
    ({}, "nothing usable: the folder holds no files"),
    ({"notes.txt": b"exported from PACS\n", "a/.DS_Store": b"\0\0\0\1Bud1" + bytes(200)},
     "nothing usable: no DICOM image series among 2 files"),
], ids=["empty", "no-dicom"])
def test_subject_with_nothing_readable_is_an_error_line_not_a_failed_job(tmp_path, caplog, files, reason):
    """One subject's empty export must not stop the others' (a failed job stops the workflow): an ERROR line
    naming the folder, a manifest row, an empty subject folder (no images), exit code 0."""
    dicom = tmp_path / "dicom" / "s01"
    dicom.mkdir(parents=True)
    for name, data in files.items():
        (dicom / name).parent.mkdir(exist_ok=True)
        (dicom / name).write_bytes(data)
    manifest = convert(dicom, tmp_path)
    assert manifest["decision"].tolist()[-1] == "failed" and manifest["reason"].tolist()[-1] == reason
    assert any(m.startswith(f"sub-s01: {reason} in {dicom}: the subject is carried on with no images")
               for m in errors(caplog))
    assert written(tmp_path) == [] and (tmp_path / "bids" / "sub-s01").is_dir()


# --------------------------------------------------------------------------- 4. junk in a series folder
def test_junk_files_in_a_series_folder_are_noted_and_the_series_converts(export, tmp_path):
    dicom = subject(export, tmp_path, T1)
    junk = {"notes.txt": b"exported from PACS\n", ".DS_Store": b"\0\0\0\1Bud1" + bytes(300),
            "Thumbs.db": bytes(range(256)) * 4, "IM_garbage.dcm": b"\0" * 128 + b"DICM" + bytes(range(256)) * 3}
    for name, data in junk.items():
        (dicom / T1 / name).write_bytes(data)
    manifest = convert(dicom, tmp_path)
    rows = manifest.set_index("source")
    for name in ("notes.txt", ".DS_Store", "Thumbs.db"):
        row = rows.loc[f"{T1}/{name}"]
        assert (row["decision"], row["reason"]) == ("skipped", "not a DICOM file")
    # a damaged DICOM file not named like the series' slices is noted, not taken for a lost slice
    assert rows.loc[f"{T1}/IM_garbage.dcm", "reason"].startswith("corrupt DICOM")
    assert row_of(manifest, 5)["decision"] == "converted" and row_of(manifest, 5)["n_files"] == "8"
    assert written(tmp_path) == bids_files(T1_NAME)


# --------------------------------------------------------------------------- 5. the clinical table
def _dataset(tmp_path, clinical: str):
    manifest = pd.DataFrame([{"subject": "sub-s01", "decision": "converted", "suffix": "T1w",
                              "bids_name": T1_NAME, "outputs": T1_NAME}])
    path = tmp_path / "clinical.tsv"
    path.write_text(clinical)
    return manifest, path


@pytest.mark.parametrize("clinical, message", [
    ("", r"clinical table \(participants_tsv\) is empty; write a header line and one row per participant"),
    ("subject\tage\ns01\t61\n", r"clinical table \(participants_tsv\) lacks the column\(s\) participant_id; it has "
                                r"subject, age; add the columns"),
    ("participant_id,age\ns01,61\n", r"lacks the column\(s\) participant_id \(is it comma-separated\?\)"),
    ("participant_id\tage\nsub-s01\t61\ns02\t70\ns01\t62\n", r"participant_id sub-s01 on lines 2, 4; keep one row "
                                                             r"per participant"),
    ("participant_id\tage\ns01\t61\nsub-s_02\t70\n", r"line 3, column participant_id: invalid participant_id 's_02': "
                                                     r"BIDS labels may contain only letters and digits; use letters"),
], ids=["empty", "no-participant_id", "comma-separated", "duplicate", "invalid-label"])
def test_clinical_table_problems_name_the_file_and_the_row(tmp_path, clinical, message):
    manifest, path = _dataset(tmp_path, clinical)
    with pytest.raises(BrainfuseError) as e:
        write_dataset_files(tmp_path / "bids", manifest, path)
    assert re.fullmatch(rf"{re.escape(str(path))}: .*{message}.*", one_line(e.value))
    assert not (tmp_path / "bids").exists()           # nothing written: no dataset_description.json either


def test_clinical_table_error_through_the_command(tmp_path):
    manifest, path = _dataset(tmp_path, "participant_id,age\ns01,61\n")
    manifest.to_csv(tmp_path / "sub-s01_manifest.tsv", sep="\t", index=False)
    line = brainfuse_error("convert", "dataset", "--bids-dir", tmp_path / "bids", "--subject-manifests",
                           tmp_path / "sub-s01_manifest.tsv", "--manifest", tmp_path / "manifest.tsv",
                           "--participants-tsv", path)
    assert line.startswith(f"brainfuse convert: error: {path}: clinical table (participants_tsv) lacks the "
                           f"column(s) participant_id (is it comma-separated?)")
    assert not (tmp_path / "manifest.tsv").exists() and not (tmp_path / "bids").exists()


# --------------------------------------------------------------------------- 6. settings
def test_malformed_params_json_is_one_line(export, tmp_path):
    manifest = tmp_path / "m.tsv"
    line = brainfuse_error("convert", "--dicom-dir", subject(export, tmp_path, T1), "--bids-dir", tmp_path / "bids",
                           "--subject", "s01", "--manifest", manifest, "--params", "{'task': 'rest'}")
    assert line.startswith("brainfuse convert: error: --params is not valid JSON (column 2: Expecting property name "
                           "enclosed in double quotes): \"{'task': 'rest'}\"; pass the convert: section as a JSON "
                           "object")
    assert not manifest.exists() and not (tmp_path / "bids").exists()


@pytest.mark.parametrize("params, message", [
    ('["rules"]', r"^--params must be a JSON object \(the convert: section\), not list; "),
    ('{"taks": "rest"}', r"^config key 'convert.taks': unknown key; the convert section takes rules, default_rules, "
                         r"task, deny_keys"),
    ('{"rules": [{"name": "my T1", "match": {"SeriesDescription": "mprage[("}, "datatype": "anat", "suffix": "T1w"}]}',
     r"^config key 'convert.rules\[0\].match.SeriesDescription' \(rule 'my T1'\): invalid regular expression "
     r"'mprage\[\(' \(unterminated character set at position 6\); fix the pattern"),
], ids=["not-an-object", "unknown-key", "invalid-regex"])
def test_bad_convert_settings_name_the_key(params, message):
    with pytest.raises(ConvertConfigError) as e:
        load_mapping(_convert_section(params=params))
    assert re.search(message, one_line(e.value))


# --------------------------------------------------------------------------- 7. dcm2niix fails on a series
def test_dcm2niix_failure_names_the_series_and_its_message(export, tmp_path, caplog):
    from pydicom.encaps import encapsulate

    dicom = subject(export, tmp_path)
    for p in (dicom / BOLD).iterdir():         # JPEG-lossless transfer syntax over bytes that are no JPEG
        ds = pydicom.dcmread(p)
        ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.70"
        ds.PixelData = encapsulate([b"\xff\xd8" + b"garbage" * 10])
        ds["PixelData"].VR = "OB"
        ds.save_as(p, enforce_file_format=False)
    manifest = convert(dicom, tmp_path)
    bold = row_of(manifest, 7)
    assert bold["decision"] == "failed"
    assert re.fullmatch(r"dcm2niix failed \(exit code 1\): Error: decode_JPEG.*", bold["reason"])
    assert any(m.startswith("sub-s01: series 7 'bold_rest' failed: dcm2niix failed (exit code 1): Error: decode_JPEG")
               for m in errors(caplog))
    assert written(tmp_path) == bids_files(T1_NAME)      # no half-written BOLD, the T1w converts


def test_dcm2niix_messages_name_the_source_files_not_its_links(tmp_path):
    from brainfuse.convert import _messages
    from brainfuse.deid import Scrubber

    text = (f"Found 2 DICOM file(s)\nWarning: File not large enough to store image data: {tmp_path}/in/000001.dcm\n"
            f"Convert 2 DICOM as {tmp_path}/out/img (8x8x2x1)\n")
    assert _messages(text, Scrubber(["Doe^Jane"]), tmp_path, ["007_bold/IM1.dcm", "007_bold/IM2_Jane.dcm"]) == [
        "Warning: File not large enough to store image data: 007_bold/IM2_[removed].dcm"]


def test_short_pixel_data_is_refused_before_dcm2niix(export, tmp_path):
    dicom = subject(export, tmp_path)
    victim = sorted((dicom / BOLD).iterdir())[4]
    ds = pydicom.dcmread(victim)
    ds.PixelData = ds.PixelData[:100]           # a consistent file whose image is cut: dcm2niix would fail on it
    ds.save_as(victim)
    bold = row_of(convert(dicom, tmp_path), 7)
    assert bold["decision"] == "failed"
    assert (f"{BOLD}/{victim.name}: corrupt DICOM: pixel data hold 100 bytes, its Rows x Columns x frames need 128"
            in bold["reason"])
    assert written(tmp_path) == bids_files(T1_NAME)


# --------------------------------------------------------------------------- 8. readable but no geometry
@pytest.mark.parametrize("key", ["ImagePositionPatient", "ImageOrientationPatient"])
def test_series_without_slice_geometry_is_refused(export, tmp_path, key):
    dicom = subject(export, tmp_path)
    for p in (dicom / T1).iterdir():           # as an over-eager de-identification tool leaves it
        ds = pydicom.dcmread(p)
        delattr(ds, key)
        ds.save_as(p)
    t1 = row_of(convert(dicom, tmp_path), 5)
    assert t1["decision"] == "failed"
    assert re.fullmatch(rf"no slice geometry: {key} missing \(or not 3/6 numbers\) in 8 of 8 files "
                        rf"\(e.g. {T1}/IM005_\d+.dcm\), so slices cannot be placed or ordered; export the series "
                        r"again .*",
                        t1["reason"])
    assert written(tmp_path) == bids_files(BOLD_NAME)
