"""Where does the aMRI signal get lost? The phantom's putamen atrophy read straight from the log-Jacobian maps
against the aMRI region features the models get, on a preprocessed phantom cohort (issue 20).

    .venv/bin/python benchmarks/bench_putamen_probe.py --root /scratch/bench/n120-seed8/results

Both with the same 5-fold stratified logistic regression (standardised, class-balanced); balanced accuracy.
Measured on the 120-subject cohort of generator seed 8 (2026-12-07): putamen ROI (8 mm around the phantom's
putamen centres) alone 0.525; log-Jacobian of the 8 region parcels the ROI touches (144 voxels over parcels of
~360) 0.483; log-Jacobian of all 200 parcels 0.375; all 600 aMRI region features 0.308; aMRI's Bayes rule 0.592.
So the parcels keep most of the signal and the feature count (for ~96 training subjects) loses it.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from brainfuse import layout
from brainfuse.phantom import generator as demo


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, required=True, help="the cohort's output_dir (holds tensors/, derivatives/)")
    ap.add_argument("--res", type=int, default=3)
    a = ap.parse_args(argv)
    dirs = layout.output_dirs(a.root)
    man = pd.read_csv(Path(dirs["tensors"]) / "manifest.tsv", sep="\t")
    y = man["target"].to_numpy()
    roi, feature = None, []
    for pid in man.participant_id:
        img = nib.load(layout.anat_paths(dirs["deriv"], pid.removeprefix("sub-"), None, a.res)["logjacobian"])
        roi = demo.putamen_roi(img) if roi is None else roi
        feature.append(img.get_fdata()[roi].mean())
    atlas = nib.load(layout.region_atlas_paths(dirs["templates"], a.res)[0]).get_fdata()
    parcels = np.unique(atlas[roi])
    print(f"putamen ROI: {int(roi.sum())} voxels in {len(parcels)} region parcels of "
          f"{np.mean([(atlas == p).sum() for p in parcels]):.0f} voxels on average")
    cv = StratifiedKFold(5, shuffle=True, random_state=0)
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000, class_weight="balanced"))
    region = np.nan_to_num(np.load(Path(dirs["tensors"]) / "aMRI.npy").reshape(len(y), -1))
    names = json.loads((Path(dirs["tensors"]) / "cohort.json").read_text())["feature_names"]["aMRI"]
    lj = [i for i, n in enumerate(names) if n.startswith("logjacobian_")]
    regions = pd.read_csv(layout.region_atlas_paths(dirs["templates"], a.res)[1], sep="\t")
    touched = set(regions.loc[regions["index"].isin(parcels.astype(int)), "name"])
    near = [i for i in lj if names[i].split("_", 1)[1] in touched]
    for name, X in (("putamen ROI log-Jacobian", np.array(feature)[:, None]),
                    ("log-Jacobian of the parcels the ROI touches", region[:, near]),
                    ("log-Jacobian of every parcel", region[:, lj]), ("aMRI region features", region)):
        pred = cross_val_predict(clf, X, y, cv=cv)
        print(f"{name} ({X.shape[1]} features): balanced accuracy {balanced_accuracy_score(y, pred):.3f}")
    for c in np.unique(y):
        print(f"  class {c}: mean putamen log-Jacobian {np.mean(np.array(feature)[y == c]):.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
