"""Participant-grouped, stratified k-fold splits with an inner validation set, written as one TSV.

Every row of the cohort belongs to a *group* (the participant, or the site with ``group_by: site``);
a group never straddles train/val/test within a fold, and every group is tested exactly once.
``check_splits`` is the guard evaluation runs before computing any metric.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from . import io as bf_io
from .errors import BrainfuseError

SETS = ("train", "val", "test")
COLUMNS = ["participant_id", "session", "group", "fold", "set"]


class LeakageError(BrainfuseError):
    """A participant (or site) appears in two sets of one fold, or the splits do not cover the cohort."""


class DegenerateLabelError(BrainfuseError):
    """Labels no cross-validated model can be trained on: one class, a class without rows, a class in fewer
    participants (groups) than folds, a constant regression target."""


def check_labels(target, task: str, n_folds: int, groups, classes=None, *, label: str = "label", source=None,
                 classes_source: str | None = None, group_by: str = "participant_id") -> None:
    """Refuse degenerate labels before any split is drawn, naming the label column, the counts and the fix.

    Counts are of groups (participants, or ``cv.group_by`` values): a class must reach every test fold."""
    target, groups = np.asarray(target), np.asarray(groups, dtype=str)
    who = "participants" if group_by == "participant_id" else f"{group_by} groups (cv.group_by)"
    col = f"column {label!r}"

    def fail(problem, fix):
        raise DegenerateLabelError(problem, path=source, fix=fix)

    if len(target) == 0:
        fail(f"no row has a label in {col}: nothing to train on",
             "fill in the labels, or predict this dataset with models trained elsewhere (model.predict_from)")
    if task != "classification":
        n = len(np.unique(groups))
        if n < n_folds:
            fail(f"{n} labelled {who} in {col}, fewer than cv.n_folds={n_folds}", "lower cv.n_folds, or add labels")
        if np.ptp(target) == 0:
            fail(f"all {len(target)} labelled values of {col} are {float(target[0]):g}: a constant target cannot be "
                 f"learnt", "check the label column (config tensors.label)")
        return
    target = target.astype(int)
    classes = [str(c) for c in (classes if classes is not None else range(int(target.max()) + 1))]
    n_groups = [len(np.unique(groups[target == k])) for k in range(len(classes))]
    counts = f"{who}: " + ", ".join(f"{c} {g}" for c, g in zip(classes, n_groups))
    where = classes_source or "config tensors.classes"
    if sum(g > 0 for g in n_groups) < 2:
        fail(f"{col} holds a single class among the labelled rows ({counts}): a classifier needs at least two",
             "check the label column and the participants table (config tensors.label, participants_tsv)")
    empty = [c for c, g in zip(classes, n_groups) if g == 0]
    if empty:
        fail(f"class(es) {', '.join(empty)} of {col} have no labelled rows ({counts})",
             f"drop them from {where}, or add their participants")
    rare = [c for c, g in zip(classes, n_groups) if g < n_folds]
    if rare:
        fewest = min(n_groups)
        fail(f"class(es) {', '.join(rare)} of {col} have fewer {who} than cv.n_folds={n_folds} ({counts}), so some "
             f"test folds would lack them",
             (f"set cv.n_folds to {fewest} or fewer, or " if fewest >= 2 else "")
             + f"drop the class from {where} (and label its rows n/a)")


def strata(target: np.ndarray, task: str, n_bins: int = 4) -> np.ndarray:
    """Classes for classification; quantile bins of the target for regression (stratified regression CV)."""
    target = np.asarray(target)
    if task == "classification":
        return target.astype(int)
    edges = np.unique(np.quantile(target, np.linspace(0, 1, n_bins + 1)[1:-1]))
    return np.digitize(target, edges)


def max_group_folds(y, groups) -> int:
    """The most stratified group folds rows can form: no more than groups, nor than rows of the largest stratum."""
    return min(len(np.unique(groups)), int(np.bincount(np.asarray(y)).max()) if len(y) else 0)


def group_folds(y, groups, n_splits, seed):
    """StratifiedGroupKFold, with a readable error when there are too few groups."""
    n_groups = len(np.unique(groups))
    if n_groups < n_splits:
        raise ValueError(f"{n_splits} folds need at least {n_splits} groups, the cohort has {n_groups}")
    counts = np.bincount(np.asarray(y))     # sklearn's condition: rows per class (stratum)
    if counts.max() < n_splits:
        raise ValueError(f"{n_splits} folds need at least {n_splits} rows in some class or stratum; the largest "
                         f"has {counts.max()} (per class: {counts.tolist()}): lower cv.n_folds")
    from sklearn.model_selection import StratifiedGroupKFold   # here: the workflow's parse time imports check_labels

    return list(StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed).split(y, y, groups))


def make_splits(participants, target, task: str = "classification", n_folds: int = 5,
                val_fraction: float = 0.2, seed: int = 0, groups=None, sessions=None, **label_info) -> pd.DataFrame:
    """Long table (participant_id, session, group, fold, set): one row per cohort row and fold.

    ``groups`` defaults to the participant: sessions of one participant always stay together.
    The inner validation set takes about ``val_fraction`` of each training part, grouped and stratified alike.
    ``label_info``: names for :func:`check_labels`' message (classes, label, source, classes_source, group_by).
    """
    participants = np.asarray(participants, dtype=str)
    groups = participants if groups is None else np.asarray(groups, dtype=str)
    check_labels(target, task, n_folds, groups, **label_info)
    sessions = np.full(len(participants), "", dtype=object) if sessions is None else np.asarray(sessions, dtype=object)
    if not 0 < val_fraction < 0.5:
        raise ValueError(f"val_fraction={val_fraction} must lie in (0, 0.5)")
    y = strata(target, task)
    rows = []
    for fold, (trainval, test) in enumerate(group_folds(y, groups, n_folds, seed)):
        n_inner = max(2, round(1 / val_fraction))
        # small cohorts: no more inner folds than groups of the rarest stratum (sklearn's requirement)
        _, first = np.unique(groups[trainval], return_index=True)
        rarest = min(c for c in np.bincount(y[trainval][first]) if c > 0)
        n_inner = max(2, min(n_inner, rarest))
        inner = group_folds(y[trainval], groups[trainval], n_inner, seed + 1000 + fold)
        role = np.full(len(participants), "", dtype=object)
        role[test] = "test"
        role[trainval] = "train"
        role[trainval[inner[0][1]]] = "val"
        rows.append(pd.DataFrame({"participant_id": participants, "session": sessions, "group": groups,
                                  "fold": fold, "set": role}))
    table = pd.concat(rows, ignore_index=True)
    check_splits(table)
    return table


def check_splits(table: pd.DataFrame, participants=None) -> None:
    """Raise LeakageError if a participant or group is in two sets of one fold, a row is in no set, a
    participant is tested in more or less than one fold, or (given ``participants``) the cohort differs."""
    missing = set(COLUMNS) - set(table.columns)
    if missing:
        raise LeakageError(f"splits table lacks columns {sorted(missing)}")
    bad_sets = set(table["set"]) - set(SETS)
    if bad_sets:
        raise LeakageError(f"splits table has unknown sets {sorted(bad_sets)}; expected {SETS}")
    for key in ("participant_id", "group"):
        n_sets = table.groupby(["fold", key])["set"].nunique()
        leaked = n_sets[n_sets > 1]
        if len(leaked):
            examples = ", ".join(f"{key} {v!r} in fold {f}" for f, v in leaked.index[:5])
            raise LeakageError(f"{len(leaked)} {key}s appear in two sets of one fold (e.g. {examples})")
    tested = table[table["set"] == "test"].groupby("participant_id")["fold"].nunique()
    everyone = set(table["participant_id"])
    never = everyone - set(tested.index)
    twice = tested[tested > 1]
    if never or len(twice):
        raise LeakageError(f"every participant must be tested in exactly one fold: never tested "
                           f"{sorted(never)[:5]}, tested twice {list(twice.index[:5])}")
    if participants is not None and set(map(str, participants)) != everyone:
        diff = set(map(str, participants)) ^ everyone
        raise LeakageError(f"splits do not match the cohort: {len(diff)} participants differ (e.g. {sorted(diff)[:5]})")


def read_splits(path) -> pd.DataFrame:
    from .inputs import read_tsv

    table = read_tsv(path, "splits table", required=tuple(COLUMNS), fix="rerun the splits (snakemake train)",
                     dtype={"participant_id": str, "session": str, "group": str}, keep_default_na=False)
    try:
        check_splits(table)
    except LeakageError as e:
        raise LeakageError(f"{path}: {e}") from None
    return table


def fold_indices(table: pd.DataFrame, fold: int, keys: list) -> dict:
    """Row indices into the cohort per set; ``keys`` are (participant_id, session) per cohort row, None for
    rows outside the CV (unlabelled participants)."""
    part = table[table["fold"] == fold]
    if part.empty:
        raise LeakageError(f"no fold {fold} in the splits (folds: {sorted(table['fold'].unique())})",
                           fix="use one of those folds, or redraw the splits with cv.n_folds")
    role = {(p, s): r for p, s, r in zip(part["participant_id"], part["session"], part["set"])}
    missing = [k for k in keys if k is not None and k not in role]
    if missing:
        raise LeakageError(f"{len(missing)} cohort rows are not in the splits (e.g. {missing[:3]}); rerun the splits")
    return {s: np.array([i for i, k in enumerate(keys) if k is not None and role[k] == s], dtype=int) for s in SETS}


write_tsv = bf_io.save_tsv     # the splits table, atomically, as pandas writes it (the name tests import)

