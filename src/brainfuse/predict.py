"""Predict new subjects with trained models: class probabilities (or values) and per-expert routing weights.

``brainfuse predict --tensors T --models M --preset P|best [--summary reports/summary.json] --output predictions.tsv``

New subjects go through the same workflow up to the tensors stage (DICOM or BIDS in, tensors out); the
models are the preset's CV models ``M/<preset>/fold-*/checkpoint.pt``, each applying its own fold-fitted
preprocessing; probabilities (values) and routing weights are averaged over the folds (an ensemble of
the cross-validated models, so no model is refitted here). Rows with none of the model's modalities get
``n/a``. For participants the models were trained on, use the out-of-fold predictions of the evaluation
instead (``reports/predictions.tsv``): these are in-sample.
"""
from __future__ import annotations

import os
import sys

import numpy as np
import pandas as pd
import torch

from . import cliargs
from . import io as bf_io
from . import models as bf_models
from .errors import BrainfuseError
from .inputs import read_json
from .layout import fold_checkpoints, fold_paths
from .tensors import load_cohort


def checkpoints(models_dir, preset: str) -> list:
    paths = fold_checkpoints(models_dir, preset)
    if not paths:
        pattern = os.path.relpath(fold_paths(models_dir, preset, "*")["checkpoint"], models_dir)
        raise BrainfuseError(f"no {pattern}", path=models_dir,
                             fix="train the preset first (snakemake train), or check model.predict_from / "
                                 "model.predict_preset")
    return paths


def predict(cohort, paths: list, device="cpu", log=print) -> pd.DataFrame:
    """Fold-averaged predictions for every row of ``cohort`` that has at least one of the model's modalities."""
    keys = bf_models.row_keys(cohort)
    tables = []
    for path in paths:
        ckpt, model = bf_models.load_checkpoint(path, device)
        bf_models.check_compatible(ckpt, cohort, str(path))
        rows = np.arange(len(keys))
        data = bf_models.cohort_data(ckpt, cohort, rows)
        usable = data["present"].any(1)
        sub = {"inputs": {k: v[usable] for k, v in data["inputs"].items()}, "present": data["present"][usable]}
        t = bf_models.prediction_table(model, ckpt, sub, [keys[i] for i in rows[usable.numpy()]], device)
        tables.append(t)
        log(f"[predict] {path}: {int(usable.sum())} of {len(keys)} rows")
    task, classes = ckpt["task"], ckpt["classes"]
    allp = pd.concat(tables, ignore_index=True)
    numeric = [c for c in allp.columns if c.startswith(("prob_", "weight_"))] + (
        ["predicted"] if task == "regression" else [])
    out = allp.groupby(["participant_id", "session"], sort=False)[numeric].mean()
    out["n_models"] = allp.groupby(["participant_id", "session"], sort=False).size()
    if task == "classification":
        probs = out[[f"prob_{c}" for c in classes]].to_numpy()
        out.insert(0, "predicted", [classes[i] for i in probs.argmax(1)])
    out = out.reset_index()
    pres = pd.DataFrame({"participant_id": [k[0] for k in keys], "session": [k[1] for k in keys]})
    for j, name in enumerate(bf_models.modality_names(cohort)):
        pres[f"present_{name}"] = np.asarray(cohort.present)[:, j].astype(int)
    for col in ("qc_pass", "qc_flags"):     # image QC of the tensors stage: a flagged row's prediction is suspect
        if col in cohort.manifest.columns:
            pres[col] = cohort.manifest[col].astype(str).to_numpy()
    out = pres.merge(out, on=["participant_id", "session"], how="left")
    out.insert(2, "preset", ckpt["preset"])
    return out


def cli(argv=None):
    ap = cliargs.parser("predict")
    args = ap.parse_args(argv)
    preset = args.preset
    if preset == "best":
        if not args.summary:
            ap.error("--preset best needs --summary (the evaluation's summary.json)")
        summary = read_json(args.summary, "evaluation summary", fix="rerun the evaluate stage")
        if not isinstance(summary.get("best_preset"), str):
            raise BrainfuseError("evaluation summary names no best_preset", path=args.summary,
                                 fix="rerun the evaluate stage, or set model.predict_preset")
        preset = summary["best_preset"]
    device = bf_models.pick_device(args.device)
    torch.set_grad_enabled(False)
    cohort = load_cohort(args.tensors)
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    table = predict(cohort, checkpoints(args.models, preset), device, log)
    bf_io.save_tsv(table, args.output)
    log(f"[predict] {preset}: {table['predicted'].notna().sum()} predictions -> {args.output}")
    return 0
