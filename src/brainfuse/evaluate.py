"""Cross-validated evaluation: metrics with bootstrap CIs, linear baselines, the missing-modality grid,
routing ablations, expert-utilisation plots and one results TSV.

``brainfuse evaluate --tensors T --splits S --models M --presets P1 P2 … --params JSON --out-dir DIR [--bayes J]``

Everything uses the out-of-fold test predictions of the models trained by ``brainfuse train fold`` (or, for
the grid and ablations, those models re-run on their own test rows); the baselines are refitted here on the
same splits, with their imputers and scalers fitted on each training fold. Evaluation refuses to run when
a participant (or group) appears in two sets of one fold.

Outputs in DIR: ``results.tsv`` (analysis, model, condition, metric, value, ci_low, ci_high, n),
``predictions.tsv`` (every out-of-fold prediction), ``summary.json`` (best preset), ``figures/*.png``
(captions: workflow/report/figures.rst): cv_performance, confusion_matrices, missing_modality_summary (the grid
condensed, beside the demo's Bayes rule given the same modalities) and _grid, roc_curves, calibration,
connectivity (group-mean conn matrices), ablations, utilisation_<preset>, training_curves.
"""
from __future__ import annotations

import itertools
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from sklearn.impute import SimpleImputer  # noqa: E402
from sklearn.linear_model import LogisticRegression, Ridge  # noqa: E402
from sklearn.metrics import (confusion_matrix, mean_absolute_error, mean_squared_error, r2_score,  # noqa: E402
                             roc_auc_score, roc_curve)
from sklearn.preprocessing import StandardScaler  # noqa: E402

from . import cliargs  # noqa: E402
from . import io as bf_io  # noqa: E402
from . import layout  # noqa: E402
from . import models as bf_models  # noqa: E402
from . import reference as bf_reference  # noqa: E402
from . import splits as bf_splits  # noqa: E402
from .config import settings_from_json  # noqa: E402
from .inputs import read_json, read_tsv  # noqa: E402
from .tensors import load_cohort  # noqa: E402

RESULT_COLUMNS = ["analysis", "model", "condition", "metric", "value", "ci_low", "ci_high", "n"]
MAIN_METRIC = {"classification": "balanced_accuracy", "regression": "r2"}


# -------------------------------------------------------------------------------------------- metrics
def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing their mean rank (as the Mann-Whitney U statistic needs)."""
    ranks = np.empty(len(x))
    ranks[np.argsort(x, kind="mergesort")] = np.arange(1, len(x) + 1)
    _, inv, counts = np.unique(x, return_inverse=True, return_counts=True)
    return (np.bincount(inv, ranks) / counts)[inv]


def classification_metrics(y: np.ndarray, prob: np.ndarray) -> dict:
    """accuracy, balanced accuracy, macro-F1 and macro one-vs-rest AUROC (NaN when a class is absent).

    The same definitions as sklearn's accuracy_score, balanced_accuracy_score, f1_score(average="macro",
    zero_division=0) and roc_auc_score(multi_class="ovr"), written with numpy because the bootstrap calls this
    1,000 times per model: sklearn's input validation made it ~25 ms a call, most of the evaluate job
    (tests/test_evaluate.py checks the agreement)."""
    y = np.asarray(y, dtype=int)
    k = prob.shape[1]
    pred = prob.argmax(1)
    cm = np.bincount(y * k + pred, minlength=k * k).reshape(k, k)     # rows: truth, columns: prediction
    tp, n_true, n_pred = np.diag(cm), cm.sum(1), cm.sum(0)
    present = n_true > 0
    f1_den = n_true + n_pred
    out = {"accuracy": float(tp.sum() / max(len(y), 1)),
           "balanced_accuracy": float(np.mean(tp[present] / n_true[present])) if present.any() else float("nan"),
           "macro_f1": float(np.mean(np.where(f1_den > 0, 2 * tp / np.maximum(f1_den, 1), 0.0)))}
    if not present.all():
        out["auroc"] = float("nan")
        return out
    p = prob / prob.sum(1, keepdims=True)
    aucs = []
    for c in ([1] if k == 2 else range(k)):
        pos = y == c
        r = _average_ranks(p[:, c])
        n_pos, n_neg = int(pos.sum()), int((~pos).sum())
        aucs.append((r[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
    out["auroc"] = float(np.mean(aucs))
    return out


def regression_metrics(y: np.ndarray, pred: np.ndarray) -> dict:
    return {"rmse": float(np.sqrt(mean_squared_error(y, pred))), "mae": mean_absolute_error(y, pred),
            "r2": r2_score(y, pred) if len(y) > 1 else float("nan")}


def metrics(task: str, y, scores) -> dict:
    return classification_metrics(y, scores) if task == "classification" else regression_metrics(y, scores)


def bootstrap(task: str, y, scores, n_boot: int, seed: int = 0, groups=None) -> dict:
    """Point estimates and percentile 95% CIs, resampling participants (``groups``) with replacement."""
    y, scores = np.asarray(y), np.asarray(scores)
    point = metrics(task, y, scores)
    groups = np.arange(len(y)) if groups is None else np.asarray(groups)
    uniq, inverse = np.unique(groups, return_inverse=True)
    members = [np.flatnonzero(inverse == g) for g in range(len(uniq))]
    rng = np.random.default_rng(seed)
    draws = {k: [] for k in point}
    for _ in range(n_boot):
        idx = np.concatenate([members[g] for g in rng.integers(0, len(uniq), len(uniq))])
        for k, v in metrics(task, y[idx], scores[idx]).items():
            draws[k].append(v)
    out = {}
    for k, v in point.items():
        d = np.asarray(draws[k], dtype=float)
        d = d[np.isfinite(d)]
        lo, hi = (np.percentile(d, [2.5, 97.5]) if len(d) else (np.nan, np.nan))
        out[k] = (float(v), float(lo), float(hi))
    return out


def rows_for(analysis, model, condition, stats: dict, n: int) -> list:
    out = []
    for metric, v in stats.items():
        value, lo, hi = v if isinstance(v, tuple) else (v, np.nan, np.nan)
        out.append({"analysis": analysis, "model": model, "condition": condition, "metric": metric,
                    "value": value, "ci_low": lo, "ci_high": hi, "n": n})
    return out


def scores_of(pred: pd.DataFrame, task: str, classes: list) -> np.ndarray:
    if task == "classification":
        return pred[[f"prob_{c}" for c in classes]].to_numpy(float)
    return pred["predicted"].to_numpy(float)


def bayes_reference(bayes: dict | None, keys: list, y: np.ndarray, labelled: np.ndarray, classes: list,
                    modalities: tuple | None = None):
    """(rows, class probabilities) of the demo generator's Bayes rule for the labelled cohort rows it knows,
    from ``truth/bayes.json`` (per-subject latent scores and scans present; ``score_needs``: the subject field a
    score needs to be observed, e.g. 'fa' -> 'has_dwi'); None for other datasets and for a file without them.
    ``modalities``: only the scores those tensor modalities encode (the missing-modality grid's reference; the
    file's ``score_modalities`` says which encode which, None without it)."""
    needed = ("subjects", "score_needs") + (("score_modalities",) if modalities is not None else ())
    if (not bayes or any(k not in bayes for k in needed)
            or list(bayes.get("config", {}).get("classes", [])) != list(classes)):
        return None
    known = {f"sub-{s['label']}": s for s in bayes["subjects"]}
    idx = [i for i, (pid, _) in enumerate(keys) if labelled[i] and pid in known]
    if len(idx) < 2:
        return None
    names = list(bayes["latent_means"])    # per score: class means with effects applied (demo.bayes_accuracy)
    means = np.array([bayes["latent_means"][n] for n in names]).T
    scores, observed = bf_reference.subject_arrays([known[keys[i][0]] for i in idx], names, bayes["score_needs"])
    if modalities is not None:
        observed &= bf_reference.seen_by(names, modalities, bayes["score_modalities"])
    return np.array(idx), bf_reference.posterior(scores, observed, means)


# ------------------------------------------------------------------------------------------ baselines
def baseline_features(cohort, rows: np.ndarray, modalities: list, fit_rows: np.ndarray, grid=(4, 5, 4)):
    """Concatenated features of ``modalities`` for ``rows``: tabular columns and volumes average-pooled to a
    coarse grid, each imputed and scaled with statistics of ``fit_rows`` (the training fold), absent
    modalities set to the training mean (0 after scaling) plus one presence indicator each.

    With several modalities each block is divided by the square root of its width, so that every modality adds
    the same total variance (the block weighting of multi-block analysis, e.g. multiple factor analysis, in its
    cheap form). Without it a 4-column clinical table drowns among thousands of voxel and edge columns: on the
    default demo the all-modality logistic regression fell from 0.81 (clinical alone) to 0.36; with it, 0.72."""
    weigh = len(modalities) > 1
    blocks = []
    for name in modalities:
        m = bf_models.modality_names(cohort).index(name)
        spec = cohort.modalities[m]

        def feats(r):
            if spec.kind == "tabular":
                return np.asarray(cohort.arrays[name][r], dtype=np.float64)
            x = torch.from_numpy(np.nan_to_num(np.asarray(cohort.arrays[name][r], dtype=np.float32)))
            return torch.nn.functional.adaptive_avg_pool3d(x, grid).flatten(1).double().numpy()

        have_fit = fit_rows[cohort.present[fit_rows, m]]
        X = feats(rows)
        if len(have_fit):
            Xf = feats(have_fit)
            imp = SimpleImputer(strategy="median", keep_empty_features=True).fit(Xf)
            sc = StandardScaler().fit(imp.transform(Xf))
            X = sc.transform(imp.transform(X))
        else:
            X = np.zeros_like(X)
        pres = cohort.present[rows, m]
        X[~pres] = 0.0
        X = np.nan_to_num(X) / (np.sqrt(X.shape[1]) if weigh and X.shape[1] else 1.0)
        blocks += [X, pres[:, None].astype(float)]
    return np.concatenate(blocks, 1)


def linear_model(task: str):
    if task == "classification":
        return LogisticRegression(C=1.0, max_iter=5000, class_weight="balanced")
    return Ridge(alpha=1.0)


def run_baseline(cohort, y, table, folds, modalities, task, n_classes, only_present=False):
    """Out-of-fold scores of a linear model on ``modalities``; rows lacking all of them are left out
    when ``only_present`` (single-modality baselines), so the model is judged where it can be used."""
    keys = bf_models.row_keys(cohort)
    labelled = [k if np.isfinite(v) and (task != "classification" or v >= 0) else None for k, v in zip(keys, y)]
    cols = [bf_models.modality_names(cohort).index(m) for m in modalities]
    out_idx, out_scores = [], []
    for fold in folds:
        r = bf_splits.fold_indices(table, fold, labelled)
        fit = np.concatenate([r["train"], r["val"]])
        test = r["test"]
        if only_present:
            fit = fit[cohort.present[fit][:, cols].any(1)]
            test = test[cohort.present[test][:, cols].any(1)]
        if len(test) == 0:
            continue
        Xf = baseline_features(cohort, fit, modalities, fit)
        Xt = baseline_features(cohort, test, modalities, fit)
        model = linear_model(task)
        if task == "classification":
            yf = y[fit].astype(int)
            model.fit(Xf, yf)
            p = np.zeros((len(test), n_classes))
            p[:, model.classes_] = model.predict_proba(Xt)
        else:
            p = model.fit(Xf, y[fit]).predict(Xt)
        out_idx.append(test)
        out_scores.append(p)
    if not out_idx:
        return np.zeros(0, int), None
    return np.concatenate(out_idx), np.concatenate(out_scores)


# ------------------------------------------------------------------------------- grid and ablations
def subsets(names: list) -> list:
    return [c for k in range(1, len(names) + 1) for c in itertools.combinations(names, k)]


def routing_hook(kind: str, expert: int | None = None):
    """A forward hook on a Router replacing its weights: 'uniform' (1/E each) or 'drop' one expert
    (its weight set to 0, the rest renormalised)."""
    def hook(module, args, out):
        w = out.weights
        if kind == "uniform":
            w = torch.full_like(w, 1.0 / w.shape[-1])
        else:
            w = w.clone()
            w[:, expert] = 0
            s = w.sum(-1, keepdim=True)
            fallback = torch.ones_like(w)
            fallback[:, expert] = 0
            fallback = fallback / fallback.sum(-1, keepdim=True)
            w = torch.where(s > 0, w / s.clamp_min(1e-12), fallback)
        return out._replace(weights=w)
    return hook


def fold_models(models_dir, presets, folds):
    for preset in presets:
        for fold in folds:
            path = Path(layout.fold_paths(models_dir, preset, fold)["checkpoint"])
            yield preset, fold, path


def load_models(models_dir, presets, folds) -> dict:
    """(preset, fold) -> (checkpoint, model), every one read (and checked) before any analysis runs."""
    return {(preset, fold): bf_models.load_checkpoint(path)
            for preset, fold, path in fold_models(models_dir, presets, folds)}


def grid_and_ablations(cohort, y, table, models_dir, presets, folds, settings, log=print,
                       models: dict | None = None) -> pd.DataFrame:
    """Long table: analysis (grid | ablation), model, condition, participant row, scores."""
    task = cohort.task
    keys = bf_models.row_keys(cohort)
    labelled = [k if ok else None for k, ok in zip(keys, bf_models.targets(cohort, settings["cv"])[1])]
    records = []
    for preset, fold, path in fold_models(models_dir, presets, folds):
        ckpt, model = models[preset, fold] if models else bf_models.load_checkpoint(path)
        test = bf_splits.fold_indices(table, fold, labelled)["test"]
        data = bf_models.cohort_data(ckpt, cohort, test)
        names = [m["name"] for m in ckpt["modalities"]]
        conditions = []
        if settings["cv"]["missing_grid"]:
            for combo in subsets(names):
                mask = torch.tensor([n in combo for n in names])
                conditions.append(("grid", "+".join(combo), data["present"] & mask, None))
        if settings["cv"]["ablations"] and ckpt["config"]["fusion"] == "moe":
            conditions.append(("ablation", "full", data["present"], None))
            conditions.append(("ablation", "uniform gating", data["present"], ("uniform", None)))
            for e, ename in enumerate(model.expert_names):
                conditions.append(("ablation", f"drop {ename}", data["present"], ("drop", e)))
        for analysis, cond, present, hook in conditions:
            keep = present.any(1)
            if not bool(keep.any()):
                continue
            sub = {"inputs": {k: v[keep] for k, v in data["inputs"].items()}, "present": present[keep]}
            handles = [r.register_forward_hook(routing_hook(*hook)) for r in model.routers] if hook else []
            try:
                pred = bf_models.run_model(model, sub, "cpu")["prediction"]
            finally:
                for h in handles:
                    h.remove()
            if task == "classification":
                scores = pred.softmax(-1).numpy()
            else:
                mean, scale = ckpt.get("target_scale", (0.0, 1.0))
                scores = pred.view(-1).numpy() * scale + mean
            for i, row in enumerate(test[keep.numpy()]):
                records.append({"analysis": analysis, "model": preset, "condition": cond, "row": int(row),
                                "scores": scores[i]})
        log(f"[evaluate] grid/ablations: {preset} fold {fold} done")
    return records


# ---------------------------------------------------------------------------------------------- plots
def plot_metrics(results: pd.DataFrame, task: str, path, bayes: dict | None, chance: float | None):
    metric = MAIN_METRIC[task]
    r = results[(results.metric == metric) & results.analysis.isin(["reference", "cv", "baseline", "canary"])
                & (results.condition == "all")]
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(r) + 1.5))
    labels = [f"{a}: {m}" for a, m in zip(r.analysis, r.model)]
    colours = {"reference": "tab:green", "cv": "tab:blue", "baseline": "tab:grey", "canary": "tab:red"}
    ypos = np.arange(len(r))[::-1]
    ax.barh(ypos, r.value, color=[colours[a] for a in r.analysis],
            xerr=[r.value - r.ci_low, r.ci_high - r.value], capsize=3)
    ax.set_yticks(ypos, labels)
    if chance is not None:
        ax.axvline(chance, color="k", ls=":", label=f"chance {chance:.2f}")
    if bayes:
        ax.axvline(bayes["bayes_accuracy"], color="tab:green", ls="--",
                   label=f"generator's Bayes accuracy {bayes['bayes_accuracy']:.2f} (expected over cohorts)")
    ax.set_xlabel(f"{metric.replace('_', ' ')} (out-of-fold, 95% bootstrap CI)")
    if chance is not None or bayes:
        ax.legend(loc="lower right", fontsize=8)
    # n on the figure: at 15 participants a 95% CI is ~0.5 wide, and a reader should see why before comparing bars
    ax.set_title(f"CV performance, n = {int(r.n.max())} (blue: presets, grey: baselines,\nred: canary, green: Bayes rule)",
                 fontsize=10)
    fig.tight_layout()
    bf_io.save_figure(fig, path, dpi=110)


def plot_confusions(preds: pd.DataFrame, classes: list, presets: list, path):
    n = len(presets)
    cols = min(3, n)
    fig, axes = plt.subplots(-(-n // cols), cols, figsize=(3.6 * cols, 3.3 * -(-n // cols)), squeeze=False)
    for ax, preset in zip(axes.flat, presets):
        p = preds[preds.preset == preset]
        cm = confusion_matrix(p.target.astype(int), p.predicted.astype(int), labels=range(len(classes)))
        ax.imshow(cm, cmap="Blues")
        for (i, j), v in np.ndenumerate(cm):
            ax.text(j, i, str(v), ha="center", va="center", color="k" if v < cm.max() / 2 else "w")
        ax.set_xticks(range(len(classes)), classes, fontsize=8)
        ax.set_yticks(range(len(classes)), classes, fontsize=8)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(preset)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.tight_layout()
    bf_io.save_figure(fig, path, dpi=110)


def plot_table_heatmap(table: pd.DataFrame, title: str, path, fmt="{:.2f}", cmap="viridis", vmin=None, vmax=None,
                       xlabel="", ylabel=""):
    fig, ax = plt.subplots(figsize=(max(5, 0.55 * table.shape[1] + 2.5), max(2.5, 0.4 * table.shape[0] + 1.8)))
    im = ax.imshow(table.to_numpy(float), cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
    for (i, j), v in np.ndenumerate(table.to_numpy(float)):
        if np.isfinite(v):
            ax.text(j, i, fmt.format(v), ha="center", va="center", fontsize=7, color="w" if v < np.nanmean(
                table.to_numpy(float)) else "k")
    ax.set_xticks(range(table.shape[1]), table.columns, rotation=60 if table.shape[1] > 4 else 0,
                  ha="right" if table.shape[1] > 4 else "center", fontsize=8)
    ax.set_yticks(range(table.shape[0]), table.index, fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.03)
    fig.tight_layout()
    bf_io.save_figure(fig, path, dpi=110)


def combo_label(row: pd.Series, names: list) -> str:
    return "+".join(n for n in names if row.get(f"present_{n}", 0)) or "none"


def plot_utilisation(preds: pd.DataFrame, preset: str, classes: list, names: list, path) -> bool:
    """Mean gate weight per expert by true class and by modality combination."""
    p = preds[preds.preset == preset]
    wcols = [c for c in p.columns if c.startswith("weight_") and p[c].notna().any()]
    if not wcols:
        return False
    p = p.assign(combination=[combo_label(r, names) for _, r in p.iterrows()])
    by = [("class", p.target.map(lambda t: classes[int(t)] if classes else "all")), ("combination", p.combination)]
    fig, axes = plt.subplots(1, 2, figsize=(12, max(3, 0.28 * len(wcols) + 2)),
                             gridspec_kw={"width_ratios": [1, 2]})
    for ax, (what, key) in zip(axes, by):
        t = p[wcols].groupby(key.to_numpy()).mean().T
        if what == "class" and classes:
            t = t[[c for c in classes if c in t.columns]]
        t.index = [c.removeprefix("weight_") for c in t.index]
        counts = key.value_counts()
        im = ax.imshow(t.to_numpy(float), cmap="magma", vmin=0, aspect="auto")
        ax.set_xticks(range(t.shape[1]), [f"{c} (n={counts[c]})" for c in t.columns], rotation=45, ha="right", fontsize=7)
        ax.set_yticks(range(t.shape[0]), t.index, fontsize=7)
        ax.set_title(f"{preset}: mean gate weight by {what}", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.04)
    fig.tight_layout()
    bf_io.save_figure(fig, path, dpi=110)
    return True


def plot_training(models_dir, presets, folds, path, models: dict | None = None):
    fig, axes = plt.subplots(1, len(presets), figsize=(3 * len(presets), 2.8), squeeze=False, sharey=True)
    for ax, preset in zip(axes[0], presets):
        for _, fold, ck in fold_models(models_dir, [preset], folds):
            h = (models[preset, fold] if models else bf_models.load_checkpoint(ck))[0]["history"]
            ax.plot([e["epoch"] for e in h], [e["val_loss"] for e in h], label=f"fold {fold}", lw=1)
        ax.set_title(preset, fontsize=9)
        ax.set_xlabel("epoch")
    axes[0, 0].set_ylabel("validation loss")
    axes[0, -1].legend(fontsize=7)
    fig.tight_layout()
    bf_io.save_figure(fig, path, dpi=110)


BAYES_MODEL = "Bayes rule (true latent scores)"


def missing_modality_summary(res: pd.DataFrame, metric: str, names: list) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The grid condensed: (by size: model x number of modalities kept -> mean, min, max over those subsets;
    key conditions: model x {each modality alone, all but each one, all} -> value). Models: the presets, plus
    the Bayes rule's row where the demo's truth gave one."""
    g = res[(res.metric == metric) & ((res.analysis == "grid")
                                      | ((res.analysis == "reference") & (res.condition != "all")))]
    g = g.assign(size=g.condition.str.count(r"\+") + 1)
    by_size = g.groupby(["model", "size"], sort=False).value.agg(["mean", "min", "max"]).reset_index()
    keys = [(f"{n} only", n) for n in names]
    if len(names) > 2:
        keys += [(f"all but {n}", "+".join(m for m in names if m != n)) for n in names]
    if len(names) > 1:
        keys.append(("all", "+".join(names)))
    wide = g.pivot(index="model", columns="condition", values="value")
    models = sorted(dict.fromkeys(g.model), key=lambda m: m == BAYES_MODEL)       # presets first, the ceiling last
    key_table = pd.DataFrame({label: wide[cond] if cond in wide else np.nan for label, cond in keys}, index=models)
    return by_size, key_table


def plot_missing_summary(res: pd.DataFrame, task: str, names: list, path, chance: float | None) -> pd.DataFrame | None:
    """Left: the metric against the number of modalities a participant has (mean over the subsets of that size,
    band min-max); right: each modality alone, all but each one, all. Returns the right panel's table."""
    metric = MAIN_METRIC[task]
    by_size, table = missing_modality_summary(res, metric, names)
    if not len(table):
        return None
    fig, (ax, hx) = plt.subplots(1, 2, figsize=(6 + 0.55 * table.shape[1], max(3.6, 0.38 * len(table) + 2.2)),
                                 gridspec_kw={"width_ratios": [1, max(1.2, 0.16 * table.shape[1])]})
    for i, model in enumerate(table.index):
        t, bayes = by_size[by_size.model == model], model == BAYES_MODEL
        colour = "k" if bayes else f"C{i}"
        ax.plot(t["size"], t["mean"], marker="o", color=colour, ls="--" if bayes else "-", lw=1.5 if bayes else 1.2,
                label="Bayes rule (ceiling)" if bayes else model)
        if not bayes:
            ax.fill_between(t["size"], t["min"], t["max"], color=colour, alpha=0.12, lw=0)
    if chance is not None:
        ax.axhline(chance, color="grey", ls=":", lw=1, label=f"chance {chance:.2f}")
    ax.set_xticks(range(1, len(names) + 1))
    ax.set_xlabel("modalities available (of %d)" % len(names))
    ax.set_ylabel(f"{metric.replace('_', ' ')} (out-of-fold)")
    ax.set_title("by number of modalities\n(line: mean over subsets, band: worst-best)", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    v = table.to_numpy(float)
    lo, hi = (chance, 1.0) if task == "classification" else (np.nanmin(v), np.nanmax(v))
    im = hx.imshow(v, cmap="viridis", vmin=lo, vmax=hi, aspect="auto")
    for (i, j), x in np.ndenumerate(v):
        if np.isfinite(x):
            hx.text(j, i, f"{x:.2f}", ha="center", va="center", fontsize=7,
                    color="w" if x < lo + 0.5 * (hi - lo) else "k")
    hx.set_xticks(range(table.shape[1]), table.columns, rotation=45, ha="right", fontsize=8)
    hx.set_yticks(range(len(table)), ["Bayes rule (ceiling)" if m == BAYES_MODEL else m for m in table.index],
                  fontsize=8)
    hx.set_title("each modality alone" + (", all but one," if len(names) > 2 else ",") + " all", fontsize=9)
    fig.colorbar(im, ax=hx, fraction=0.03)
    fig.suptitle(f"Missing modalities: {metric.replace('_', ' ')} of the trained models given only some inputs",
                 fontsize=10)
    fig.tight_layout()
    bf_io.save_figure(fig, path, dpi=110)
    return table


def one_vs_rest(y: np.ndarray, prob: np.ndarray, k: int) -> dict:
    """Class index -> (false positive rates, true positive rates, AUC) of class-vs-rest on probabilities
    normalised as classification_metrics does (so the AUCs average to its macro AUROC)."""
    p = prob / prob.sum(1, keepdims=True)
    out = {}
    for c in range(k):
        pos = (y == c).astype(int)
        if 0 < pos.sum() < len(pos):
            fpr, tpr, _ = roc_curve(pos, p[:, c], drop_intermediate=False)
            out[c] = (fpr, tpr, float(roc_auc_score(pos, p[:, c])))
    return out


def plot_roc(curves: dict, classes: list, path) -> dict:
    """One panel per model (the presets and the best baseline): one-vs-rest ROC of each class from the
    out-of-fold probabilities. Returns model -> the AUROC in its title (macro over classes; class 1 for two
    classes, as results.tsv)."""
    n = len(curves)
    cols = min(3, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.5 * cols, 3.4 * rows), squeeze=False)
    shown = {}
    for ax, (model, (y, prob)) in zip(axes.flat, curves.items()):
        roc = one_vs_rest(y, prob, len(classes))
        for c, (fpr, tpr, auc) in roc.items():
            ax.plot(fpr, tpr, lw=1.3, color=f"C{c}", label=f"{classes[c]} vs rest: {auc:.2f}")
        ax.plot([0, 1], [0, 1], color="grey", ls=":", lw=1)
        if len(roc) == len(classes):
            shown[model] = roc[1][2] if len(classes) == 2 else float(np.mean([r[2] for r in roc.values()]))
            ax.set_title(f"{model}\nAUROC {shown[model]:.2f} (n={len(y)})", fontsize=9)
        else:
            ax.set_title(f"{model}\n(a class absent: no AUROC)", fontsize=9)
        ax.set_xlabel("false positive rate", fontsize=8)
        ax.set_ylabel("true positive rate", fontsize=8)
        ax.set_aspect("equal")
        ax.legend(fontsize=7, loc="lower right", title="AUC", title_fontsize=7)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.tight_layout()
    bf_io.save_figure(fig, path, dpi=110)
    return shown


def reliability(y: np.ndarray, prob: np.ndarray, n_bins: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Top-label reliability: (mean confidence, accuracy, count) per equal-count bin of the predicted class's
    probability, and the expected calibration error (count-weighted |accuracy - confidence|)."""
    p = prob / prob.sum(1, keepdims=True)
    conf, correct = p.max(1), (p.argmax(1) == y).astype(float)
    order = np.argsort(conf, kind="mergesort")
    bins = [b for b in np.array_split(order, min(n_bins, len(y))) if len(b)]
    mc = np.array([conf[b].mean() for b in bins])
    acc = np.array([correct[b].mean() for b in bins])
    cnt = np.array([len(b) for b in bins])
    return mc, acc, cnt, float(np.sum(cnt * np.abs(acc - mc)) / cnt.sum())


def plot_calibration(curves: dict, classes: list, path, n_bins: int = 5) -> dict:
    """Reliability diagram of each model's out-of-fold probabilities (confidence of the predicted class against
    how often it was right), and their histogram. Returns model -> expected calibration error."""
    fig, (ax, hx) = plt.subplots(2, 1, figsize=(7.6, 6.2), gridspec_kw={"height_ratios": [3, 1]}, sharex=True)
    ece = {}
    for i, (model, (y, prob)) in enumerate(curves.items()):
        mc, acc, _, ece[model] = reliability(y, prob, n_bins)
        ax.plot(mc, acc, marker="o", ms=3, lw=1.2, color=f"C{i}", label=f"{model} (ECE {ece[model]:.2f})")
        p = prob / prob.sum(1, keepdims=True)
        hx.hist(p.max(1), bins=np.linspace(1 / len(classes), 1, 11), histtype="step", color=f"C{i}")
    ax.plot([0, 1], [0, 1], color="grey", ls=":", lw=1, label="perfect calibration")
    ax.set_xlim(1 / len(classes) - 0.02, 1.0)
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("fraction correct")
    ax.set_title(f"Calibration (out-of-fold; {n_bins} equal-count bins)", fontsize=10)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))     # outside: never over a curve
    hx.set_xlabel("predicted probability of the predicted class")
    hx.set_ylabel("participants", fontsize=8)
    fig.tight_layout()
    bf_io.save_figure(fig, path, dpi=110)
    return ece


def connectivity_matrices(cohort, y: np.ndarray, labelled: np.ndarray, classes: list):
    """(parcel names, {group: mean Fisher-z matrix}) of the conn modality's participants, per class (all
    labelled participants for regression); None without a conn modality. The edges are the upper triangle
    (k=1) in the atlas' parcel order, named ``a__b``."""
    edges = cohort.feature_names.get("conn") if "conn" in bf_models.modality_names(cohort) else None
    if not edges:
        return None
    first = edges[0].split("__")[0]
    parcels = [first] + [e.split("__")[1] for e in edges if e.split("__")[0] == first]
    iu = np.triu_indices(len(parcels), 1)
    if len(iu[0]) != len(edges):
        return None
    m = bf_models.modality_names(cohort).index("conn")
    has = cohort.present[:, m] & labelled
    groups = {c: has & (y == i) for i, c in enumerate(classes)} if classes else {"all": has}
    out = {}
    for name, rows in groups.items():
        if rows.any():
            mat = np.zeros((len(parcels), len(parcels)))
            mat[iu] = np.nanmean(np.asarray(cohort.arrays["conn"][np.flatnonzero(rows)], dtype=np.float64), 0)
            out[f"{name} (n={int(rows.sum())})"] = mat + mat.T
    return (parcels, out) if out else None


def plot_connectivity(parcels: list, mats: dict, path) -> None:
    """Group-mean connectivity per class with nilearn's plot_matrix, parcels in the atlas order (left then right
    hemisphere, inferior to superior), and each class minus the first (where the diagnosis shows)."""
    from nilearn.plotting import plot_matrix

    names = list(mats)
    panels = [(n, mats[n], "mean Fisher z") for n in names]
    panels += [(f"{n.split(' (')[0]} - {names[0].split(' (')[0]}", mats[n] - mats[names[0]], "difference")
               for n in names[1:]]
    cols = len(names)
    rows = 1 + (len(panels) > cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.3 * cols, 4.0 * rows), squeeze=False)
    # colour limits at the 99th percentile of |z|: a few extreme edges of short runs would wash out the rest
    vmax = float(np.percentile(np.abs(np.stack(list(mats.values()))), 99)) or 1.0
    dmax = float(np.percentile(np.abs(np.stack([p[1] for p in panels[cols:]])), 99)) if len(panels) > cols else 1.0
    dmax = dmax or 1.0
    hemi = [p[:1] for p in parcels]
    cuts = [i for i in range(1, len(hemi)) if hemi[i] != hemi[i - 1]]
    for ax, (title, mat, what) in zip(axes.flat, panels):
        v = vmax if what == "mean Fisher z" else dmax
        plot_matrix(mat, axes=ax, vmin=-v, vmax=v, colorbar=True, tri="full", labels=None, cmap="RdBu_r",
                    auto_fit=False)
        for c in cuts:
            ax.axhline(c - 0.5, color="k", lw=0.6)
            ax.axvline(c - 0.5, color="k", lw=0.6)
        starts = [0] + cuts
        ticks = [(s + e) / 2 for s, e in zip(starts, cuts + [len(parcels)])]
        ax.set_xticks(ticks, [hemi[s] for s in starts], fontsize=8)
        ax.set_yticks(ticks, [hemi[s] for s in starts], fontsize=8)
        ax.set_title(f"{title}\n{what}", fontsize=9)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(f"Resting-state connectivity, {len(parcels)} atlas parcels (L | R, inferior to superior)", fontsize=10)
    fig.tight_layout()
    bf_io.save_figure(fig, path, dpi=110)


# ------------------------------------------------------------------------------------------------- QC
def qc_table(cohort) -> pd.DataFrame | None:
    """participant_id, session, qc_pass, qc_flags of each cohort row (image QC carried by the tensors stage);
    None for cohorts without those columns."""
    man = cohort.manifest
    if "qc_pass" not in man.columns:
        return None
    keys = bf_models.row_keys(cohort)
    return pd.DataFrame({"participant_id": [k[0] for k in keys], "session": [k[1] for k in keys],
                         "qc_pass": man["qc_pass"].astype(str).to_numpy(),
                         "qc_flags": man["qc_flags"].astype(str).to_numpy()})


def qc_flagged(preds: pd.DataFrame) -> pd.DataFrame:
    """The evaluated rows whose image QC failed or raised flags: index (participant_id, session), columns
    qc_pass ("True"/"False") and qc_flags."""
    if "qc_pass" not in preds.columns:
        return pd.DataFrame(columns=["qc_pass", "qc_flags"])
    rows = preds.drop_duplicates(["participant_id", "session"])
    bad = rows[(rows.qc_pass == "False") | (rows.qc_flags.fillna("n/a") != "n/a")]
    return bad.set_index(["participant_id", "session"])[["qc_pass", "qc_flags"]]


def unit_name(key) -> str:
    pid, ses = key
    return pid + (f"_ses-{ses}" if ses not in ("", "n/a") else "")


# ------------------------------------------------------------------------------------------- driver
def evaluate(cohort, table: pd.DataFrame, models_dir, presets: list, settings: dict, out_dir,
             bayes: dict | None = None, log=print) -> pd.DataFrame:
    """Every analysis of the trained models in ``models_dir`` on the splits ``table``; writes results.tsv,
    predictions.tsv, summary.json and figures/ in ``out_dir`` (last: they appear only when all succeeded) and
    returns the results table."""
    out_dir = Path(out_dir)
    cv, task = settings["cv"], cohort.task
    y, labelled = bf_models.targets(cohort, cv)
    keys = bf_models.row_keys(cohort)
    bf_splits.check_splits(table, [k[0] for k, ok in zip(keys, labelled) if ok])
    folds = sorted(table["fold"].unique())
    classes = list(cohort.classes) if task == "classification" else []
    n_boot, seed = int(cv["bootstrap"]), int(cv["seed"])
    names = bf_models.modality_names(cohort)

    # models: every checkpoint read first (a damaged one stops the run here)
    models = load_models(models_dir, presets, folds)
    preds = _out_of_fold_predictions(cohort, table, models_dir, presets, folds)
    flagged = qc_flagged(preds)
    results = _cv_rows(preds, flagged, presets, task, classes, n_boot, seed, log)
    results += _qc_rows(flagged, log)
    ref_rows, cohort_bayes = _bayes_rows(bayes, keys, y, labelled, classes, task, cv, names, n_boot, seed, log)
    results += ref_rows
    baseline_scores = {}        # label -> (truth, out-of-fold scores): the best one joins the ROC figure
    if cv["baselines"]:
        base_rows, baseline_scores = _baseline_rows(cohort, y, labelled, table, folds, names, task, classes, keys,
                                                    n_boot, seed, log)
        results += base_rows
    if cv["missing_grid"] or cv["ablations"]:
        results += _grid_ablation_rows(cohort, y, table, models_dir, presets, folds, settings, log, models)

    res = pd.DataFrame(results, columns=RESULT_COLUMNS)
    summary, best = _summary(res, task, classes, cv, flagged, bayes, cohort_bayes)
    _figures(cohort, res, preds, labelled, models_dir, presets, folds, models, classes, names, baseline_scores,
             bayes, out_dir / "figures")

    # write last, atomically: the rule's outputs appear only when everything succeeded
    bf_io.save_tsv(preds, out_dir / "predictions.tsv")
    bf_io.save_json(summary, out_dir / "summary.json", newline=False)
    bf_io.save_tsv(res, out_dir / "results.tsv")
    metric = MAIN_METRIC[task]
    log(f"[evaluate] best preset {best.model}: {metric} {best.value:.3f} [{best.ci_low:.3f}, {best.ci_high:.3f}]")
    return res


def _out_of_fold_predictions(cohort, table: pd.DataFrame, models_dir, presets: list, folds: list) -> pd.DataFrame:
    """The test predictions of every preset and fold, each checked to be exactly that fold's test set in the
    splits (LeakageError otherwise), with the cohort's image QC columns where it has them."""
    preds = []
    for preset, fold, path in fold_models(models_dir, presets, folds):
        p = read_tsv(path.parent / "predictions.tsv", "predictions of a trained fold",
                     required=("participant_id", "session", "target"), fix="delete the fold's folder and rerun train",
                     dtype={"participant_id": str, "session": str}, keep_default_na=False)
        test = table[(table.fold == fold) & (table.set == "test")]
        expected = set(zip(test.participant_id, test.session))
        got = set(zip(p.participant_id, p.session))
        if got != expected:
            raise bf_splits.LeakageError(f"{path.parent / 'predictions.tsv'}: its rows are not the test set of fold "
                                         f"{fold} in the splits ({len(got ^ expected)} differ); retrain")
        preds.append(p)
    preds = pd.concat(preds, ignore_index=True)
    preds["target"] = pd.to_numeric(preds["target"])
    qc = qc_table(cohort)
    if qc is not None:
        preds = preds.merge(qc, on=["participant_id", "session"], how="left")
    return preds


def _cv_rows(preds: pd.DataFrame, flagged: pd.DataFrame, presets: list, task: str, classes: list, n_boot: int,
             seed: int, log) -> list:
    """Cross-validated metrics with bootstrap CIs per preset (condition 'all'), and again without the rows
    whose image QC failed or raised flags (condition 'QC passed') when there are any."""
    results = []
    for preset in presets:
        p = preds[preds.preset == preset]
        stats = bootstrap(task, p.target.to_numpy(), scores_of(p, task, classes), n_boot, seed, p.participant_id)
        results += rows_for("cv", preset, "all", stats, len(p))
        log(f"[evaluate] {preset}: " + ", ".join(f"{k} {v[0]:.3f} [{v[1]:.3f}, {v[2]:.3f}]" for k, v in stats.items()))
        if len(flagged):        # the same models judged on the rows whose image QC passed only
            p = p[~p.set_index(["participant_id", "session"]).index.isin(flagged.index)]
            if len(p) >= 2:
                stats = bootstrap(task, p.target.to_numpy(), scores_of(p, task, classes), n_boot, seed,
                                  p.participant_id)
                results += rows_for("cv", preset, "QC passed", stats, len(p))
    return results


def _qc_rows(flagged: pd.DataFrame, log) -> list:
    """The flagged rows listed in the results (analysis qc: value 1 = passed with flags, 0 = failed), and
    one warning naming them."""
    results = []
    for key, ok, flags in zip(flagged.index, flagged.qc_pass, flagged.qc_flags):
        results += rows_for("qc", "image QC", f"{unit_name(key)}: {flags}", {"qc_pass": float(ok == "True")}, 1)
    if len(flagged):
        log(f"[evaluate] WARNING: image QC flagged {len(flagged)} evaluated rows (results.tsv: analysis qc; "
            f"condition 'QC passed': the metrics without them): "
            + "; ".join(f"{unit_name(k)} ({f})" for k, f in zip(flagged.index, flagged.qc_flags)))
    return results


def _bayes_rows(bayes, keys, y, labelled, classes, task, cv, names, n_boot, seed, log) -> tuple[list, float | None]:
    """(result rows, its main metric) of the demo's Bayes rule on the same subjects: the ceiling this cohort
    allows (nothing fitted); with the missing-modality grid also given only the scores each modality subset
    encodes. No rows (and None) for other datasets, regression and the permuted-label canary."""
    if task != "classification" or cv["permute_labels"]:
        return [], None
    ref = bayes_reference(bayes, keys, y, labelled, classes)
    if ref is None:
        return [], None
    idx, sc = ref
    stats = bootstrap(task, y[idx], sc, n_boot, seed, [keys[i][0] for i in idx])
    cohort_bayes = float(stats[MAIN_METRIC[task]][0])
    results = rows_for("reference", BAYES_MODEL, "all", stats, len(idx))
    log(f"[evaluate] Bayes rule on this cohort: {MAIN_METRIC[task]} {stats[MAIN_METRIC[task]][0]:.3f}")
    if cv["missing_grid"]:
        for combo in subsets(names):
            idx, sc = bayes_reference(bayes, keys, y, labelled, classes, modalities=combo)
            results += rows_for("reference", BAYES_MODEL, "+".join(combo), metrics(task, y[idx], sc), len(idx))
    return results, cohort_bayes


def _baseline_rows(cohort, y, labelled, table, folds, names, task, classes, keys, n_boot, seed,
                   log) -> tuple[list, dict]:
    """Linear baselines refitted per fold (all modalities, each alone) and the permuted-label canary:
    (result rows, {baseline label: (truth, out-of-fold scores)})."""
    n_classes = len(classes) if classes else 1
    configs = [("baseline", "linear (all modalities)", names, y, False)]
    configs += [("baseline", f"linear ({n} only)", [n], y, True) for n in names]
    yp = y.copy()
    yp[labelled] = np.random.default_rng([seed, 13]).permutation(y[labelled])
    configs.append(("canary", "linear, permuted labels", names, yp, False))
    results, baseline_scores = [], {}
    for analysis, label, mods, yy, only in configs:
        idx, sc = run_baseline(cohort, yy, table, folds, mods, task, n_classes, only)
        if len(idx) < 2:
            continue
        stats = bootstrap(task, yy[idx], sc, n_boot, seed, [keys[i][0] for i in idx])
        results += rows_for(analysis, label, "all", stats, len(idx))
        if analysis == "baseline":
            baseline_scores[label] = (yy[idx].astype(int) if task == "classification" else yy[idx], sc)
        log(f"[evaluate] {label}: {MAIN_METRIC[task]} {stats[MAIN_METRIC[task]][0]:.3f}")
    return results, baseline_scores


def _grid_ablation_rows(cohort, y, table, models_dir, presets, folds, settings, log, models) -> list:
    """The missing-modality grid and routing ablations (point estimates; n = rows evaluated)."""
    task = cohort.task
    recs = grid_and_ablations(cohort, y, table, models_dir, presets, folds, settings, log, models)
    df = pd.DataFrame(recs)
    results = []
    if len(df):
        for (analysis, model, cond), g in df.groupby(["analysis", "model", "condition"], sort=False):
            rows = g.row.to_numpy()
            sc = np.stack(g.scores.to_numpy()) if task == "classification" else g.scores.to_numpy(float)
            results += rows_for(analysis, model, cond, metrics(task, y[rows], sc), len(rows))
    return results


def _summary(res: pd.DataFrame, task: str, classes: list, cv: dict, flagged: pd.DataFrame, bayes: dict | None,
             cohort_bayes: float | None) -> tuple[dict, pd.Series]:
    """(summary.json's content, the best preset's cv row on the main metric)."""
    metric = MAIN_METRIC[task]
    cvres = res[(res.analysis == "cv") & (res.metric == metric) & (res.condition == "all")]
    best = cvres.sort_values("value", ascending=False).iloc[0]
    summary = {"task": task, "metric": metric, "best_preset": best.model, "best_value": float(best.value),
               "best_ci": [float(best.ci_low), float(best.ci_high)], "classes": classes, "n": int(best.n),
               "permuted_labels": bool(cv["permute_labels"]),
               "presets": {m: float(v) for m, v in zip(cvres.model, cvres.value)}}
    if len(flagged):
        summary["qc_flagged"] = [f"{unit_name(k)}: {'failed' if ok == 'False' else 'passed'}; {f}"
                                 for k, ok, f in zip(flagged.index, flagged.qc_pass, flagged.qc_flags)]
    if bayes:
        summary["bayes_accuracy"] = bayes.get("bayes_accuracy")
        if cohort_bayes is not None:
            summary["cohort_bayes"] = cohort_bayes
    return summary, best


def _figures(cohort, res, preds, labelled, models_dir, presets, folds, models, classes, names, baseline_scores,
             bayes, figs) -> None:
    """Every figure in ``figs`` (captions: workflow/report/figures.rst)."""
    task = cohort.task
    figs.mkdir(parents=True, exist_ok=True)
    chance = 1.0 / (len(classes) if classes else 1) if task == "classification" else 0.0
    plot_metrics(res, task, figs / "cv_performance.png", bayes if task == "classification" else None, chance)
    if task == "classification":
        plot_confusions(preds, classes, presets, figs / "confusion_matrices.png")
    _heatmap_figures(res, task, chance, figs)
    if len(res[res.analysis == "grid"]):
        plot_missing_summary(res, task, names, figs / "missing_modality_summary.png", chance)
    if task == "classification":
        _roc_figures(res, preds, presets, classes, baseline_scores, figs)
    # by the true labels, also in the canary run (the connectivity itself is not permuted)
    conn = connectivity_matrices(cohort, np.asarray(cohort.target, float), labelled, classes)
    if conn is not None:
        plot_connectivity(*conn, figs / "connectivity.png")
    for preset in presets:
        plot_utilisation(preds, preset, classes, names, figs / f"utilisation_{preset}.png")
    plot_training(models_dir, presets, folds, figs / "training_curves.png", models)


def _heatmap_figures(res: pd.DataFrame, task: str, chance: float, figs) -> None:
    """The missing-modality grid and the routing ablations as heatmaps of the main metric."""
    metric = MAIN_METRIC[task]
    for analysis, fname, title in [("grid", "missing_modality_grid.png", "Missing-modality grid"),
                                   ("ablation", "ablations.png", "Routing ablations")]:
        t = res[(res.analysis == analysis) & (res.metric == metric)]
        if len(t):
            heat = t.pivot(index="model", columns="condition", values="value")
            heat = heat[list(dict.fromkeys(t.condition))]
            label = "modalities present" if analysis == "grid" else ""
            wide = heat.shape[1] > heat.shape[0]     # the grid's 2^M - 1 subsets read as rows, not a 4000 px strip
            plot_table_heatmap(heat.T if wide else heat, f"{title}: {metric.replace('_', ' ')} (out-of-fold)",
                               figs / fname, vmin=chance if task == "classification" else None,
                               vmax=1 if task == "classification" else None,
                               xlabel="" if wide else label, ylabel=label if wide else "")


def _roc_figures(res: pd.DataFrame, preds: pd.DataFrame, presets: list, classes: list, baseline_scores: dict,
                 figs) -> None:
    """ROC curves and calibration of every preset and of the best linear baseline (classification)."""
    task, metric = "classification", MAIN_METRIC["classification"]
    curves = {}
    for preset in presets:
        p = preds[preds.preset == preset]
        curves[preset] = (p.target.to_numpy(int), scores_of(p, task, classes))
    base = res[(res.analysis == "baseline") & (res.metric == metric) & (res.condition == "all")]
    if len(base):
        best_base = base.sort_values("value", ascending=False, kind="mergesort").iloc[0].model
        curves[best_base] = baseline_scores[best_base]
    plot_roc(curves, classes, figs / "roc_curves.png")
    plot_calibration(curves, classes, figs / "calibration.png")

def cli(argv=None):
    args = cliargs.parser("evaluate").parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = settings_from_json(args.params)
    cohort = load_cohort(args.tensors)
    table = bf_splits.read_splits(args.splits)
    bayes = read_json(args.bayes, "demo truth (bayes.json)", fix="rerun the demo rule") if args.bayes else None
    evaluate(cohort, table, args.models, args.presets, settings, args.out_dir, bayes,
             log=lambda m: print(m, file=sys.stderr, flush=True))
    return 0
