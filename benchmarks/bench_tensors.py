"""Batches/s from the gathered tensor cache vs reading the NIfTI derivatives directly (nibabel), one run.

    python benchmarks/bench_tensors.py                        # 24 subjects, 3 mm grid, batch 4
    python benchmarks/bench_tensors.py --res 2 --subjects 16  # 2 mm grid (99x117x95)

Synthetic derivatives are written on the Stage contract's paths (DEVELOPERS.md) on nilearn's MNI152 grid:
aMRI (3 maps), DTI (4), fMRI (3) as float32 .nii.gz, a 100-parcel Fisher-z matrix TSV, participants.tsv.
Both loaders produce the same batch (same normalisation, same dict of float32 tensors, single process):

- baseline: a torch Dataset that opens the subject's 10 NIfTI files + relmat TSV with nibabel/pandas per
  item, i.e. what training would do without the cache;
- cache: ``brainfuse.tensors.CohortDataset`` over ``load_cohort`` (memory-mapped float16 stacks), through
  ``ds.loader()`` (whole batches cast into one tensor: the headline figure), and for reference through a
  default per-item DataLoader and with float16 volumes (cast on the GPU instead).

Each loader runs ``--epochs`` epochs; the figure is the best epoch (warm page cache for both, which
favours the baseline: cold reads widen the gap). Target: cache >= 20x the baseline.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from brainfuse.phantom import generator as demo  # noqa: E402
from brainfuse import tensors as T  # noqa: E402


def make_derivatives(root: Path, n: int, res: int, n_parcels: int):
    from nilearn.datasets import load_mni152_brain_mask

    m = load_mni152_brain_mask(resolution=res)
    mask, affine = np.asarray(m.dataobj) > 0, m.affine
    mask_path = root / "mask.nii.gz"
    nib.save(nib.Nifti1Image(mask.astype(np.uint8), affine), mask_path)
    deriv = root / "derivatives"
    rng = np.random.default_rng(0)
    labels = [f"{i + 1:03d}" for i in range(n)]
    names = [f"p{j:03d}" for j in range(n_parcels)]
    for sub in labels:
        for modality, channels in T.VOLUME_CHANNELS.items():
            run = {"task": "rest"} if modality == "fMRI" else None
            for _, path in zip(channels, T.derivative_paths(deriv, sub, modality, res, run_entities=run)):
                os.makedirs(os.path.dirname(path), exist_ok=True)
                scale = 1e-3 if "param-md" in path or "param-ad" in path or "param-rd" in path else 1.0
                data = np.where(mask, rng.uniform(0.1, 1.0, mask.shape) * scale, 0).astype(np.float32)
                nib.save(nib.Nifti1Image(data, affine), path)
        z = np.arctanh(np.clip(np.corrcoef(rng.normal(size=(n_parcels, 60))), -0.99, 0.99))
        relmat = T.derivative_paths(deriv, sub, "conn", res, run_entities={"task": "rest"})[0]
        pd.DataFrame(z, columns=names).to_csv(relmat, sep="\t", index=False)
    cfg = demo.demo_config({"n_subjects": max(n, 3)})
    table = demo.clinical_table(cfg, demo.plan(cfg)).iloc[:n]
    table.to_csv(root / "participants.tsv", sep="\t", index=False)
    with open(root / "participants.json", "w") as f:
        import json
        json.dump(demo.PARTICIPANTS_JSON, f)
    return deriv, str(mask_path), labels, mask


class NiftiDataset:
    """The uncached baseline: every item re-reads and re-normalises the subject's derivatives."""

    def __init__(self, deriv, labels, res, mask, participants, classes):
        import torch

        self.torch, self.deriv, self.labels, self.res, self.mask = torch, deriv, labels, res, mask
        self.table = pd.read_csv(participants, sep="\t").set_index("participant_id")
        self.classes = classes

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        sub, torch = self.labels[i], self.torch
        inputs = {}
        for modality, channels in T.VOLUME_CHANNELS.items():
            run = {"task": "rest"} if modality == "fMRI" else None
            chans = []
            for (name, *_), path in zip(channels, T.derivative_paths(self.deriv, sub, modality, self.res, run_entities=run)):
                data = np.asarray(nib.load(path).dataobj, dtype=np.float64)
                data, _ = T._normalise(modality, name, data, self.mask)
                chans.append(data.astype(np.float32))
            inputs[modality] = torch.from_numpy(np.stack(chans))
        vec, _ = T.conn_vector(T.derivative_paths(self.deriv, sub, "conn", self.res, run_entities={"task": "rest"})[0])
        inputs["conn"] = torch.from_numpy(vec)
        row = self.table.loc[f"sub-{sub}"]
        inputs["clinical"] = torch.tensor([row.age, float(row.sex == "M"), row.updrs_iii, row.rbdsq], dtype=torch.float32)
        inputs["serum"] = torch.tensor([row.nfl_pg_ml], dtype=torch.float32)
        return {"inputs": inputs, "present": torch.ones(6, dtype=torch.bool),
                "target": torch.tensor(self.classes.index(row.diagnosis)), "index": i}


def rate(dataset, batch_size: int, epochs: int, batched: bool = False) -> tuple[float, float]:
    """(best batches/s over epochs, first-epoch batches/s); ``batched``: CohortDataset.loader."""
    import torch

    if batched:
        loader = dataset.loader(batch_size, shuffle=True, seed=0)
    else:
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=0,
                                             generator=torch.Generator().manual_seed(0))
    rates = []
    for _ in range(epochs):
        t0, nb = time.perf_counter(), 0
        for batch in loader:
            nb += 1
            assert batch["inputs"]["aMRI"].shape[0] in (batch_size, len(dataset) % batch_size)
        rates.append(nb / (time.perf_counter() - t0))
    return max(rates), rates[0]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--subjects", type=int, default=24)
    ap.add_argument("--res", type=int, default=3, choices=(2, 3))
    ap.add_argument("--parcels", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=3)
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="bench_tensors_") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        deriv, mask_path, labels, mask = make_derivatives(root, args.subjects, args.res, args.parcels)
        t_make = time.perf_counter() - t0

        t0 = time.perf_counter()
        files = []
        for sub in labels:
            for modality in T.IMAGE_MODALITIES:
                run = {"task": "rest"} if modality in ("fMRI", "conn") else None
                out = T.tensor_path(root / "tensors", sub, modality)
                T.build_subject(modality, T.derivative_paths(deriv, sub, modality, args.res, run_entities=run),
                                mask_path, out, args.res, subject=sub)
                files.append(out)
        t_cache = time.perf_counter() - t0
        t0 = time.perf_counter()
        T.gather(root / "tensors", root / "participants.tsv", {"classes": ["control", "PD", "iRBD"], "image_features": "volumes"}, files)
        t_gather = time.perf_counter() - t0

        cohort = T.load_cohort(root / "tensors")
        cached = T.CohortDataset(cohort)
        baseline = NiftiDataset(deriv, labels, args.res, mask, root / "participants.tsv", cohort.classes)
        # same content: the cache holds the baseline's values up to float16
        a, b = cached[0]["inputs"], baseline[0]["inputs"]
        for k in a:
            assert torch.allclose(a[k], b[k], rtol=2e-3, atol=2e-3), k

        base_best, base_first = rate(baseline, args.batch_size, args.epochs)
        item_best, item_first = rate(cached, args.batch_size, args.epochs)
        cache_best, cache_first = rate(cached, args.batch_size, args.epochs, batched=True)
        half = T.CohortDataset(cohort, volume_dtype=torch.float16)
        half_best, half_first = rate(half, args.batch_size, args.epochs, batched=True)
        size = sum(f.stat().st_size for f in (root / "tensors").glob("*.npy"))

    shape = mask.shape
    print(f"bench_tensors: {args.subjects} subjects, {args.res} mm grid {shape}, batch {args.batch_size}, "
          f"10 volumes + {args.parcels * (args.parcels - 1) // 2}-feature conn + clinical/serum per item, 1 thread")
    print(f"  setup: synthetic derivatives {t_make:.1f} s, caching {t_cache:.1f} s "
          f"({t_cache / args.subjects:.2f} s/subject), gather {t_gather:.1f} s, stacked arrays {size / 2**20:.0f} MiB")
    print(f"  {'loader':<34}{'batches/s (best)':>18}{'first epoch':>14}")
    print(f"  {'NIfTI derivatives (nibabel)':<34}{base_best:>18.2f}{base_first:>14.2f}")
    print(f"  {'cache, DataLoader(ds) per item':<34}{item_best:>18.2f}{item_first:>14.2f}")
    print(f"  {'cache, ds.loader() whole batches':<34}{cache_best:>18.2f}{cache_first:>14.2f}")
    print(f"  {'cache, ds.loader(), float16 vols':<34}{half_best:>18.2f}{half_first:>14.2f}"
          f"   (volume_dtype=torch.float16: cast on the device)")
    ratio = cache_best / base_best
    print(f"  per-item DataLoader over the cache: {item_best / base_best:.1f}x the baseline")
    print(f"  speed-up (ds.loader(), float32: the same batch as the baseline): {ratio:.1f}x (target >= 20x: {'met' if ratio >= 20 else 'NOT met'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
