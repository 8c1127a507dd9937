"""convert: one subject's raw DICOM folder -> BIDS (dcm2niix), de-identified, with a manifest of every series.

Steps for one subject (:func:`convert_subject`):

1. Pre-scan every file with pydicom (pixel data deferred): non-DICOM files, unreadable or truncated DICOM,
   non-image objects (reports, DICOMDIR) and incomplete series are found here and get manifest rows. A series
   is refused (no BIDS file) when one of its files is damaged (told by the file's own header, its series UID
   in its raw bytes, or its folder and name), when its slices lack geometry, or when its slice positions and
   volumes fall short of its geometry or of the counts its header gives (ImagesInAcquisition, GE/Philips
   slice counts, NumberOfTemporalPositions) - a missing end slice included. Symbolic links to folders are
   followed, each real folder read once.
2. Each series (SeriesInstanceUID) is converted on its own by dcm2niix (``-z y -ba y -b y``) from a folder
   of links to its files, so a bad series cannot take the others down and outputs map to series exactly.
3. Every image dcm2niix writes is mapped to a BIDS name by the first matching rule (:data:`DEFAULT_RULES`
   after the user's ``convert.rules``): regexes on SeriesDescription / ProtocolName / ImageType / any
   sidecar field -> datatype, suffix, entities, or skip with a reason.
4. Sidecars are scrubbed (deny-listed keys, and any key whose value contains an identifying value read
   from the source headers), NIfTI header text fields are checked the same way, and files are moved into
   the BIDS tree with write-to-temporary-then-rename (the image last).

dcm2niix is called directly rather than through nipype's ``Dcm2niix`` interface: the interface guesses its
outputs by parsing dcm2niix's stdout and renames nothing, whereas here each series runs in its own folder
with a fixed output name, which is what makes the series -> output mapping exact.

Identifying values never reach file names, the manifest or log lines: descriptions and paths are passed
through the same scrubber (:mod:`brainfuse.deid`) before they are written anywhere.

Commands: ``brainfuse convert`` (one subject), ``brainfuse convert dataset`` (dataset_description.json,
participants.tsv merged with the clinical table, merged manifest), ``brainfuse convert verify`` (the demo's
round trip: converted images against the BIDS images the DICOM export was made from).
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from . import cliargs
from . import io as bf_io
from .deid import Scrubber, identifying_values, scrub_nifti, scrub_sidecar
from .deid import as_text as _text
from .errors import BrainfuseError
from .layout import IMAGING, LabelError, bids_dataset_files, bids_path, check_label, with_ext

log = logging.getLogger("brainfuse.convert")

MANIFEST_COLUMNS = [
    "subject", "session", "series_number", "series_description", "protocol_name", "image_type", "n_files",
    "decision", "reason", "datatype", "suffix", "bids_name", "outputs", "source",
]

# --------------------------------------------------------------------------------------------------
# Mapping rules
# --------------------------------------------------------------------------------------------------
# A rule: {"name", "match": {field(s): regex}, "exclude": {field(s): regex}, "min_volumes": int,
#          "action": "convert" | "skip", "reason": str, "datatype", "suffix", "entities": {...},
#          "dir": "always" | "auto" | "never"}.
# "A|B" as a field name means "A or B"; list values (ImageType) are matched joined with "\".
# Regexes are case-insensitive ``re.search``. The first rule whose match/exclude/min_volumes all hold wins.
_T1_NAMES = r"t1w?(?![a-z0-9])|mprage|mp[-_ ]rage|bravo|spgr|tfl3d|(?<![a-z])tfl(?![a-z])|tfe|t1[-_ ]|[-_ ]t1"
_T1_NOT = r"mp2rage|inv[-_ ]?[12]|t1[-_ ]?map|t1rho|uni[-_ ]?den|flair"

DEFAULT_RULES: list[dict] = [
    {"name": "localizer", "action": "skip", "reason": "localizer/scout",
     "match": {"SeriesDescription|ProtocolName|ImageType":
               r"locali[sz]er|scout|survey|3[-_ ]?plane|aahead|(?<![a-z])loc(?![a-z])|calibration|(^|\\)LOCALIZER"}},
    {"name": "derived-diffusion-map", "action": "skip",
     "reason": "scanner-derived diffusion map (ADC/FA/TRACEW/tensor)",
     "match": {"ImageType": r"(^|\\)(ADC|EADC|FA|TRACEW|TENSOR|EXP|ISODWI|COLFA|CALC_BVALUE)(\\|$)"}},
    {"name": "derived-diffusion-name", "action": "skip",
     "reason": "scanner-derived diffusion map (ADC/FA/TRACEW/tensor)",
     "match": {"SeriesDescription": r"[-_ ](ADC|eADC|FA|ColFA|TRACEW|TENSOR(_B0)?|Isotropic|CALC_BVALUE)$"}},
    {"name": "derived", "action": "skip", "reason": "derived image (ImageType DERIVED: reformat, map or post-processing)",
     "match": {"ImageType": r"(^|\\)DERIVED(\\|$)"}},
    {"name": "phase", "action": "skip", "reason": "phase image",
     "match": {"ImageType": r"(^|\\)(P|PHASE)(\\|$)"}},
    {"name": "sbref", "action": "skip", "reason": "single-band reference image (not used)",
     "match": {"SeriesDescription|ProtocolName": r"sbref"}},
    {"name": "dwi", "datatype": "dwi", "suffix": "dwi", "dir": "always",
     "match": {"SeriesDescription|ProtocolName|ImageType": r"dwi|dti|diff|hardi|dmri|noddi|(^|\\)DIFFUSION(\\|$)"}},
    {"name": "bold", "datatype": "func", "suffix": "bold", "dir": "auto", "min_volumes": 2,
     "match": {"SeriesDescription|ProtocolName": r"bold|fmri|func|rest|task|ep2d_pace"}},
    {"name": "T1w-normalised", "datatype": "anat", "suffix": "T1w", "entities": {"rec": "norm"},
     "match": {"SeriesDescription|ProtocolName": _T1_NAMES, "ImageType|ImageTypeText": r"(^|\\)NORM(\\|$)"},
     "exclude": {"SeriesDescription|ProtocolName": _T1_NOT}},
    {"name": "T1w", "datatype": "anat", "suffix": "T1w",
     "match": {"SeriesDescription|ProtocolName": _T1_NAMES},
     "exclude": {"SeriesDescription|ProtocolName": _T1_NOT}},
    # dcm2niix's own guess (sidecar field BidsGuess) for names the regexes above do not know.
    {"name": "guess-dwi", "datatype": "dwi", "suffix": "dwi", "dir": "always", "match": {"BidsGuess": r"^dwi\\.*_dwi$"}},
    {"name": "guess-bold", "datatype": "func", "suffix": "bold", "dir": "auto", "min_volumes": 2,
     "match": {"BidsGuess": r"^func\\.*_bold$"}},
    {"name": "guess-T1w", "datatype": "anat", "suffix": "T1w", "match": {"BidsGuess": r"^anat\\.*_T1w$"},
     "exclude": {"SeriesDescription|ProtocolName": _T1_NOT}},
    {"name": "other", "action": "skip",
     "reason": "not T1w, BOLD or DWI by the mapping rules (add a convert.rules entry to keep it)", "match": {}},
]

RULE_KEYS = {"name", "match", "exclude", "min_volumes", "action", "reason", "datatype", "suffix", "entities", "dir"}
RULE_ENTITIES = {"task", "acq", "ce", "rec", "dir", "run", "echo"}
DATATYPES = {"anat", "func", "dwi", "fmap", "perf"}


class ConvertConfigError(BrainfuseError):
    """A convert.* configuration value that cannot be used; the message names the key."""


class ConvertInputError(BrainfuseError):
    """A DICOM folder, clinical table or manifest convert cannot use; the message names the file."""


@dataclass
class Mapping:
    """Series -> BIDS rules plus the conversion settings from the config's ``convert`` section."""
    rules: list = field(default_factory=lambda: list(DEFAULT_RULES))
    task: str = "rest"
    deny_keys: tuple = ()


def _check_rule(rule, where: str) -> dict:
    if not isinstance(rule, dict):
        raise ConvertConfigError(f"config key '{where}': a rule must be a mapping")
    unknown = set(rule) - RULE_KEYS
    if unknown:
        raise ConvertConfigError(f"config key '{where}.{sorted(unknown)[0]}': unknown rule key (known: {sorted(RULE_KEYS)})")
    for part in ("match", "exclude"):
        crit = rule.get(part, {})
        if not isinstance(crit, dict):
            raise ConvertConfigError(f"config key '{where}.{part}': must map field names to regular expressions")
        for key, pattern in crit.items():
            try:
                re.compile(str(pattern))
            except re.error as e:
                named = f" (rule {rule['name']!r})" if rule.get("name") else ""
                raise ConvertConfigError(f"config key '{where}.{part}.{key}'{named}: invalid regular expression "
                                         f"{str(pattern)!r} ({e})",
                                         fix="fix the pattern (Python re syntax; quote it in YAML)") from None
    if "match" not in rule:
        raise ConvertConfigError(f"config key '{where}.match': required (use {{}} to match every series)")
    action = rule.get("action", "convert")
    if action not in ("convert", "skip"):
        raise ConvertConfigError(f"config key '{where}.action': must be 'convert' or 'skip', not {action!r}")
    if action == "convert":
        if rule.get("datatype") not in DATATYPES:
            raise ConvertConfigError(f"config key '{where}.datatype': must be one of {sorted(DATATYPES)}")
        if not re.fullmatch(r"[A-Za-z0-9]+", str(rule.get("suffix", ""))):
            raise ConvertConfigError(f"config key '{where}.suffix': a BIDS suffix (letters and digits) is required")
        entities = rule.get("entities", {}) or {}
        if not isinstance(entities, dict):
            raise ConvertConfigError(f"config key '{where}.entities': must be a mapping")
        for key, value in entities.items():
            if key not in RULE_ENTITIES:
                raise ConvertConfigError(f"config key '{where}.entities.{key}': not one of {sorted(RULE_ENTITIES)}")
            try:
                check_label(str(value), f"entity {key}")
            except LabelError as e:
                raise ConvertConfigError(f"config key '{where}.entities.{key}': {e}") from None
        if rule.get("dir", "never") not in ("always", "auto", "never"):
            raise ConvertConfigError(f"config key '{where}.dir': must be 'always', 'auto' or 'never'")
    if "min_volumes" in rule and not (isinstance(rule["min_volumes"], int) and rule["min_volumes"] >= 1):
        raise ConvertConfigError(f"config key '{where}.min_volumes': must be a positive integer")
    return dict(rule)


def load_mapping(section: dict | None = None) -> Mapping:
    """Mapping from the config's ``convert`` section: user ``rules`` first, then the defaults.

    Keys: ``rules`` (list of rules, default []), ``default_rules`` (bool, default true),
    ``task`` (BOLD task label when neither the rule nor the series name gives one, default "rest"),
    ``deny_keys`` (extra sidecar keys to remove, default []).
    """
    section = dict(section or {})
    known = ("rules", "default_rules", "task", "deny_keys")
    unknown = set(section) - set(known)
    if unknown:
        raise ConvertConfigError(f"config key 'convert.{sorted(unknown)[0]}': unknown key",
                                 fix=f"the convert section takes {', '.join(known)} (check the spelling)")
    rules = section.get("rules") or []
    if not isinstance(rules, list):
        raise ConvertConfigError("config key 'convert.rules': must be a list of rules")
    user = [_check_rule(r, f"convert.rules[{i}]") for i, r in enumerate(rules)]
    for i, r in enumerate(user):
        r.setdefault("name", f"convert.rules[{i}]")
        # as the defaults do: DWI always names its phase-encoding direction, BOLD when runs differ in it
        r.setdefault("dir", {"dwi": "always", "func": "auto", "fmap": "auto", "perf": "auto"}.get(r.get("datatype"), "never"))
    defaults = section.get("default_rules", True)
    if not isinstance(defaults, bool):
        raise ConvertConfigError("config key 'convert.default_rules': must be true or false")
    try:
        task = check_label(str(section.get("task", "rest")), "task label")
    except LabelError as e:
        raise ConvertConfigError(f"config key 'convert.task': {e}") from None
    deny = section.get("deny_keys") or []
    if not isinstance(deny, list) or not all(isinstance(k, str) for k in deny):
        raise ConvertConfigError("config key 'convert.deny_keys': must be a list of sidecar key names")
    return Mapping(rules=user + (list(DEFAULT_RULES) if defaults else []), task=task, deny_keys=tuple(deny))


def match_rule(rule: dict, fields: dict) -> bool:
    """Whether ``rule`` applies to an image with these header/sidecar ``fields``."""
    for key, pattern in rule.get("match", {}).items():
        if not any(re.search(pattern, _text(fields.get(k)), re.I) for k in key.split("|")):
            return False
    for key, pattern in rule.get("exclude", {}).items():
        if any(re.search(pattern, _text(fields.get(k)), re.I) for k in key.split("|")):
            return False
    if rule.get("min_volumes") and fields.get("_volumes", 1) < rule["min_volumes"]:
        return False
    return True


def first_rule(rules, fields) -> dict | None:
    return next((r for r in rules if match_rule(r, fields)), None)


# --------------------------------------------------------------------------------------------------
# Pre-scan
# --------------------------------------------------------------------------------------------------
_DICOMDIR_SOP = "1.2.840.10008.1.3.10"
# Storage classes that always carry pixel data (MR, enhanced MR, CT, enhanced CT, secondary capture, PET).
_IMAGE_SOP = {"1.2.840.10008.5.1.4.1.1." + s for s in ("4", "4.1", "4.3", "2", "2.1", "7", "128", "130")}
_NON_IMAGE_SOP = {"1.2.840.10008.5.1.4.1.1.66": "raw data", "1.2.840.10008.5.1.4.1.1.88.22": "structured report",
                  "1.2.840.10008.5.1.4.1.1.4.2": "MR spectroscopy", "1.2.840.10008.5.1.4.1.1.104.1": "encapsulated PDF"}
_PIXEL_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)     # PixelData, FloatPixelData, DoubleFloatPixelData


@dataclass
class DicomFile:
    path: Path
    series_uid: str
    study_uid: str
    series_number: int | None
    description: str
    protocol: str
    image_type: str
    has_pixels: bool
    sop_class: str
    instance: int | None
    position: tuple | None
    frames: int
    temporal_positions: int | None
    locations: int | None           # slice positions the header says the series has ...
    locations_key: str              # ... and the header field that says so
    mosaic: bool
    orientation: tuple | None = None
    derived: bool = False
    acquisition_images: int | None = None   # ImagesInAcquisition: slices of one volume, or of all volumes (GE)
    phase: bool = False


@dataclass
class BadFile:
    path: Path
    decision: str       # skipped (not DICOM) | failed (corrupt)
    reason: str
    series_uid: str | None = None       # the series a damaged file belongs to, where that can be told
    info: DicomFile | None = None       # what its header said, when that much was readable


@dataclass
class Series:
    uid: str
    files: list = field(default_factory=list)
    damaged: list = field(default_factory=list)     # BadFiles of this series: it cannot be converted whole

    @property
    def first(self) -> DicomFile:
        return self.files[0] if self.files else self.damaged[0].info

    @property
    def number(self):
        return self.first.series_number


def _int(value):
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


_NATIVE_SYNTAXES = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2"}   # uncompressed pixels


def _pixel_bytes_needed(ds) -> int | None:
    """Bytes the uncompressed pixel data of ``ds`` must hold (Rows x Columns x samples x bits x frames),
    None when that cannot be told (compressed, or a size field missing)."""
    meta = getattr(ds, "file_meta", None)
    syntax = str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""
    if syntax not in _NATIVE_SYNTAXES:
        return None
    try:
        rows, cols, bits = int(ds.Rows), int(ds.Columns), int(ds.BitsAllocated)
        samples, frames = int(ds.get("SamplesPerPixel") or 1), int(ds.get("NumberOfFrames") or 1)
    except (AttributeError, TypeError, ValueError):
        return None
    needed = (rows * cols * samples * frames * bits + 7) // 8
    return needed + needed % 2          # values are padded to an even length


def read_header(path: Path):
    """(dataset, problem): (ds, None) for a readable file; (None, BadFile) for a file that is not DICOM or
    whose header cannot be read; (ds, BadFile) for a damaged image whose header could be read (its series
    is known: that series is incomplete). Pixel data are not read, but their extent is checked against the
    file size and against Rows x Columns x frames, and an image object without pixel data counts as
    truncated."""
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.tag import Tag

    try:
        ds = pydicom.dcmread(str(path), defer_size=1024)
    except InvalidDicomError:
        return None, BadFile(path, "skipped", "not a DICOM file")
    except Exception as e:  # pydicom raises many kinds on damaged files
        return None, BadFile(path, "failed", f"corrupt DICOM: unreadable header ({type(e).__name__}: "
                                             f"cut short or overwritten)")
    try:
        meta = getattr(ds, "file_meta", None)
        sop = str(ds.get("SOPClassUID") or (meta.get("MediaStorageSOPClassUID") if meta is not None else "") or "")
        if sop == _DICOMDIR_SOP or path.name.upper() == "DICOMDIR":
            return None, BadFile(path, "skipped", "DICOMDIR (index of the export, no image)")
        damaged = ds if ds.get("SeriesInstanceUID") else None
        pixel = next((ds._dict[Tag(t)] for t in _PIXEL_TAGS if Tag(t) in ds._dict), None)
        if pixel is not None:
            length, tell = getattr(pixel, "length", None), getattr(pixel, "value_tell", None)
            size = path.stat().st_size
            if length is not None and tell is not None and length != 0xFFFFFFFF and tell + length > size:
                kept = max(size - tell, 0)
                return damaged, BadFile(path, "failed", f"corrupt DICOM: truncated pixel data ({kept} of {length} bytes)")
            needed = _pixel_bytes_needed(ds) if Tag(_PIXEL_TAGS[0]) in ds._dict else None
            if needed and length not in (None, 0xFFFFFFFF) and length < needed:
                return damaged, BadFile(path, "failed",
                                        f"corrupt DICOM: pixel data hold {length} bytes, its Rows x Columns x frames "
                                        f"need {needed}")
        elif sop in _IMAGE_SOP or "Rows" in ds:
            return damaged, BadFile(path, "failed", "corrupt DICOM: image object without pixel data (truncated file?)")
        if not ds.get("SeriesInstanceUID"):
            return None, BadFile(path, "failed", "corrupt DICOM: no SeriesInstanceUID (truncated file?)")
        return ds, None
    except Exception as e:
        return None, BadFile(path, "failed", f"corrupt DICOM: {type(e).__name__} while reading the header")


# Private fields giving the number of slice positions of a series: (group, creator, element, name).
_SLICE_COUNT_TAGS = ((0x0021, "GEMS_RELA_01", 0x4F, "GE LocationsInAcquisition"),
                     (0x2001, "Philips Imaging DD 001", 0x18, "Philips NumberOfSlicesMR"))


def _header_slices(ds) -> tuple[int | None, str]:
    """(number of slice positions, field name) from a vendor's private header, else (None, "").
    Looked up in the raw element dict: pydicom's ``private_block`` cost ~1 ms per file."""
    raw = ds._dict
    for group, creator, element, name in _SLICE_COUNT_TAGS:
        for block in range(0x10, 0x100):
            tag = group << 16 | block
            if tag not in raw:
                continue
            try:
                if str(ds[tag].value).strip() == creator:
                    value = _int(ds[group << 16 | block << 8 | element].value)
                    if value:
                        return value, name
            except Exception:       # a damaged private element: no count from it
                pass
    return None, ""


def _floats(value, n: int, digits: int) -> tuple | None:
    try:
        return tuple(round(float(v), digits) for v in value) if value is not None and len(value) == n else None
    except (TypeError, ValueError):
        return None


def _describe(ds, path: Path) -> DicomFile:
    def get(kw, default=None):
        try:
            return ds.get(kw, default)
        except Exception:
            return default

    image_type = _text(list(get("ImageType") or []))
    sop = str(get("SOPClassUID", "") or "")
    has_pixels = any(t in ds._dict for t in (0x7FE00010, 0x7FE00008, 0x7FE00009))
    locations, locations_key = _header_slices(ds)
    return DicomFile(
        path=path, series_uid=str(get("SeriesInstanceUID", "") or ""), study_uid=str(get("StudyInstanceUID", "") or ""),
        series_number=_int(get("SeriesNumber")), description=str(get("SeriesDescription", "") or ""),
        protocol=str(get("ProtocolName", "") or ""), image_type=image_type, has_pixels=has_pixels, sop_class=sop,
        instance=_int(get("InstanceNumber")), position=_floats(get("ImagePositionPatient"), 3, 2),
        frames=_int(get("NumberOfFrames")) or 1, temporal_positions=_int(get("NumberOfTemporalPositions")),
        locations=locations, locations_key=locations_key, mosaic="MOSAIC" in image_type.upper(),
        orientation=_floats(get("ImageOrientationPatient"), 6, 4),
        derived=bool(re.search(r"(^|\\)DERIVED(\\|$)", image_type, re.I)),
        acquisition_images=_int(get("ImagesInAcquisition")),
        phase=bool(re.search(r"(^|\\)(P|PHASE)(\\|$)", image_type, re.I)))


def _walk(top: Path):
    """(folder, file names) under ``top``, following symbolic links (studies are often assembled from
    links to series folders) but reading each real folder once: a link back to an ancestor or a second
    link to the same folder is passed over."""
    seen = set()
    for root, dirs, files in os.walk(top, followlinks=True):
        dirs.sort()
        st = os.stat(root)
        if (st.st_dev, st.st_ino) in seen:
            dirs[:] = []
            log.info("folder read once already (a link loop or a second link to it): not read again")
            continue
        seen.add((st.st_dev, st.st_ino))
        yield Path(root), sorted(files)


def _name_shape(name: str) -> str:
    """A file name with its numbers blanked: the slices of a series share one (IM_0001.dcm, IM_0002.dcm)."""
    return re.sub(r"\d+", "#", name.lower())


def _uid_in_bytes(path: Path, uids) -> str | None:
    """The one known SeriesInstanceUID that a damaged file holds as element (0020,000E) (explicit or implicit
    VR, either byte order), found in its raw bytes where pydicom cannot parse them; None if none or several."""
    try:
        with open(path, "rb") as f:
            data = f.read(8 << 20)          # the series UID precedes any large element
    except OSError:
        return None
    found = set()
    for uid in uids:
        value = uid.encode("ascii", "replace")
        start = data.find(value)
        while start >= 0:
            # the tag 8 bytes before the value: explicit VR (tag, 'UI', 2-byte length) or implicit (4-byte length)
            if start >= 8 and data[start - 8:start - 4] in (b"\x20\x00\x0e\x00", b"\x00\x20\x00\x0e"):
                found.add(uid)
            start = data.find(value, start + 1)
    return found.pop() if len(found) == 1 else None


def _attribute_damaged(series: dict, bad: list) -> None:
    """Give each damaged file the series it belongs to, so that series is refused rather than converted a
    slice short: from its own header (``read_header``), else from the series' UID in its raw bytes, else -
    for a damaged DICOM file, or a file cut to less than a DICOM preamble - from its folder when that folder
    holds exactly one series and the file is named like that series' files."""
    by_folder = defaultdict(lambda: (set(), set()))      # folder -> (series UIDs, name shapes of their files)
    for s in series.values():
        for f in s.files:
            uids, shapes = by_folder[f.path.parent]
            uids.add(s.uid)
            shapes.add(_name_shape(f.path.name))
    for b in bad:
        if b.series_uid is None and b.decision == "failed":
            b.series_uid = _uid_in_bytes(b.path, series)
        if b.series_uid is None and b.path.parent in by_folder:
            uids, shapes = by_folder[b.path.parent]
            short = b.decision == "skipped" and b.reason == "not a DICOM file" and b.path.stat().st_size < 132
            if len(uids) == 1 and _name_shape(b.path.name) in shapes and (b.decision == "failed" or short):
                b.series_uid = next(iter(uids))
                if short:
                    b.decision, b.reason = "failed", (f"corrupt DICOM: {b.path.stat().st_size} bytes, cut short "
                                                      f"before its header (named like the series' files)")
        if b.series_uid is not None:
            series.setdefault(b.series_uid, Series(b.series_uid)).damaged.append(b)


def scan(dicom_dir) -> tuple[list[Series], list[BadFile], Scrubber]:
    """Every file under ``dicom_dir``: series (by SeriesInstanceUID), bad files, identifying values.
    A damaged file that can be told to belong to a series is also listed in that series' ``damaged``."""
    dicom_dir = Path(dicom_dir)
    scrubber = Scrubber()
    series: dict[str, Series] = {}
    bad: list[BadFile] = []
    for root, files in _walk(dicom_dir):
        for name in files:
            path = root / name
            if not path.is_file():
                bad.append(BadFile(path, "skipped", "not a regular file"))
                continue
            ds, problem = read_header(path)
            if ds is not None:
                for v in identifying_values(ds):
                    scrubber.add(v)
            if problem:
                if ds is not None:
                    problem.info = _describe(ds, path)
                    problem.series_uid = problem.info.series_uid
                bad.append(problem)
                continue
            info = _describe(ds, path)
            series.setdefault(info.series_uid, Series(info.series_uid)).files.append(info)
    if bad:
        _attribute_damaged(series, bad)
    ordered = sorted(series.values(), key=lambda s: (s.number if s.number is not None else 10**9, str(s.first.path)))
    return ordered, bad, scrubber


def check_complete(series: Series) -> str | None:
    """Why a series looks incomplete, or None.

    Single-slice files: from the geometry (slice positions x volumes), since instance numbers need not be
    contiguous (Philips leaves gaps). Files holding whole volumes (mosaic, multi-frame): from gaps in the
    instance numbers.
    """
    files = [f for f in series.files if f.has_pixels]
    if len(files) < 2:
        return None
    if all(f.frames == 1 and not f.mosaic and f.position is not None for f in files):
        return _check_geometry(files)
    return _check_instances(files)


# Classic (one slice per file) MR and CT images: each file must say where its slice lies.
_CLASSIC_SOP = {"1.2.840.10008.5.1.4.1.1.4", "1.2.840.10008.5.1.4.1.1.2"}


def check_geometry_present(series: Series) -> str | None:
    """Why the slices of a classic MR/CT series cannot be placed (no ImagePositionPatient or
    ImageOrientationPatient in some files), or None. dcm2niix would still write an image, with a made-up
    orientation and slice order."""
    files = [f for f in series.files if f.has_pixels and f.sop_class in _CLASSIC_SOP and f.frames == 1]
    for key, attr in (("ImagePositionPatient", "position"), ("ImageOrientationPatient", "orientation")):
        lacking = [f for f in files if getattr(f, attr) is None]
        if lacking:
            example = f"{lacking[0].path.parent.name}/{lacking[0].path.name}"
            return (f"no slice geometry: {key} missing (or not 3/6 numbers) in {len(lacking)} of {len(series.files)} "
                    f"files (e.g. {example}), so slices cannot be placed or ordered; export the series again with "
                    f"its full headers (a de-identification tool may have removed {key})")
    return None


def _check_instances(files) -> str | None:
    instances = sorted(f.instance for f in files if f.instance is not None)
    n = len(files)
    if len(instances) == n and len(set(instances)) == n and instances[-1] - instances[0] + 1 > n:
        missing = instances[-1] - instances[0] + 1 - n
        return f"incomplete series: {n} files, instance numbers {instances[0]}..{instances[-1]} ({missing} missing)"
    # The end of the series: files holding one volume each (mosaic; multi-frame unless their count divides the
    # header's, as files of several volumes each would) against the number of volumes the header gives.
    ntp = {f.temporal_positions for f in files}
    frames = {f.frames for f in files}
    if len(ntp) == 1 and len(frames) == 1 and not any(f.derived for f in files):
        expected = next(iter(ntp)) or 0
        if n < expected and (all(f.mosaic for f in files) or expected % n):
            return (f"incomplete series: {n} files holding whole volumes, the header (NumberOfTemporalPositions) "
                    f"says {expected} volumes: {expected - n} missing")
    return None


def _slice_coordinates(files) -> dict | None:
    """{slice position: coordinate along the slice normal}; None when the files are not one stack of parallel
    slices (orientation varies, or two positions lie in the same plane)."""
    orientations = {f.orientation for f in files}
    if len(orientations) != 1 or None in orientations:
        return None
    normal = np.cross(*np.reshape(next(iter(orientations)), (2, 3)))
    coords = {f.position: float(np.dot(f.position, normal)) for f in files}
    if len({round(c, 2) for c in coords.values()}) != len(coords):
        return None
    return coords


def _slice_gap(coords) -> str | None:
    """A gap in evenly spaced slice positions: a jump of more than 1.5 times the typical spacing."""
    steps = np.diff(coords)
    if len(steps) < 2:
        return None
    spacing = float(np.median(steps))
    for i, step in enumerate(steps):
        if spacing > 0.01 and step > 1.5 * spacing:
            lost = int(round(step / spacing)) - 1
            return (f"slices {i + 1} and {i + 2} of {len(coords)} are {step:.2f} mm apart where the spacing is "
                    f"{spacing:.2f} mm: about {lost} slice position(s) missing between them")
    return None


def _check_geometry(files) -> str | None:
    """Each slice position must hold the same number of images (volumes), the positions must be evenly
    spaced along the slice normal, and their number must match the header's where it gives one."""
    n = len(files)
    per_position = Counter(f.position for f in files)
    volumes = max(per_position.values())
    coords = _slice_coordinates(files)
    short = {p: c for p, c in per_position.items() if c < volumes}
    if short:
        if coords is not None:      # name slices by their rank along the normal, as a viewer shows them
            rank = {p: i + 1 for i, p in enumerate(sorted(coords, key=coords.get))}
            where = [f"slice {rank[p]} of {len(rank)} has {short[p]}" for p in sorted(short, key=rank.get)]
        else:
            where = [f"position {p} has {c}" for p, c in short.items()]
        more = f" and {len(where) - 3} more" if len(where) > 3 else ""
        return (f"incomplete series: {sum(volumes - c for c in short.values())} image(s) missing: {n} files over "
                f"{len(per_position)} slice positions that should each hold {volumes}, but {', '.join(where[:3])}{more}")
    if coords is not None:
        gap = _slice_gap(sorted(coords.values()))
        if gap:
            return f"incomplete series: {gap}"
    # the header counts the acquired slices; a derived series (reformat, map) need not sample them all
    expected = max(files, key=lambda f: f.locations or 0)
    if expected.locations and len(per_position) < expected.locations and not any(f.derived for f in files):
        return (f"incomplete series: {len(per_position)} slice positions, the header ({expected.locations_key}) "
                f"says {expected.locations}: {expected.locations - len(per_position)} missing at an end of the stack")
    expected_t = max((f.temporal_positions or 0) for f in files)
    if expected_t > 1 and volumes < expected_t and len({f.temporal_positions for f in files}) == 1:
        return f"incomplete series: {volumes} volumes, the header says {expected_t}"
    # ImagesInAcquisition (standard, any vendor) counts the images of one volume (Siemens: each volume is an
    # acquisition) or of all volumes (GE): a complete series has a number of positions that divides it and a
    # number of files it divides. Phase and derived images may count differently: not judged by it.
    images = max((f.acquisition_images or 0) for f in files)
    positions = len(per_position)
    if (images and coords is not None and positions < images and not (images % positions == 0 and n % images == 0)
            and not any(f.derived or f.phase for f in files)):
        return (f"incomplete series: {n} images over {positions} slice positions, the header (ImagesInAcquisition) "
                f"says {images} images per acquisition: slice positions missing at an end of the stack")
    return None


# --------------------------------------------------------------------------------------------------
# dcm2niix
# --------------------------------------------------------------------------------------------------
def dcm2niix_binary() -> str:
    """The dcm2niix executable: the PyPI package's binary, else the one on PATH."""
    try:
        import dcm2niix

        if os.access(dcm2niix.bin, os.X_OK):
            return dcm2niix.bin
    except ImportError:
        pass
    found = shutil.which("dcm2niix") or str(Path(sys.executable).parent / "dcm2niix")
    if not os.access(found, os.X_OK):
        raise ConvertInputError("dcm2niix not found (neither the dcm2niix package's binary nor one on PATH)",
                                fix="install it (pip install dcm2niix, or conda install -c conda-forge dcm2niix) or "
                                    "run with the convert environment (envs/convert.yaml)")
    return found


def dcm2niix_version() -> str:
    out = subprocess.run([dcm2niix_binary(), "--version"], capture_output=True, text=True).stdout
    m = re.search(r"v\d+\.\d+\.\d+", out)
    return m[0] if m else "unknown"


def run_dcm2niix(files, out_dir: Path, timeout: int = 600) -> tuple[int, str]:
    """Convert exactly ``files`` (one series) into ``out_dir`` as img*.nii.gz (+ .json, .bval, .bvec)."""
    src = out_dir / "in"
    dst = out_dir / "out"
    src.mkdir(parents=True)
    dst.mkdir()
    for i, f in enumerate(files):
        os.symlink(os.path.abspath(f), src / f"{i:06d}.dcm")
    cmd = [dcm2niix_binary(), "-z", "y", "-ba", "y", "-b", "y", "-f", "img", "-o", str(dst), str(src)]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, errors="replace", timeout=timeout)
        return r.returncode, r.stdout + r.stderr
    except subprocess.TimeoutExpired:
        return -1, f"dcm2niix timed out after {timeout} s"


_VARIANT_RE = re.compile(r"^img(?P<variant>.*)\.nii\.gz$")


def _messages(text: str, scrubber: Scrubber, work: Path, sources=()) -> list[str]:
    """dcm2niix warnings/errors, without the work folder or identifying values; the links dcm2niix read
    (``in/000003.dcm``) named by the source files they stand for (``sources``: relative paths)."""
    out = []
    link = re.compile(re.escape(str(work / "in")) + r"/(\d{6})\.dcm")
    for line in text.splitlines():
        if re.search(r"warning|error|unable|missing|not stacked|corrupt|abort", line, re.I):
            line = link.sub(lambda m: sources[int(m[1])] if int(m[1]) < len(sources) else m[0], line)
            line = line.replace(str(work), "").strip()
            out.append(scrubber.clean(line)[:300])
    return out


# --------------------------------------------------------------------------------------------------
# Naming
# --------------------------------------------------------------------------------------------------
_AXIS_NAMES = (("L", "R"), ("P", "A"), ("I", "S"))    # RAS: +x points R, +y A, +z S


def pe_dir_label(pe: str | None, affine) -> str | None:
    """BIDS ``dir`` label (from-to, e.g. AP) of a PhaseEncodingDirection (i, j-, …) given the image affine.

    ``j`` means phase encoding along +j, so the label names where +j starts and ends in the world:
    for dcm2niix's usual axial output (+j pointing anterior) ``j`` is PA and ``j-`` is AP.
    """
    m = re.fullmatch(r"([ijk])(-?)", str(pe or ""))
    if not m or affine is None:
        return None
    axis = np.asarray(affine)[:3, "ijk".index(m[1])] * (-1 if m[2] else 1)
    world = int(np.argmax(np.abs(axis)))
    lo, hi = _AXIS_NAMES[world]
    return lo + hi if axis[world] > 0 else hi + lo


def description_entities(text: str) -> dict:
    """ReproIn-style entities in a series name (``func-bold_task-rest_acq-mb``): task, acq, ce, rec, dir."""
    out = {}
    for key in ("task", "acq", "ce", "rec", "dir"):
        m = re.search(rf"(?:^|[_\- ]){key}-([A-Za-z0-9]+)", text)
        if m:
            out[key] = m[1]
    return out


def description_dir(text: str) -> str | None:
    m = re.search(r"(?<![A-Za-z])(AP|PA|LR|RL|SI|IS)(?![A-Za-z])", text)
    return m[1] if m else None


@dataclass(eq=False)     # compared by identity (it holds an array)
class Candidate:
    """One image written by dcm2niix and what the rules decided for it."""
    series: Series
    variant: str
    files: dict                 # ext -> path in the work folder
    sidecar: dict
    volumes: int
    affine: np.ndarray | None
    rule: dict | None = None
    decision: str = ""
    reason: str = ""
    datatype: str = ""
    suffix: str = ""
    entities: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)
    outputs: list = field(default_factory=list)
    dir_label: str | None = None

    @property
    def echo(self):
        m = re.match(r"_e(\d+)", self.variant)
        return int(m[1]) if m else None


def _fields(c: Candidate) -> dict:
    f = c.series.first
    fields = {"SeriesDescription": f.description, "ProtocolName": f.protocol, "ImageType": f.image_type}
    fields.update({k: v for k, v in c.sidecar.items() if v not in (None, "")})
    fields["_volumes"] = c.volumes
    return fields


def _decide(c: Candidate, mapping: Mapping, scrubber: Scrubber) -> None:
    fields = _fields(c)
    rule = first_rule(mapping.rules, fields)
    c.rule = rule
    if rule is None:
        c.decision, c.reason = "skipped", "no mapping rule matched"
        return
    if rule.get("action", "convert") == "skip":
        c.decision, c.reason = "skipped", f"{rule.get('reason') or 'skipped by rule'} (rule {rule['name']})"
        return
    if re.fullmatch(r"_(ph|real|imaginary)", c.variant) or c.variant.endswith("_ph"):
        c.decision, c.reason = "skipped", f"{c.variant.strip('_')} image written by dcm2niix alongside the magnitude"
        return
    c.decision = "converted"
    c.datatype, c.suffix = rule["datatype"], rule["suffix"]
    names = " ".join(str(fields.get(k, "")) for k in ("SeriesDescription", "ProtocolName"))
    ents = {k: v for k, v in description_entities(names).items() if k != "dir" and not scrubber.found(v)}
    ents.update({k: str(v) for k, v in (rule.get("entities") or {}).items()})
    if c.suffix == "bold":
        ents.setdefault("task", mapping.task)
    if c.echo is not None:
        ents["echo"] = str(c.echo)
    c.entities = ents
    c.reason = f"rule {rule['name']}"
    if c.datatype == "dwi" and not ("bval" in c.files and "bvec" in c.files):
        c.decision, c.reason = "skipped", "diffusion series without b-values/b-vectors from dcm2niix (derived or trace image?)"


def _assign_dirs(cands: list[Candidate]) -> None:
    """``dir`` entity: from PhaseEncodingDirection + affine, else from the series name; 'auto' rules add it
    only when images of the same kind differ in it."""
    for c in cands:
        mode = (c.rule or {}).get("dir", "never")
        if "dir" in c.entities or mode == "never":
            c.dir_label = c.entities.get("dir")
            continue
        label = pe_dir_label(c.sidecar.get("PhaseEncodingDirection"), c.affine)
        named = description_dir(" ".join([c.series.first.description, c.series.first.protocol]))
        if label and named and label != named:
            c.notes.append(f"dir-{label} from PhaseEncodingDirection, although the series name says {named}")
        if not label and named:
            c.notes.append(f"dir-{named} from the series name (no phase-encoding polarity in the headers)")
        c.dir_label = label or named
        if not c.dir_label and mode == "always":
            c.notes.append("no dir entity: phase-encoding polarity unknown")
    groups = defaultdict(list)
    for c in cands:
        if (c.rule or {}).get("dir") == "auto" and "dir" not in c.entities:
            groups[(c.datatype, c.suffix, tuple(sorted((k, v) for k, v in c.entities.items() if k != "run")))].append(c)
    for c in cands:
        mode = (c.rule or {}).get("dir", "never")
        if "dir" in c.entities or not c.dir_label:
            continue
        if mode == "always":
            c.entities["dir"] = c.dir_label
        elif mode == "auto":
            key = (c.datatype, c.suffix, tuple(sorted((k, v) for k, v in c.entities.items() if k != "run")))
            if len({g.dir_label for g in groups[key]}) > 1:
                c.entities["dir"] = c.dir_label


def _assign_runs(cands: list[Candidate]) -> None:
    """run-1, run-2, … (in series order) when several images would otherwise get the same name."""
    groups = defaultdict(list)
    for c in cands:
        key = (c.datatype, c.suffix, tuple(sorted((k, v) for k, v in c.entities.items() if k not in ("run", "echo"))))
        groups[key].append(c)
    for members in groups.values():
        series = []
        for c in members:
            if c.series.uid not in series:
                series.append(c.series.uid)
        if len(series) > 1 and not any("run" in c.entities for c in members):
            for c in members:
                c.entities["run"] = str(series.index(c.series.uid) + 1)


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------
def _install(c: Candidate, bids_root: Path, subject: str, session: str | None, scrubber: Scrubber,
             mapping: Mapping) -> None:
    """Write one image's files into the BIDS tree: all to temporary names first, then renamed, image last."""
    image = Path(bids_path(bids_root, subject, c.datatype, c.suffix, ".nii.gz", ses=session, **c.entities))
    image.parent.mkdir(parents=True, exist_ok=True)
    meta, removed = scrub_sidecar(c.sidecar, scrubber, mapping.deny_keys)
    if c.suffix == "bold":
        meta["TaskName"] = c.entities.get("task", mapping.task)
    if removed:
        c.notes.append(f"{len(removed)} sidecar keys removed")
        log.info("%s: sidecar keys removed: %s", image.name, ", ".join(scrubber.clean(k) for k in removed))
    staged = []          # (temporary, final)
    try:
        for ext in ("bval", "bvec"):
            if ext in c.files and c.datatype == "dwi":
                final = image.with_name(image.name.replace(".nii.gz", f".{ext}"))
                tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
                shutil.copyfile(c.files[ext], tmp)
                staged.append((tmp, final))
        final = image.with_name(image.name.replace(".nii.gz", ".json"))
        tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(meta, indent=2) + "\n")
        staged.append((tmp, final))
        tmp = image.with_name(f".{image.name}.{os.getpid()}.tmp")
        scrub_nifti(c.files["nii.gz"], tmp, scrubber)
        staged.append((tmp, image))
        for tmp, final in staged:
            os.replace(tmp, final)
    except BaseException:
        for tmp, final in staged:
            for p in (tmp, final):
                if p.exists():
                    p.unlink()
        raise
    c.outputs = [os.path.relpath(final, bids_root) for _, final in staged]


# --------------------------------------------------------------------------------------------------
# One subject
# --------------------------------------------------------------------------------------------------
def _row(subject, session, series: Series | None, scrubber: Scrubber, dicom_dir: Path, **values) -> dict:
    row = dict.fromkeys(MANIFEST_COLUMNS, "")
    row.update(subject=f"sub-{subject}", session=f"ses-{session}" if session else "")
    if series is not None:
        f = series.first
        row.update(series_number=f.series_number if f.series_number is not None else "",
                   series_description=scrubber.clean(f.description), protocol_name=scrubber.clean(f.protocol),
                   image_type=f.image_type, n_files=len(series.files) + len(series.damaged),
                   source=scrubber.clean(os.path.relpath(f.path.parent, dicom_dir)), _series=series.uid)
    row.update({k: scrubber.clean(v) if isinstance(v, str) else v for k, v in values.items()})
    return row


_HEADER_FIELDS = {"SeriesDescription", "ProtocolName", "ImageType"}


def _skipped_by_header(rules, series: Series) -> dict | None:
    """The skip rule that decides a series from its header alone (localizer, derived, phase ...), else None:
    None as soon as a rule that could come first needs what only dcm2niix tells (sidecar fields, volumes)."""
    f = series.first
    fields = {"SeriesDescription": f.description, "ProtocolName": f.protocol, "ImageType": f.image_type}
    for rule in rules:
        keys = {k for part in ("match", "exclude") for key in rule.get(part, {}) for k in key.split("|")}
        if not rule.get("match") or not keys <= _HEADER_FIELDS or rule.get("min_volumes"):
            return None
        if match_rule(rule, fields):
            return rule if rule.get("action", "convert") == "skip" else None
    return None


def _damaged_reason(series: Series, dicom_dir: Path) -> str:
    """Why a series with damaged files is refused: the files, what is wrong, what to do."""
    damaged = sorted(series.damaged, key=lambda b: str(b.path))
    first = damaged[0]
    more = f" (and {len(damaged) - 1} more)" if len(damaged) > 1 else ""
    total = len(series.files) + len(damaged)
    what = ("damaged series: its only file is unreadable" if total == 1 else
            f"damaged series: all {total} files are unreadable" if not series.files else
            f"incomplete series: {len(damaged)} of its {total} files unreadable, converting the rest would "
            f"silently lose slices")
    return (f"{what}: {os.path.relpath(first.path, dicom_dir)}: {first.reason}{more}; copy the whole series again "
            f"from the scanner or PACS")


def _looks_t1w(series: Series, sidecar: dict | None = None) -> bool:
    f = series.first
    names = f"{f.description} {f.protocol}"
    if re.search(_T1_NOT, names, re.I):
        return False
    return bool(re.search(_T1_NAMES, names, re.I)
                or re.search(r"^anat\\.*_T1w$", _text((sidecar or {}).get("BidsGuess")), re.I))


def _no_t1w(tag: str, series_list, cands, rows, scrubber: Scrubber, dicom_dir: Path) -> str:
    """The line for a subject without a converted T1w: the series that looked like one, why each was not
    converted, and the convert.rules entry that would accept a skipped one. Notes it on their manifest rows."""
    found, rule_hint = [], None
    by_series = {}
    for c in cands:
        by_series.setdefault(c.series.uid, c)
    for series in series_list:
        c = by_series.get(series.uid)
        if not _looks_t1w(series, c.sidecar if c else None):
            continue
        if c is not None:
            if (c.rule or {}).get("name") in ("localizer", "phase"):
                continue
            decision, reason = c.decision, c.reason
        else:
            row = next((r for r in rows if r.get("_series") == series.uid), None)
            if row is None:
                continue
            decision, reason = row["decision"], row["reason"]
        desc = scrubber.clean(series.first.description)
        folder = scrubber.clean(os.path.relpath(series.first.path.parent, dicom_dir))
        verb = "failed" if decision == "failed" else f"was {decision}"
        found.append(f"series {series.number} '{desc}' (folder {folder}) {verb}: {reason}")
        if decision == "skipped" and rule_hint is None and desc:
            rule_hint = (f"if it is the T1w to use, add to convert.rules: {{match: {{SeriesDescription: "
                         f"'^{re.escape(desc)}$'}}, datatype: anat, suffix: T1w}}")
            if c is not None:
                c.notes.append("the subject has no other T1w: add a convert.rules entry to convert this one")
    if not found:
        return (f"{tag} has no T1w: no series is named like one; if one of its series is a T1w, add a "
                f"convert.rules entry for it; until then {tag} goes on without anatomy (stages that need a T1w "
                f"leave it out)")
    more = f" (and {len(found) - 3} more)" if len(found) > 3 else ""
    return (f"{tag} has no T1w: " + "; ".join(found[:3]) + more + "; " + (rule_hint + "; " if rule_hint else "")
            + f"until then {tag} goes on without anatomy (stages that need a T1w leave it out)")


@dataclass
class _Subject:
    """One ``convert_subject`` call: who and where, and the manifest rows gathered so far (in manifest order)."""
    subject: str
    session: str | None
    tag: str
    dicom_dir: Path
    bids_root: Path
    mapping: Mapping
    scrubber: Scrubber
    rows: list = field(default_factory=list)

    def add(self, series: Series | None, **values) -> dict:
        """Append one manifest row (values scrubbed by ``_row``) and return it."""
        row = _row(self.subject, self.session, series, self.scrubber, self.dicom_dir, **values)
        self.rows.append(row)
        return row

    def label(self, series: Series) -> str:
        return f"{self.tag}: series {series.number} '{self.scrubber.clean(series.first.description)}'"


def _check_dicom_dir(dicom_dir: Path, subject: str) -> None:
    if not dicom_dir.is_dir():
        problem = "is a file, not a folder" if dicom_dir.exists() else "does not exist"
        raise ConvertInputError(f"DICOM folder of sub-{subject} {problem}", path=dicom_dir,
                                fix="point --dicom-dir (or the config's dicom_dir) at a folder holding one folder "
                                    "of DICOM files per subject")


def _record_bad_files(s: _Subject, bad) -> None:
    """One row per file that is not DICOM or is corrupt (scan's BadFile)."""
    for b in bad:
        rel = s.scrubber.clean(os.path.relpath(b.path, s.dicom_dir))
        s.add(None, decision=b.decision, reason=b.reason, source=rel)
        (log.warning if b.decision == "failed" else log.info)("%s: %s: %s: %s", s.tag, b.decision, rel, b.reason)


def _record_nothing_usable(s: _Subject, bad) -> None:
    reason = (f"nothing usable: no DICOM image series among {len(bad)} files" if bad
              else "nothing usable: the folder holds no files")
    s.add(None, decision="failed", reason=reason, source=".")
    # An error line, but no failed job: one subject's empty export must not stop the others.
    log.error("%s: %s in %s: the subject is carried on with no images; copy its DICOM export there and rerun",
              s.tag, reason, s.scrubber.clean(str(s.dicom_dir)))


def _series_problem(series: Series, images, dicom_dir: Path) -> str | None:
    """Why a series cannot be converted as it stands (damaged files, missing geometry, missing slices), else None."""
    problem = _damaged_reason(series, dicom_dir) if series.damaged else None
    if problem is None and images:
        problem = check_geometry_present(series) or check_complete(series)
        if problem and problem.startswith("incomplete"):
            problem += "; copy the whole series again from the scanner or PACS"
    return problem


def _refuse(s: _Subject, series: Series, label: str, problem: str) -> None:
    """A series with a problem fails, unless a rule skips it from its header alone (then no failure)."""
    skip = _skipped_by_header(s.mapping.rules, series)
    if skip is None:
        s.add(series, decision="failed", reason=problem)
        log.error("%s failed: %s", label, s.scrubber.clean(problem))
    else:       # the rules skip it whatever dcm2niix would write (localizer, derived...): no failure
        reason = f"{skip.get('reason') or 'skipped by rule'} (rule {skip['name']}); {problem}"
        s.add(series, decision="skipped", reason=reason)
        log.info("%s skipped: %s", label, s.scrubber.clean(reason))


def _dcm2niix_series(s: _Subject, series: Series, images, work: Path, timeout: int, label: str) -> list | None:
    """Run dcm2niix on the series' image files; the images it wrote, or None (a failed row) when it failed."""
    rc, text = run_dcm2niix([f.path for f in images], work, timeout)
    messages = _messages(text, s.scrubber, work, [os.path.relpath(f.path, s.dicom_dir) for f in images])
    for m in messages:
        log.info("%s: dcm2niix: %s", label, m)
    produced = sorted((work / "out").glob("img*.nii.gz"))
    if rc != 0 or not produced:
        last = f": {messages[-1]}" if messages else ""
        why = (f"dcm2niix failed (exit code {rc}){last}" + (" (partial output discarded)" if produced else "")
               if rc != 0 else f"dcm2niix wrote no image{last}")
        row = s.add(series, decision="failed", reason=why)
        log.error("%s failed: %s", label, row["reason"])
        return None
    return produced


def _read_outputs(s: _Subject, series: Series, produced) -> list[Candidate]:
    """One Candidate per image dcm2niix wrote (with its sidecar, b-values, volumes); a failed row per unreadable one."""
    series_cands = []
    for nii in produced:
        variant = _VARIANT_RE.match(nii.name)["variant"]
        stem = nii.name[: -len(".nii.gz")]
        files = {"nii.gz": nii}
        for ext in ("json", "bval", "bvec"):
            p = nii.with_name(f"{stem}.{ext}")
            if p.exists():
                files[ext] = p
        try:
            sidecar = json.loads(files["json"].read_text()) if "json" in files else {}
            hdr = nib.load(str(nii))
            volumes = hdr.shape[3] if len(hdr.shape) > 3 else 1
            affine = hdr.affine
        except Exception as e:
            s.add(series, decision="failed", reason=f"unreadable dcm2niix output ({type(e).__name__})")
            continue
        series_cands.append(Candidate(series, variant, files, sidecar, volumes, affine, notes=[]))
    return series_cands


def _decide_series(s: _Subject, series: Series, series_cands: list[Candidate], label: str) -> list[Candidate]:
    """Apply the mapping rules to each image of the series; [] (a failed row) when dcm2niix split the series."""
    # dcm2niix split the series for a reason other than echoes/phase (geometry varies, etc.).
    odd = [c for c in series_cands if not re.fullmatch(r"(_e\d+)?(_ph|_real|_imaginary)?", c.variant)]
    if len(odd) > 1:
        names = ", ".join(c.variant.strip("_") for c in odd[:4])
        row = s.add(series, decision="failed",
                    reason=f"dcm2niix split the series into {len(series_cands)} images ({names}, …): "
                           f"inconsistent geometry or missing files")
        log.error("%s failed: %s", label, row["reason"])
        return []
    for c in series_cands:
        if c in odd and any(o.variant == "" for o in series_cands):
            c.decision = "skipped"
            c.reason = f"extra image dcm2niix wrote for the series (variant {c.variant.strip('_')})"
        else:
            _decide(c, s.mapping, s.scrubber)
    return series_cands


def _convert_series(s: _Subject, index: int, series: Series, work_root: Path, timeout: int) -> list[Candidate]:
    """One series: checked, converted by dcm2niix and decided; its candidates ([] when it failed or is skipped
    before conversion, with its row already added)."""
    label = s.label(series)
    images = [f for f in series.files if f.has_pixels]
    problem = _series_problem(series, images, s.dicom_dir)
    if problem:
        _refuse(s, series, label, problem)
        return []
    if not images:
        what = _NON_IMAGE_SOP.get(series.first.sop_class, "no pixel data")
        s.add(series, decision="skipped", reason=f"not an image ({what}; SOP class {series.first.sop_class})")
        log.info("%s skipped: not an image", label)
        return []
    produced = _dcm2niix_series(s, series, images, work_root / f"series{index:04d}", timeout, label)
    if produced is None:
        return []
    return _decide_series(s, series, _read_outputs(s, series, produced), label)


def _check_t1w(s: _Subject, series_list, cands: list[Candidate], keep: list[Candidate], strict: bool) -> None:
    """No converted T1w: one warning (with ``strict``, the error) naming the series that looked like one."""
    if not any(c.suffix == "T1w" for c in keep):
        problem = _no_t1w(s.tag, series_list, cands, s.rows, s.scrubber, s.dicom_dir)
        if strict:
            raise ConvertInputError(problem, path=s.scrubber.clean(str(s.dicom_dir)),
                                    fix="or set strict: false to carry the subject on without anatomy")
        log.warning("%s", problem)


def _install_and_record(s: _Subject, cands: list[Candidate]) -> None:
    """Write each converted image into the BIDS tree and add every candidate's manifest row."""
    for c in cands:
        label = s.label(c.series)
        if c.decision == "converted":
            try:
                _install(c, s.bids_root, s.subject, s.session, s.scrubber, s.mapping)
            except Exception as e:
                c.decision, c.reason = "failed", f"could not write the BIDS files ({type(e).__name__}: {s.scrubber.clean(str(e))[:200]})"
        several = sum(o.series is c.series for o in cands) > 1
        image = [f"image {c.variant.strip('_')}"] if several and c.variant else []
        reason = "; ".join(image + [c.reason] + c.notes)
        bids_name = c.outputs[-1] if c.outputs else ""
        s.add(c.series, decision=c.decision, reason=reason,
              datatype=c.datatype if c.decision == "converted" else "",
              suffix=c.suffix if c.decision == "converted" else "",
              bids_name=bids_name, outputs=";".join(c.outputs))
        if c.decision == "converted":
            log.info("%s -> %s", label, bids_name)
        else:
            (log.error if c.decision == "failed" else log.info)("%s %s: %s", label, c.decision, reason)


def _warn_stale(s: _Subject, subject_dir: Path) -> None:
    """Outside Snakemake (which empties the subject's folder first) an earlier run's images may remain, e.g. of a
    series refused now: say so rather than let them pass for this run's."""
    written = {s.bids_root / p for r in s.rows for p in str(r.get("outputs") or "").split(";") if p}
    stale = sorted(p for p in subject_dir.rglob("*.nii.gz") if p not in written)
    if stale:
        log.warning("%s: %d image(s) in %s were not written by this conversion (left from an earlier run?), e.g. %s; "
                    "remove that folder and rerun so that only this run's images remain", s.tag, len(stale),
                    s.scrubber.clean(str(subject_dir)), s.scrubber.clean(os.path.relpath(stale[0], s.bids_root)))


def convert_subject(dicom_dir, bids_root, subject: str, session: str | None = None, mapping=None,
                    work_dir=None, timeout: int = 600, strict: bool = False) -> pd.DataFrame:
    """Convert one subject's (or session's) DICOM folder into ``bids_root``; return its manifest rows.

    ``mapping``: a :class:`Mapping`, the config's ``convert`` section (dict) or None (defaults).
    Every series found gets at least one row (decision converted / skipped / failed, with a reason);
    files that are not DICOM or are corrupt get one row each. Nothing is written for a series that fails.
    A subject without a converted T1w gets one warning naming the series that looked like one and why each
    was not converted; ``strict``: raise that line instead, before any BIDS file is written.
    """
    subject = check_label(subject, "subject label")
    session = check_label(session, "session label") if session else None
    mapping = mapping if isinstance(mapping, Mapping) else load_mapping(mapping)
    dicom_dir, bids_root = Path(dicom_dir), Path(bids_root)
    _check_dicom_dir(dicom_dir, subject)
    tag = f"sub-{subject}" + (f"_ses-{session}" if session else "")
    # The subject's folder exists afterwards even when nothing converts (it is a workflow output).
    subject_dir = bids_root / f"sub-{subject}" / (f"ses-{session}" if session else "")
    subject_dir.mkdir(parents=True, exist_ok=True)
    series_list, bad, scrubber = scan(dicom_dir)
    if scrubber.found(subject) or scrubber.found(session or ""):
        log.warning("%s: the subject/session label contains a value of the patient's DICOM headers: "
                    "choose labels that do not identify the participant", tag)
    s = _Subject(subject, session, tag, dicom_dir, bids_root, mapping, scrubber)
    _record_bad_files(s, bad)
    if not series_list:
        _record_nothing_usable(s, bad)
        return _frame(s.rows)

    work_root = Path(tempfile.mkdtemp(prefix=f"brainfuse-convert-{tag}-", dir=work_dir))
    try:
        cands: list[Candidate] = []
        for index, series in enumerate(series_list):
            cands.extend(_convert_series(s, index, series, work_root, timeout))
        keep = [c for c in cands if c.decision == "converted"]
        _check_t1w(s, series_list, cands, keep, strict)
        _assign_dirs(keep)
        _assign_runs(keep)
        _install_and_record(s, cands)
    finally:
        shutil.rmtree(work_root, ignore_errors=True)
    _warn_stale(s, subject_dir)
    frame = _frame(s.rows)
    if not (frame["decision"] == "converted").any():
        log.warning("%s: no series converted (%d rows in the manifest)", tag, len(frame))
    return frame


def _frame(rows) -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=MANIFEST_COLUMNS)
    frame["series_number"] = frame["series_number"].astype(str)
    frame["n_files"] = frame["n_files"].astype(str)
    return frame


def produced_files(manifest: pd.DataFrame) -> dict:
    """What one subject's conversion produced: {'images': {modality: [...]}, 'files': [...], 'missing': [...]},
    paths relative to the BIDS root (the checkpoint's view of a subject). Every modality brainfuse uses
    (T1w, dwi, bold) is a key of 'images', with [] when none converted, and is then listed in 'missing'.
    The same rule as the workflow's: a subject has a modality iff a manifest row has decision 'converted'
    and that modality's suffix."""
    by_suffix = {suffix: modality for modality, (_, suffix) in IMAGING.items()}
    images, files = {modality: [] for modality in IMAGING}, []
    for _, row in manifest[manifest["decision"] == "converted"].iterrows():
        files += [p for p in str(row["outputs"]).split(";") if p]
        images.setdefault(by_suffix.get(row["suffix"], row["suffix"]), []).append(row["bids_name"])
    return {"images": {k: sorted(v) for k, v in images.items()}, "files": sorted(files),
            "missing": [m for m in IMAGING if not images[m]]}


def write_manifest(manifest: pd.DataFrame, path) -> None:
    bf_io.save_tsv(manifest, path, na_rep="n/a")


def read_manifest(path) -> pd.DataFrame:
    from .inputs import read_tsv

    return read_tsv(path, "conversion manifest", required=("subject", "decision", "suffix", "bids_name"),
                    fix="rerun `brainfuse convert` for this subject (it writes the manifest)",
                    dtype=str, keep_default_na=False)


def read_clinical(path) -> pd.DataFrame:
    """The user's clinical table (participants.tsv): tab-separated, a participant_id column of BIDS labels
    (with or without ``sub-``), each once. Returns it with participant_id as ``sub-<label>``."""
    from .inputs import read_tsv

    what = "clinical table (participants_tsv)"
    clinical = read_tsv(path, what, required=("participant_id",), dtype=str, keep_default_na=False)
    ids = []
    for i, value in enumerate(clinical["participant_id"]):
        try:
            ids.append("sub-" + check_label(str(value).strip(), "participant_id"))
        except LabelError as e:
            raise ConvertInputError(f"line {i + 2}, column participant_id: {e}", path=path,
                                    fix="use letters and digits only (e.g. sub-01 or 01), as the DICOM folder "
                                        "names are") from None
    clinical["participant_id"] = ids
    lines = defaultdict(list)
    for i, value in enumerate(ids):
        lines[value].append(i + 2)
    repeated = {k: v for k, v in lines.items() if len(v) > 1}
    if repeated:
        first = sorted(repeated, key=lambda k: repeated[k][0])[0]
        more = f" (and {len(repeated) - 1} more participant(s))" if len(repeated) > 1 else ""
        raise ConvertInputError(f"participant_id {first} on lines {', '.join(map(str, repeated[first]))}{more}",
                                path=path, fix="keep one row per participant")
    return clinical


# --------------------------------------------------------------------------------------------------
# Dataset level
# --------------------------------------------------------------------------------------------------
def write_dataset_files(bids_root, manifest, clinical_tsv=None, name: str = "brainfuse conversion") -> pd.DataFrame:
    """dataset_description.json, README (if absent) and participants.tsv (+ .json) for a converted dataset.

    ``manifest``: a DataFrame (all subjects) or paths of per-subject manifest TSVs. participants.tsv lists
    the subjects with at least one converted image, merged (left join) with the user's clinical table
    (``participant_id`` with or without the ``sub-`` prefix). Returns the participants table.
    """
    from . import __version__

    bids_root = Path(bids_root)
    if not isinstance(manifest, pd.DataFrame):
        paths = [manifest] if isinstance(manifest, (str, os.PathLike)) else list(manifest)
        manifest = pd.concat([read_manifest(p) for p in paths], ignore_index=True) if paths else _frame([])
    # Every input is read and checked before anything is written.
    converted = manifest[manifest["decision"] == "converted"]
    subjects = sorted(set(converted["subject"]))
    empty = sorted(set(manifest["subject"]) - set(subjects))
    if empty:
        log.warning("participants: %d subject(s) with nothing converted are left out of participants.tsv "
                    "(see their rows in the manifest for why): %s", len(empty), ", ".join(empty[:10]))
    table = pd.DataFrame({"participant_id": subjects})
    sidecar = None
    if clinical_tsv:
        clinical = read_clinical(clinical_tsv)
        extra = sorted(set(clinical["participant_id"]) - set(subjects))
        missing = sorted(set(subjects) - set(clinical["participant_id"]))
        if extra:
            log.warning("participants: %d row(s) of %s have no converted images and are left out (e.g. %s)",
                        len(extra), clinical_tsv, ", ".join(extra[:3]))
        if missing:
            log.warning("participants: %d converted subject(s) are not in %s: their clinical columns are n/a "
                        "(e.g. %s)", len(missing), clinical_tsv, ", ".join(missing[:3]))
        table = table.merge(clinical, on="participant_id", how="left")
        side = Path(re.sub(r"\.tsv$", ".json", str(clinical_tsv)))
        if side.exists() and side != Path(clinical_tsv):
            from .inputs import read_json

            sidecar = read_json(side, "participants sidecar (column descriptions)")
    table = table.fillna("n/a").replace("", "n/a")
    bids_root.mkdir(parents=True, exist_ok=True)
    files = bids_dataset_files(bids_root)
    bf_io.save_json({
        "Name": name, "BIDSVersion": "1.10.0", "DatasetType": "raw",
        "GeneratedBy": [{"Name": "brainfuse", "Version": __version__,
                         "Description": "DICOM to BIDS conversion (brainfuse.convert) with dcm2niix"},
                        {"Name": "dcm2niix", "Version": dcm2niix_version()}],
    }, files["description"])
    readme = bids_root / "README"
    if not readme.exists():
        readme.write_text("Converted from DICOM by brainfuse (dcm2niix, de-identified sidecars).\n"
                          "Every series found, converted or not, is listed in the conversion manifest.\n")
    bf_io.save_tsv(table, files["participants"])
    if sidecar is not None:
        bf_io.save_json(sidecar, bids_root / "participants.json")
    return table


# --------------------------------------------------------------------------------------------------
# Round trip check (demo): converted images against the BIDS images the DICOM export was made from
# --------------------------------------------------------------------------------------------------
VERIFY_COLUMNS = ["bids_name", "reference", "shape_equal", "data_max_abs_diff", "affine_max_abs_diff",
                  "bval_max_abs_diff", "bvec_max_abs_diff", "sidecar_mismatches", "identifying_values_found", "ok"]


def _canonical(path):
    """Image in the closest RAS orientation: dcm2niix may return another voxel order than the source."""
    img = nib.as_closest_canonical(nib.load(str(path)))
    return img, np.asanyarray(img.dataobj, dtype=np.float64)


def _same_value(a, b) -> bool:
    numbers = (int, float)
    if isinstance(a, numbers) and isinstance(b, numbers) and not isinstance(a, bool):
        return bool(np.isclose(a, b, rtol=1e-6, atol=1e-9))
    return a == b


def verify(converted_root, reference_root, manifest, identity: dict | None = None,
           tolerance: float = 1e-4) -> pd.DataFrame:
    """Compare each converted image with the reference image of the same BIDS name.

    Data are compared in world orientation (closest canonical), with a tolerance for the int16
    quantisation of non-integer images; affines within ``tolerance`` mm; bval/bvec and the key sidecar
    fields as written. ``identity``: the fake patient fields the export carried, searched for in every
    converted file and the manifest.
    """
    from .deid import find_identifying

    converted_root, reference_root = Path(converted_root), Path(reference_root)
    manifest = manifest if isinstance(manifest, pd.DataFrame) else read_manifest(manifest)
    scrubber = Scrubber(v for v in (identity or {}).values() if v)
    rows = []
    for _, row in manifest[manifest["decision"] == "converted"].iterrows():
        out = dict.fromkeys(VERIFY_COLUMNS, "n/a")
        name = row["bids_name"]
        ref = reference_root / name
        out.update(bids_name=name, reference=os.path.relpath(ref, reference_root))
        if not ref.exists():
            out.update(ok=False, sidecar_mismatches="no reference image")
            rows.append(out)
            continue
        a_img, a = _canonical(converted_root / name)
        b_img, b = _canonical(ref)
        step = float(getattr(nib.load(str(ref)).dataobj, "slope", 1.0) or 1.0)
        out["shape_equal"] = a.shape == b.shape
        if out["shape_equal"]:
            out["data_max_abs_diff"] = float(np.abs(a - b).max())
            out["affine_max_abs_diff"] = float(np.abs(a_img.affine - b_img.affine).max())
        same_order = np.allclose(nib.load(str(converted_root / name)).affine, nib.load(str(ref)).affine, atol=tolerance)
        for ext, col in (("bval", "bval_max_abs_diff"), ("bvec", "bvec_max_abs_diff")):
            p, q = converted_root / with_ext(name, f".{ext}"), with_ext(ref, f".{ext}")
            if Path(q).exists():
                x, y = np.loadtxt(p, ndmin=2) if p.exists() else None, np.loadtxt(q, ndmin=2)
                out[col] = float(np.abs(x - y).max()) if x is not None and x.shape == y.shape and (ext == "bval" or same_order) else "mismatch"
        a_side = json.loads((converted_root / with_ext(name, ".json")).read_text())
        b_side = json.loads(Path(with_ext(ref, ".json")).read_text()) if Path(with_ext(ref, ".json")).exists() else {}
        keys = ["RepetitionTime", "EchoTime", "TotalReadoutTime"] + (["PhaseEncodingDirection"] if same_order else [])
        bad = [k for k in keys if k in b_side and not _same_value(a_side.get(k), b_side[k])]
        out["sidecar_mismatches"] = ",".join(bad) or "none"
        leaks = find_identifying([converted_root / p for p in str(row["outputs"]).split(";") if p], scrubber)
        out["identifying_values_found"] = len(leaks)
        numeric = [out[k] for k in ("bval_max_abs_diff", "bvec_max_abs_diff") if isinstance(out[k], float)]
        out["ok"] = bool(out["shape_equal"] and out["data_max_abs_diff"] <= step / 2 + 1e-6
                         and out["affine_max_abs_diff"] <= tolerance and all(v <= 1e-4 for v in numeric)
                         and "mismatch" not in (out["bval_max_abs_diff"], out["bvec_max_abs_diff"])
                         and not bad and not leaks)
        rows.append(out)
    return pd.DataFrame(rows, columns=VERIFY_COLUMNS)


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------
def _convert_section(config_path=None, params=None) -> dict:
    """The ``convert`` section: from ``--params`` (JSON, what the workflow passes) or a config YAML."""
    if params:
        try:
            section = json.loads(params)
        except json.JSONDecodeError as e:
            raise ConvertConfigError(f"--params is not valid JSON (column {e.colno}: {e.msg}): {params[:80]!r}",
                                     fix="pass the convert: section as a JSON object, e.g. "
                                         "--params '{\"task\": \"rest\", \"rules\": []}'") from None
        if not isinstance(section, dict):
            raise ConvertConfigError(f"--params must be a JSON object (the convert: section), "
                                     f"not {type(section).__name__}", fix="e.g. --params '{\"task\": \"rest\"}'")
        return section
    if not config_path:
        return {}
    from .config import load

    return load(config_path)["convert"]


def _setup_logging(log_file=None) -> None:
    handlers = [logging.StreamHandler(sys.stderr)]
    if log_file:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", handlers=handlers, force=True)


def _cli_dataset(argv) -> int:
    args = cliargs.parser("convert dataset").parse_args(argv)
    _setup_logging(args.log)
    frames = [read_manifest(p) for p in args.subject_manifests]
    manifest = pd.concat(frames, ignore_index=True) if frames else _frame([])
    write_dataset_files(args.bids_dir, manifest, args.participants_tsv)
    write_manifest(manifest, args.manifest)
    log.info("dataset: %d subjects, %s", manifest["subject"].nunique(), manifest["decision"].value_counts().to_dict())
    return 0


def _cli_verify(argv) -> int:
    args = cliargs.parser("convert verify").parse_args(argv)
    _setup_logging(args.log)
    from .inputs import read_json

    identity = {}
    for i, p in enumerate(args.identity):
        identity.update({f"{k}{i}": v for k, v in read_json(p, "DICOM identity file").items() if k != "PatientSex"})
    manifest = pd.concat([read_manifest(p) for p in args.manifests], ignore_index=True)
    table = verify(args.converted, args.reference, manifest, identity)
    problems = []
    if table.empty:
        problems.append("no converted image to verify")
    for row in table[~table["ok"].astype(bool)].to_dict("records"):
        problems.append(f"{row.pop('bids_name')} differs from its reference: {row}")
    write_manifest(table, args.output)
    for line in problems:
        log.error("verify: %s", line)
    log.info("verify: %d images, %d match their reference", len(table), int(table["ok"].sum()) if len(table) else 0)
    return 1 if problems else 0


def cli(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "dataset":
        return _cli_dataset(argv[1:])
    if argv and argv[0] == "verify":
        return _cli_verify(argv[1:])
    args = cliargs.parser("convert").parse_args(argv)
    _setup_logging(args.log)
    # Errors (bad settings, no such folder, --strict without a T1w) reach `brainfuse`'s one-line handler.
    mapping = load_mapping(_convert_section(args.config, args.params))
    manifest = convert_subject(args.dicom_dir, args.bids_dir, args.subject, args.session, mapping, args.work_dir,
                               strict=args.strict)
    write_manifest(manifest, args.manifest)
    if args.outputs:
        info = {"subject": f"sub-{check_label(args.subject)}",
                "session": f"ses-{check_label(args.session)}" if args.session else None,
                **produced_files(manifest), "decisions": manifest["decision"].value_counts().to_dict()}
        bf_io.save_json(info, args.outputs)
    return 0
