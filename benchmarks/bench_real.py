"""Per-stage wall time and peak memory on the shared Philips subject, beside each rule's declared resources.

    .venv/bin/python benchmarks/bench_real.py [--data ../shared/data] [--res 3] [--threads 1] [--keep DIR]

Runs the commands the rules run (`brainfuse convert|anat|dwi|func`), one process per stage as Snakemake does,
on ../shared/data/dicom/dcm_qa_philips_enh: DICOM -> BIDS (1 mm MPRAGE, 16-direction DTI; the resting BOLD is
shipped as NIfTI and copied in), then anat, dwi and func at the working resolution. A 0.5 mm copy of the T1w
(the 1 mm scan upsampled in-plane, 170 x 512 x 512) measures how anat's cost grows with the input.
Peak RSS is the stage process's own (``os.wait4``). Targets on 2 cores: the subject (convert + anat + dwi + func)
<= 3 minutes, each stage <= 60 s, anat on the 0.5 mm copy <= 2x the 1 mm one, every peak below the rule's
declared ``mem_mb``. Timings depend on machine load: run alone.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from brainfuse import layout, resources, templates  # noqa: E402
from brainfuse.layout import TEMPLATE, bids_path  # noqa: E402


def run_stage(name, argv, log_dir) -> dict:
    """Run ``python -m brainfuse <argv>``; wall seconds and the process's peak RSS (MB)."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "NIPYPE_NO_ET": "1"}
    log = open(Path(log_dir) / f"{name}.log", "w")
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "brainfuse", *argv], stdout=log, stderr=subprocess.STDOUT, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    log.close()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{name} failed: see {log.name}\n" + Path(log.name).read_text()[-3000:])
    return {"wall_s": round(wall, 1), "peak_rss_mb": round(usage.ru_maxrss / 1024)}


def upsampled_t1w(t1w, out):
    """The T1w at half its in-plane voxel size (same field of view): a stand-in for a 0.5 mm acquisition."""
    img = nib.load(str(t1w))
    zooms = np.asarray(img.header.get_zooms()[:3])
    axes = np.argsort(zooms)[:2] if np.ptp(zooms) > 0 else np.array([1, 2])
    factor = np.ones(3)
    factor[axes] = 2
    data = ndimage.zoom(np.asarray(img.dataobj, np.float32), factor, order=1)
    affine = img.affine.copy()
    for a in axes:      # keep voxel centres' world extent: the first new centre sits a quarter voxel earlier
        affine[:3, 3] -= 0.25 * img.affine[:3, a]
        affine[:3, a] /= 2
    out_img = nib.Nifti1Image(data.astype(np.float32), affine)
    out_img.set_data_dtype(np.int16)        # nibabel picks the scale factor (the scanner's values exceed int16)
    out_img.header.set_xyzt_units("mm")
    nib.save(out_img, str(out))
    return out


def ants_syn_baseline(anat_paths, tpl_dir, res) -> dict:
    """Issue 17's reference: plain ``ants.registration(type_of_transform="SyN")`` of the stage's own
    skull-stripped N4 brain to the 1 mm template; MNI correlation of both on the working grid."""
    from brainfuse.antsconfig import load_ants

    ants = load_ants(1)
    one = layout.template_files(Path(tpl_dir).parent, 1)
    one = templates.build(1, Path(tpl_dir).parent) if not Path(one["T1w"]).exists() else one
    grid = layout.template_files(Path(tpl_dir).parent, res)
    brain = ants.image_read(anat_paths["preproc"]) * ants.image_read(anat_paths["mask"])
    fixed, tpl = ants.image_read(one["T1w"]), ants.image_read(grid["T1w"])
    inside = ants.image_read(grid["mask"]).numpy() > 0
    with tempfile.TemporaryDirectory() as td:
        t0 = time.perf_counter()
        reg = ants.registration(fixed=fixed, moving=brain, type_of_transform="SyN", outprefix=f"{td}/syn_")
        seconds = time.perf_counter() - t0
        warped = ants.apply_transforms(fixed=tpl, moving=brain, transformlist=reg["fwdtransforms"]).numpy()
    r = lambda a: float(np.corrcoef(a[inside], tpl.numpy()[inside])[0, 1])
    return {"ants_syn_r": round(r(warped), 3), "ants_syn_s": round(seconds, 1),
            "stage_r": round(r(nib.load(anat_paths["mni_t1w"]).get_fdata()), 3)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=os.environ.get("BRAINFUSE_SHARED_DATA", str(REPO.parent / "shared" / "data")))
    ap.add_argument("--res", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--keep", help="work folder to keep (default: a temporary one, removed)")
    ap.add_argument("--skip-05", action="store_true", help="skip the 0.5 mm anat run")
    ap.add_argument("--no-baseline", action="store_true", help="skip plain ANTs SyN of the same brain (~1-2 min)")
    args = ap.parse_args()
    site = Path(args.data) / "dicom" / "dcm_qa_philips_enh"
    if not site.is_dir():
        raise SystemExit(f"{site}: not found (set --data or BRAINFUSE_SHARED_DATA)")
    work = Path(args.keep or tempfile.mkdtemp(prefix="bench_real_"))
    work.mkdir(parents=True, exist_ok=True)
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    res, th = str(args.res), str(args.threads)
    bids, deriv, sub = work / "bids", work / "deriv", "philips"
    tpl = templates.build(args.res, work / "resources")
    atlas_nii = work / "resources" / f"tpl-{TEMPLATE}" / f"tpl-{TEMPLATE}_res-{res}_atlas-brainfuse_dseg.nii.gz"
    atlas_tsv = atlas_nii.with_name(f"tpl-{TEMPLATE}_res-{res}_atlas-brainfuse_dseg.tsv")
    subprocess.run([sys.executable, "-m", "brainfuse", "func", "atlas", "--gm", tpl["GM"], "--mask", tpl["mask"],
                    "--output", str(atlas_nii), "--output-tsv", str(atlas_tsv), "--n-parcels", "100"], check=True,
                   env={**os.environ, "PYTHONPATH": str(REPO / "src")}, capture_output=True)
    rows = {}
    rows["convert"] = run_stage("convert", ["convert", "--dicom-dir", str(site / "In"), "--bids-dir", str(bids),
                                            "--subject", sub, "--manifest", str(work / "manifest.tsv"),
                                            "--work-dir", str(work)], logs)
    rows["convert"]["declared"] = resources.convert(site / "In")
    t1w = bids_path(bids, sub, "anat", "T1w")
    dwis = sorted(str(p) for p in (bids / f"sub-{sub}" / "dwi").glob("*_dwi.nii.gz"))
    bold = bids_path(bids, sub, "func", "bold", task="rest")
    Path(bold).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(site / "Nifti" / "2101_WIP_fcMRI_cl.nii.gz", bold)
    shutil.copyfile(site / "Nifti" / "2101_WIP_fcMRI_cl.json", bold.replace(".nii.gz", ".json"))

    rows["anat"] = run_stage("anat", ["anat", "--t1w", t1w, "--out-dir", str(deriv), "--subject", sub,
                                      "--template-dir", str(Path(tpl["T1w"]).parent), "--resolution", res, "--threads", th], logs)
    rows["anat"]["declared"] = resources.anat(t1w)
    a = layout.anat_paths(deriv, sub, None, args.res)
    rows["dwi"] = run_stage("dwi", ["dwi", "--dwi", *dwis, "--subject", sub, "--out-dir", str(deriv), "--t1w", a["preproc"],
                                    "--t1w-mask", a["mask"], "--transforms", a["warp"], a["affine"],
                                    "--template", tpl["T1w"], "--resolution", res, "--threads", th], logs)
    rows["dwi"]["declared"] = resources.dwi(dwis)
    rows["func"] = run_stage("func", ["func", "--bold", bold, "--t1w", a["preproc"], "--t1w-mask", a["mask"],
                                      "--anat-dir", str(Path(a["preproc"]).parent), "--template", tpl["T1w"],
                                      "--template-mask", tpl["mask"], "--wm", a["mni_WM"], "--csf", a["mni_CSF"],
                                      "--atlas", str(atlas_nii), "--atlas-tsv", str(atlas_tsv), "--out-dir", str(deriv),
                                      "--resolution", res, "--threads", th], logs)
    rows["func"]["declared"] = resources.func(bold)
    if not args.skip_05:
        t1w_05 = upsampled_t1w(t1w, work / "T1w_05mm.nii.gz")
        rows["anat 0.5 mm"] = run_stage("anat05", ["anat", "--t1w", str(t1w_05), "--out-dir", str(work / "deriv05"),
                                                   "--subject", sub, "--template-dir", str(Path(tpl["T1w"]).parent),
                                                   "--resolution", res, "--threads", th], logs)
        rows["anat 0.5 mm"]["declared"] = resources.anat(t1w_05)

    qc = json.loads(Path(a["mni_t1w"].replace(".nii.gz", ".json")).read_text())["QC"]
    baseline = None if args.no_baseline else ants_syn_baseline(a, Path(tpl["T1w"]).parent, args.res)
    print(f"\nPhilips subject, {args.res} mm working grid, {args.threads} thread(s) per job:")
    print(f"{'stage':<14}{'wall s':>8}{'peak MB':>9}{'mem_mb':>8}{'runtime':>9}  within")
    for name, r in rows.items():
        d = r["declared"]
        ok = r["peak_rss_mb"] < d["mem_mb"] and r["wall_s"] < 60 * d["runtime"]
        print(f"{name:<14}{r['wall_s']:>8.1f}{r['peak_rss_mb']:>9}{d['mem_mb']:>8}{d['runtime']:>8}m  {'yes' if ok else 'NO'}")
    total = sum(rows[s]["wall_s"] for s in ("convert", "anat", "dwi", "func"))
    print(f"subject total (convert + anat + dwi + func): {total:.0f} s (target <= 180 s, each stage <= 60 s)")
    if "anat 0.5 mm" in rows:
        print(f"anat 0.5 mm / 1 mm: {rows['anat 0.5 mm']['wall_s'] / rows['anat']['wall_s']:.2f}x (target <= 2x)")
    print(f"anat QC: {json.dumps(qc)}")
    if baseline:
        print(f"MNI correlation, stage {baseline['stage_r']} vs plain ANTs SyN to the 1 mm template "
              f"{baseline['ants_syn_r']} ({baseline['ants_syn_s']} s): target within 0.03")
    (work / "bench_real.json").write_text(json.dumps(rows, indent=2))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
