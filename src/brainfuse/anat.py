"""anat: N4, skull stripping, MNI registration (affine + SyN) and tissue maps of one T1w image, with antspyx.

One process per subject does every step (``import ants`` alone costs seconds):

1. affine registration of the whole head to the template head target (``templates.py``: no head template
   ships offline, so the target is the template brain inside synthetic CSF/skull/scalp shells);
2. N4 bias correction, weighted by the template brain mask mapped back through that affine (dilated);
3. skull stripping: SyN (mutual information) of the bias-corrected head to the same target, its metric restricted
   to the dilated template brain mask so that the synthetic scalp does not pull the brain edge; the template
   brain mask pulled back through it is the brain mask;
4. normalisation: SyN of the skull-stripped brain to the template brain, from the same affine, with local
   cross-correlation (CC), which ignores the slowly varying intensity bias N4 leaves. Measured on the phantom
   (displacement error against the known warp): 0.38 mm at 2 mm, 0.53 mm at 3 mm; the earlier single
   mutual-information SyN of the head to the head target reached 0.78 / 0.88 mm, and CC on that head target
   pulled a real scan's brain mask into the neck (no neck in the target) while brain-to-brain CC does not;
5. tissue maps = Atropos initialised with the template GM/WM/CSF priors pulled back through step 4;
6. T1 brain, tissue maps and the log-Jacobian of the template->subject warp resampled onto the template grid.

Transforms follow ANTs: registering fixed = template, moving = T1w gives ``[warp, affine]`` that takes a T1w-space
image to the template with ``ants.apply_transforms(fixed=tpl, moving=img, transformlist=[warp, affine])``
(``brainfuse.layout.to_mni_transforms``). Output names: ``brainfuse.layout.anat_paths``.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from . import cliargs
from . import stageqc
from .antsconfig import load_ants
from .errors import BrainfuseError
from .inputs import as_stage_error, check_anisotropy, check_finite, load_nifti
from .layout import TEMPLATE, TISSUES, anat_paths, check_label, template_files
from .provenance import code_version
from .schema import section_defaults

DEFAULTS = section_defaults("anat")    # the schema's anat section: every default, and why each value
# Input check and QC thresholds: not processing parameters, left out of the outputs' provenance, so that outputs
# stay byte-identical when only a threshold changes.
CHECK_KEYS = ("max_voxel_anisotropy", "min_mni_correlation", "min_mni_mask_dice", "brain_volume_ml")
SKULLSTRIP_SIGMAS = (3.0, 1.0)          # head -> head-target SyN (flow, total): a smooth field carries the mask; the
                                       # synthetic head has no detail for a finer one to follow
MAX_VOXEL_MM, MIN_VOXEL_MM = 8.0, 0.2


class InputError(BrainfuseError):
    """A T1w image brainfuse cannot process; the message names the file."""


# ------------------------------------------------------------------------------------------- checks
def check_t1w(path, max_anisotropy: float = DEFAULTS["max_voxel_anisotropy"]) -> nib.Nifti1Image:
    """Load a T1w NIfTI and refuse what cannot be a usable 3D structural image: truncated or unreadable, not 3D,
    implausible or too anisotropic voxels, NaN/Inf, empty (InputError naming the file)."""
    path = str(path)
    with as_stage_error(InputError):
        img, data = load_nifti(path, "T1w image", ndim=(3, 4, 5, 6, 7), dtype=np.float32)
        shape = img.shape
        while len(shape) > 3 and shape[-1] == 1:
            shape = shape[:-1]
        if len(shape) != 3:
            raise InputError(f"a T1w image must be 3D, this one has shape {img.shape}", path=path,
                             fix="give one 3D volume (e.g. the first echo, or the echoes' RMS)")
        if min(shape) < 8:
            raise InputError(f"too few voxels along an axis for a head image (shape {shape})", path=path,
                             fix="check that this is the whole T1w series, not one slice")
        zooms = np.asarray(img.header.get_zooms()[:3], dtype=float)
        if not np.all((zooms >= MIN_VOXEL_MM) & (zooms <= MAX_VOXEL_MM)):
            raise InputError(f"voxel size {zooms.tolist()} mm is outside {MIN_VOXEL_MM}-{MAX_VOXEL_MM} mm", path=path,
                             fix="check the header's voxel size (pixdim) or convert the image again")
        check_anisotropy(zooms, path, "T1w", max_anisotropy, "anat.max_voxel_anisotropy")
        data = data.reshape(shape)
        check_finite(data, path, "T1w image")
        if not (data > 0).any():
            raise InputError(f"the T1w image has no voxel above 0 (max {float(data.max()):g})", path=path,
                             fix="check the export; a T1w image holds positive intensities")
    return nib.Nifti1Image(data, img.affine, img.header)


def qc_flags(metrics: dict, p: dict, figures: dict | None) -> tuple[list, dict, dict]:
    """(flags, metrics, thresholds) of the QC record: registration and brain-mask plausibility (``p``: the
    anat settings; ``figures``: the QC figure paths a flag points at, None when they will not be written)."""
    m = {"mni_correlation": round(metrics["mni_correlation"], 4), "mni_mask_dice": round(metrics["mni_mask_dice"], 4),
         "mask_volume_ml": round(metrics["mask_volume_ml"], 1),
         "voxel_anisotropy": round(max(metrics["native_voxel_mm"]) / min(metrics["native_voxel_mm"]), 3)}
    t = {k: p[k] for k in CHECK_KEYS}
    reg, mask = (("the registration figure", "the brain mask figure") if figures is None else
                 (os.path.basename(figures["qc_reg"]), os.path.basename(figures["qc_mask"])))
    flags = []
    if not m["mni_correlation"] >= t["min_mni_correlation"]:       # NaN fails too
        flags.append(f"MNI correlation {m['mni_correlation']:.3f} is below anat.min_mni_correlation "
                     f"{t['min_mni_correlation']:g}: registration to the template failed or is poor; check {reg} "
                     f"and the T1w's orientation, field of view and voxel size")
    if not m["mni_mask_dice"] >= t["min_mni_mask_dice"]:
        flags.append(f"brain mask Dice {m['mni_mask_dice']:.3f} with the template's is below anat.min_mni_mask_dice "
                     f"{t['min_mni_mask_dice']:g}: registration failed or is poor; check {reg} and {mask}")
    lo, hi = t["brain_volume_ml"]
    if not lo <= m["mask_volume_ml"] <= hi:
        flags.append(f"brain mask volume {m['mask_volume_ml']:.0f} ml is outside anat.brain_volume_ml {lo:g}-{hi:g} "
                     f"ml: a wrong voxel size in the header, or a failed skull strip; check {mask}")
    return flags, m, t


# ----------------------------------------------------------------------------------------- pipeline
def _dice(a, b) -> float:
    a, b = np.asarray(a) > 0, np.asarray(b) > 0
    return float(2 * (a & b).sum() / max(a.sum() + b.sum(), 1))


def process(t1w_path, out_dir, sub: str, ses: str | None, template_dir, res: int, threads: int = 1,
            params: dict | None = None, log=print, strict: bool = False) -> dict:
    """Run every step for one T1w image; write all outputs atomically; return paths, step timings, QC metrics.

    Cost follows the working grids, not the input: N4 and Atropos run on a copy at ``processing_mm`` when the
    T1w is finer, affine and SyN on a copy at the template resolution; the native-grid outputs are resampled
    from those (the N4 bias field, the brain mask and the tissue maps are smooth on that scale).

    QC (``qc_flags``): below a threshold, a ``WARNING`` log line and a flag in the QC JSON; with ``strict``,
    a :class:`~brainfuse.stageqc.QCError` before any output is renamed into place.
    """
    p = {**DEFAULTS, **(params or {})}
    sub = check_label(sub, "subject label")
    ses = check_label(ses, "session label") if ses else None
    res = int(res)
    img = check_t1w(t1w_path, p["max_voxel_anisotropy"])   # before `import ants`: bad input fails in a second
    tpl_files = template_files(Path(template_dir).parent, res)
    missing = [f for f in tpl_files.values() if not os.path.exists(f)]
    if missing:
        raise InputError(f"template files missing ({len(missing)} of {len(tpl_files)})", path=missing[0],
                         fix=f"run `brainfuse templates --resolution {res}` (or the workflow's templates rule)")
    ants = load_ants(threads)      # seeded: the affine's metric samples a random 20 % of voxels
    final = anat_paths(out_dir, sub, ses, res)
    anat_dir = Path(final["preproc"]).parent
    anat_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".anat-", dir=anat_dir))       # ANTs outprefix and staged outputs
    # antspyx's Atropos writes its priors/posteriors to tempfile.mktemp() and never removes them: keep them here.
    previous_tempdir, tempfile.tempdir = tempfile.tempdir, str(work)
    clock = _Clock(sub, log)
    try:
        tpl = {k: ants.image_read(v) for k, v in tpl_files.items()}
        nib.save(img, work / "input.nii")          # uncompressed: gzip of a 0.5 mm T1w alone took seconds
        del img
        g = _grids(ants, ants.image_read(str(work / "input.nii")), res, p)
        clock.tick("load")
        reg = _register(ants, g, tpl, res, p, work, clock)
        seg = _segment(ants, g, tpl, reg, p)
        clock.tick("atropos")
        images = _native_and_mni(ants, g, tpl, reg, seg)
        clock.tick("to_mni")
        metrics = _metrics(ants, g, tpl, reg, images)
        flags, qc_metrics, thresholds = qc_flags(metrics, p, None if strict else final)   # strict: no figures
        label = f"sub-{sub}" + (f"_ses-{ses}" if ses else "")
        stageqc.settle(flags, strict=strict, label=label, stage="anat", path=t1w_path, log=log)
        staged = _stage_outputs(ants, images, reg, final, work, sub, tpl_files)
        staged["qc_json"] = str(work / Path(final["qc_json"]).name)
        stageqc.save(staged["qc_json"], flags, qc_metrics, thresholds)
        staged.update(_stage_sidecars(final, work, t1w_path, tpl_files, p, res, g, metrics, ants.__version__))
        clock.tick("write")
        Path(final["qc_mask"]).parent.mkdir(parents=True, exist_ok=True)
        for key, src in staged.items():
            os.replace(src, final[key])
        clock.tick("rename")
    finally:
        tempfile.tempdir = previous_tempdir
        shutil.rmtree(work, ignore_errors=True)
    return {"paths": final, "timings": clock.timings, "metrics": metrics}


class _Clock:
    """Step timings, logged as they happen."""

    def __init__(self, sub, log):
        self.sub, self.log, self.timings, self.t0 = sub, log, {}, time.perf_counter()

    def tick(self, step):
        now = time.perf_counter()
        self.timings[step] = round(now - self.t0, 2)
        self.t0 = now
        self.log(f"[anat] sub-{self.sub}: {step} {self.timings[step]:.1f} s")


def _grids(ants, t1, res: int, p: dict) -> dict:
    """The native image and its two working copies: ``proc`` (N4, Atropos: at most ``processing_mm``) and
    ``reg`` (affine and SyN: the template resolution), each the native image itself when it is not finer.
    N4's bias field, fitted on ``proc``, is smooth: it divides the image on any of the three grids."""
    proc = _coarser(ants, t1, float(p["processing_mm"]))
    reg = proc if np.allclose(proc.spacing, res, atol=0.1 * res) else _coarser(ants, t1, float(res))
    return {"native": t1, "proc": proc, "reg": reg}


def _coarser(ants, image, mm: float):
    """``image`` on an isotropic ``mm`` grid when any voxel edge is finer than 0.9 mm x that, else itself.
    Gaussian pre-smoothing to the new voxel size (FWHM = voxel) so that downsampling does not alias."""
    spacing = np.asarray(image.spacing, float)
    if spacing.min() >= 0.9 * mm:
        return image
    sigma = np.sqrt(np.clip(mm ** 2 - spacing ** 2, 0, None)) / 2.3548
    smooth = ants.smooth_image(image, sigma.tolist(), sigma_in_physical_coordinates=True)
    return ants.resample_image(smooth, (mm,) * 3, use_voxels=False, interp_type=0)


def _register(ants, g: dict, tpl: dict, res: int, p: dict, work: Path, clock) -> dict:
    """Affine, N4, skull-stripping SyN and brain-to-template SyN. Returns the transforms, the N4-corrected
    ``proc`` image and its bias field, and the brain mask on the ``proc`` grid."""
    reg_img = _rescale(g["reg"])
    # Template brain mask on the head grid, dilated: the SyN metric's domain, so that the neck, face and
    # shoulders of a real scan (absent from the synthetic head) do not pull the brain edge.
    head_mask = ants.resample_image_to_target(tpl["mask"], tpl["head"], interp_type="nearestNeighbor")
    metric_mask = ants.iMath(head_mask, "MD", max(1, int(round(p["metric_mask_dilation_mm"] / res))))
    init = _head_top_translation(ants, reg_img, tpl["head"], str(work / "init.mat"))
    # Unmasked: with the metric on the brain + margin only, the affine inflates the brain into the scalp.
    aff = ants.registration(fixed=tpl["head"], moving=reg_img, type_of_transform="Affine", initial_transform=init,
                            outprefix=str(work / "aff_"), aff_metric="mattes")
    affine_mat = aff["fwdtransforms"][0]
    clock.tick("affine")
    n4, bias = _n4(ants, g["proc"], metric_mask, affine_mat, p)
    n4_reg = _rescale(n4 if g["reg"] is g["proc"] else _divide_by_field(
        g["reg"], ants.resample_image_to_target(bias, g["reg"], interp_type="linear")))
    clock.tick("n4")
    strip_fwd, strip_inv = _skullstrip_syn(ants, n4_reg, tpl, metric_mask, affine_mat, res, p, work)
    mask = ants.threshold_image(_to_native(ants, g["proc"], tpl["mask"], strip_fwd, strip_inv), 0.5, 2.0, 1, 0)
    mask = ants.iMath(mask, "FillHoles").threshold_image(0.5, 2)
    clock.tick("skullstrip")
    mask_reg = mask if g["reg"] is g["proc"] else ants.resample_image_to_target(mask, g["reg"], interp_type="nearestNeighbor")
    fwd, inv, syn_grid = _normalise_syn(ants, _rescale(n4_reg * mask_reg), tpl, affine_mat, res, p, work)
    clock.tick("syn")
    return {"n4": n4, "bias": bias, "mask": mask, "fwd": fwd, "inv": inv, "syn_grid": syn_grid}


def _n4(ants, proc, metric_mask, affine_mat: str, p: dict):
    """N4 on the ``proc`` grid, weighted by the dilated template brain mask pulled back through the affine.
    Returns the corrected image and the bias field (the native image is divided by the field resampled)."""
    mask = ants.apply_transforms(fixed=proc, moving=metric_mask, transformlist=[affine_mat], whichtoinvert=[True],
                                 interpolator="nearestNeighbor")
    shrink = int(max(1, min(8, round(8.0 / min(proc.spacing)))))     # fit the smooth field on a ~8 mm grid
    bias = ants.n4_bias_field_correction(proc, mask=mask, shrink_factor=shrink, spline_param=float(p["n4_spline_mm"]),
                                         convergence={"iters": [50, 50, 30], "tol": 1e-6}, return_bias_field=True)
    return proc / bias, bias


def _skullstrip_syn(ants, n4_reg, tpl: dict, metric_mask, affine_mat: str, res: int, p: dict, work: Path):
    """SyN (mutual information) of the bias-corrected head to the head target, its field on a box around the
    metric mask (outside it the warp is zero; 2-3x fewer voxels than the head grid); the template brain
    mask pulled back through it is the brain mask."""
    fixed, mask = tpl["head"], metric_mask
    if p["syn_crop_margin_mm"] is not None and p["metric_mask_dilation_mm"] > 0:
        box = ants.iMath(metric_mask, "MD", max(1, int(round(p["syn_crop_margin_mm"] / res))))
        fixed, mask = ants.crop_image(tpl["head"], box, 1), ants.crop_image(metric_mask, box, 1)
    strip = ants.registration(fixed=fixed, moving=n4_reg, type_of_transform="SyNOnly", initial_transform=affine_mat,
                              outprefix=str(work / "strip_"), syn_metric="mattes",
                              mask=mask if p["metric_mask_dilation_mm"] > 0 else None,
                              reg_iterations=tuple(p["skullstrip_iterations"]), grad_step=p["syn_gradient_step"],
                              flow_sigma=SKULLSTRIP_SIGMAS[0], total_sigma=SKULLSTRIP_SIGMAS[1])
    return _split(strip, affine_mat)


def _normalise_syn(ants, brain_reg, tpl: dict, affine_mat: str, res: int, p: dict, work: Path):
    """SyN of the skull-stripped brain to the template brain (no scalp, neck or face of a real head for the
    synthetic head target to mismatch), from the same affine. CC by default: local normalisation ignores
    the slowly varying bias N4 leaves, which mutual information follows. Returns (fwd, inv, SyN grid)."""
    fixed = tpl["T1w"]
    if p["syn_crop_margin_mm"] is not None:     # the same box rule as the skull strip, around the template brain
        margin = p["metric_mask_dilation_mm"] + p["syn_crop_margin_mm"]
        fixed = ants.crop_image(tpl["T1w"], ants.iMath(tpl["mask"], "MD", max(1, int(round(margin / res)))), 1)
    cc = p["syn_metric"] == "CC"
    syn = ants.registration(fixed=fixed, moving=brain_reg, type_of_transform="SyNOnly", initial_transform=affine_mat,
                            outprefix=str(work / "syn_"), syn_metric="CC" if cc else "mattes",
                            syn_sampling=int(p["syn_cc_radius"]) if cc else 32,
                            reg_iterations=tuple(p["syn_iterations"]), grad_step=p["syn_gradient_step"],
                            flow_sigma=p["syn_flow_sigma"], total_sigma=p["syn_total_sigma"])
    fwd, inv = _split(syn, affine_mat)
    return fwd, inv, fixed


def _segment(ants, g: dict, tpl: dict, reg: dict, p: dict) -> dict:
    """Atropos on the ``proc`` grid, initialised with the template GM/WM/CSF priors pulled back through the
    brain-to-template transforms: {tissue: probability image}."""
    priors = [_to_native(ants, g["proc"], tpl[t], reg["fwd"], reg["inv"]) * reg["mask"] for t in TISSUES]
    # r=0: Atropos' --use-random-seed 0, a constant seed (its default, 1, seeds from the clock: tissue maps
    # differed by up to 0.04 between two runs of the same subject)
    seg = ants.atropos(a=reg["n4"], x=reg["mask"], i=priors, m=f"[{p['atropos_mrf']},1x1x1]", c="[3,0]",
                       priorweight=p["atropos_prior_weight"], r=0)
    return dict(zip(TISSUES, seg["probabilityimages"]))


def _native_and_mni(ants, g: dict, tpl: dict, reg: dict, probs: dict) -> dict:
    """Every output image: native grid (N4 T1w, mask, tissue maps) and template grid (brain, tissues, log-Jacobian)."""
    native, proc = g["native"], g["proc"]
    up = (lambda im: im) if native is proc else (lambda im: ants.resample_image_to_target(im, native, interp_type="linear"))
    out = {"preproc": reg["n4"] if native is proc else _divide_by_field(native, up(reg["bias"]))}
    out["mask"] = reg["mask"] if native is proc else up(reg["mask"]).threshold_image(0.5, 2.0)
    for t in TISSUES:
        out[t] = probs[t] if native is proc else up(probs[t]) * out["mask"]
    to_mni = lambda moving: ants.apply_transforms(fixed=tpl["T1w"], moving=moving,
                                                 transformlist=[reg["fwd"]["warp"], reg["fwd"]["affine"]],
                                                 whichtoinvert=[False, False], interpolator="linear")
    out["mni_t1w"] = to_mni(out["preproc"] * out["mask"])  # native: sampled at the template grid's points only
    for t in TISSUES:
        out[f"mni_{t}"] = to_mni(probs[t])
    logjac = ants.create_jacobian_determinant_image(reg["syn_grid"], reg["fwd"]["warp"], do_log=True)
    out["logjacobian"] = ants.resample_image_to_target(logjac, tpl["T1w"], interp_type="linear") * tpl["mask"]
    out["mni_mask"] = to_mni(reg["mask"])
    return out


def _divide_by_field(image, field):
    """``image / field``, the field's zeros (native voxel centres beyond the processing grid's last centre,
    where interpolation has nothing to read) taken as its median: those border voxels lie outside the head."""
    f = field.numpy()
    f = np.where(f > 0, f, np.median(f[f > 0]))
    return image.new_image_like((image.numpy() / f).astype(np.float32))


def _metrics(ants, g: dict, tpl: dict, reg: dict, images: dict) -> dict:
    """QC numbers: brain volume, correlation with the template inside its brain mask, mask Dice in MNI."""
    inside = tpl["mask"].numpy() > 0
    return {"mask_volume_ml": float(images["mask"].numpy().sum() * np.prod(g["native"].spacing) / 1000),
            "mni_correlation": float(np.corrcoef(images["mni_t1w"].numpy()[inside], tpl["T1w"].numpy()[inside])[0, 1]),
            "mni_mask_dice": _dice(images["mni_mask"].numpy() > 0.5, inside),
            "native_voxel_mm": [round(float(s), 3) for s in g["native"].spacing],
            "processing_voxel_mm": [round(float(s), 3) for s in g["proc"].spacing],
            "registration_voxel_mm": [round(float(s), 3) for s in g["reg"].spacing]}


def _stage_outputs(ants, images: dict, reg: dict, final: dict, work: Path, sub: str, tpl_files: dict) -> dict:
    """Every image, transform and QC figure written under a temporary name in ``work``: {key: staged path}."""
    from . import qc

    staged = {}
    for key in ("preproc", "mask", *TISSUES, *(f"mni_{t}" for t in TISSUES), "mni_t1w", "logjacobian"):
        staged[key] = str(work / Path(final[key]).name)
        ants.image_write(images[key].astype("uint8") if key == "mask" else images[key], staged[key])
    for key, src in (("affine", reg["fwd"]["affine"]), ("warp", reg["fwd"]["warp"]), ("inverse_warp", reg["inv"])):
        staged[key] = str(work / Path(final[key]).name)
        shutil.copyfile(src, staged[key])
    # QC from the proc grid (at most processing_mm: a 0.5 mm T1w renders in a fraction of the time), in world space
    qc_dir = work / "qc"
    qc_dir.mkdir()
    ants.image_write(reg["n4"], str(qc_dir / "n4.nii.gz"))
    ants.image_write(reg["mask"], str(qc_dir / "mask.nii.gz"))
    bg, zooms = qc.as_canonical(qc_dir / "n4.nii.gz", zooms=True)
    staged["qc_mask"] = qc.overlay_figure(bg, work / "qc_mask.png", title=f"sub-{sub}: brain mask on N4 T1w",
                                          contours=[(qc.as_canonical(qc_dir / "mask.nii.gz"), 0.5, "red")], zooms=zooms)
    staged["qc_reg"] = qc.overlay_figure(
        qc.as_canonical(staged["mni_t1w"]), work / "qc_reg.png", box_from=qc.as_canonical(tpl_files["T1w"]),
        title=f"sub-{sub}: T1w in {TEMPLATE} with template edges",
        contours=[(qc.as_canonical(tpl_files["WM"]), 0.5, "cyan"), (qc.as_canonical(tpl_files["mask"]), 0.5, "yellow")])
    return staged


def _stage_sidecars(final: dict, work: Path, t1w_path, tpl_files: dict, p: dict, res: int, g: dict, metrics: dict,
                    ants_version: str) -> dict:
    """JSON sidecars of every image and transform (sources, parameters, QC), staged in ``work``; adds their
    final names to ``final``."""
    sources = [os.path.abspath(str(t1w_path))]
    provenance = {"GeneratedBy": [{"Name": "brainfuse anat", "CodeVersion": code_version("anat"),
                                   "Software": {"antspyx": ants_version}}],
                  "Parameters": {**{k: v for k, v in p.items() if k not in CHECK_KEYS}, "resolution_mm": res,
                                 "registration_resolution_mm": float(min(g["reg"].spacing)),
                                 "processing_resolution_mm": float(min(g["proc"].spacing))}}
    tpl_rel = {k: os.path.abspath(v) for k, v in tpl_files.items()}
    side = {
        "preproc": {"Description": "N4 bias-corrected T1w (native grid; bias field fitted on the processing grid)",
                    "SkullStripped": False},
        "mask": {"Description": "Brain mask: template mask pulled back through affine + SyN", "Type": "Brain",
                 "RawSources": sources},
        "affine": {"Description": "ITK affine, T1w to template (second in the antsApplyTransforms list)"},
        "warp": {"Description": "SyN displacement field (ITK, LPS), T1w to template (first in the list)"},
        "inverse_warp": {"Description": "Inverse SyN field: template to T1w, after inverting the affine"},
        "mni_t1w": {"Description": "Skull-stripped N4 T1w in template space", "SkullStripped": True,
                    "SpatialReference": tpl_rel["T1w"], "QC": metrics},
        "logjacobian": {"Description": "log det Jacobian of the template->subject warp (atrophy < 0), "
                                       "nonlinear part only, inside the template brain mask",
                        "SpatialReference": tpl_rel["T1w"]},
    }
    for t in TISSUES:
        side[t] = {"Description": f"{t} probability (Atropos on the processing grid, template priors)"}
        side[f"mni_{t}"] = {"Description": f"{t} probability in template space", "SpatialReference": tpl_rel["T1w"]}
    staged = {}
    for key, extra in side.items():
        extra = {**extra, "Sources": sources + ([tpl_rel[k] for k in ("head", "mask", "GM", "WM", "CSF")]
                                               if key != "preproc" else []), **provenance}
        name = Path(final[key]).name
        base = name[: -len(".nii.gz")] if name.endswith(".nii.gz") else os.path.splitext(name)[0]
        staged[f"{key}.json"] = str(work / (base + ".json"))
        Path(staged[f"{key}.json"]).write_text(json.dumps(extra, indent=2) + "\n")
        final[f"{key}.json"] = str(Path(final[key]).with_name(base + ".json"))
    return staged


def _head_top_translation(ants, moving, fixed, path: str) -> str:
    """ITK translation matching the top 100 mm of the two heads (centroids): a start that ignores the neck.

    Centre-of-mass starts fail on scans that include the neck and shoulders; the vertex is always in the FOV.
    """
    def centroid(image):
        a = image.numpy()
        head = a > 0.3 * np.percentile(a[a > 0], 90)
        ijk = np.argwhere(head).astype(float)
        ras = nib.affines.apply_affine(_ras_affine(image), ijk)
        top = np.percentile(ras[:, 2], 99.9)
        return ras[ras[:, 2] > top - 100].mean(0)

    shift = centroid(moving) - centroid(fixed)          # fixed (template) point + shift = moving point
    tx = ants.create_ants_transform(transform_type="AffineTransform", dimension=3,
                                    translation=tuple(shift * [-1, -1, 1]))   # ITK works in LPS
    ants.write_transform(tx, path)
    return path


def _to_native(ants, native, moving, fwd: dict, inv: str, interp: str = "linear"):
    """A template-space image resampled on the ``native`` grid through one registration's (fwd, inv) pair
    from ``_split``: the inverse affine, then the inverse warp."""
    return ants.apply_transforms(fixed=native, moving=moving, transformlist=[fwd["affine"], inv],
                                 whichtoinvert=[True, False], interpolator=interp)


def _ras_affine(image) -> np.ndarray:
    """Voxel -> RAS world matrix of an ANTs image (ANTs stores LPS origin and direction)."""
    m = np.eye(4)
    m[:3, :3] = np.asarray(image.direction) * np.asarray(image.spacing)[None, :]
    m[:3, 3] = image.origin
    return np.diag([-1, -1, 1, 1]) @ m


def _rescale(image):
    """Intensities to 0..1 by robust range (the metric's histogram then does not depend on scanner units)."""
    a = image.numpy()
    hi = np.percentile(a[a > 0], 99.5) if (a > 0).any() else 1.0
    return image.new_image_like(np.clip(a / hi, 0, 1.2).astype(np.float32))


def _split(reg: dict, affine_mat: str):
    """Forward (warp, affine) and inverse warp from a SyNOnly run started from ``affine_mat``."""
    fwd = reg["fwdtransforms"]
    warp = next(f for f in fwd if f.endswith("Warp.nii.gz") and "Inverse" not in f)
    inv = next(f for f in reg["invtransforms"] if f.endswith("InverseWarp.nii.gz"))
    mats = [f for f in fwd if f.endswith(".mat")]
    return {"warp": warp, "affine": mats[0] if mats else affine_mat}, inv


def cli(argv=None):
    ap = cliargs.parser("anat")
    args = ap.parse_args(argv)
    params = json.loads(args.params)
    unknown = set(params) - set(DEFAULTS)
    if unknown:
        ap.error(f"unknown anat parameters {sorted(unknown)}")
    # errors reach brainfuse.cli, which prints them as one line
    out = process(args.t1w, args.out_dir, args.subject, args.session, args.template_dir, args.resolution,
                  args.threads, params, log=lambda m: print(m, file=sys.stderr), strict=args.strict)
    print(json.dumps({"timings": out["timings"], "metrics": out["metrics"]}), file=sys.stderr)
    return 0
