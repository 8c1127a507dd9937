"""func stage: motion correction, fMRIPrep-style confounds, MNI resampling, denoising, ALFF/fALFF/ReHo,
parcel time series and Fisher-z connectivity, per BOLD run.

Order of work (one run):
1. checks (4D, enough volumes, RepetitionTime in the sidecar), then batched rigid motion correction
   (:mod:`brainfuse.motion`, all volumes at once in torch) against the mean of a first pass; estimates
   beyond ``max_rotation_deg`` / ``max_translation_mm`` are re-estimated, then stop the run with an error
   naming the volumes; FD and the largest parameters go to the log and ``<confounds>.json`` (``motion_qc``);
2. confounds in native space: 24 motion parameters, framewise_displacement (nipype's
   FramewiseDisplacement), dvars / std_dvars (nipype's ComputeDVARS);
3. BOLD reference -> T1w rigid registration (antspyx, Mattes MI), written as an ITK .mat that maps T1w
   points to BOLD points (appended at the end of the anat list, see DEVELOPERS.md);
4. template points pushed through ``[warp, affine, bold->T1w]`` once (``mni_coordinates``), then every
   volume sampled once at ``T_k`` of those points (motion and normalisation in one interpolation);
5. global_signal / white_matter / csf (and optional aCompCor, nipype's ACompCor) on the MNI series;
6. nilearn ``signal.clean`` (confounds, detrend, band-pass 0.01-0.08 Hz, optional FD scrubbing) and the
   derivatives.

Motion parameters follow fMRIPrep's column names and units (mm, radians); see brainfuse.motion for the
exact convention (rotation about the field-of-view centre, R = Rx Ry Rz).
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from . import cliargs
from . import io as bf_io
from . import layout
from . import motion
from . import stageqc
from .antsconfig import load_ants
from .errors import BrainfuseError
from .inputs import as_stage_error, check_anisotropy, check_finite, load_nifti, plausible_tr, read_sidecar
from .layout import parse_name, sidecar
from .schema import section_defaults

os.environ.setdefault("NIPYPE_NO_ET", "1")

DEFAULTS = section_defaults("func")    # the schema's func section: every default, and why each value


TSV = {"na_rep": "n/a", "float_format": "%.6g"}   # how every table is written (confounds, time series, relmat)

# Motion QC warning levels (log + <confounds>.json), after Parkes et al. 2018's exclusion criteria: mean FD above
# 0.5 mm (their lenient 0.55 mm), any FD above 5 mm (their stringent criterion; func.fd_threshold instead when set),
# a volume correlated under 0.5 with the motion reference (a corrupted volume: its motion estimate is unreliable).
QC_MEAN_FD_MM = 0.5
QC_MAX_FD_MM = 5.0
QC_MIN_CORRELATION = 0.5
MIN_TISSUE_VOXELS = 10       # WM / CSF voxels in the BOLD field of view for their mean signals
MIN_BRAIN_VOXELS = 100       # template brain voxels in the BOLD field of view
# Frequencies of the run's spectrum inside alff_band: fewer leave ALFF / fALFF undefined (none: NaN and 0, as a TR
# in milliseconds gave) or one or two noisy Fourier coefficients. 3 = 20 volumes at TR 2 s (min_volumes' default).
MIN_ALFF_BINS = 3


class FuncInputError(BrainfuseError):
    """A BOLD input brainfuse cannot process; the message names the file."""


# ------------------------------------------------------------------------------------------- inputs
def load_bold(path, min_volumes: int | None = None, cfg: dict | None = None):
    """The BOLD image (its data read, checked and held in memory as float32) and its RepetitionTime (s, from
    the JSON sidecar), or FuncInputError naming the file: truncated or unreadable, not 4D, too few volumes
    (``min_volumes``) or too short a run for ALFF, too anisotropic voxels, NaN/Inf or empty, a malformed
    sidecar, RepetitionTime missing or outside ``repetition_time_s``. All before motion correction."""
    cfg = {**DEFAULTS, **(cfg or {})}
    min_volumes = cfg["min_volumes"] if min_volumes is None else min_volumes
    path = str(path)
    with as_stage_error(FuncInputError):
        img, data = load_nifti(path, "BOLD series", ndim=(3, 4), dtype=np.float32)
        if img.ndim != 4 or img.shape[3] == 1:
            raise FuncInputError(f"expected a 4D BOLD series (volumes over time), got an image of shape {img.shape}",
                                 path=path, fix="give the whole series, not one volume (an sbref is not a run)")
        if img.shape[3] < min_volumes:
            raise FuncInputError(f"only {img.shape[3]} volumes, at least {min_volumes} are needed (func.min_volumes)",
                                 path=path, fix="leave this run out, or lower func.min_volumes (at least 10)")
        check_anisotropy(img.header.get_zooms()[:3], path, "BOLD", cfg["max_voxel_anisotropy"],
                         "func.max_voxel_anisotropy")
        side = sidecar(path)
        meta = read_sidecar(path, "BOLD sidecar")
        tr = meta.get("RepetitionTime")
        if tr is None:
            z = img.header.get_zooms()[3]
            unit = {"sec": "s", "msec": "ms", "usec": "us"}.get(img.header.get_xyzt_units()[1], "(unit not set)")
            hint = f" (the NIfTI header says {z:g} {unit}; BIDS wants it in the sidecar)" if z > 0 else ""
            if not os.path.exists(side):
                raise FuncInputError(f"no JSON sidecar {side}: RepetitionTime is needed{hint}", path=path,
                                     fix="write the sidecar (dcm2niix does) with \"RepetitionTime\" in seconds")
            raise FuncInputError(f"RepetitionTime is missing{hint}", path=side,
                                 fix="add \"RepetitionTime\": <seconds> to the sidecar")
        lo, hi = cfg["repetition_time_s"]
        tr = plausible_tr(tr, side, lo, hi)
        check_finite(data, path, "BOLD series")
    _check_alff_band(img.shape[3], tr, cfg["alff_band"], path)
    return nib.Nifti1Image(data, img.affine, img.header), tr


def _check_alff_band(n: int, tr: float, band, path) -> None:
    """Refuse a run too short for ALFF / fALFF: fewer than MIN_ALFF_BINS frequencies of its spectrum in the band."""
    lo, hi = band

    def bins(m):
        f = np.fft.rfftfreq(m, tr)
        return int(((f >= lo) & (f <= hi)).sum())

    if bins(n) >= MIN_ALFF_BINS:
        return
    need = next((m for m in range(n + 1, 100 * n + 1000) if bins(m) >= MIN_ALFF_BINS), None)
    fix = f"use a run of at least {need} volumes ({need * tr:.0f} s)" if need else "check func.alff_band"
    raise FuncInputError(f"{n} volumes x TR {tr:g} s = {n * tr:.0f} s is too short for ALFF / fALFF: its spectrum "
                         f"has {bins(n)} frequencies in func.alff_band {lo:g}-{hi:g} Hz, {MIN_ALFF_BINS} are needed",
                         path=path, fix=fix)


def run_prefix(bold_path) -> dict:
    """BIDS entities of a BOLD run (sub, ses, task, acq, dir, run, echo ...) to keep in output names."""
    ents = parse_name(os.path.basename(str(bold_path)))
    if not ents or ents["suffix"] != "bold":
        raise FuncInputError(f"{bold_path}: not a BIDS BOLD file name (sub-X[_ses-Y]_task-Z[...]_bold.nii.gz)")
    return {k: v for k, v in ents.items() if k not in ("suffix", "ext")}


def outputs(deriv, bold_path, res) -> dict:
    """Every output path of one run (Stage contract: ``brainfuse.layout.func_paths``)."""
    e = run_prefix(bold_path)
    return layout.func_paths(deriv, e["sub"], e.get("ses"), res, layout.run_key(e))


# ------------------------------------------------------------------------------------------ confounds
MOTION_COLUMNS = list(motion.PARAM_NAMES)


def motion_24(params) -> pd.DataFrame:
    """fMRIPrep's 24 motion regressors: parameters, derivative1 (first row NaN), power2, derivative1_power2."""
    df = pd.DataFrame(np.asarray(params, float), columns=MOTION_COLUMNS)
    out = {}
    for c in MOTION_COLUMNS:
        d = df[c].diff()
        out[c], out[f"{c}_derivative1"] = df[c], d
        out[f"{c}_power2"], out[f"{c}_derivative1_power2"] = df[c] ** 2, d ** 2
    return pd.DataFrame(out)


def nipype_fd(params, workdir) -> np.ndarray:
    """Power FD with nipype's FramewiseDisplacement (FSL column order: rotations first); FD[0] = NaN."""
    from nipype.algorithms.confounds import FramewiseDisplacement

    p = np.asarray(params, float)
    par = Path(workdir).resolve() / "motion_fsl.par"   # absolute: nipype's run(cwd=...) changes directory
    np.savetxt(par, np.c_[p[:, 3:], p[:, :3]])
    res = FramewiseDisplacement(in_file=str(par), parameter_source="FSL", radius=50.0,
                                save_plot=False).run(cwd=str(par.parent))
    fd = np.atleast_1d(np.loadtxt(res.outputs.out_file, skiprows=1))
    return np.r_[np.nan, fd]


def nipype_dvars(series_img, mask_img, workdir) -> tuple[np.ndarray, np.ndarray]:
    """(dvars, std_dvars) from nipype's ComputeDVARS itself (about 10 s a run: it fits an AR(1) per voxel
    in a Python loop); ``dvars`` computes the same numbers vectorised and is checked against this."""
    from nipype.algorithms.confounds import ComputeDVARS

    wd = Path(workdir).resolve()   # absolute: nipype's run(cwd=...) changes directory
    nib.save(series_img, wd / "bold.nii.gz")
    nib.save(mask_img, wd / "mask.nii.gz")
    res = ComputeDVARS(in_file=str(wd / "bold.nii.gz"), in_mask=str(wd / "mask.nii.gz"), save_std=True,
                       save_nstd=True, remove_zerovariance=True).run(cwd=str(wd))
    load = lambda f: np.r_[np.nan, np.atleast_1d(np.loadtxt(f, skiprows=0))]
    return load(res.outputs.out_nstd), load(res.outputs.out_std)


def dvars(data4d, mask) -> tuple[np.ndarray, np.ndarray]:
    """(dvars, std_dvars), first row NaN: nipype's ``compute_dvars`` (Power 2012; Nichols 2013) with
    ``remove_zerovariance=True`` and the lag-1 Yule-Walker autocorrelation computed for all voxels at once
    (for order 1, nitime's AR_est_YW is sum x_t x_t+1 / sum x_t^2 of the demeaned series)."""
    mfunc = np.asarray(data4d, np.float32)[np.asarray(mask, bool)]
    mfunc = mfunc / np.median(mfunc) * 1000
    sd = (np.percentile(mfunc, 75, axis=1, method="lower") - np.percentile(mfunc, 25, axis=1, method="lower")) / 1.349
    keep = sd > 0
    mfunc, sd = mfunc[keep], sd[keep]
    x = (mfunc - mfunc.mean(1, keepdims=True)).astype(np.float64)
    ar1 = (x[:, :-1] * x[:, 1:]).sum(1) / np.maximum((x * x).sum(1), 1e-30)
    diff_sdhat = np.sqrt((1 - ar1) * 2) * sd
    d = np.sqrt(np.square(np.diff(mfunc, axis=1)).mean(0))
    return np.r_[np.nan, d], np.r_[np.nan, d / diff_sdhat.mean()]


def nipype_acompcor(series_img, mask_img, n, tr, workdir) -> pd.DataFrame:
    """a_comp_cor_00.. from nipype's ACompCor on the given (WM+CSF) mask."""
    from nipype.algorithms.confounds import ACompCor

    wd = Path(workdir).resolve()   # absolute: nipype's run(cwd=...) changes directory
    nib.save(series_img, wd / "mni_bold.nii.gz")
    nib.save(mask_img, wd / "acc_mask.nii.gz")
    res = ACompCor(realigned_file=str(wd / "mni_bold.nii.gz"), mask_files=[str(wd / "acc_mask.nii.gz")],
                   components_file="acompcor.tsv", num_components=n, pre_filter="cosine",
                   high_pass_cutoff=0.01, repetition_time=tr, header_prefix="a_comp_cor_").run(cwd=str(wd))
    return pd.read_csv(res.outputs.components_file, sep="\t")


# --------------------------------------------------------------------------------- registration / MNI
def bold_to_t1w(boldref_img, t1w_img, out_mat, t1w_mask_img=None, workdir=None, voxel_mm: float | None = None):
    """Rigid BOLD reference -> T1w (Mattes MI). Writes the ITK .mat mapping T1w points to BOLD points
    (ants' forward transform with fixed = T1w), the convention appended to the anat MNI list.

    The T1w (brain) is resampled to ``voxel_mm`` (default: the BOLD voxel, at least 2 mm) first: BOLD
    carries no finer detail, and a 1 mm fixed image makes the finest level many times slower.
    """
    from nilearn import image

    ants = load_ants()

    if voxel_mm is None:
        voxel_mm = max(2.0, float(np.mean(boldref_img.header.get_zooms()[:3])))
    t1 = np.asarray(t1w_img.dataobj, np.float32)
    if t1w_mask_img is not None:
        t1 = t1 * (np.asarray(t1w_mask_img.dataobj) > 0)
    t1 = nib.Nifti1Image(t1, t1w_img.affine)
    if min(t1w_img.header.get_zooms()[:3]) < voxel_mm - 1e-3:
        t1 = image.resample_img(t1, target_affine=np.diag([voxel_mm] * 3), interpolation="continuous",
                                force_resample=True, copy_header=True)
    with tempfile.TemporaryDirectory(dir=workdir) as td:
        fixed = _to_ants(t1, td, "t1w")
        moving = _to_ants(boldref_img, td, "boldref")
        # Same session, same scanner frame: start from the identity, not from centres of mass that the
        # BOLD field of view and contrast move.
        reg = ants.registration(fixed=fixed, moving=moving, type_of_transform="Rigid", initial_transform="Identity",
                                aff_metric="mattes", aff_sampling=32, aff_random_sampling_rate=0.25,
                                aff_iterations=(100, 50), aff_shrink_factors=(2, 1),
                                aff_smoothing_sigmas=(1, 0), outprefix=os.path.join(td, "bold2t1w_"))
        tx = ants.read_transform(reg["fwdtransforms"][0])
        with bf_io.atomic_path(out_mat, keep_extension=True) as tmp:     # ITK picks the format from .mat
            ants.write_transform(tx, str(tmp))
    return str(out_mat)


def _to_ants(img, folder, name):
    import ants

    path = os.path.join(folder, f"{name}.nii.gz")
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj, np.float32), img.affine), path)
    return ants.image_read(path)


def mni_coordinates(template_img, transformlist, bold_img, workdir=None) -> tuple[np.ndarray, np.ndarray]:
    """For every template voxel, the world point (mm, RAS) of the BOLD reference frame it maps to through
    ``transformlist`` (ANTs order, fixed = template: ``[warp, affine, bold->T1w .mat]``), and whether it
    falls inside the BOLD field of view.

    ANTs pushes coordinate images (x, y, z and a ones image): linear interpolation of a linear function is
    exact, so this is the composed mapping itself, computed once per run and independent of the number of
    volumes. Returns (points (P, 3), inside (P,)) in the template's C order.
    """
    import ants

    # coordinate images padded by two voxels: ITK clamps at the last voxel centre, which would bend the
    # mapping in the outer half voxel; points outside the BOLD grid are flagged later by sample_series
    shape = tuple(int(n) + 4 for n in bold_img.shape[:3])
    A = bold_img.affine @ np.c_[np.eye(4)[:, :3], [-2, -2, -2, 1]]
    world = np.indices(shape, dtype=np.float64).reshape(3, -1).T @ A[:3, :3].T + A[:3, 3]
    with tempfile.TemporaryDirectory(dir=workdir) as td:
        fixed = _to_ants(template_img, td, "template")
        out = []
        for i, values in enumerate([world[:, 0], world[:, 1], world[:, 2], np.ones(len(world))]):
            moving = _to_ants(nib.Nifti1Image(values.reshape(shape).astype(np.float32), A), td, f"coord{i}")
            warped = ants.apply_transforms(fixed=fixed, moving=moving, transformlist=[str(t) for t in transformlist],
                                           whichtoinvert=[False] * len(transformlist),
                                           interpolator="linear", defaultvalue=0)
            out.append(warped.numpy().astype(np.float64).reshape(-1))
    ones = out[3]
    inside = ones > 0.999
    # float32 coordinates: renormalise by the ones image near the edge (where ANTs mixed in zeros)
    pts = np.stack(out[:3], 1) / np.maximum(ones, 1e-6)[:, None]
    return pts, inside


# ----------------------------------------------------------------------------------------- derivatives
def clean_signals(ts, confounds, tr, cfg, sample_mask=None, band=True):
    """Denoise (T, V) series with nilearn's ``signal.clean`` (detrend + confound regression, censoring):
    signals and confounds are band-passed the same way first (Lindquist et al. 2019, nilearn's order).

    The filter runs here, vectorised over voxels (scipy ``sosfiltfilt`` along time): nilearn's own
    Butterworth loops over voxels in Python (about 30 s a run). Scrubbed volumes are interpolated (cubic
    spline over the kept ones, as nilearn does) before filtering and dropped before the regression.
    filter="cosine": nilearn's DCT high-pass inside the regression, then the Butterworth low-pass.
    """
    from nilearn import signal

    ts = np.asarray(ts, np.float64)
    conf = None if confounds is None else np.asarray(confounds, np.float64)
    kw = dict(detrend=True, standardize=None, standardize_confounds=False, t_r=tr)  # scaling: same residuals
    if not band:
        return signal.clean(ts, confounds=conf, filter=False, **kw)
    if cfg["filter"] == "cosine":
        out = signal.clean(ts, confounds=conf, filter="cosine", high_pass=cfg["high_pass"], **kw)
        out = _butter(out, tr, None, cfg["low_pass"])
        return out if sample_mask is None else out[sample_mask]
    if sample_mask is not None:
        ts = _interpolate_censored(ts, sample_mask)
        conf = None if conf is None else _interpolate_censored(conf, sample_mask)
    from scipy.signal import detrend

    ts = _butter(detrend(ts, axis=0), tr, cfg["high_pass"], cfg["low_pass"])
    conf = None if conf is None else _butter(detrend(conf, axis=0), tr, cfg["high_pass"], cfg["low_pass"])
    return signal.clean(ts, confounds=conf, filter=False, sample_mask=sample_mask, **kw)


def _butter(x, tr, high_pass, low_pass, order: int = 5):
    """Zero-phase Butterworth (as nilearn's: order 5, odd padding) along axis 0; a band edge at or above
    Nyquist is dropped."""
    from scipy.signal import butter, sosfiltfilt

    nyq = 0.5 / tr
    lo = high_pass if high_pass and high_pass < nyq else None
    hi = low_pass if low_pass and low_pass < nyq else None
    if lo is None and hi is None:
        return x
    btype, wn = (("bandpass", [lo, hi]) if lo and hi else ("highpass", lo) if lo else ("lowpass", hi))
    sos = butter(order, wn, btype=btype, fs=1.0 / tr, output="sos")
    padlen = min(3 * (2 * len(sos) + 1), len(x) - 1)   # short runs: scipy's default padding exceeds them
    return sosfiltfilt(sos, x, axis=0, padtype="odd", padlen=padlen)


def _interpolate_censored(x, keep):
    from scipy.interpolate import CubicSpline

    t = np.arange(len(x))
    out = x.copy()
    drop = np.setdiff1d(t, keep)
    if len(drop):
        out[drop] = CubicSpline(t[keep], x[keep], axis=0)(drop)
    return out


def alff_falff(ts, tr, band=(0.01, 0.08)) -> tuple[np.ndarray, np.ndarray]:
    """ALFF (mean amplitude in the band) and fALFF (band amplitude / amplitude over 0 < f <= Nyquist) of
    (T, V) residual series (Zou et al. 2008)."""
    n = ts.shape[0]
    amp = np.abs(np.fft.rfft(ts - ts.mean(0), axis=0)) * 2 / n
    f = np.fft.rfftfreq(n, tr)
    inb = (f >= band[0]) & (f <= band[1])
    alff = amp[inb].mean(0)
    total = amp[f > 0].sum(0)
    return alff, np.where(total > 0, amp[inb].sum(0) / np.maximum(total, 1e-12), 0.0)


def reho(data4d, mask, neighbourhood: int = 27) -> np.ndarray:
    """Kendall's W of each voxel with its 26 (or 18 / 6) face/edge/corner neighbours inside the mask."""
    from scipy.stats import rankdata

    n = data4d.shape[3]
    ranks = np.zeros(data4d.shape, np.float32)
    ranks[mask] = rankdata(data4d[mask], axis=1)
    offsets = [(i, j, k) for i in (-1, 0, 1) for j in (-1, 0, 1) for k in (-1, 0, 1)
               if abs(i) + abs(j) + abs(k) <= {27: 3, 19: 2, 7: 1}[neighbourhood]]
    pad = np.pad(ranks, ((1, 1), (1, 1), (1, 1), (0, 0)))
    mpad = np.pad(mask, 1)
    R = np.zeros(data4d.shape, np.float64)
    K = np.zeros(mask.shape, np.float64)
    I, J, L = mask.shape
    for i, j, k in offsets:
        R += pad[1 + i:1 + i + I, 1 + j:1 + j + J, 1 + k:1 + k + L]
        K += mpad[1 + i:1 + i + I, 1 + j:1 + j + J, 1 + k:1 + k + L]
    s = ((R - R.mean(3, keepdims=True)) ** 2).sum(3)
    w = 12 * s / np.maximum(K ** 2 * (n ** 3 - n), 1e-12)
    return np.where(mask, w, 0.0).astype(np.float32)


def parcel_timeseries(ts, labels, names) -> pd.DataFrame:
    """Mean of (T, V) series over each label (V,) 1..L; empty parcels (no BOLD coverage) get NaN."""
    L = len(names)
    counts = np.bincount(labels, minlength=L + 1)[1:]
    sums = np.zeros((ts.shape[0], L + 1))
    np.add.at(sums.T, labels, ts.T)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = sums[:, 1:] / counts
    return pd.DataFrame(out, columns=names)


def fisher_z_connectivity(parcel_ts: pd.DataFrame) -> pd.DataFrame:
    """Pearson correlation between parcels, Fisher z (arctanh); diagonal 0, uncovered parcels NaN."""
    r = parcel_ts.corr().to_numpy()
    z = np.arctanh(np.clip(r, -0.999999, 0.999999))
    np.fill_diagonal(z, 0.0)
    return pd.DataFrame(z, index=parcel_ts.columns, columns=parcel_ts.columns)


# ------------------------------------------------------------------------------------------ the run
def native_confounds(data, affine, cfg=None, workdir=None, name="BOLD series"):
    """Motion correction and the native-space confounds of a (I, J, K, T) series.

    Returns (confounds DataFrame: dvars, std_dvars, framewise_displacement and the 24 motion columns;
    the MotionResult; the corrected series). framewise_displacement comes from nipype's
    FramewiseDisplacement; dvars/std_dvars are nipype's ComputeDVARS numbers (see ``dvars``). Motion beyond
    ``max_rotation_deg`` / ``max_translation_mm`` raises FuncInputError naming ``name`` and the volumes.
    """
    cfg = {**DEFAULTS, **(cfg or {})}
    try:
        mc = motion.register_series(data, affine, dof="rigid", similarity="ssd", device=cfg["motion_device"],
                                    max_rotation_deg=cfg["max_rotation_deg"],
                                    max_translation_mm=cfg["max_translation_mm"])
    except motion.MotionBoundsError as e:
        raise FuncInputError(f"{name}: head motion estimate out of bounds: {e}. If the head really moved this "
                             f"much, raise func.max_rotation_deg / func.max_translation_mm or leave the run out; "
                             f"otherwise look for corrupted volumes") from None
    corrected = motion.resample_series(data, affine, mc.transforms, device=cfg["motion_device"])
    conf = motion_24(mc.params)
    with tempfile.TemporaryDirectory(dir=workdir) as wd:
        conf.insert(0, "framewise_displacement", nipype_fd(mc.params, wd))
    dv, sdv = dvars(corrected, _bold_mask(corrected.mean(3)))
    conf.insert(0, "std_dvars", sdv)
    conf.insert(0, "dvars", dv)
    return conf, mc, corrected


def motion_qc(conf, mc, cfg=None) -> dict:
    """Motion QC of a run (the confounds' JSON sidecar): mean / max FD, largest rotation and translation
    from the reference volume, the lowest correlation with the reference, and warnings (QC_* levels;
    the max-FD level is func.fd_threshold when set)."""
    cfg = {**DEFAULTS, **(cfg or {})}
    fd = np.nan_to_num(conf["framewise_displacement"].to_numpy(float))
    rot = np.degrees(np.abs(mc.params[:, 3:]))
    trans = np.abs(mc.params[:, :3])
    max_fd_level = cfg["fd_threshold"] if cfg["fd_threshold"] is not None else QC_MAX_FD_MM
    qc = {"MeanFramewiseDisplacement": float(fd[1:].mean()) if len(fd) > 1 else 0.0,
          "MaxFramewiseDisplacement": float(fd.max()), "MaxFramewiseDisplacementVolume": int(fd.argmax()),
          "MaxRotation": float(rot.max()), "MaxRotationVolume": int(rot.max(1).argmax()),
          "MaxTranslation": float(trans.max()), "MaxTranslationVolume": int(trans.max(1).argmax()),
          "ReferenceVolume": mc.reference_volume, "ReestimatedVolumes": list(mc.reestimated),
          "Units": {"FramewiseDisplacement": "mm (Power 2012, 50 mm radius)", "Rotation": "deg",
                    "Translation": "mm", "Volume": "0-based index"},
          "WarningLevels": {"MeanFramewiseDisplacement": QC_MEAN_FD_MM, "MaxFramewiseDisplacement": max_fd_level,
                            "ReferenceCorrelation": QC_MIN_CORRELATION}}
    warnings = []
    if qc["MeanFramewiseDisplacement"] > QC_MEAN_FD_MM:
        warnings.append(f"mean framewise displacement {qc['MeanFramewiseDisplacement']:.2f} mm > {QC_MEAN_FD_MM} mm")
    if qc["MaxFramewiseDisplacement"] > max_fd_level:
        warnings.append(f"max framewise displacement {qc['MaxFramewiseDisplacement']:.2f} mm (volume "
                        f"{qc['MaxFramewiseDisplacementVolume']}) > {max_fd_level} mm")
    if mc.correlation is not None:
        qc["MinReferenceCorrelation"] = float(mc.correlation.min())
        low = np.flatnonzero(mc.correlation < QC_MIN_CORRELATION)
        if len(low):
            warnings.append(f"volume(s) {', '.join(map(str, low[:10]))} barely resemble the motion reference "
                            f"(correlation {', '.join(f'{r:.2f}' for r in mc.correlation[low[:10]])} < "
                            f"{QC_MIN_CORRELATION}): corrupted volumes? their motion estimates are unreliable")
    qc["Warnings"] = warnings
    return qc


def run(bold_path, t1w, template, template_mask, mni_transforms, atlas, atlas_tsv, deriv, res,
        wm=None, csf=None, t1w_mask=None, cfg=None, bold_to_t1w_mat=None, log=print, strict: bool = False,
        loaded=None) -> dict:
    """Process one BOLD run; returns the output paths (see ``outputs``) and a summary.

    t1w / t1w_mask: the subject's T1w (N4) and brain mask; template / template_mask: the MNI grid at the
    working resolution; mni_transforms: ANTs list template -> T1w (``brainfuse.layout.to_mni_transforms``);
    wm / csf: MNI-space probability maps (the subject's from anat, or the template's); atlas: MNI labels.
    bold_to_t1w_mat: use this transform instead of registering (tests, reruns).
    strict: a motion QC warning stops the run (QCError) before anything is written.
    loaded: ``load_bold(bold_path, cfg=cfg)`` when the caller has it already (the CLI checks first).
    """
    cfg = {**DEFAULTS, **(cfg or {})}
    t0 = time.time()
    img, tr = loaded if loaded is not None else load_bold(bold_path, cfg=cfg)
    out = outputs(deriv, bold_path, res)
    for p in out.values():
        Path(p).parent.mkdir(parents=True, exist_ok=True)
    data = np.asarray(img.dataobj, np.float32)
    A = img.affine
    with tempfile.TemporaryDirectory(dir=Path(out["confounds"]).parent, prefix=".func-") as wd:
        conf, mc, corrected, qc, keep = _motion_and_scrubbing(data, A, cfg, wd, bold_path, strict, log, t0)
        # 3. BOLD -> T1w
        ref_img = nib.Nifti1Image(corrected.mean(3), A)
        _bold_to_t1w_transform(ref_img, t1w, t1w_mask, bold_to_t1w_mat, out["xfm"], wd)
        log(f"[func] bold->T1w done at {time.time() - t0:.1f} s")
        # 4. one interpolation from raw volumes to MNI
        tpl = nib.load(str(template))
        grid = tpl.shape[:3]
        tpl_brain, covered, mni = _sample_mni(data, A, mc, ref_img, tpl, template_mask,
                                              list(mni_transforms) + [out["xfm"]], wd, cfg)
        brain = tpl_brain.reshape(-1) & covered
        masks = _tissue_masks(wm, csf, covered, grid)
        # checked before anything is written to MNI space
        if brain.sum() < MIN_BRAIN_VOXELS or min(m.sum() for m in masks.values()) < MIN_TISSUE_VOXELS:
            raise coverage_error(bold_path, img, brain.sum(), tpl_brain.sum(), masks, out["xfm"], qc)
        mni_img = _save_mni_series(mni, grid, tpl, tr, out["preproc"])
        log(f"[func] MNI series written at {time.time() - t0:.1f} s ({brain.sum()} brain voxels)")
        # 5. MNI-space tissue signals
        _add_tissue_signals(conf, mni, brain, masks, mni_img, tpl, tr, cfg, wd)
        bf_io.save_tsv(conf, out["confounds"], **TSV)
        bf_io.save_json(qc, out["motion_qc"])
    # 6. denoising and derivatives
    alff, falff, den = _denoise(conf, mni, brain, tr, cfg, keep)
    _save_derivatives(alff, falff, den, brain, grid, tpl, atlas, atlas_tsv, out)
    # QC
    motion_figure(conf, out["qc_motion"], title=Path(bold_path).name)
    carpet_figure(mni, brain, tr, out["qc_carpet"], conf, title=Path(bold_path).name)
    summary = {"n_volumes": int(data.shape[3]), "tr": tr, "mean_fd": float(np.nanmean(conf["framewise_displacement"])),
               "max_fd": float(np.nanmax(conf["framewise_displacement"])),
               "max_rotation_deg": round(qc["MaxRotation"], 3), "max_translation_mm": round(qc["MaxTranslation"], 3),
               "motion_warnings": len(qc["Warnings"]),
               "n_scrubbed": 0 if keep is None else int(data.shape[3] - len(keep)),
               "brain_voxels": int(brain.sum()), "seconds": round(time.time() - t0, 1)}
    log(f"[func] done: {json.dumps(summary)}")
    return {**out, "summary": summary, "motion": mc}


def _motion_and_scrubbing(data, A, cfg, wd, bold_path, strict, log, t0):
    """(confounds, MotionResult, corrected series, motion QC, volumes kept by FD scrubbing or None): motion
    correction and native confounds, the QC logged (a warning stops a strict run) and the scrubbing checked,
    all before anything is written."""
    conf, mc, corrected = native_confounds(data, A, cfg, wd, name=str(bold_path))
    qc = motion_qc(conf, mc, cfg)
    log(f"[func] motion + native confounds: {data.shape[3]} volumes in {time.time() - t0:.1f} s, "
        f"mean FD {qc['MeanFramewiseDisplacement']:.2f} mm, max FD {qc['MaxFramewiseDisplacement']:.2f} mm, "
        f"max rotation {qc['MaxRotation']:.2f} deg, max translation {qc['MaxTranslation']:.2f} mm")
    if strict:
        stageqc.settle(qc["Warnings"], strict=True, label=Path(bold_path).name.split("_bold.nii")[0],
                       stage="func (motion)", path=bold_path)
    for w in qc["Warnings"]:
        log(f"[func] WARNING: {bold_path}: {w}")
    keep = None
    if cfg["fd_threshold"] is not None:   # checked before anything is written
        keep = np.flatnonzero(np.nan_to_num(conf["framewise_displacement"].to_numpy()) <= cfg["fd_threshold"])
        if len(keep) < cfg["min_volumes"]:
            raise FuncInputError(f"{bold_path}: only {len(keep)} volumes with FD <= {cfg['fd_threshold']} mm "
                                 f"remain after scrubbing (need {cfg['min_volumes']}, func.min_volumes)")
    return conf, mc, corrected, qc, keep


def _bold_to_t1w_transform(ref_img, t1w, t1w_mask, bold_to_t1w_mat, xfm, wd) -> None:
    """Write the BOLD reference -> T1w transform to ``xfm``: registered, or copied from ``bold_to_t1w_mat``."""
    if bold_to_t1w_mat is None:
        bold_to_t1w(ref_img, nib.load(str(t1w)), xfm, nib.load(str(t1w_mask)) if t1w_mask else None,
                    workdir=wd)
    else:
        import shutil
        with bf_io.atomic_path(xfm) as tmp:
            shutil.copyfile(bold_to_t1w_mat, tmp)


def _sample_mni(data, A, mc, ref_img, tpl, template_mask, transforms, wd, cfg):
    """(template brain mask, covered: flat grid voxels every volume's field of view reaches, (voxels, T)
    series) on the template grid, by one interpolation from the raw volumes (motion and ``transforms``
    composed), only in and around the brain: the rest of the grid stays 0 (faster, smaller files)."""
    pts, inside = mni_coordinates(tpl, transforms, ref_img, workdir=wd)
    tpl_brain = np.asarray(nib.load(str(template_mask)).dataobj) > 0
    roi = _dilate(tpl_brain, 2).reshape(-1) & inside
    vals, valid = motion.sample_series(data, A, mc.transforms, pts[roi], device=cfg["motion_device"])
    covered = np.zeros(len(pts), bool)
    covered[roi] = valid.all(1)
    mni = np.zeros((len(pts), data.shape[3]), np.float32)
    mni[roi] = np.where(valid.all(1)[:, None], vals, 0.0)
    return tpl_brain, covered, mni


def _tissue_masks(wm, csf, covered, grid) -> dict:
    """{confound name: flat mask} of the white matter and CSF probability maps (``_tissue_mask``)."""
    load_prob = lambda path: np.asarray(nib.load(str(path)).dataobj, np.float32).reshape(-1)
    return {"white_matter": _tissue_mask(load_prob(wm), covered, grid),
            "csf": _tissue_mask(load_prob(csf), covered, grid)}


def _save_mni_series(mni, grid, tpl, tr, path):
    """The MNI series as an int16 NIfTI (nibabel scales: slope/intercept), TR in its zooms; returns the image."""
    mni_img = nib.Nifti1Image(mni.reshape(*grid, -1), tpl.affine)
    mni_img.header.set_xyzt_units("mm", "sec")
    mni_img.header.set_zooms((*tpl.header.get_zooms()[:3], tr))
    mni_img.header.set_data_dtype(np.int16)   # nibabel scales (slope/intercept): half the size, ample precision
    bf_io.save_nifti(mni_img, path)
    return mni_img


def _add_tissue_signals(conf, mni, brain, masks, mni_img, tpl, tr, cfg, wd) -> None:
    """Insert the MNI-space confounds into ``conf``: global signal, white matter, CSF (first columns) and,
    with func.acompcor, a_comp_cor_* (last)."""
    conf.insert(0, "global_signal", mni[brain].mean(0))
    for i, (name, m) in enumerate(masks.items()):
        conf.insert(1 + i, name, mni[m].mean(0))
    if cfg["acompcor"]:
        acc_mask = nib.Nifti1Image((masks["white_matter"] | masks["csf"]).reshape(tpl.shape[:3]).astype(np.uint8),
                                   tpl.affine)
        acc = nipype_acompcor(mni_img, acc_mask, cfg["n_acompcor"], tr, wd)
        for c in acc.columns:
            conf[c] = acc[c].to_numpy()


def _denoise(conf, mni, brain, tr, cfg, keep):
    """(ALFF, fALFF, denoised (T, V) series) of the brain voxels in percent signal (ALFF comparable across
    scanners): the func.denoise_confounds columns regressed out; ALFF before the band-pass, the denoised
    series band-passed and scrubbed (``keep``)."""
    from fnmatch import fnmatchcase

    cols = [c for c in conf.columns if any(fnmatchcase(c, p) for p in cfg["denoise_confounds"])]
    X = conf[cols].fillna(0.0).to_numpy() if cols else None
    ts = mni[brain].T.astype(np.float64)  # (T, V)
    psc = ts / np.maximum(ts.mean(0), 1e-6) * 100   # percent signal: ALFF comparable across scanners
    resid = clean_signals(psc, X, tr, cfg, band=False)
    alff, falff = alff_falff(resid, tr, tuple(cfg["alff_band"]))
    den = clean_signals(psc, X, tr, cfg, sample_mask=keep)
    return alff, falff, den


def _save_derivatives(alff, falff, den, brain, grid, tpl, atlas, atlas_tsv, out) -> None:
    """ALFF, fALFF and ReHo maps, the atlas parcels' time series and their Fisher-z connectivity."""
    vol = lambda v: _from_mask(v, brain, grid)
    bf_io.save_nifti(nib.Nifti1Image(vol(alff), tpl.affine), out["alff"])
    bf_io.save_nifti(nib.Nifti1Image(vol(falff), tpl.affine), out["falff"])
    den4d = np.zeros((*grid, den.shape[0]), np.float32)
    den4d[brain.reshape(grid)] = den.T
    bf_io.save_nifti(nib.Nifti1Image(reho(den4d, brain.reshape(grid)), tpl.affine), out["reho"])
    labels_img = nib.load(str(atlas))
    table = pd.read_csv(atlas_tsv, sep="\t")
    lab = np.asarray(labels_img.dataobj).astype(int).reshape(-1)[brain]
    pts_ts = parcel_timeseries(den, _relabel(lab, table["index"].to_numpy()), list(table["name"]))
    bf_io.save_tsv(pts_ts, out["timeseries"], **TSV)
    bf_io.save_tsv(fisher_z_connectivity(pts_ts), out["relmat"], **TSV)

def _dilate(mask, iterations):
    from scipy import ndimage

    return ndimage.binary_dilation(mask, iterations=iterations)


def _bold_mask(ref):
    from scipy import ndimage

    m = ref > 0.25 * np.percentile(ref, 98)
    return ndimage.binary_fill_holes(ndimage.binary_opening(m, iterations=1))


def _tissue_mask(prob, covered, grid, thresholds=(0.95, 0.9, 0.8)):
    """Confidently-WM/CSF voxels: probability >= threshold, eroded by one voxel (as fMRIPrep erodes), so
    that grey-matter signal partial-volumed into the edge of the ventricles is not regressed out; falls
    back to lower thresholds, then to no erosion, on coarse grids. Under MIN_TISSUE_VOXELS even then: the
    last (loosest) mask, which the caller reports (``coverage_error``)."""
    from scipy import ndimage

    for erode in (1, 0):
        for t in thresholds:
            m = (prob >= t).reshape(grid)
            if erode:
                m = ndimage.binary_erosion(m, iterations=erode)
            m = m.reshape(-1) & covered
            if m.sum() >= MIN_TISSUE_VOXELS:
                return m
    return m


def coverage_error(bold_path, img, n_brain, n_tpl_brain, masks, xfm, qc) -> FuncInputError:
    """The error for a BOLD field of view that holds too little brain after registration: the counts, the
    field of view in mm and the likely causes."""
    fov = np.asarray(img.shape[:3]) * np.sqrt((img.affine[:3, :3] ** 2).sum(0))
    return FuncInputError(
        f"{bold_path}: too little brain inside the BOLD field of view after registration: {int(n_brain)} of "
        f"{int(n_tpl_brain)} template brain voxels, {int(masks['white_matter'].sum())} white-matter and "
        f"{int(masks['csf'].sum())} CSF voxels (need {MIN_BRAIN_VOXELS}, {MIN_TISSUE_VOXELS} and "
        f"{MIN_TISSUE_VOXELS}); BOLD field of view {' x '.join(f'{v:.0f}' for v in fov)} mm. Likely a slab "
        f"acquisition that does not cover the brain, or a failed BOLD->T1w registration: check {xfm} and the "
        f"motion (max rotation {qc['MaxRotation']:.1f} deg, max translation {qc['MaxTranslation']:.1f} mm, "
        f"max FD {qc['MaxFramewiseDisplacement']:.1f} mm)")


def _relabel(lab, index):
    """Atlas label values -> 1..L positions of the TSV rows (0 = background)."""
    lut = np.zeros(max(lab.max(initial=0), index.max()) + 1, int)
    lut[index] = np.arange(1, len(index) + 1)
    return lut[lab]


def _from_mask(values, mask, grid):
    out = np.zeros(int(np.prod(grid)), np.float32)
    out[mask] = values
    return out.reshape(grid)


# ------------------------------------------------------------------------------------------------- QC
def motion_figure(conf, path, title=""):
    """Translations, rotations (as mm at 50 mm), FD and std_dvars over time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(4, 1, figsize=(9, 7), sharex=True)
    for c in ("trans_x", "trans_y", "trans_z"):
        ax[0].plot(conf[c], label=c)
    for c in ("rot_x", "rot_y", "rot_z"):
        ax[1].plot(np.degrees(conf[c]), label=c)
    ax[2].plot(conf["framewise_displacement"], color="k")
    ax[3].plot(conf["std_dvars"], color="tab:red")
    for a, lab in zip(ax, ("translation (mm)", "rotation (deg)", "FD (mm)", "std DVARS")):
        a.set_ylabel(lab)
        a.grid(alpha=0.3)
    ax[0].legend(ncol=3, fontsize=8)
    ax[1].legend(ncol=3, fontsize=8)
    ax[3].set_xlabel("volume")
    fig.suptitle(f"{title}: mean FD {np.nanmean(conf['framewise_displacement']):.3f} mm")
    fig.tight_layout()
    bf_io.save_figure(fig, path, dpi=80)


def carpet_figure(mni, brain, tr, path, conf, title=""):
    """Carpet plot (Power 2017) of the MNI brain voxels (z-scored, detrended) under global signal and FD."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from scipy.signal import detrend

    ts = detrend(mni[brain].astype(np.float64), axis=1)
    ts = ts / np.maximum(ts.std(1, keepdims=True), 1e-6)
    order = np.argsort(mni[brain].mean(1))      # dark (CSF/edge) to bright voxels
    step = max(1, len(order) // 1500)
    fig, ax = plt.subplots(3, 1, figsize=(9, 7), sharex=True, gridspec_kw={"height_ratios": [1, 1, 5]})
    ax[0].plot(conf["global_signal"], color="tab:blue")
    ax[0].set_ylabel("GS")
    ax[1].plot(conf["framewise_displacement"], color="k")
    ax[1].set_ylabel("FD (mm)")
    ax[2].imshow(ts[order[::step]], aspect="auto", cmap="gray", vmin=-2, vmax=2, interpolation="nearest")
    ax[2].set_ylabel("brain voxels")
    ax[2].set_xlabel(f"volume (TR {tr:g} s)")
    fig.suptitle(title)
    fig.tight_layout()
    bf_io.save_figure(fig, path, dpi=80)


# ------------------------------------------------------------------------------------------------ CLI
def _mni_list(args):
    if args.mni_xfm:
        return args.mni_xfm
    return layout.to_mni_transforms(args.anat_dir)


def cli(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "atlas":
        from . import atlas

        return atlas.cli(argv[1:])
    ap = cliargs.parser("func")
    args = ap.parse_args(argv)
    if not args.mni_xfm and not args.anat_dir:
        ap.error("give --anat-dir or --mni-xfm")
    cfg = json.loads(args.params)
    loaded = load_bold(args.bold, cfg=cfg)     # before ANTs loads: bad input fails in seconds
    import torch

    torch.set_num_threads(args.threads)
    load_ants(args.threads)
    # errors reach brainfuse.cli, which prints them as one line
    run(args.bold, args.t1w, args.template, args.template_mask, _mni_list(args), args.atlas, args.atlas_tsv,
        args.out_dir, args.resolution, wm=args.wm, csf=args.csf, t1w_mask=args.t1w_mask, cfg=cfg,
        log=lambda m: print(m, file=sys.stderr), strict=args.strict, loaded=loaded)
    return 0
