"""Train one preset on one cross-validation fold: fold-fitted preprocessing, AdamW with warm-up and
cosine decay, early stopping on the inner validation set, resumable single-dict checkpoints.

``brainfuse train splits --tensors T --params JSON --output splits.tsv``
``brainfuse train fold --tensors T --splits splits.tsv --fold k --preset P --params JSON --out-dir DIR``

Outputs per fold x preset (``DIR``): ``checkpoint.pt`` (best weights, fold-fitted preprocessing, model
config, history; loads with ``torch.load(..., weights_only=True)``) and ``predictions.tsv`` (test rows:
class probabilities and per-expert routing weights). ``DIR/resume.pt`` holds the state after the last
finished epoch (model, optimiser, RNG streams); a rerun after a kill continues from it and ends with the
same weights as an uninterrupted run. A damaged resume file is ignored with a WARNING (the fold restarts: seeded,
so the same bytes); a damaged checkpoint is refused by :func:`brainfuse.models.load_checkpoint` with "rerun the train stage".
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from sklearn.impute import SimpleImputer
from sklearn.preprocessing import StandardScaler

from . import cliargs
from . import io as bf_io
from . import splits as bf_splits
from .config import settings_from_json
from .errors import BrainfuseError
from .inputs import InputFileError, load_torch
from .models import (CHECKPOINT_FORMAT, autocast, materialise, pick_device, pooled_shape, prediction_table, row_keys,
                     run_model, targets, volume_batch)
from .moe import PRESETS, ModalitySpec, MultimodalMoE, preset_config
from .provenance import code_version


# ------------------------------------------------------------------------------------------- settings
def model_overrides(settings: dict, preset: str, cohort_modalities: list) -> dict:
    """MoEConfig overrides: preset defaults < ``model.common`` < ``model.overrides[preset]``."""
    m = settings["model"]
    out = {**m["common"], **m["overrides"].get(preset, {})}
    names = [s.name for s in cohort_modalities]
    if preset == "single" and "single_modality" not in out:
        if m["single_modality"] in names:
            out["single_modality"] = m["single_modality"]
    if PRESETS[preset].get("router") == "conditioned" and "condition_on" not in out:
        out["condition_on"] = condition_modality(m["condition_on"], cohort_modalities)
    weight = float(m["modality_heads"])
    if weight and preset != "single":
        out["aux_weights"] = {**PRESETS[preset].get("aux_weights", {}), **out.get("aux_weights", {}), "modality": weight}
    return out


def condition_modality(name: str, cohort_modalities: list) -> str:
    """The tabular modality that drives NeuroMoE's gate: ``model.condition_on`` (any tabular modality, e.g. a
    table of demographics), else the cohort's first tabular modality."""
    tabular = [s.name for s in cohort_modalities if s.kind == "tabular"]
    if name in tabular:
        return name
    if not tabular:
        raise BrainfuseError(f"config model.condition_on={name!r}: the conditioned router (neuromoe) needs a "
                             f"tabular modality and this cohort has none ({', '.join(s.name for s in cohort_modalities)})",
                             fix="drop neuromoe from model.presets, or add a table (tensors.tables)")
    return tabular[0]


# --------------------------------------------------------------------------------------------- cohort
def load(tensors_dir):
    from .tensors import load_cohort

    return load_cohort(tensors_dir)


def cohort_splits(cohort, cv: dict, tensors_dir="tensors") -> pd.DataFrame:
    """The CV splits of the labelled rows (``brainfuse train splits``), grouped by participant or ``cv.group_by``."""
    y, labelled = targets(cohort, cv)
    keys = [k for k, ok in zip(row_keys(cohort), labelled) if ok]
    groups = None
    if cv["group_by"] != "participant_id":
        if cv["group_by"] not in cohort.manifest.columns:
            raise BrainfuseError(f"config cv.group_by={cv['group_by']!r}: no such column in the cohort manifest "
                                 f"(columns: {', '.join(cohort.manifest.columns)})",
                                 path=Path(tensors_dir) / "manifest.tsv",
                                 fix="name a manifest column (participant_id, group or site)")
        groups = cohort.manifest[cv["group_by"]].astype(str).to_numpy()[labelled]
    info = cohort.info
    return bf_splits.make_splits([k[0] for k in keys], y[labelled], cohort.task, cv["n_folds"], cv["val_fraction"],
                                 cv["seed"], groups, [k[1] for k in keys], classes=cohort.classes,
                                 label=info.get("label", "label"),
                                 source=info.get("participants_tsv", {}).get("path") or Path(tensors_dir) / "manifest.tsv",
                                 classes_source=info.get("classes_source"), group_by=cv["group_by"])


# --------------------------------------------------------------------------------- preprocessing
def fit_preprocessing(cohort, rows: np.ndarray, pool: int, volume_norm: str = "voxel",
                      tabular_components: int | None = None, tabular_reduce: str = "select",
                      y: np.ndarray | None = None, select_k: str = "fixed", seed: int = 0) -> dict:
    """Per-modality statistics fitted on ``rows`` (the training fold) only, as tensors (checkpoint-safe).
    Tabular: median imputation + standard scaling (sklearn); a table wider than ``tabular_components`` columns
    is then reduced to that many: ``select`` keeps the columns most associated with the fold's labels, ``pca``
    projects on the first whitened principal components (at most rows - 1). Why reduce: an MLP encoder of 4,950
    connectivity edges has ~160k weights to fit ~30 subjects and memorises them. Why select by default: the
    effects sit in a few regions, which unsupervised components (led by the largest variance) dilute; on the
    120-subject benchmark the MoE presets' mean rose from 0.60 (pca) to 0.65 (README, "Image features").
    Volumes, after pooling: ``voxel`` z-scores each
    voxel against the training fold (as voxel-based morphometry does: the model sees how a subject differs
    from the fold, not the template's anatomy, which no classifier of ~30 subjects can learn to subtract);
    ``channel`` uses one mean and SD per channel. ``select_k``: ``fixed`` selects ``tabular_components`` columns,
    ``inner_cv`` chooses how many per modality (:func:`choose_select_k`, on these rows only)."""
    stats = {}
    for m, spec in enumerate(cohort.modalities):
        have = rows[np.asarray(cohort.present)[rows, m]]
        if spec.kind == "tabular":
            F_ = spec.shape[0]
            if len(have) == 0:
                fill, mean, scale = np.zeros(F_), np.zeros(F_), np.ones(F_)
            else:
                X = np.asarray(cohort.arrays[spec.name][have], dtype=np.float64)
                imputer = SimpleImputer(strategy="median", keep_empty_features=True).fit(X)
                X = imputer.transform(X)
                scaler = StandardScaler().fit(X)
                fill, mean, scale = imputer.statistics_, scaler.mean_, scaler.scale_
            stats[spec.name] = {"fill": torch.tensor(fill, dtype=torch.float32),
                                "mean": torch.tensor(mean, dtype=torch.float32),
                                "scale": torch.tensor(scale, dtype=torch.float32)}
            if tabular_components and F_ > tabular_components and len(have) >= 2 and tabular_reduce == "select":
                # the columns most associated with the target in the training fold (ANOVA F / correlation):
                # a selection matrix, so the checkpoint format (centre, projection) stays the same
                Xs, k = scaler.transform(X), tabular_components
                if select_k == "inner_cv":
                    k = choose_select_k(Xs, y[have], np.asarray(cohort.groups)[have], cohort.task, k, seed)
                keep = select_columns(Xs, y[have], cohort.task, k)
                proj = np.zeros((F_, len(keep)))
                proj[keep, np.arange(len(keep))] = 1.0
                stats[spec.name].update(centre=torch.zeros(F_, dtype=torch.float32),
                                        projection=torch.tensor(proj, dtype=torch.float32))
            elif tabular_components and F_ > tabular_components and len(have) >= 2:
                from sklearn.decomposition import PCA

                k = min(tabular_components, len(have) - 1)
                pca = PCA(n_components=k, svd_solver="full").fit(scaler.transform(X))
                # PCA(whiten=True).transform as tensors (checkpoints load weights_only): x -> (x - centre) @ projection,
                # components scaled by 1/sqrt(their variance)
                proj = pca.components_.T / np.sqrt(np.maximum(pca.explained_variance_, 1e-12))
                stats[spec.name].update(centre=torch.tensor(pca.mean_, dtype=torch.float32),
                                        projection=torch.tensor(proj, dtype=torch.float32))
        else:
            shape = pooled_shape(spec.shape, pool)
            s1, s2, n = torch.zeros(shape, dtype=torch.float64), torch.zeros(shape, dtype=torch.float64), 0
            for start in range(0, len(have), 32):
                x = volume_batch(cohort.arrays[spec.name], have[start:start + 32], pool).double()
                s1 += x.sum(0)
                s2 += x.pow(2).sum(0)
                n += x.shape[0]
            if volume_norm == "channel":
                n, s1, s2 = n * math.prod(shape[1:]), s1.sum((1, 2, 3), keepdim=True), s2.sum((1, 2, 3), keepdim=True)
            elif volume_norm != "voxel":
                raise ValueError(f"volume_norm={volume_norm!r}: choose voxel or channel")
            mean = s1 / max(n, 1)
            sd = (s2 / max(n, 1) - mean ** 2).clamp_min(0).sqrt()
            # a voxel (near) constant across the fold (background) is centred, not blown up by a tiny SD
            floor = 1e-3 * float(sd.max()) if sd.numel() else 0.0
            stats[spec.name] = {"mean": mean.float(), "scale": torch.where(sd > floor, sd, 1.0).float()}
    return stats


def select_columns(X: np.ndarray, y: np.ndarray, task: str, k: int) -> np.ndarray:
    """Indices (ascending) of the ``k`` columns with the largest ANOVA F (classification) or squared correlation
    (regression) with ``y``, ties broken by column order; constant columns score 0."""
    from sklearn.feature_selection import f_classif, f_regression

    with np.errstate(divide="ignore", invalid="ignore"):
        score = (f_classif if task == "classification" else f_regression)(X, y)[0]
    score = np.nan_to_num(score, nan=0.0, posinf=0.0)
    return np.sort(np.argsort(-score, kind="stable")[:k])


def choose_select_k(X: np.ndarray, y: np.ndarray, groups, task: str, k_max: int, seed: int,
                    n_inner: int = 3) -> int:
    """How many of the best columns to keep (1, 2, 4, ... up to ``k_max``): the count whose selection plus a
    logistic regression (ridge for regression) has the lowest held-out loss over ``n_inner`` inner folds of these
    rows (grouped, stratified; the selection refitted in each). Why: the planted effects sit in 2-8 of 4,950
    edges or 600 region features, and a fixed 16 lets noise columns in; a fixed smaller k would starve a
    modality whose signal is spread. Too few rows for inner folds: ``k_max``."""
    from sklearn.linear_model import LogisticRegression, Ridge
    from sklearn.metrics import log_loss

    strata = bf_splits.strata(y, task)
    groups = np.asarray(groups, dtype=str)
    n = min(n_inner, bf_splits.max_group_folds(strata, groups))
    if n < 2:
        return k_max
    candidates = [2 ** i for i in range(int(math.log2(k_max)) + 1)]
    if candidates[-1] != k_max:
        candidates.append(k_max)
    loss, classes = np.zeros(len(candidates)), np.unique(y)
    for fit, val in bf_splits.group_folds(strata, groups, n, seed + 700):
        for i, k in enumerate(candidates):
            keep = select_columns(X[fit], y[fit], task, k)
            if task == "classification":
                model = LogisticRegression(max_iter=2000, class_weight="balanced").fit(X[fit][:, keep], y[fit])
                prob = np.full((len(val), len(classes)), 1e-6)    # a class absent from these fit rows: ~0
                prob[:, np.searchsorted(classes, model.classes_)] = model.predict_proba(X[val][:, keep])
                loss[i] += log_loss(y[val], prob / prob.sum(1, keepdims=True), labels=classes) * len(val)
            else:
                model = Ridge().fit(X[fit][:, keep], y[fit])
                loss[i] += float(((model.predict(X[val][:, keep]) - y[val]) ** 2).sum())
    return candidates[int(np.argmin(loss))]


def model_specs(cohort, pool: int, stats: dict | None = None) -> list:
    """The model's view of each modality: volumes pooled, tables as wide as their preprocessing leaves them."""
    def shape(s):
        if s.kind == "volume":
            return pooled_shape(s.shape, pool)
        st = (stats or {}).get(s.name, {})
        return (int(st["projection"].shape[1]),) if "projection" in st else s.shape
    return [ModalitySpec(s.name, s.kind, shape(s), s.encoder) for s in cohort.modalities]


# ------------------------------------------------------------------------------------------ training
def _deterministic_algorithms() -> None:
    """``torch.use_deterministic_algorithms(True, warn_only=True)`` without the import of torch._inductor it makes
    to set the compiler's flag too (1.2 s of every ~6 s training job, measured; nothing here is compiled). The
    public call where this torch lacks the setter."""
    setter = getattr(torch._C, "_set_deterministic_algorithms", None)
    if setter is None:
        torch.use_deterministic_algorithms(True, warn_only=True)
    else:
        setter(True, warn_only=True)


def set_determinism(seed: int, threads: int | None = None):
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.manual_seed(seed)
    _deterministic_algorithms()
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    if threads:
        torch.set_num_threads(threads)


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to zero at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def class_weights(y: np.ndarray, n_classes: int) -> list:
    """Inverse-frequency ('balanced') weights from the training fold; absent classes get weight 1."""
    counts = np.bincount(y.astype(int), minlength=n_classes).astype(float)
    w = np.where(counts > 0, len(y) / (n_classes * np.maximum(counts, 1)), 1.0)
    return w.tolist()


def batch(data: dict, idx: torch.Tensor, device) -> tuple:
    return ({k: v[idx].to(device, non_blocking=True) for k, v in data["inputs"].items()},
            data["present"][idx].to(device))


def drop_modalities(present: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
    """Modality dropout: hide each present modality with probability p, keeping at least one per sample."""
    if p <= 0:
        return present
    keep = torch.rand(present.shape, generator=generator) >= p
    out = present & keep.to(present.device)
    empty = ~out.any(1)
    out[empty] = present[empty]
    return out


def fingerprint(settings: dict, preset: str, fold: int, fold_rows: dict, n_rows: int) -> str:
    """Identity of a training run: a resume file from another run (settings, split, code) is ignored."""
    h = hashlib.sha256(json.dumps([settings, preset, fold, {k: v.tolist() for k, v in fold_rows.items()},
                                   n_rows, code_version("train")], sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def _phase(cohort, rows: dict, fit: str, settings: dict, preset: str, y: np.ndarray, seed: int, dev) -> dict:
    """Everything one training phase needs, fitted on ``rows[fit]`` only: preprocessing statistics, tensors,
    targets, model (seeded: both phases start from the same weights), optimiser and batch generator."""
    m_cfg = settings["model"]
    pool = int(m_cfg["pool"])
    fit_rows = rows[fit]
    stats = fit_preprocessing(cohort, fit_rows, pool, m_cfg["volume_norm"], m_cfg["tabular_components"],
                              m_cfg["tabular_reduce"], y, m_cfg["tabular_select_k"], seed)
    specs = model_specs(cohort, pool, stats)
    parts = {"fit": fit_rows, "val": rows["val"] if fit == "train" else rows["val"][:0], "test": rows["test"]}
    data = {k: materialise(cohort, r, stats, pool) for k, r in parts.items()}
    # regression: the model sees the target standardised with statistics of the rows it is fitted on
    y_fit = y[fit_rows]
    t_mean, t_scale = ((float(y_fit.mean()), float(y_fit.std()) or 1.0) if cohort.task == "regression"
                       else (0.0, 1.0))
    target = {k: torch.tensor((y[r] - t_mean) / t_scale, dtype=torch.float32) for k, r in parts.items()}
    n_classes = len(cohort.classes) if cohort.task == "classification" else 1
    overrides = model_overrides(settings, preset, specs)
    if cohort.task == "classification" and m_cfg["class_weighted"]:
        overrides["class_weights"] = class_weights(y_fit, n_classes)
    cfg = preset_config(preset, specs, n_classes, cohort.task, **overrides)
    torch.manual_seed(seed)
    model = MultimodalMoE(cfg).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=m_cfg["lr"], weight_decay=m_cfg["weight_decay"])
    steps_per_epoch = max(1, math.ceil(len(fit_rows) / int(m_cfg["batch_size"])))
    return {"stats": stats, "data": data, "target": target, "target_scale": [t_mean, t_scale], "cfg": cfg,
            "model": model, "opt": opt, "gen": torch.Generator().manual_seed(seed + 1),   # batches, dropout
            "n": len(fit_rows), "total": steps_per_epoch * int(m_cfg["epochs"]),
            "warmup": steps_per_epoch * int(m_cfg["warmup_epochs"])}


def _warn_damaged(path, reason, log) -> None:
    text = str(reason).strip()
    text = text.splitlines()[0][:200] if text else type(reason).__name__
    log(f"[train] WARNING: {path} is damaged ({text}): ignoring it and training this fold from the start "
        f"(seeded: the result is the one an uninterrupted run gives)")


def _read_resume(path, fp: str, log) -> dict | None:
    """The resume file of this run, or None: absent, from another run (settings, split, code), or damaged.

    A damaged resume file (truncated, edited, not a brainfuse file) is not an error: it only saves time, and
    training is seeded, so starting the fold afresh ends with the same bytes. weights_only=True still refuses
    any pickled code in it."""
    if not path.exists():
        return None
    try:
        saved = load_torch(path, "resume file", stage="train")
    except InputFileError as e:
        _warn_damaged(path, e.problem, log)
        return None
    if not isinstance(saved, dict) or not {"fingerprint", "state", "model", "optimizer", "rng"} <= set(saved):
        if isinstance(saved, dict) and "fingerprint" in saved and saved["fingerprint"] != fp:
            log(f"[train] {path} is from another run (settings, split or code changed): starting afresh")
        else:
            _warn_damaged(path, "not a brainfuse resume file", log)
        return None
    if saved["fingerprint"] != fp:
        log(f"[train] {path} is from another run (settings, split or code changed): starting afresh")
        return None
    return saved


def _restore(saved: dict, cohort, rows, settings, preset, y, seed, dev) -> tuple[dict, dict]:
    """The phase and state a resume file holds, ready to continue training."""
    state = saved["state"]
    missing = {"phase", "epoch", "step", "best_loss", "best_epoch", "bad_epochs", "history"} - set(state)
    if missing:
        raise KeyError(f"state lacks {sorted(missing)}")
    P = _phase(cohort, rows, "train" if state["phase"] == 1 else "train_val", settings, preset, y, seed, dev)
    P["model"].load_state_dict(saved["model"])
    P["opt"].load_state_dict(saved["optimizer"])
    P["gen"].set_state(saved["rng"]["batches"])
    torch.set_rng_state(saved["rng"]["torch"])
    if dev.type == "cuda" and saved["rng"].get("cuda") is not None:
        torch.cuda.set_rng_state(saved["rng"]["cuda"])
    return P, state


def _fresh_state(phase: int, model) -> dict:
    """Phase 1 keeps the best weights on validation; phase 2 (no validation set) ends with its last epoch."""
    return {"phase": phase, "epoch": 0, "step": 0, "best_loss": float("inf"), "best_epoch": -1, "bad_epochs": 0,
            "best_state": copy.deepcopy(model.state_dict()) if phase == 1 else None, "history": []}


def train_fold(cohort, split_table: pd.DataFrame, fold: int, preset: str, settings: dict, out_dir,
               device: str = "auto", threads: int | None = None, log=print) -> dict:
    """Train ``preset`` on ``fold``; write checkpoint.pt and predictions.tsv in ``out_dir``; return the checkpoint.

    Phase 1 chooses the number of epochs: with ``model.inner_folds`` > 1 (default 3) from that many inner folds
    of the training part (:func:`choose_epochs`), else by early stopping on the splits' inner validation set. With
    ``model.refit`` (default), phase 2 then trains the same model from the same initial weights on training +
    validation rows for the number of epochs phase 1 chose, as the linear baselines are fitted on both: with ~30 subjects per
    fold, the validation fifth is too much data to leave out of the final model."""
    m_cfg, cv = settings["model"], settings["cv"]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    y, labelled = targets(cohort, cv)
    keys = row_keys(cohort)
    keys_l = [k if ok else None for k, ok in zip(keys, labelled)]
    rows = bf_splits.fold_indices(split_table, fold, keys_l)
    rows["train_val"] = np.concatenate([rows["train"], rows["val"]])
    seed = int(cv["seed"]) * 1000 + fold
    set_determinism(seed, threads)
    dev = pick_device(device)
    refit = bool(m_cfg["refit"]) and len(rows["val"]) > 0

    fp = fingerprint(settings, preset, fold, rows, len(keys))
    resume_path = out_dir / "resume.pt"
    P, state = _start_or_resume(cohort, rows, settings, preset, fold, y, seed, dev, keys, refit, resume_path, fp, log)
    log(f"[train] {preset} fold {fold}: {len(rows['train'])} train / {len(rows['val'])} val / {len(rows['test'])} "
        f"test{' (then refit on train + val)' if refit else ''}, device {dev} ({torch.get_num_threads()} CPU threads), "
        f"{sum(p.numel() for p in P['model'].parameters()):,} parameters")
    t0 = time.time()
    P, state = _run_phases(P, state, cohort, rows, settings, preset, fold, y, seed, dev, refit, resume_path, fp,
                           log, t0)
    model, best_epoch, epochs_run, history, best_loss = _final_model(P, state, rows)
    log(f"[train] stopped after epoch {epochs_run}; best val loss {best_loss:.4f} at epoch {best_epoch}"
        + (f"; refit on train + val for {best_epoch} epochs" if state["phase"] == 2 else "")
        + f"; {time.time() - t0:.1f} s")

    ckpt = {"format": CHECKPOINT_FORMAT, "preset": preset, "fold": fold, "task": cohort.task,
            "classes": list(map(str, cohort.classes)) if cohort.task == "classification" else [],
            "config": P["cfg"].to_dict(), "pool": int(m_cfg["pool"]), "target_scale": P["target_scale"],
            "modalities": [{"name": s.name, "kind": s.kind, "shape": list(s.shape)} for s in cohort.modalities],
            "preprocessing": P["stats"], "model": {k: v.cpu() for k, v in model.state_dict().items()},
            "best_epoch": best_epoch, "epochs_run": epochs_run, "history": history,
            "refit": {"rows": int(P["n"]), "epochs": state["epoch"]} if state["phase"] == 2 else None,
            "settings": json.loads(json.dumps(settings)), "fingerprint": fp, "code_version": code_version("train")}
    preds = prediction_table(model, ckpt, P["data"]["test"], [keys[i] for i in rows["test"]], dev)
    preds.insert(2, "fold", fold)
    preds.insert(3, "preset", preset)
    preds.insert(4, "target", y[rows["test"]])
    bf_io.save_tsv(preds, out_dir / "predictions.tsv")
    bf_io.save_torch(ckpt, out_dir / "checkpoint.pt")
    resume_path.unlink(missing_ok=True)
    return ckpt


def _start_or_resume(cohort, rows, settings, preset, fold, y, seed, dev, keys, refit, resume_path, fp,
                     log) -> tuple[dict, dict]:
    """The phase and state to train from: this run's resume file where it holds a usable one, else a fresh
    start: phase 1, or (epoch count chosen on inner folds first) straight to phase 2, the refit on train + val."""
    m_cfg = settings["model"]
    saved = _read_resume(resume_path, fp, log)
    P, state = None, None
    if saved:
        try:
            P, state = _restore(saved, cohort, rows, settings, preset, y, seed, dev)
            log(f"[train] resuming {preset} fold {fold} in phase {state['phase']} after epoch {state['epoch']}")
        except Exception as e:      # loads, but its content does not fit this model: as damaged
            _warn_damaged(resume_path, e, log)
    n_inner = inner_fold_count(cohort, rows["train_val"], y, keys, int(m_cfg["inner_folds"]), log) if refit else 1
    if P is None and n_inner > 1:
        # epoch count from inner folds, then straight to the refit on train + val
        phase1 = choose_epochs(cohort, rows, settings, preset, y, seed, dev, keys, log, n_inner)
        P = _phase(cohort, rows, "train_val", settings, preset, y, seed, dev)
        state = _fresh_state(2, P["model"])
        state["phase1"] = phase1
    elif P is None:
        P = _phase(cohort, rows, "train", settings, preset, y, seed, dev)
        state = _fresh_state(1, P["model"])
    return P, state


def _run_phases(P, state, cohort, rows, settings, preset, fold, y, seed, dev, refit, resume_path, fp, log,
                t0) -> tuple[dict, dict]:
    """Train the current phase to its end; after phase 1 with a refit, phase 2: the same initial weights and
    schedule fitted on train + val, stopped at phase 1's best epoch. The resume file is written after every
    epoch and at the switch; returns the last phase and state."""
    m_cfg = settings["model"]

    def save_resume():
        bf_io.save_torch({"fingerprint": fp, "model": P["model"].state_dict(), "optimizer": P["opt"].state_dict(),
                          "rng": {"batches": P["gen"].get_state(), "torch": torch.get_rng_state(),
                                  "cuda": torch.cuda.get_rng_state() if dev.type == "cuda" else None},
                          "state": state}, resume_path)

    while True:
        phase = state["phase"]
        max_epochs = int(m_cfg["epochs"]) if phase == 1 else state["phase1"]["best_epoch"]
        _train_epochs(P, state, max_epochs, m_cfg, cohort.task, dev, save_resume,
                      f"{preset} fold {fold}" + (" refit" if phase == 2 else ""), log, t0)
        if phase == 2 or not refit:
            break
        # phase 2: same initial weights and schedule, fitted on train + val, stopped at phase 1's best epoch
        phase1 = {k: state[k] for k in ("best_epoch", "best_loss", "epoch", "history")}
        P = _phase(cohort, rows, "train_val", settings, preset, y, seed, dev)
        state = _fresh_state(2, P["model"])
        state["phase1"] = {**phase1, "best_epoch": max(1, phase1["best_epoch"])}
        save_resume()
    return P, state


def _final_model(P: dict, state: dict, rows: dict) -> tuple:
    """(model, best epoch, epochs run, history, best validation loss): phase 1's best weights (its last epoch
    without a validation set), or the refit's last epoch with phase 1's record."""
    model = P["model"]
    if state["phase"] == 1:
        if len(rows["val"]):          # without a validation set the last epoch is the model
            model.load_state_dict(state["best_state"])
        record = state
    else:
        record = state["phase1"]
    return model, record["best_epoch"], record["epoch"], record["history"], record["best_loss"]

def _train_epochs(P: dict, state: dict, max_epochs: int, m_cfg: dict, task: str, dev, save_resume, desc: str,
                  log, t0: float) -> None:
    """Epochs of one phase until ``max_epochs`` or (with a validation set) ``patience`` epochs without a
    better validation loss; ``state`` and the resume file are updated after every epoch."""
    has_val = len(P["target"]["val"]) > 0
    try:
        from tqdm import tqdm
        bar = tqdm(total=max_epochs, initial=state["epoch"], desc=desc, disable=None, file=sys.stderr)
    except ImportError:  # pragma: no cover
        bar = None
    while state["epoch"] < max_epochs and state["bad_epochs"] < int(m_cfg["patience"]):
        train_loss, val_loss = _epoch(P, state, m_cfg, task, dev)
        save_resume()
        if bar is not None:
            bar.update(1)
            bar.set_postfix(train=f"{train_loss or 0:.3f}", **({"val": f"{val_loss:.3f}"} if has_val else {}))
        if bar is None or bar.disable:
            if state["epoch"] % 10 == 0 or state["epoch"] == 1:
                log(f"[train] {desc} epoch {state['epoch']}: train loss {train_loss or 0:.4f}"
                    + (f", val loss {val_loss:.4f} (best {state['best_loss']:.4f} @ {state['best_epoch']})"
                       if has_val else "") + f", {time.time() - t0:.1f} s")
    if bar is not None:
        bar.close()


def _epoch(P: dict, state: dict, m_cfg: dict, task: str, dev) -> tuple:
    """One epoch over the fitted rows, then the validation loss; updates ``state`` (history, best weights)."""
    model, opt, gen, data, target = P["model"], P["opt"], P["gen"], P["data"], P["target"]
    n, bs = P["n"], int(m_cfg["batch_size"])
    has_val = len(target["val"]) > 0
    model.train()
    order = torch.randperm(n, generator=gen)
    losses = []
    for start in range(0, n, bs):
        idx = order[start:start + bs]
        if len(idx) < 2 and n >= 2:     # a batch of one adds noise, not signal
            continue
        inputs, present = batch(data["fit"], idx, dev)
        present = drop_modalities(present.cpu(), float(m_cfg["modality_dropout"]), gen).to(dev)
        for g in opt.param_groups:
            g["lr"] = m_cfg["lr"] * lr_factor(state["step"], P["warmup"], P["total"])
        with autocast(dev):
            out = model(inputs, present, target["fit"][idx].to(dev))
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), m_cfg["grad_clip"])
        opt.step()
        state["step"] += 1
        losses.append(float(out.loss.detach()))
    val_loss = evaluate_loss(model, data["val"], target["val"], dev, task) if has_val else None
    state["epoch"] += 1
    train_loss = float(np.mean(losses)) if losses else None
    state["history"].append({"epoch": state["epoch"], "train_loss": train_loss, "val_loss": val_loss})
    if has_val and val_loss < state["best_loss"] - 1e-4:
        state.update(best_loss=val_loss, best_epoch=state["epoch"], bad_epochs=0,
                     best_state=copy.deepcopy(model.state_dict()))
    elif has_val:
        state["bad_epochs"] += 1
    return train_loss, val_loss


def inner_fold_count(cohort, pool: np.ndarray, y: np.ndarray, keys: list, wanted: int, log=print) -> int:
    """``model.inner_folds``, or fewer when the training part has too few participants or rows per class for
    them (a small cohort): with a warning, down to 1 (early stopping on the splits' own validation set)."""
    if wanted <= 1:
        return 1
    strata = bf_splits.strata(y[pool], cohort.task)
    groups = [keys[i][0] for i in pool]
    k = min(wanted, bf_splits.max_group_folds(strata, groups))
    if k < wanted:
        log(f"[train] WARNING: the training part ({len(pool)} rows, {len(set(groups))} participants, per class "
            f"{np.bincount(strata).tolist()}) is too small for model.inner_folds={wanted}; "
            + (f"using {k} inner folds" if k > 1 else "early stopping on the splits' validation set instead"))
    return k if k > 1 else 1


def choose_epochs(cohort, rows: dict, settings: dict, preset: str, y: np.ndarray, seed: int, dev, keys: list,
                  log=print, n_inner: int | None = None) -> dict:
    """The epoch count of the final model from ``model.inner_folds`` inner folds of the training part (train +
    val rows, grouped by participant, stratified): one model per inner fold, trained epoch by epoch side by side,
    stopped ``patience`` epochs after the best mean validation loss. Why: one inner validation set of ~6 people
    chose epoch 1-3 in several folds of the demo (a refit of 1 epoch is an untrained model); the mean of three
    curves over every training row is far steadier (README, "Image features")."""
    m_cfg = settings["model"]
    pool = rows["train_val"]
    groups = np.array([keys[i][0] for i in pool])
    folds = bf_splits.group_folds(bf_splits.strata(y[pool], cohort.task), groups,
                                  n_inner or int(m_cfg["inner_folds"]), seed + 500)   # n_inner: inner_fold_count
    runs = []
    for fit, val in folds:
        P = _phase(cohort, {"train": pool[fit], "val": pool[val], "test": pool[:0]}, "train", settings, preset, y,
                   seed, dev)
        runs.append((P, _fresh_state(1, P["model"])))
    curve, best, best_epoch, bad = [], float("inf"), 1, 0
    while len(curve) < int(m_cfg["epochs"]) and bad < int(m_cfg["patience"]):
        losses = np.array([_epoch(P, st, m_cfg, cohort.task, dev) for P, st in runs], dtype=float)
        curve.append({"epoch": len(curve) + 1, "train_loss": float(losses[:, 0].mean()),
                      "val_loss": float(losses[:, 1].mean())})
        if curve[-1]["val_loss"] < best - 1e-4:
            best, best_epoch, bad = curve[-1]["val_loss"], len(curve), 0
        else:
            bad += 1
    log(f"[train] {preset}: {len(runs)} inner folds, mean validation loss lowest ({best:.4f}) at epoch {best_epoch} "
        f"of {len(curve)}")
    return {"best_epoch": best_epoch, "best_loss": best, "epoch": len(curve), "history": curve,
            "inner_folds": len(runs)}


@torch.no_grad()
def evaluate_loss(model, data: dict, target: torch.Tensor, device, task: str) -> float:
    """Task loss on a held-out set (no auxiliary terms): the early-stopping criterion."""
    if len(target) == 0:
        return 0.0
    pred = run_model(model, data, device)["prediction"]
    if task == "classification":
        return float(F.cross_entropy(pred, target.long(), weight=model.class_weights.cpu()
                                     if model.class_weights is not None else None))
    return float(F.mse_loss(pred.view(-1), target))


# ------------------------------------------------------------------------------------------------ CLI
def cli(argv=None):
    args = cliargs.parser("train").parse_args(argv)
    settings = settings_from_json(args.params)
    if args.what == "fold":
        pick_device(args.device)        # a missing GPU is reported before any data is read
    cohort = load(args.tensors)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    if args.what == "splits":
        table = cohort_splits(cohort, settings["cv"], args.tensors)
        bf_io.save_tsv(table, args.output)
        n_labelled = int(targets(cohort, settings["cv"])[1].sum())
        log(f"[splits] {n_labelled} labelled rows ({len(cohort) - n_labelled} unlabelled left out), "
            f"{settings['cv']['n_folds']} folds -> {args.output}")
        return 0
    table = bf_splits.read_splits(args.splits)
    train_fold(cohort, table, args.fold, args.preset, settings, args.out_dir, args.device, args.threads, log)
    return 0
