"""De-identification: identifying values read from DICOM headers, and their removal from every output.

The approach is value-based, not key-based: every identifying value found in the source headers (patient
name and IDs, dates, institution, station, physicians, study identifiers, ...) is searched for in each
text brainfuse writes (sidecars, NIfTI header text, manifest cells, log lines, file names). Deny-listed
sidecar keys are removed as well, whatever their values, because dcm2niix ``-ba y`` keeps some of them.
"""
from __future__ import annotations

import gzip
import re
import shutil
from pathlib import Path

import numpy as np

# Header fields whose values identify a person, a place or a date (DICOM PS3.15 basic profile, the
# parts that occur in MR exports). Their values, read from every source file, are searched for in
# everything written.
IDENTIFYING_KEYWORDS = (
    "PatientName", "PatientID", "OtherPatientIDs", "OtherPatientNames", "PatientBirthDate", "PatientBirthTime",
    "PatientBirthName", "PatientMotherBirthName", "PatientAddress", "PatientTelephoneNumbers", "PatientAge",
    "PatientWeight", "PatientSize", "IssuerOfPatientID", "MedicalRecordLocator", "InstitutionName",
    "InstitutionAddress", "InstitutionalDepartmentName", "StationName", "DeviceSerialNumber",
    "ReferringPhysicianName", "ReferringPhysicianAddress", "ReferringPhysicianTelephoneNumbers",
    "PerformingPhysicianName", "OperatorsName", "NameOfPhysiciansReadingStudy", "PhysiciansOfRecord",
    "RequestingPhysician", "AccessionNumber", "StudyID", "StudyDate", "SeriesDate", "AcquisitionDate",
    "ContentDate", "AcquisitionDateTime", "StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID",
    "RequestedProcedureID", "PerformedProcedureStepID", "ScheduledProcedureStepID",
)
# Sidecar keys always removed (dcm2niix -ba y keeps some of them), besides any key with Patient (but
# PatientPosition), Date, UID, Physician, Operator or Institution in its name.
DENY_KEYS = {
    "StationName", "DeviceSerialNumber", "AccessionNumber", "StudyID", "StudyDescription",
    "ProcedureStepDescription", "PerformedProcedureStepDescription", "RequestedProcedureDescription",
    "ImageComments", "SeriesComments", "StudyComments", "AcquisitionComments", "BidsGuess",      # BidsGuess: dcm2niix's naming guess, not ours
}
_DENY_RE = re.compile(r"^(?!PatientPosition$)Patient|Date|UID$|Physician|Operator|Institution")
_PLACEHOLDERS = {"anonymous", "anonymized", "anonymised", "anon", "none", "unknown", "n/a", "null", "removed",
                 "deidentified", "de-identified", "nil", "xxx"}
REMOVED = "[removed]"


def as_text(value) -> str:
    """A header/sidecar value as text; multi-values (ImageType) joined with a backslash as in DICOM."""
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        return "\\".join(as_text(v) for v in value)
    return str(value)


def _tokens(value: str) -> list[str]:
    return re.findall(r"[A-Za-z0-9]+", value)


class Scrubber:
    """Finds and removes identifying values (read from the source headers) in any text."""

    def __init__(self, values=()):
        self.values: set[str] = set()
        self._patterns: list[str] = []
        self._combined: re.Pattern | None = None
        for v in values:
            self.add(v)

    def add(self, value) -> None:
        value = str(value).strip()
        if not value or value in self.values:
            return
        alnum = "".join(_tokens(value))
        if len(alnum) < 3 or value.lower() in _PLACEHOLDERS or len(set(alnum)) == 1:
            return
        self.values.add(value)
        variants = [_tokens(value)]
        if re.fullmatch(r"\d{8}", value):                # DICOM date YYYYMMDD: also YYYY-MM-DD etc.
            variants.append([value[:4], value[4:6], value[6:]])
        if "^" in value or "=" in value:                  # person name: each component of 4+ characters
            variants += [[c] for c in re.split(r"[\^=]", value) if len("".join(_tokens(c))) >= 4]
        for toks in variants:
            if not toks:
                continue
            body = r"[^A-Za-z0-9]{0,3}".join(re.escape(t) for t in toks)
            short = len("".join(toks)) < 6 or "".join(toks).isdigit() or len(toks) == 1 and len(toks[0]) < 8
            pattern = rf"(?<![A-Za-z0-9]){body}(?![A-Za-z0-9])" if short else body
            self._patterns.append(pattern)
            self._combined = None

    def _regex(self) -> re.Pattern | None:
        # One alternation instead of thousands of searches: a subject has hundreds of distinct values.
        if self._combined is None and self._patterns:
            self._combined = re.compile("|".join(f"(?:{p})" for p in self._patterns), re.I)
        return self._combined

    def found(self, text) -> bool:
        regex = self._regex()
        return bool(regex and regex.search(as_text(text)))

    def clean(self, text) -> str:
        regex = self._regex()
        text = as_text(text)
        return regex.sub(REMOVED, text) if regex else text

    def found_bytes(self, data: bytes) -> bool:
        return self.found(data.decode("latin-1"))


# Besides IDENTIFYING_KEYWORDS, any element whose keyword says it holds a date, a person or a place.
_IDENTIFYING_RE = re.compile(r"(Date|DateTime)$|Physician|Operator|Institution|"
                             r"^(Other)?Patient(Name|IDs?|BirthDate|BirthTime|Address|TelephoneNumbers|BirthName)s?$")


# Enhanced DICOM's per-frame and shared functional groups hold geometry and timing for each frame
# (thousands of items): walking them costs seconds per file and adds no value not found at the top level
# (their frame dates repeat the study's date).
_SKIP_SEQUENCES = {0x52009229, 0x52009230}


def identifying_values(ds) -> list[str]:
    """Values of the identifying elements of one pydicom dataset, nested sequences included (enhanced
    DICOM repeats study fields in request and procedure sequences). Only elements whose keyword is
    identifying are decoded, which keeps this cheap on large headers."""
    from pydicom.datadict import dictionary_VR, keyword_for_tag

    out = []

    def walk(dataset, depth=0):
        for tag in list(dataset.keys()):
            if tag in _SKIP_SEQUENCES or tag.is_private:
                continue
            kw = keyword_for_tag(tag)
            if not kw:
                continue
            try:
                if dictionary_VR(tag) == "SQ":
                    if depth < 4:
                        for item in dataset[tag].value or []:
                            walk(item, depth + 1)
                    continue
                if not (kw in IDENTIFYING_KEYWORDS or _IDENTIFYING_RE.search(kw)):
                    continue
                value = dataset[tag].value
            except Exception:       # a corrupt element: its value is unknown, nothing to search for
                continue
            if value in (None, ""):
                continue
            values = list(value) if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue" else [value]
            out.extend(str(v) for v in values if str(v).strip())

    try:
        walk(ds)
    except Exception:
        pass        # the values read so far are kept; the file is reported corrupt elsewhere
    return out


def scrub_sidecar(meta: dict, scrubber: Scrubber, deny_keys=()) -> tuple[dict, list[str]]:
    """Sidecar without deny-listed keys and without any key whose value holds an identifying value."""
    deny = DENY_KEYS | set(deny_keys)
    clean, removed = {}, []
    for key, value in meta.items():
        if key in deny or _DENY_RE.search(key) or scrubber.found(key) or _holds_identifying(value, scrubber):
            removed.append(key)
        else:
            clean[key] = value
    return clean, removed


def _holds_identifying(value, scrubber: Scrubber) -> bool:
    if isinstance(value, dict):
        return any(scrubber.found(k) or _holds_identifying(v, scrubber) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return any(_holds_identifying(v, scrubber) for v in value)
    if isinstance(value, bool) or value is None:
        return False
    if isinstance(value, (int, float)):
        return str(value) in scrubber.values
    return scrubber.found(value)


# NIfTI-1 header text fields (offset, length): data_type, db_name, descrip, aux_file, intent_name.
_NIFTI_TEXT = ((4, 10), (14, 18), (148, 80), (228, 24), (328, 16))


def scrub_nifti(src: Path, dst: Path, scrubber: Scrubber) -> None:
    """Copy a .nii.gz, blanking header text fields that hold identifying values; refuse identifying
    values anywhere else in the header or its extensions."""
    with gzip.open(src, "rb") as f:
        head = bytearray(f.read(352))
        vox_offset = int(np.frombuffer(bytes(head[108:112]), "<f4")[0]) if len(head) >= 352 else 352
        ext = f.read(max(vox_offset - 352, 0))
    changed = False
    for off, n in _NIFTI_TEXT:
        if scrubber.found_bytes(bytes(head[off:off + n]).split(b"\0")[0]):
            head[off:off + n] = b"\0" * n
            changed = True
    if scrubber.found_bytes(bytes(head) + ext):
        raise ValueError("identifying value in the NIfTI header extension")
    if not changed:
        shutil.copyfile(src, dst)
        return
    with gzip.open(src, "rb") as f, gzip.open(dst, "wb", compresslevel=6) as g:
        f.read(352)
        g.write(bytes(head))
        shutil.copyfileobj(f, g, 1 << 20)




def output_text(path) -> bytes:
    """What of a written file can carry text: a NIfTI's header and extensions (not its voxels), else every byte."""
    path = Path(path)
    if path.name.endswith((".nii.gz", ".nii")):
        opener = gzip.open if path.name.endswith(".gz") else open
        with opener(path, "rb") as f:
            head = f.read(352)
            vox_offset = int(np.frombuffer(head[108:112], "<f4")[0]) if len(head) >= 352 else 352
            return head + f.read(max(vox_offset - 352, 0))
    return path.read_bytes()


def find_identifying(paths, scrubber: Scrubber) -> list[str]:
    """Paths (names or contents) among ``paths`` in which an identifying value occurs."""
    return [str(p) for p in paths if scrubber.found(str(p)) or scrubber.found_bytes(output_text(p))]
