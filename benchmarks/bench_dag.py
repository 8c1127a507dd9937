"""Scale of the workflow's DAG: `snakemake -n` on a 1,000-subject BIDS tree against the same for 10 subjects.

The tree holds files with BIDS names (T1w, dwi + bval/bvec, bold + sidecars): building the DAG reads names
and, for the jobs' declared resources (brainfuse.resources), each image's header, so every image is one tiny
valid NIfTI (empty files would stop the dry run). Target: <= 20 s for 1,000 subjects on 2 cores (the dataset
is indexed once at parse time).

    .venv/bin/python benchmarks/bench_dag.py [--subjects 1000] [--baseline 10] [--target all]
"""
import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from brainfuse.layout import bids_path  # noqa: E402


def _tiny_nifti() -> bytes:
    import nibabel as nib
    import numpy as np

    with tempfile.TemporaryDirectory() as tmp:
        nib.save(nib.Nifti1Image(np.zeros((2, 2, 2, 2), np.int16), np.eye(4)), f"{tmp}/x.nii.gz")
        return Path(f"{tmp}/x.nii.gz").read_bytes()


def build_tree(root: Path, n: int) -> None:
    root.mkdir(parents=True, exist_ok=True)
    image = _tiny_nifti()
    (root / "dataset_description.json").write_text(json.dumps({"Name": "bench", "BIDSVersion": "1.9.0"}))
    rows = ["participant_id\tdiagnosis\tage\tsex"]
    for i in range(n):
        sub = f"{i:04d}"
        rows.append(f"sub-{sub}\t{['control', 'PD', 'iRBD'][i % 3]}\t{50 + i % 30}\t{'MF'[i % 2]}")
        files = [Path(p) for p in (bids_path(root, sub, "anat", "T1w"), bids_path(root, sub, "dwi", "dwi", dir="AP"),
                 bids_path(root, sub, "func", "bold", task="rest"))]
        for f in files:
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_bytes(image)
            for ext in (".json",) + ((".bval", ".bvec") if f.parent.name == "dwi" else ()):
                Path(str(f).replace(".nii.gz", ext)).touch()
    (root / "participants.tsv").write_text("\n".join(rows) + "\n")


def time_dry_run(bids: Path, out: Path, target: str) -> tuple[float, int]:
    cmd = [sys.executable, "-m", "snakemake", "-n", "--quiet", "all", "--cores", "2",
           "--config", f"bids_dir={bids}", f"output_dir={out}"]
    if target != "all":
        cmd[cmd.index("all")] = target
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"snakemake -n failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    jobs = next((int(line.split()[1]) for line in proc.stdout.splitlines() if line.startswith("total")), -1)
    return seconds, jobs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--subjects", type=int, default=1000)
    ap.add_argument("--baseline", type=int, default=10)
    ap.add_argument("--target", default="all", help="rule to dry-run (default: all)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = {}
        for n in (args.baseline, args.subjects):
            bids = Path(tmp) / f"bids{n}"
            build_tree(bids, n)
            results[n] = time_dry_run(bids, Path(tmp) / f"out{n}", args.target)
            print(f"{n:5d} subjects: snakemake -n {args.target}: {results[n][0]:6.1f} s, {results[n][1]} jobs",
                  flush=True)
    big, small = results[args.subjects][0], results[args.baseline][0]
    print(f"ratio {args.subjects}/{args.baseline} subjects: {big / small:.1f}x "
          f"(target: {args.subjects} subjects <= 20 s: {'met' if big <= 20 else 'NOT met'})")


if __name__ == "__main__":
    main()
