"""Participant-grouped, stratified CV splits: no participant (or site) in two sets, seeded, guarded."""
import numpy as np
import pandas as pd
import pytest

from brainfuse.splits import LeakageError, check_splits, fold_indices, make_splits, read_splits, write_tsv


def cohort_rows(n_participants=40, sessions=2, seed=0):
    """Rows = participant x session; class and site are per participant."""
    rng = np.random.default_rng(seed)
    cls = rng.permutation(np.arange(n_participants) % 3)
    site = rng.choice(["A", "B", "C", "D", "E", "F"], n_participants)
    pid = [f"sub-{i:03d}" for i in range(n_participants)]
    rows = [(pid[i], f"{s + 1}", cls[i], site[i]) for i in range(n_participants) for s in range(sessions)]
    return pd.DataFrame(rows, columns=["participant_id", "session", "y", "site"])


def test_sessions_of_a_participant_never_straddle_sets_and_each_is_tested_once():
    rows = cohort_rows()
    table = make_splits(rows.participant_id, rows.y, n_folds=5, val_fraction=0.2, seed=3, sessions=rows.session)
    assert set(table["set"]) == {"train", "val", "test"}
    assert (table.groupby(["fold", "participant_id"])["set"].nunique() == 1).all()
    tested = table[table.set == "test"].groupby("participant_id")["fold"].nunique()
    assert (tested == 1).all() and len(tested) == rows.participant_id.nunique()
    # stratified: each test fold holds each class in about the cohort's proportion (8 of 40 participants)
    test = table[table.set == "test"].merge(rows, on=["participant_id", "session"])
    per_fold = test.drop_duplicates("participant_id").groupby(["fold", "y"]).size().unstack()
    assert per_fold.min().min() >= 2 and per_fold.max().max() <= 4
    # inner validation: about val_fraction of each training part
    sizes = table.groupby(["fold", "set"]).size().unstack()
    assert ((sizes["val"] / (sizes["val"] + sizes["train"])).between(0.12, 0.3)).all()


def test_same_seed_same_splits_other_seed_other_splits():
    rows = cohort_rows()
    a = make_splits(rows.participant_id, rows.y, seed=1, sessions=rows.session)
    b = make_splits(rows.participant_id, rows.y, seed=1, sessions=rows.session)
    c = make_splits(rows.participant_id, rows.y, seed=2, sessions=rows.session)
    pd.testing.assert_frame_equal(a, b)
    assert not a["set"].equals(c["set"])


def test_site_grouping_keeps_every_site_in_one_set():
    rows = cohort_rows(n_participants=60)
    table = make_splits(rows.participant_id, rows.y, n_folds=3, val_fraction=0.25, seed=0, groups=rows.site,
                        sessions=rows.session)
    table = table.merge(rows[["participant_id", "session", "site"]], on=["participant_id", "session"])
    assert (table.groupby(["fold", "site"])["set"].nunique() == 1).all()


def test_regression_targets_are_stratified_by_quantile():
    rows = cohort_rows(sessions=1)
    y = np.random.default_rng(0).normal(size=len(rows))
    table = make_splits(rows.participant_id, y, task="regression", n_folds=4, seed=0)
    test_means = [y[table[(table.fold == f)]["set"].eq("test").to_numpy()].mean() for f in range(4)]
    assert np.ptp(test_means) < 0.6


def test_leaks_are_refused(tmp_path):
    rows = cohort_rows()
    table = make_splits(rows.participant_id, rows.y, seed=0, sessions=rows.session)
    # one session of a test participant moved to the training set of the same fold
    bad = table.copy()
    i = bad.index[(bad.fold == 0) & (bad.set == "test")][0]
    bad.loc[i, "set"] = "train"
    with pytest.raises(LeakageError, match=bad.loc[i, "participant_id"]):
        check_splits(bad)
    # a participant tested in no fold
    never = table[~((table.participant_id == "sub-000") & (table.set == "test"))].copy()
    never.loc[never.participant_id == "sub-000", "set"] = "train"
    with pytest.raises(LeakageError, match="never tested"):
        check_splits(never)
    # a file on disk: the error names it
    path = tmp_path / "splits.tsv"
    write_tsv(bad, path)
    with pytest.raises(LeakageError, match="splits.tsv"):
        read_splits(path)
    # the splits do not describe this cohort
    with pytest.raises(LeakageError, match="differ"):
        check_splits(table, participants=list(rows.participant_id) + ["sub-999"])


def test_fold_indices_map_rows_and_skip_unlabelled():
    rows = cohort_rows(n_participants=20, sessions=1)
    table = make_splits(rows.participant_id, rows.y, n_folds=4, seed=0, sessions=rows.session)
    keys = list(zip(rows.participant_id, rows.session)) + [None]      # an unlabelled row at the end
    idx = fold_indices(table, 2, keys)
    assert sorted(np.concatenate(list(idx.values()))) == list(range(20))
    assert set(rows.participant_id[idx["test"]]) == set(table[(table.fold == 2) & (table.set == "test")].participant_id)
    with pytest.raises(LeakageError, match="not in the splits"):
        fold_indices(table, 2, keys[:-1] + [("sub-new", "1")])
