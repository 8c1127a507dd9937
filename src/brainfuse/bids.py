"""A BIDS dataset's index: which subjects, sessions and imaging runs an input folder holds.

The index walks the tree once with ``os.scandir`` and parses file names with one regular expression
(:func:`brainfuse.layout.parse_name`): pybids takes minutes on a 1,000-subject tree, and Snakemake builds the DAG
from this index at every start (pybids is still used in the tests to check validity). Every name brainfuse
reads or writes is built by :mod:`brainfuse.layout`.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from .errors import BrainfuseError
from .layout import IMAGING, LabelError, check_label, parse_name

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
