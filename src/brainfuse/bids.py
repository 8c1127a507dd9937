"""BIDS names: one path helper for every input and output, label checks, and a fast dataset index.

Every file brainfuse reads or writes is named by :func:`bids_path` (as in HippUnfold), so rules,
library code and tests agree on names. The index walks the tree once with ``os.scandir`` and parses
file names with one regular expression: pybids takes minutes on a 1,000-subject tree, and Snakemake
builds the DAG from this index at every start (pybids is still used in the tests to check validity).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from .errors import BrainfuseError

# Entity order from the BIDS specification (Appendix: entity table), the ones brainfuse uses.
ENTITY_ORDER = (
    "sub", "ses", "task", "acq", "ce", "rec", "dir", "run", "echo",
    "from", "to", "mode", "space", "cohort", "res", "den", "label", "atlas", "seg", "hemi", "model", "desc",
)
# What a BOLD run keeps of its name in its derivatives' names (brainfuse.layout.RUN_ENTITIES, the rules' {bold}).
RUN_ENTITIES = ("task", "acq", "ce", "rec", "dir", "run", "echo")
LABEL_RE = re.compile(r"^[A-Za-z0-9]+$")
TEMPLATE = "MNI152NLin2009aSym"   # nilearn's packaged ICBM152 2009a symmetric template

# Imaging inputs brainfuse processes: BIDS datatype and suffix for each.
IMAGING = {"T1w": ("anat", "T1w"), "dwi": ("dwi", "dwi"), "bold": ("func", "bold")}


class LabelError(BrainfuseError):
    """A subject/session/entity label that is not BIDS-valid (letters and digits only)."""


def check_label(value: str, what: str = "label") -> str:
    """Return ``value`` with any ``sub-``/``ses-`` prefix removed; refuse anything but [A-Za-z0-9]+.

    Labels end up in paths, so ``sub-../x`` or ``a_b`` must never get through.
    """
    value = str(value)
    for prefix in ("sub-", "ses-"):
        if value.startswith(prefix):
            value = value[len(prefix):]
    if not LABEL_RE.match(value):
        raise LabelError(f"invalid {what} {value!r}: BIDS labels may contain only letters and digits")
    return value


def bids_path(root, sub: str, datatype: str | None = None, suffix: str = "", ext: str = ".nii.gz",
              ses: str | None = None, **entities) -> str:
    """Build ``root/sub-X[/ses-Y][/datatype]/sub-X[_ses-Y][_key-value…]_suffix.ext``.

    Entities come out in the specification's order whatever order they are given in; ``None`` values
    are left out, so optional entities can be passed through. Wildcards (``{subject}``) pass unchanged,
    which lets Snakemake rules build patterns with the same function.
    """
    parts = [f"sub-{sub}"]
    folders = [f"sub-{sub}"]
    if ses:
        parts.append(f"ses-{ses}")
        folders.append(f"ses-{ses}")
    unknown = set(entities) - set(ENTITY_ORDER)
    if unknown:
        raise ValueError(f"unknown BIDS entities {sorted(unknown)}")
    for key in ENTITY_ORDER[2:]:
        value = entities.get(key)
        if value is not None and value != "":
            parts.append(f"{key}-{value}")
    name = "_".join(parts) + (f"_{suffix}" if suffix else "") + ext
    if datatype:
        folders.append(datatype)
    return os.path.join(str(root), *folders, name)


_NAME_RE = re.compile(
    r"^sub-(?P<sub>[A-Za-z0-9]+)(?:_ses-(?P<ses>[A-Za-z0-9]+))?(?P<ents>(?:_[a-z]+-[A-Za-z0-9]+)*)"
    r"_(?P<suffix>[A-Za-z0-9]+)(?P<ext>\.nii(?:\.gz)?)$"
)


def parse_name(name: str) -> dict | None:
    """Entities of a BIDS image file name, or None if it is not one."""
    m = _NAME_RE.match(name)
    if not m:
        return None
    ents = dict(kv.split("-", 1) for kv in m["ents"].split("_")[1:])
    ents.update(sub=m["sub"], suffix=m["suffix"], ext=m["ext"])
    if m["ses"]:
        ents["ses"] = m["ses"]
    return ents


@dataclass
class Session:
    """Images of one subject (and session): modality -> list of image paths (several runs allowed)."""
    sub: str
    ses: str | None = None
    images: dict[str, list[str]] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"sub-{self.sub}" + (f"_ses-{self.ses}" if self.ses else "")

    def has(self, modality: str) -> bool:
        return bool(self.images.get(modality))


class DatasetError(BrainfuseError):
    """An input folder (bids_dir, dicom_dir) brainfuse cannot index."""


def check_input_dir(path, key: str) -> Path:
    """The folder a config key names: refuse a missing path or a file, naming the key."""
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"{key} does not exist", path=path, fix=f"set {key} to your dataset's folder")
    if not path.is_dir():
        raise DatasetError(f"{key} is a file, not a folder", path=path, fix=f"set {key} to your dataset's folder")
    return path


def check_bids_root(root) -> Path:
    """A BIDS dataset root: a folder holding dataset_description.json (the BIDS specification requires it)."""
    root = check_input_dir(root, "bids_dir")
    if not (root / "dataset_description.json").is_file():
        raise DatasetError("not a BIDS dataset root (no dataset_description.json)", path=root,
                           fix="point bids_dir at the folder holding dataset_description.json and the sub-* folders")
    return root


def folder_label(path, what: str = "subject") -> str:
    """The label of a sub-/ses- (or DICOM subject) folder; refuse the folder by name when it is not BIDS-valid."""
    path = Path(path)
    try:
        return check_label(path.name, f"{what} label")
    except LabelError as e:
        prefix = next((p for p in ("sub-", "ses-") if path.name.startswith(p)), "")
        fixed = prefix + (re.sub("[^A-Za-z0-9]", "", path.name[len(prefix):]) or "01")
        raise LabelError(f"folder name {path.name!r} is not a valid {what} label (letters and digits only)",
                         path=path, fix=f"rename the folder (e.g. {fixed})") from e


def index_bids(root, subjects=None) -> list[Session]:
    """Index T1w, dwi and bold images of a BIDS tree in one pass.

    Folder names that are not valid labels are refused (a clear error naming the folder) rather than
    skipped, so a typo does not silently drop a participant.
    """
    root = Path(root)
    if not (root / "dataset_description.json").exists():
        raise FileNotFoundError(f"{root}: not a BIDS dataset (no dataset_description.json)")
    wanted = {check_label(s, "subject label") for s in subjects} if subjects else None
    sessions = []
    with os.scandir(root) as it:
        sub_dirs = sorted(e.name for e in it if e.is_dir() and e.name.startswith("sub-"))
    for sub_dir in sub_dirs:
        sub = folder_label(root / sub_dir, "subject")
        if wanted is not None and sub not in wanted:
            continue
        ses_dirs = sorted(e.name for e in os.scandir(root / sub_dir) if e.is_dir() and e.name.startswith("ses-"))
        for ses_dir in ses_dirs or [None]:
            ses = folder_label(root / sub_dir / ses_dir, "session") if ses_dir else None
            base = root / sub_dir / (ses_dir or "")
            session = Session(sub, ses)
            for modality, (datatype, suffix) in IMAGING.items():
                folder = base / datatype
                if not folder.is_dir():
                    continue
                for e in sorted(os.scandir(folder), key=lambda e: e.name):
                    ents = parse_name(e.name)
                    if ents and ents["suffix"] == suffix:
                        session.images.setdefault(modality, []).append(e.path)
            sessions.append(session)
    if wanted is not None:
        missing = wanted - {s.sub for s in sessions}
        if missing:
            raise FileNotFoundError(f"{root}: config key 'subjects' names {', '.join(sorted(missing))} but the "
                                    "dataset has no such sub-<label> folder; correct the labels, or leave subjects "
                                    "empty for all")
    return sessions


def sidecar(image_path: str) -> str:
    """The JSON sidecar next to a NIfTI image."""
    return re.sub(r"\.nii(\.gz)?$", ".json", str(image_path))


def with_ext(image_path: str, ext: str) -> str:
    """Same name with another extension (``.bval``, ``.bvec``, ``.json``)."""
    return re.sub(r"\.nii(\.gz)?$", ext, str(image_path))
