"""Trained models: checkpoint I/O, the torch device, running a model on cohort rows.

The inference side of ``brainfuse train``, shared by ``train``, ``evaluate`` and ``predict``: the checkpoint
format and :func:`load_checkpoint` (``torch.load(..., weights_only=True)``), the torch device, the cohort's row
keys and targets, the fold-fitted preprocessing applied to cohort rows (:func:`materialise`) and a model's
predictions and routing weights on them (:func:`run_model`, :func:`prediction_table`). The run settings
(``--params``) are read by :func:`brainfuse.config.settings_from_json`.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from .errors import BrainfuseError
from .inputs import InputFileError, load_torch
from .moe import MultimodalMoE, MoEConfig

CHECKPOINT_FORMAT = "brainfuse-moe-1"


class DeviceError(BrainfuseError):
    """A torch device (config model.device, --device) this machine does not have."""


# --------------------------------------------------------------------------------------------- cohort
def row_keys(cohort) -> list:
    """(participant_id, session) per cohort row; session '' when the dataset has none."""
    man = cohort.manifest
    ses = man["session"].fillna("").astype(str) if "session" in man.columns else [""] * len(man)
    return list(zip(man["participant_id"].astype(str), ses))


def targets(cohort, cv: dict) -> tuple[np.ndarray, np.ndarray]:
    """(target, labelled mask). Class indices (classification) or values (regression); with
    ``cv.permute_labels`` the labelled targets are shuffled (the leakage canary: every model must fall
    to chance)."""
    y = np.asarray(cohort.target, dtype=float)
    labelled = np.isfinite(y)
    if cohort.task == "classification":
        labelled &= y >= 0
    if cv.get("permute_labels"):
        rng = np.random.default_rng([cv["seed"], 7])
        y = y.copy()
        y[labelled] = rng.permutation(y[labelled])
    return y, labelled


def modality_names(cohort) -> list:
    return [m.name for m in cohort.modalities]


# --------------------------------------------------------------------------------- preprocessing
def pooled_shape(shape: tuple, pool: int) -> tuple:
    return (shape[0], *(math.ceil(s / pool) for s in shape[1:]))


def volume_batch(array, rows, pool: int) -> torch.Tensor:
    x = torch.from_numpy(np.nan_to_num(np.asarray(array[rows], dtype=np.float32)))
    return F.avg_pool3d(x, pool, ceil_mode=True) if pool > 1 else x


def _volume_stat(t: torch.Tensor) -> torch.Tensor:
    """(C,) per-channel statistics of older checkpoints broadcast like (C, 1, 1, 1); (C, X, Y, Z) as is."""
    return t.view(-1, 1, 1, 1) if t.dim() == 1 else t


def materialise(cohort, rows: np.ndarray, stats: dict, pool: int, specs: list | None = None) -> dict:
    """Preprocessed float32 tensors of ``rows``: {"inputs": {name: (n, ...)}, "present": (n, M) bool}."""
    specs = specs or cohort.modalities
    present = torch.from_numpy(np.asarray(cohort.present)[rows].astype(bool))
    inputs = {}
    for spec in specs:
        st = stats[spec.name]
        if spec.kind == "tabular":
            x = torch.from_numpy(np.asarray(cohort.arrays[spec.name][rows], dtype=np.float32))
            x = torch.where(torch.isnan(x), st["fill"], x)
            x = (x - st["mean"]) / st["scale"]
            inputs[spec.name] = (x - st["centre"]) @ st["projection"] if "projection" in st else x
        else:
            parts = [volume_batch(cohort.arrays[spec.name], rows[i:i + 32], pool) for i in range(0, len(rows), 32)]
            x = torch.cat(parts) if parts else torch.zeros(0, *pooled_shape(spec.shape, pool))
            inputs[spec.name] = (x - _volume_stat(st["mean"])) / _volume_stat(st["scale"])
    return {"inputs": inputs, "present": present}


# ------------------------------------------------------------------------------------------ device
def pick_device(name: str = "auto") -> torch.device:
    """``auto``: CUDA when available, else CPU; a named device must exist here (else one line saying so)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    fix = "set model.device to auto or cpu in the config, or run the train and predict jobs on a GPU node " \
          "(model.partition, model.gpus)"
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise DeviceError(f"config model.device (--device) {name!r} is not a torch device",
                          fix="use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = ("this torch is a CPU-only build" if torch.version.cuda is None
                   else "no CUDA GPU is visible (driver, CUDA_VISIBLE_DEVICES)")
            raise DeviceError(f"config model.device (--device) is {name!r} but {why}", fix=fix)
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise DeviceError(f"config model.device (--device) is {name!r} but this machine has {n} CUDA GPU(s) "
                              f"(cuda:0 to cuda:{n - 1})", fix="use cuda (the first GPU) or an index below " + str(n))
    return dev


def autocast(device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


@torch.no_grad()
def run_model(model, data: dict, device, batch_size: int = 64, present=None) -> dict:
    """Eval-mode predictions over every row of ``data``: {"prediction": (n, K), "weights": {router: (n, E)}}."""
    model.eval()
    device = torch.device(device)
    n = data["present"].shape[0]
    present = data["present"] if present is None else present
    preds, weights = [], {}
    for start in range(0, n, batch_size):
        idx = torch.arange(start, min(n, start + batch_size))
        inputs = {k: v[idx].to(device) for k, v in data["inputs"].items()}
        with autocast(device):
            out = model(inputs, present[idx].to(device))
        preds.append(out.prediction.float().cpu())
        for name, w in out.routing_weights.items():
            weights.setdefault(name, []).append(w.float().cpu())
    return {"prediction": torch.cat(preds) if preds else torch.zeros(0),
            "weights": {k: torch.cat(v) for k, v in weights.items()}}


# ------------------------------------------------------------------------------------- checkpoints
def load_checkpoint(path, device="cpu") -> tuple[dict, MultimodalMoE]:
    """A checkpoint (plain tensors and data only: ``weights_only=True``) and its model in eval mode."""
    fix = "delete it and rerun the train stage (snakemake train)"
    ckpt = load_torch(path, "checkpoint", map_location=device, stage="train")
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise InputFileError(f"not a brainfuse checkpoint (format {CHECKPOINT_FORMAT!r} expected)", path=path, fix=fix)
    try:
        # checkpoints written before residual experts existed were trained without them
        model = MultimodalMoE(MoEConfig(**{"residual_experts": False, **ckpt["config"]}))
        model.load_state_dict(ckpt["model"])
        for key in ("preset", "task", "classes", "modalities", "preprocessing", "pool"):
            ckpt[key]
    except Exception as e:      # KeyError, TypeError, RuntimeError (tensor shapes) of an edited file
        raise InputFileError(f"checkpoint content is damaged ({type(e).__name__}: {str(e).splitlines()[0][:160]})",
                             path=path, fix=fix) from None
    return ckpt, model.to(device).eval()


def check_compatible(ckpt: dict, cohort, source="") -> None:
    """The cohort must have the modalities (names, kinds, shapes) the model was trained on."""
    have = {s.name: (s.kind, list(s.shape)) for s in cohort.modalities}
    fix = "gather the new subjects with the tensors settings (modalities, resolution_mm) of the training run"
    for m in ckpt["modalities"]:
        if m["name"] not in have:
            raise BrainfuseError(f"{source}: modality {m['name']!r} the model was trained on is not in the cohort "
                                 f"(it has {sorted(have)})", fix=fix)
        if have[m["name"]] != (m["kind"], m["shape"]):
            raise BrainfuseError(f"{source}: modality {m['name']!r} is {have[m['name']]} in the cohort but "
                                 f"{(m['kind'], m['shape'])} in the model", fix=fix)


def cohort_data(ckpt: dict, cohort, rows: np.ndarray) -> dict:
    specs = [s for s in cohort.modalities]
    order = [m["name"] for m in ckpt["modalities"]]
    specs = sorted(specs, key=lambda s: order.index(s.name)) if set(order) == {s.name for s in specs} else specs
    data = materialise(cohort, rows, ckpt["preprocessing"], int(ckpt["pool"]), specs)
    idx = [modality_names(cohort).index(n) for n in order]
    data["present"] = data["present"][:, idx]
    return data


def prediction_table(model, ckpt: dict, data: dict, keys: list, device, present=None) -> pd.DataFrame:
    """participant_id, session, prediction (class + probabilities, or value), presence and routing weights."""
    out = run_model(model, data, device, present=present)
    df = pd.DataFrame({"participant_id": [k[0] for k in keys], "session": [k[1] for k in keys]})
    pred = out["prediction"]
    if ckpt["task"] == "classification":
        prob = pred.softmax(-1).numpy() if len(pred) else np.zeros((0, len(ckpt["classes"])))
        df["predicted"] = prob.argmax(1) if len(prob) else []
        for c, name in enumerate(ckpt["classes"]):
            df[f"prob_{name}"] = prob[:, c]
    else:
        mean, scale = ckpt.get("target_scale", (0.0, 1.0))
        df["predicted"] = pred.view(-1).numpy() * scale + mean
    mask = data["present"] if present is None else present
    for j, m in enumerate(ckpt["modalities"]):
        df[f"present_{m['name']}"] = mask[:, j].numpy().astype(int) if len(mask) else []
    expert_names = model.expert_names
    for router, w in out["weights"].items():
        for e in range(w.shape[1]):
            name = expert_names[e] if e < len(expert_names) else f"e{e}"
            df[f"weight_{router}_{name}"] = w[:, e].numpy()
    return df
