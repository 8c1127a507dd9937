"""The embedded phantom dataset: a small multimodal cohort with known ground truth, generated offline.

Generative model (every number below is in the config's ``demo`` section or stored in ``truth/``):

* Each participant has a diagnosis (``classes``, balanced) and one latent *disease score* per effect,
  ``s ~ N(mu[class], 1)`` (see ``LATENT_MEANS``), scaled by the effect strength. Images, clinical scores and
  serum values are deterministic, monotone functions of these scores plus nuisance (anatomy, motion,
  noise), so the Bayes-optimal accuracy computed from the scores (with the realised missingness) is an
  upper bound on what any model can reach; it is written to ``truth/bayes.json``.
* Anatomy: the head model (nilearn's MNI152 2009a symmetric brain with CSF, skull and scalp shells added)
  seen through a known mapping ``z = y + u(y)``, ``y = A x`` from subject world coordinates ``x`` to template
  coordinates ``z`` (RAS mm). ``A`` is a random affine, ``u`` a smooth random warp plus the planted
  atrophy (a radial expansion of the template around both putamina: the subject's putamen is smaller).
  Stored as ANTs/ITK files: ``[warp, affine]`` as ``ants.apply_transforms`` takes them with the subject as
  the fixed image.
* T1w: head model intensity x smooth bias field x 1000, Rician noise.
* DWI: one diffusion tensor per voxel (white matter along a coarse direction field, isotropic GM/CSF,
  FA lowered in the left corticospinal tract by the ``fa`` score), S = S0 exp(-b g'Dg), per-volume rigid
  head motion ``H_k`` (volume 0 is the reference), Rician noise. A head rotation R turns the gradient
  the head sees into g' = R^T g, which is also the true corrected b-vector.
* BOLD: six networks of Gaussian nodes in grey matter with band-limited time courses; the coupling of
  the somatomotor and striatal networks follows the ``connectivity`` score; per-volume rigid motion.

Motion convention: ``H_k`` (4x4, world mm) maps reference-frame points to where they are in volume k,
``I_k(H_k p) = I_ref(p)``, rotation about the centre of the image's field of view.
All images are stored LAS (negative determinant), as dcm2niix writes axial scans, so FSL-convention
b-vectors are plain voxel-frame vectors.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from . import bayes
from .. import cliargs
from .. import headmodel
from .. import io as bf_io
from ..headmodel import HEAD_PAD_MM, HeadModel, Linear, _HEADS, affine_rows, apply_affine, head_model
from ..layout import TEMPLATE, bids_dataset_files, bids_path

# Class means of the latent disease scores (rows follow config demo.classes; 2-class configs use the first two).
# Each modality informs a different contrast, so no single one gets far and fusion is needed (issue 20): atrophy
# separates PD from the others, FA iRBD, connectivity both from controls; clinical and serum values only weakly.
# Bayes balanced accuracy of each modality alone / together (truth/bayes.json, 15% missing DWI and BOLD):
# aMRI 0.58, DTI 0.54, conn 0.55, clinical 0.55, serum 0.42; aMRI+DTI 0.78; all 0.88.
LATENT_MEANS = {  # control, PD, iRBD
    "atrophy": (0.0, 2.2, 0.0),        # aMRI: putamen volume loss
    "fa": (0.0, 0.0, 2.2),             # DTI: FA loss in the left corticospinal tract
    "connectivity": (0.0, 1.0, 2.0),   # fMRI: somatomotor-striatal decoupling
    "motor": (0.0, 1.0, 0.3),          # clinical: updrs_iii
    "rbd": (0.0, 0.2, 1.0),            # clinical: rbdsq
    "serum": (0.0, 0.7, 0.7),          # serum: nfl_pg_ml
}
EFFECT_OF = {"atrophy": "atrophy", "fa": "fa", "connectivity": "connectivity",
             "motor": "clinical", "rbd": "clinical", "serum": "serum"}

PUTAMEN = np.array([[-24.0, 2.0, 2.0], [24.0, 2.0, 2.0]])
ATROPHY_SIGMA = 10.0      # mm
ATROPHY_PER_SCORE = 0.06  # radial expansion of the subject->template map per unit score
NETWORKS = {  # node centres (template mm); Gaussian nodes of NODE_SIGMA in grey matter
    "visual": [(-10, -90, 2), (10, -90, 2)],
    "somatomotor": [(-38, -22, 56), (38, -22, 56)],
    "default": [(0, -56, 30), (0, 50, 2), (-46, -66, 32), (46, -66, 32)],
    "salience": [(-38, 16, 2), (38, 16, 2), (0, 22, 36)],
    "frontoparietal": [(-44, 30, 30), (44, 30, 30), (-40, -52, 46), (40, -52, 46)],
    "striatal": [(-24, 2, 2), (24, 2, 2), (-12, 12, 8), (12, 12, 8)],
}
NODE_SIGMA = 8.0
BOLD_AMPLITUDE = 0.03     # fractional signal change of a network node
B0_SIGNAL = {"wm": 1.0, "gm": 1.3, "csf": 2.2, "skull": 0.05, "scalp": 0.15}
BOLD_SIGNAL = {"wm": 0.8, "gm": 1.0, "csf": 1.3, "skull": 0.02, "scalp": 0.3}
PHANTOM_MANUFACTURER = "brainfuse phantom"


# --------------------------------------------------------------------------------------------- plan
@dataclass
class SubjectPlan:
    label: str
    index: int
    diagnosis: str
    scores: dict
    has_dwi: bool
    has_bold: bool
    age: float
    sex: str
    site: str
    dicom: bool = False


def plan(cfg: dict) -> list[SubjectPlan]:
    """Who is in the cohort, with labels, scores and availability. Cheap: Snakemake calls it at parse time."""
    rng = np.random.default_rng([cfg["seed"], 0])
    classes = cfg["classes"]
    n = cfg["n_subjects"]
    y = rng.permutation(np.arange(n) % len(classes))
    width = max(3, len(str(n)))
    subjects = []
    for i in range(n):
        scores = {k: float(rng.normal(cfg["effects"][EFFECT_OF[k]] * m[y[i]], 1.0)) for k, m in LATENT_MEANS.items()}
        subjects.append(SubjectPlan(
            label=f"{i + 1:0{width}d}", index=i, diagnosis=classes[y[i]], scores=scores,
            has_dwi=bool(rng.random() >= cfg["missing"]["dwi"]), has_bold=bool(rng.random() >= cfg["missing"]["bold"]),
            age=round(float(rng.normal(66, 7)), 1), sex=str(rng.choice(["F", "M"])), site=str(rng.choice(["A", "B"]))))
    complete = [s for s in subjects if s.has_dwi and s.has_bold]
    for s in complete[: cfg["dicom_subjects"]]:
        s.dicom = True
    return subjects


def latent_class_means(cfg: dict) -> tuple[list, np.ndarray]:
    """(score names, (K, S) class means with the configured effect strengths applied)."""
    names = list(LATENT_MEANS)
    return names, np.array([[cfg["effects"][EFFECT_OF[n]] * LATENT_MEANS[n][c] for n in names]
                            for c in range(len(cfg["classes"]))])


def bayes_accuracy(cfg: dict, n_samples: int = 200_000) -> dict:
    """Monte-Carlo accuracy of the Bayes classifier on the latent scores, under the configured missingness.

    The scores are what the images and tables encode (monotone, noise-free functions of them), so no
    model can beat this on data from this generator; anatomy, motion and noise only lower what is reachable.
    """
    rng = np.random.default_rng([cfg["seed"], 99])
    k = len(cfg["classes"])
    names, mu = latent_class_means(cfg)
    y = rng.integers(0, k, n_samples)
    s = mu[y] + rng.normal(size=(n_samples, len(names)))
    observed = np.ones_like(s, dtype=bool)
    for j, n in enumerate(names):
        if n in bayes.NEEDS:    # "has_dwi" -> the configured rate of subjects missing DWI
            observed[:, j] = rng.random(n_samples) >= cfg["missing"][bayes.NEEDS[n].removeprefix("has_")]
    correct = lambda obs: float((bayes.log_likelihood(s, obs, mu).argmax(1) == y).mean())  # noqa: E731
    grid_n = min(n_samples, 50_000)    # 63 subsets: 50,000 draws give +-0.005
    return {"bayes_accuracy": correct(observed), "bayes_accuracy_all_modalities": correct(np.ones_like(observed)),
            "chance": 1.0 / k, "n_samples": n_samples, "latent_means": {n: mu[:, j].tolist() for j, n in enumerate(names)},
            "bayes_grid": bayes.modality_grid(s[:grid_n], observed[:grid_n], y[:grid_n], mu, names)}


def cohort_bayes(cfg: dict, subjects: list) -> dict:
    """The Bayes rule applied to the realised cohort: its accuracy and balanced accuracy on these subjects.

    The generator's Bayes accuracy is an expectation over cohorts; on n = 36 subjects the rule itself scatters
    by about 6 points (``benchmarks/bench_bayes_gap.py``), so models are judged against this realised value too.
    """
    classes = cfg["classes"]
    y = np.array([classes.index(s.diagnosis) for s in subjects])
    names, mu = latent_class_means(cfg)
    scores, observed = bayes.subject_arrays(subjects, names)
    pred = bayes.log_likelihood(scores, observed, mu).argmax(1)
    return {"cohort_bayes_accuracy": float((pred == y).mean()),
            "cohort_bayes_balanced_accuracy": bayes.balanced_accuracy(y, pred),
            "cohort_bayes_grid": bayes.modality_grid(scores, observed, y, mu, names),
            "cohort_n": len(subjects)}


# --------------------------------------------------------------------------------------- head model
# The head model itself (HeadModel, head_model) is brainfuse.headmodel's: real-data skull stripping uses it too.
_FILTERS: dict = {}     # (samples, TR) -> BOLD band-pass operator


def head_resolution(cfg: dict) -> int:
    return 2 if cfg["t1_voxel_mm"] >= 2 else 1


def putamen_roi(img, radius_mm: float = 8.0) -> np.ndarray:
    """Voxels of ``img``'s grid within ``radius_mm`` of the phantom's putamen centres (where the atrophy is planted)."""
    pts = grid_points(img.shape, img.affine)
    d = np.min([np.linalg.norm(pts - c, axis=1) for c in PUTAMEN], axis=0)
    return (d < radius_mm).reshape(img.shape)


def demo_paths(root) -> dict:
    """Where the phantom writes below ``root`` (the workflow's ``<output_dir>/demo``), by short name: its BIDS
    dataset, ground truth (truth/bayes.json, the generator cache), the staging folder of DWI and BOLD, the DICOM
    export and the converted copy of it (the convert stage's check). The phantom's counterpart of
    brainfuse.layout, used by the generator and the demo and convert rules alike."""
    root = str(root)
    return {"bids": f"{root}/bids", "truth": f"{root}/truth", "staging": f"{root}/staging",
            "dicom": f"{root}/dicom", "converted": f"{root}/converted",
            "bayes": f"{root}/truth/bayes.json", "cache": f"{root}/truth/generator_cache.npz"}


def dicom_dir(root, sub: str) -> str:
    """``<root>/dicom/<sub>``: one subject's DICOM export (a folder per subject, as a scanner would give)."""
    return f"{demo_paths(root)['dicom']}/{sub}"


def identity_path(root, sub: str) -> str:
    """The FAKE patient fields written into a subject's DICOM (the convert check: none may reach an output)."""
    return f"{demo_paths(root)['truth']}/sub-{sub}/sub-{sub}_dicom_identity.json"


def generator_cache_path(root) -> Path:
    return Path(demo_paths(root)["cache"])


def _cache_key(cfg: dict) -> str:
    """What a generator cache must match: grids, BOLD timing, and the source of this module and of the head model's
    (any edit invalidates it)."""
    source = Path(__file__).read_bytes() + Path(headmodel.__file__).read_bytes()
    return json.dumps([head_resolution(cfg), HEAD_PAD_MM, cfg["n_bold_volumes"], cfg["repetition_time"],
                       hashlib.sha1(source).hexdigest()])


def write_generator_cache(cfg: dict, root):
    """The fixed ingredients of every subject (head model, BOLD band-pass operator) in one .npz, so that
    subject jobs neither rebuild them (seconds) nor import nilearn or scipy.signal. Uncompressed: a read."""
    with bf_io.atomic_path(generator_cache_path(root), keep_extension=True) as tmp:     # np.savez wants .npz
        np.savez(tmp, key=np.array(_cache_key(cfg)), bold_filter=bold_filter(cfg),
                 **head_model(head_resolution(cfg)).arrays())


def load_generator_cache(cfg: dict, root) -> bool:
    """Use the cache :func:`write_generator_cache` wrote, if it is there and was made for ``cfg`` and this code."""
    try:
        with np.load(generator_cache_path(root)) as f:
            if str(f["key"]) != _cache_key(cfg):
                return False
            _HEADS.setdefault((head_resolution(cfg), HEAD_PAD_MM), HeadModel.from_arrays(f))
            _FILTERS.setdefault((cfg["n_bold_volumes"] + 100, float(cfg["repetition_time"])), f["bold_filter"])
            return True
    except (OSError, KeyError, ValueError):
        return False


# ------------------------------------------------------------------------------------------ geometry
# apply_affine, affine_rows and Linear: brainfuse.headmodel's (imported above).
def rotation(rx: float, ry: float, rz: float) -> np.ndarray:
    """R = Rz @ Ry @ Rx (radians, right-handed about RAS axes)."""
    cx, sx, cy, sy, cz, sz = np.cos(rx), np.sin(rx), np.cos(ry), np.sin(ry), np.cos(rz), np.sin(rz)
    Rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    Ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    Rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return Rz @ Ry @ Rx


def rigid(params, centre) -> np.ndarray:
    """4x4 from (trans_x, trans_y, trans_z, rot_x, rot_y, rot_z): rotate about ``centre``, then translate."""
    m = np.eye(4)
    m[:3, :3] = rotation(*params[3:])
    m[:3, 3] = np.asarray(centre) - m[:3, :3] @ np.asarray(centre) + np.asarray(params[:3])
    return m


def grid_affine(lo, hi, voxel: float):
    """LAS grid (x axis flipped, as dcm2niix writes axial scans) covering the RAS box [lo, hi]."""
    shape = np.ceil((np.asarray(hi) - np.asarray(lo)) / voxel).astype(int) + 1
    affine = np.diag([-voxel, voxel, voxel, 1.0])
    affine[:3, 3] = [lo[0] + (shape[0] - 1) * voxel, lo[1], lo[2]]
    return tuple(int(s) for s in shape), affine


def grid_points(shape, affine) -> np.ndarray:
    """World points (N, 3) of every voxel, C order (last axis fastest)."""
    return affine_rows(affine, np.indices(shape, dtype=np.float32).reshape(3, -1)).T


def grid_rows_f(shape, affine) -> np.ndarray:
    """World points of every voxel as rows (3, N), in Fortran order (first axis fastest), as NIfTI stores voxels."""
    return affine_rows(affine, np.indices(shape[::-1], dtype=np.float32).reshape(3, -1)[::-1])


def as_volume(flat: np.ndarray, shape) -> np.ndarray:
    """Per-voxel values in Fortran voxel order, (N,) or (K, N), as an (X, Y, Z[, K]) Fortran array (no copy)."""
    return flat.reshape(*flat.shape[:-1], *shape[::-1]).T


def fov_centre(shape, affine) -> np.ndarray:
    return apply_affine(affine, (np.asarray(shape) - 1) / 2.0)


# ------------------------------------------------------------------------------------------ anatomy
class Anatomy:
    """One subject's mapping from subject world coordinates to template coordinates."""

    WARP_SPACING = 4.0  # mm; the warp is smooth, a coarse grid stores it exactly enough for ANTs

    def __init__(self, cfg: dict, subject: SubjectPlan, head: HeadModel):
        rng = np.random.default_rng([cfg["seed"], subject.index, 1])
        self.head = head
        A = np.eye(4)
        A[:3, :3] = rotation(*np.deg2rad(rng.uniform(-6, 6, 3))) @ np.diag(rng.uniform(0.94, 1.06, 3))
        A[:3, 3] = rng.uniform(-6, 6, 3)
        self.A = A
        # Smooth random warp: a few plane waves (wavelength 80-140 mm, amplitude ~1 mm each).
        self.waves = [(rng.normal(size=3), rng.uniform(80, 140), rng.uniform(0, 2 * np.pi), rng.normal(0, 1.0, 3))
                      for _ in range(4)]
        self.atrophy = ATROPHY_PER_SCORE * subject.scores["atrophy"]
        lo, hi = self.head.box
        self.warp_shape, warp_affine = grid_affine(lo - 8, hi + 8, self.WARP_SPACING)
        self.warp_affine = warp_affine
        self.warp = self.displacement(grid_points(self.warp_shape, warp_affine)).reshape(*self.warp_shape, 3)

    def _wavevectors(self):
        """(k, phase, amplitude) of each plane wave: u += amplitude * sin(k . y + phase)."""
        for direction, wavelength, phase, amplitude in self.waves:
            yield direction / np.linalg.norm(direction) * 2 * np.pi / wavelength, phase, amplitude

    def displacement(self, y: np.ndarray) -> np.ndarray:
        """u(y): random warp plus the atrophy expansion about each putamen (template mm)."""
        y = np.asarray(y, dtype=np.float64)
        u = np.zeros_like(y)
        for k, phase, amplitude in self._wavevectors():
            u += np.sin(_dot3(y, k) + phase)[:, None] * amplitude
        for c in PUTAMEN:
            d = y - c
            u += self.atrophy * d * np.exp(-_dot3(d, d) / (2 * ATROPHY_SIGMA ** 2))[:, None]
        return u

    def jacobian(self, y: np.ndarray) -> np.ndarray:
        """(N, 3, 3) d(y + u(y))/dy, analytic."""
        return np.stack([np.stack(row, -1) for row in self.jacobian_elements(y)], -2)

    def jacobian_elements(self, y: np.ndarray, dtype=np.float64) -> list:
        """d(y + u(y))_i/dy_j as a 3 x 3 list of (N,) arrays (no (N, 3, 3) temporaries)."""
        y = np.asarray(y, dtype=dtype)
        J = [[np.full(len(y), float(i == j), dtype=dtype) for j in range(3)] for i in range(3)]
        for k, phase, amplitude in self._wavevectors():
            c = np.cos(_dot3(y, k.astype(dtype)) + dtype(phase))
            for i in range(3):
                for j in range(3):
                    J[i][j] += dtype(amplitude[i] * k[j]) * c
        for c in PUTAMEN:
            d = [y[:, a] - dtype(c[a]) for a in range(3)]
            e = dtype(self.atrophy) * np.exp((d[0] ** 2 + d[1] ** 2 + d[2] ** 2) * dtype(-0.5 / ATROPHY_SIGMA ** 2))
            for i in range(3):
                for j in range(3):
                    J[i][j] += e * (dtype(i == j) - d[i] * d[j] * dtype(1 / ATROPHY_SIGMA ** 2))
        return J

    def to_template(self, x: np.ndarray) -> np.ndarray:
        """z = y + u(y), y = A x; u interpolated from the stored grid exactly as ANTs does. (N, 3) points."""
        return self.to_template_rows(np.asarray(x).T).T

    def to_template_rows(self, x: np.ndarray) -> np.ndarray:
        """:meth:`to_template` of points given as rows (3, N)."""
        y = affine_rows(self.A, x)
        y += Linear(self.warp_shape, affine_rows(np.linalg.inv(self.warp_affine), y), clip=True)(self.warp).T
        return y

    def subject_box(self, margin: float = 6.0):
        """RAS bounding box of the head in subject coordinates."""
        lo, hi = self.head.box
        corners = np.array([[a, b, c] for a in (lo[0], hi[0]) for b in (lo[1], hi[1]) for c in (lo[2], hi[2])])
        x = apply_affine(np.linalg.inv(self.A), corners)
        return x.min(0) - margin, x.max(0) + margin

    def save(self, folder: Path, label: str):
        """ANTs/ITK transforms (subject T1w -> template), a readable JSON, and the true log-Jacobian map."""
        F = np.diag([-1.0, -1.0, 1.0])   # RAS <-> LPS
        stem = f"sub-{label}_from-T1w_to-{TEMPLATE}"
        write_itk_affine(F @ self.A[:3, :3] @ F, F @ self.A[:3, 3], folder / f"{stem}_desc-affine_xfm.mat")
        field = (self.warp * np.diag(F)).astype(np.float32)[:, :, :, None, :]   # ITK stores LPS components
        img = nib.Nifti1Image(field, self.warp_affine)
        img.header.set_intent("vector")
        bf_io.save_nifti(img, folder / f"{stem}_desc-warp_xfm.nii.gz", fast_gzip=True)
        bf_io.save_json({"affine_ras": self.A.tolist(), "atrophy_expansion": self.atrophy,
                         "ants_transformlist": [f"{stem}_desc-affine_xfm.mat", f"{stem}_desc-warp_xfm.nii.gz"],
                         "ants_whichtoinvert": [False, False],
                         "sense": "z = y + u(y), y = A x: subject T1w world points x (fixed) to template points z "
                                  "(moving); ants.apply_transforms(fixed=T1w, moving=template, transformlist, "
                                  "whichtoinvert) reproduces the noise-free T1w"},
                        folder / f"{stem}_xfm.json")


def write_itk_affine(matrix: np.ndarray, translation: np.ndarray, path):
    """An ITK ``AffineTransform_double_3_3`` .mat (MATLAB v4, as ``ants.write_transform`` writes it;
    centre 0), written directly: importing ANTs costs seconds per job."""
    def variable(name: str, values: np.ndarray) -> bytes:
        values = np.asarray(values, dtype="<f8").ravel()
        # type 0000 = little-endian, double, full matrix; rows, cols, imaginary flag, name length (+NUL)
        return struct.pack("<5i", 0, len(values), 1, 0, len(name) + 1) + name.encode() + b"\0" + values.tobytes()

    data = variable("AffineTransform_double_3_3", np.r_[np.asarray(matrix).ravel(), translation]) + variable("fixed", np.zeros(3))
    bf_io.save_bytes(data, path)


def _dot3(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise dot product of (N, 3) points with a vector (3,) or with (N, 3), without a matmul."""
    b = np.asarray(b)
    if b.ndim == 1:
        return a[:, 0] * b[0] + a[:, 1] * b[1] + a[:, 2] * b[2]
    return a[:, 0] * b[:, 0] + a[:, 1] * b[:, 1] + a[:, 2] * b[:, 2]


def log_jacobian_truth(anatomy: Anatomy, shape, affine) -> np.ndarray:
    """log det of d(subject)/d(template) of the nonlinear part, on a template grid (atrophy < 0)."""
    # float32: |J - I| < 0.3, so log det is good to ~1e-6, and the grid is large (every template voxel)
    (a, b, c), (d, e, f), (g, h, i) = anatomy.jacobian_elements(grid_points(shape, affine), np.float32)
    det = a * (e * i - f * h) - b * (d * i - f * g) + c * (d * h - e * g)
    return (-np.log(np.abs(det))).astype(np.float32).reshape(shape)


# ------------------------------------------------------------------------------------------- images
def standard_normal_like(a: np.ndarray, rng) -> np.ndarray:
    """float32 N(0, 1) noise shaped and laid out (C or Fortran) like ``a``."""
    order = "F" if a.flags.f_contiguous and not a.flags.c_contiguous else "C"
    return rng.standard_normal(a.size, dtype=np.float32).reshape(a.shape, order=order)


def rician(signal: np.ndarray, sigma: float, rng) -> np.ndarray:
    real = signal + np.float32(sigma) * standard_normal_like(signal, rng)
    return np.hypot(real, np.float32(sigma) * standard_normal_like(signal, rng), out=real)


def bias_field(points: np.ndarray, centre: np.ndarray, rng) -> np.ndarray:
    p = (points - centre) / 100.0
    terms = [p[:, 0], p[:, 1], p[:, 2], p[:, 0] * p[:, 1], p[:, 1] * p[:, 2], p[:, 0] ** 2, p[:, 2] ** 2]
    return np.exp(sum(rng.normal(0, 0.12) * t for t in terms))


def motion_params(n: int, scale_mm: float, rng) -> np.ndarray:
    """Slow drift plus a few jumps; volume 0 is the reference (zero motion). Rotations ~ scale at 50 mm."""
    steps = rng.normal(0, 0.25, (n, 6))
    steps[rng.random(n) < 0.05] *= 6
    steps[0] = 0
    p = np.cumsum(steps, 0)
    p = p / max(np.abs(p).max(), 1e-9) * scale_mm
    p[:, 3:] /= 50.0
    return p


def save_nifti(data, affine, path, dtype=np.int16, **header):
    """Atomic write (brainfuse.io) of a phantom image, rounded first when ``dtype`` is an integer type;
    deflated with the run-length strategy (``fast_gzip``: compression is the largest cost of a phantom
    subject). Fortran-ordered data are written without a transposing copy (the order NIfTI stores voxels in)."""
    img = nib.Nifti1Image(np.asarray(np.round(data) if np.issubdtype(dtype, np.integer) else data).astype(dtype), affine)
    bf_io.save_nifti(img, path, units=("mm", "sec"), zooms=header.get("zooms"), fast_gzip=True)


def save_tsv(columns, rows: np.ndarray, path):
    """A table of floats as pandas writes it (shortest round-trip repr), without importing pandas."""
    lines = ["\t".join(columns)] + ["\t".join(repr(float(v)) for v in row) for row in np.asarray(rows)]
    bf_io.save_text("\n".join(lines) + "\n", path)


def tissue_at(head: HeadModel, z: np.ndarray) -> dict:
    return head.tissues_at(z)


def _direction_field(z: np.ndarray) -> np.ndarray:
    """Coarse white-matter orientation (template frame): callosal LR, corticospinal SI, elsewhere AP."""
    x, y, zz = z[:, 0], z[:, 1], z[:, 2]
    v = np.tile([0.0, 1.0, 0.0], (len(z), 1))
    cst = (np.abs(x) > 14) & (np.abs(x) < 36) & (y > -34) & (y < 8) & (zz > -40)
    cc = (np.abs(x) < 16) & (y > -36) & (y < 34) & (zz > 6) & (zz < 30)
    v[cst] = [0.0, 0.0, 1.0]
    v[cc] = [1.0, 0.0, 0.0]
    return v


def tract_mask(z: np.ndarray) -> np.ndarray:
    """The left corticospinal tract region whose FA carries the ``fa`` score."""
    x, y, zz = z[:, 0], z[:, 1], z[:, 2]
    return (x < -14) & (x > -36) & (y > -34) & (y < 8) & (zz > -20) & (zz < 50) & ~((np.abs(x) < 16) & (zz > 6) & (zz < 30))


ISO_DIFFUSIVITY = {"gm": 0.8e-3, "csf": 3.0e-3, "skull": 1.0e-3, "scalp": 1.0e-3}


def tensors_at(anatomy: Anatomy, x: np.ndarray, fa_score: float):
    """S0 and diffusion tensors (subject RAS frame, mm^2/s) at subject points ``x``."""
    z = anatomy.to_template(x)
    p = tissue_at(anatomy.head, z)
    delta = 0.12e-3 * fa_score * tract_mask(z)
    l1, l2 = 1.7e-3 - delta, 0.3e-3 + delta / 2
    # Template directions (LR, AP, SI) in the subject frame, unit length; each point takes one of them.
    axes = np.linalg.inv(anatomy.A[:3, :3]).T
    axes /= np.linalg.norm(axes, axis=1, keepdims=True)
    v = np.take(axes, np.argmax(_direction_field(z), axis=1), axis=0)
    w = {k: p[k].astype(np.float64) * B0_SIGNAL[k] for k in p}
    s0 = sum(w.values())
    # Signal-weighted mix: white matter l2 I + (l1 - l2) v v', the other tissues isotropic.
    isotropic = w["wm"] * l2 + sum(w[k] * ISO_DIFFUSIVITY[k] for k in ISO_DIFFUSIVITY)
    D = (w["wm"] * (l1 - l2))[:, None, None] * v[:, :, None] * v[:, None, :]
    D += isotropic[:, None, None] * np.eye(3)
    D /= np.maximum(s0, 1e-6)[:, None, None]
    D[s0 < 1e-6] = 0
    return s0, D


def gradient_table(n_b0: int, n_dirs: int, bvalue: float, rng):
    """b0s first and again mid-way; directions spread on the sphere (Fibonacci), random sign flips."""
    i = np.arange(n_dirs) + 0.5
    phi = np.arccos(1 - i / n_dirs)            # hemisphere
    theta = np.pi * (1 + 5 ** 0.5) * i
    g = np.stack([np.cos(theta) * np.sin(phi), np.sin(theta) * np.sin(phi), np.cos(phi)], 1)
    g *= rng.choice([-1, 1], (n_dirs, 1))
    bvecs, bvals = list(g), [bvalue] * n_dirs
    for k in range(n_b0):
        at = 0 if k == 0 else (k * (n_dirs + k)) // n_b0
        bvecs.insert(at, np.zeros(3))
        bvals.insert(at, 0.0)
    return np.array(bvals), np.array(bvecs)


def network_weights(anatomy: Anatomy, z: np.ndarray, gm: np.ndarray | None = None) -> np.ndarray:
    """(N, networks) node weights in grey matter at template points z."""
    if gm is None:
        gm = anatomy.head.sample(anatomy.head.tissues["gm"], z)
    out = np.zeros((len(z), len(NETWORKS)), dtype=np.float32)
    for j, nodes in enumerate(NETWORKS.values()):
        for c in nodes:
            d = np.asarray(z, dtype=np.float32) - np.asarray(c, dtype=np.float32)
            out[:, j] += np.exp(-_dot3(d, d) / np.float32(2 * NODE_SIGMA ** 2))
    return np.clip(out, 0, 1) * gm[:, None]


def bold_filter(cfg: dict) -> np.ndarray:
    """(M, M) matrix F with F @ x = zero-phase Butterworth band-pass (0.01-0.1 Hz) of x, M = volumes + 100.

    ``sosfiltfilt`` is linear in its input (odd padding, initial state scaled by the first sample), so
    filtering the identity gives its matrix: exactly the same filter, without scipy.signal in subject jobs.
    """
    m, tr = cfg["n_bold_volumes"] + 100, float(cfg["repetition_time"])
    if (m, tr) not in _FILTERS:
        from scipy.signal import butter, sosfiltfilt

        sos = butter(2, [0.01, min(0.1, 0.45 / tr)], btype="band", fs=1.0 / tr, output="sos")
        _FILTERS[(m, tr)] = sosfiltfilt(sos, np.eye(m), axis=0)
    return _FILTERS[(m, tr)]


def network_timecourses(cfg: dict, subject: SubjectPlan, rng) -> tuple[np.ndarray, float]:
    """Unit-variance band-limited (0.01-0.1 Hz) courses; striatal = c * somatomotor + sqrt(1-c^2) * own."""
    n = cfg["n_bold_volumes"]
    raw = (rng.normal(size=(len(NETWORKS), n + 100)) @ bold_filter(cfg).T)[:, 50:-50]
    raw = (raw - raw.mean(1, keepdims=True)) / raw.std(1, keepdims=True)
    names = list(NETWORKS)
    coupling = float(np.tanh(0.9 - 0.45 * subject.scores["connectivity"]))    # monotone in the score
    sm, st = names.index("somatomotor"), names.index("striatal")
    own = raw[st] - (raw[st] @ raw[sm]) / n * raw[sm]           # orthogonalise so the coupling is exact
    own /= own.std()
    raw[st] = coupling * raw[sm] + np.sqrt(1 - coupling ** 2) * own
    return raw.T, coupling                                        # (time, networks)


# ---------------------------------------------------------------------------------- per-modality writers
class SubjectPhantom:
    """Everything needed to (re)generate one subject's images; tests use it to check stored truth.

    Images are computed voxel by voxel in Fortran order (as NIfTI stores them): volumes come back as
    Fortran-ordered (X, Y, Z[, T]) arrays.
    """

    def __init__(self, cfg: dict, subject: SubjectPlan, head: HeadModel | None = None):
        self.cfg, self.subject = cfg, subject
        self.head = head or head_model(head_resolution(cfg))
        self.anatomy = Anatomy(cfg, subject, self.head)
        lo, hi = self.anatomy.subject_box()
        self.box = (lo, hi)

    def rng(self, what: int):
        return np.random.default_rng([self.cfg["seed"], self.subject.index, what])

    def template_points(self, shape, affine):
        """Subject world points (N, 3) of a grid (Fortran voxel order) and where they are in the template."""
        pts = grid_rows_f(shape, affine)
        return pts.T, self.anatomy.to_template_rows(pts).T

    # T1w -----------------------------------------------------------------------------------------
    def t1w(self):
        shape, affine = grid_affine(*self.box, self.cfg["t1_voxel_mm"])
        pts, z = self.template_points(shape, affine)
        at = Linear(self.head.t1.shape, affine_rows(np.linalg.inv(self.head.affine), z.T))
        clean = at(self.head.t1)
        brain = at(self.head.brain.astype(np.float32)) > 0.5
        bias = bias_field(pts, fov_centre(shape, affine), self.rng(2)).astype(np.float32)
        noisy = rician(clean * bias * np.float32(1000.0), self.cfg["noise"]["t1"] * 1000.0, self.rng(3))
        r = lambda a: as_volume(a, shape)
        return r(noisy), affine, {"clean": r(clean * np.float32(1000.0)), "bias": r(bias), "brain": r(brain)}

    # DWI -----------------------------------------------------------------------------------------
    def dwi_geometry(self):
        shape, affine = grid_affine(*self.box, self.cfg["dwi_voxel_mm"])
        bvals, bvecs = gradient_table(self.cfg["n_b0"], self.cfg["n_directions"], self.cfg["bvalue"], self.rng(4))
        motion = motion_params(len(bvals), self.cfg["motion_mm"]["dwi"], self.rng(5))
        centre = fov_centre(shape, affine)
        return shape, affine, bvals, bvecs, motion, [rigid(p, centre) for p in motion]

    def dwi_motion_free(self, bvals, bvecs, H, shape, affine):
        """Noise-free series in the head frame: volume k as the head sees gradient g' = R_k^T g_k."""
        s0, D = tensors_at(self.anatomy, grid_rows_f(shape, affine).T, self.subject.scores["fa"])
        g = np.array([h[:3, :3].T @ g for h, g in zip(H, bvecs)])
        # g'Dg for every volume at once: (K, 6) quadratic terms x (6, N) tensor elements
        quad = np.stack([g[:, 0] ** 2, g[:, 1] ** 2, g[:, 2] ** 2, 2 * g[:, 0] * g[:, 1], 2 * g[:, 0] * g[:, 2],
                         2 * g[:, 1] * g[:, 2]], 1)
        elements = np.stack([D[:, 0, 0], D[:, 1, 1], D[:, 2, 2], D[:, 0, 1], D[:, 0, 2], D[:, 1, 2]])
        series = quad.astype(np.float32) @ elements.astype(np.float32)
        series *= -np.asarray(bvals, dtype=np.float32)[:, None]
        np.exp(series, out=series)
        series *= (1000.0 * s0).astype(np.float32)
        return as_volume(series, shape), as_volume(s0, shape), D.reshape(*shape[::-1], 3, 3).transpose(2, 1, 0, 3, 4)

    def dwi(self):
        shape, affine, bvals, bvecs, motion, H = self.dwi_geometry()
        clean, s0, D = self.dwi_motion_free(bvals, bvecs, H, shape, affine)
        moved = move_series(clean, H, affine)
        data = rician(moved, self.cfg["noise"]["dwi"] * 1000.0, self.rng(6))
        return data, affine, bvals, bvecs, motion, H, (s0, D)

    # BOLD ----------------------------------------------------------------------------------------
    def bold_geometry(self):
        shape, affine = grid_affine(*self.box, self.cfg["bold_voxel_mm"])
        motion = motion_params(self.cfg["n_bold_volumes"], self.cfg["motion_mm"]["bold"], self.rng(7))
        centre = fov_centre(shape, affine)
        return shape, affine, motion, [rigid(p, centre) for p in motion]

    def bold_motion_free(self, shape, affine, tcs, drift):
        """Noise-free series in the head frame: tissue baseline x (1 + drift + network signal)."""
        _, z = self.template_points(shape, affine)
        p = tissue_at(self.head, z)
        base = sum(p[k] * np.float32(BOLD_SIGNAL[k]) for k in p)
        weights = network_weights(self.anatomy, z, gm=p["gm"])
        series = np.asarray(tcs, dtype=np.float32) @ (np.float32(BOLD_AMPLITUDE) * weights.T)   # (T, N)
        series += (1 + np.asarray(drift, dtype=np.float32))[:, None]
        series *= np.float32(1000.0) * base
        return as_volume(series, shape)

    def bold(self):
        shape, affine, motion, H = self.bold_geometry()
        tcs, coupling = network_timecourses(self.cfg, self.subject, self.rng(8))
        drift = np.linspace(-0.01, 0.01, len(H))
        data = move_series(self.bold_motion_free(shape, affine, tcs, drift), H, affine)
        data += np.float32(self.cfg["noise"]["bold"] * 1000.0) * standard_normal_like(data, self.rng(9))
        return data, affine, motion, H, tcs, coupling


def move_series(series: np.ndarray, H, affine) -> np.ndarray:
    """Volume k seen after the head moved by H_k: out_k(x) = series_k(H_k^-1 x), linear interpolation.

    Only voxels that motion can bring within reach of a non-zero voxel are interpolated (the rest stay 0,
    as they would: all their neighbours are 0); the result is a Fortran-ordered (X, Y, Z, K) array.
    """
    shape = series.shape[:3]
    vox = [np.linalg.inv(affine) @ np.linalg.inv(h) @ affine for h in H]
    corners = np.array(np.meshgrid(*[(0, s - 1) for s in shape], indexing="ij")).reshape(3, -1).astype(float)
    reach = max(np.abs(affine_rows(v, corners) - corners).max() for v in vox)   # an affine map moves corners most
    from scipy import ndimage

    r = int(np.ceil(reach)) + 1      # dilation by a (2r+1)^3 cube (maximum_filter is separable)
    support = ndimage.maximum_filter(np.any(series != 0, axis=-1), size=2 * r + 1, mode="constant", cval=False)
    at = np.flatnonzero(support.reshape(-1, order="F"))
    ijk = np.array(np.unravel_index(at, shape, order="F"), dtype=np.float32)
    out = np.zeros((len(H), int(np.prod(shape))), dtype=np.float32)       # (K, N): Fortran (X, Y, Z, K) memory
    for k, v in enumerate(vox):
        out[k, at] = Linear(shape, affine_rows(v, ijk, dtype=np.float32))(series[..., k])
    return as_volume(out, shape)


MOTION_COLUMNS = ["trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z"]


def _sidecar(kind: str, cfg: dict, n_slices: int = 0) -> dict:
    common = {"Manufacturer": PHANTOM_MANUFACTURER, "MagneticFieldStrength": 3.0}
    if kind == "T1w":
        return {**common, "RepetitionTime": 2.3, "EchoTime": 0.00296, "InversionTime": 0.9, "FlipAngle": 9}
    if kind == "dwi":
        return {**common, "RepetitionTime": 8.0, "EchoTime": 0.08, "PhaseEncodingDirection": "j-", "TotalReadoutTime": 0.05}
    tr = cfg["repetition_time"]
    order = list(range(0, n_slices, 2)) + list(range(1, n_slices, 2))      # interleaved, along k
    slice_timing = [round(tr * order.index(i) / n_slices, 4) for i in range(n_slices)]
    return {**common, "RepetitionTime": tr, "EchoTime": 0.03, "TaskName": "rest", "PhaseEncodingDirection": "j-",
            "TotalReadoutTime": 0.04, "SliceTiming": slice_timing}


def write_subject(cfg: dict, subject: SubjectPlan, root: Path, modalities=("T1w", "dwi", "bold"),
                  head: HeadModel | None = None, stage=None):
    """Write one subject's BIDS images and ground truth under ``root/bids`` and ``root/truth``.

    All modalities in one call share the head model, the subject's anatomy and the imports. The head
    model comes from ``head``, else this process's, else the cache :func:`write_dataset` wrote. With
    ``stage`` (a folder), the DWI and BOLD images go there instead of ``root/bids``, under the same
    BIDS names (the workflow links them into place: it cannot declare outputs a subject may lack).
    """
    bids, truth = Path(demo_paths(root)["bids"]), Path(demo_paths(root)["truth"])
    if head is None:
        load_generator_cache(cfg, root)
        head = head_model(head_resolution(cfg))
    ph = SubjectPhantom(cfg, subject, head)
    sub = subject.label
    tdir = truth / f"sub-{sub}"
    for d in ("anat", "dwi", "func"):
        (tdir / d).mkdir(parents=True, exist_ok=True)
    if "T1w" in modalities:
        out = Path(bids_path(bids, sub, "anat", "T1w"))
        out.parent.mkdir(parents=True, exist_ok=True)
        data, affine, extra = ph.t1w()
        save_nifti(extra["clean"], affine, tdir / "anat" / f"sub-{sub}_desc-noisefree_T1w.nii.gz", np.float32)
        save_nifti(extra["bias"], affine, tdir / "anat" / f"sub-{sub}_desc-bias_T1w.nii.gz", np.float32)
        save_nifti(extra["brain"], affine, tdir / "anat" / f"sub-{sub}_desc-brain_mask.nii.gz", np.uint8)
        ph.anatomy.save(tdir / "anat", sub)
        logjac = log_jacobian_truth(ph.anatomy, head.t1.shape, head.affine)
        save_nifti(logjac, head.affine, tdir / "anat" / f"sub-{sub}_space-{TEMPLATE}_desc-truth_logjacobian.nii.gz", np.float32)
        bf_io.save_json(_sidecar("T1w", cfg), out.with_name(out.name.replace(".nii.gz", ".json")))
        save_nifti(data, affine, out)
    if "dwi" in modalities and subject.has_dwi:
        out = Path(bids_path(stage or bids, sub, "dwi", "dwi", dir="AP"))
        out.parent.mkdir(parents=True, exist_ok=True)
        data, affine, bvals, bvecs, motion, H, (s0, D) = ph.dwi()
        flip = np.sign(np.diag(affine[:3, :3]))    # LAS: flip x to get voxel-frame vectors
        voxel_frame = np.diag(flip)
        pairs = [(0, 0), (0, 1), (1, 1), (0, 2), (1, 2), (2, 2)]
        lower = np.stack([D[..., i, j] * (flip[i] * flip[j]) for i, j in pairs], -1)
        save_nifti(lower, affine, tdir / "dwi" / f"sub-{sub}_dir-AP_desc-truth_tensor.nii.gz", np.float32)
        save_nifti(s0 * 1000.0, affine, tdir / "dwi" / f"sub-{sub}_dir-AP_desc-truth_S0.nii.gz", np.float32)
        save_tsv(MOTION_COLUMNS, motion, tdir / "dwi" / f"sub-{sub}_dir-AP_desc-truth_motion.tsv")
        np.save(tdir / "dwi" / f"sub-{sub}_dir-AP_desc-truth_xfm.npy", np.array(H))
        true_bvecs = np.array([h[:3, :3].T @ g for h, g in zip(H, bvecs)]) @ voxel_frame
        np.savetxt(tdir / "dwi" / f"sub-{sub}_dir-AP_desc-truthrotated_dwi.bvec", true_bvecs.T, fmt="%.6f")
        np.savetxt(str(out).replace(".nii.gz", ".bval"), bvals[None], fmt="%d")
        np.savetxt(str(out).replace(".nii.gz", ".bvec"), (bvecs @ voxel_frame).T, fmt="%.6f")
        bf_io.save_json(_sidecar("dwi", cfg), str(out).replace(".nii.gz", ".json"))
        save_nifti(data, affine, out)
    if "bold" in modalities and subject.has_bold:
        out = Path(bids_path(stage or bids, sub, "func", "bold", task="rest"))
        out.parent.mkdir(parents=True, exist_ok=True)
        data, affine, motion, H, tcs, coupling = ph.bold()
        save_tsv(MOTION_COLUMNS, motion, tdir / "func" / f"sub-{sub}_task-rest_desc-truth_motion.tsv")
        np.save(tdir / "func" / f"sub-{sub}_task-rest_desc-truth_xfm.npy", np.array(H))
        save_tsv(list(NETWORKS), tcs, tdir / "func" / f"sub-{sub}_task-rest_desc-truth_timeseries.tsv")
        bf_io.save_json({"coupling_somatomotor_striatal": coupling, "networks": NETWORKS, "node_sigma_mm": NODE_SIGMA,
                         "amplitude": BOLD_AMPLITUDE}, tdir / "func" / f"sub-{sub}_task-rest_desc-truth_networks.json")
        bf_io.save_json(_sidecar("bold", cfg, n_slices=data.shape[2]), str(out).replace(".nii.gz", ".json"))
        save_nifti(data, affine, out, zooms=(*[cfg["bold_voxel_mm"]] * 3, cfg["repetition_time"]))
    bf_io.save_json({"participant_id": f"sub-{sub}", "diagnosis": subject.diagnosis, "scores": subject.scores,
                     "has_dwi": subject.has_dwi, "has_bold": subject.has_bold}, tdir / f"sub-{sub}_truth.json")


def clinical_table(cfg: dict, subjects: list[SubjectPlan]):
    """participants.tsv (a DataFrame): diagnosis, demographics, clinical scores and serum values from the latent scores."""
    import pandas as pd   # here only: the subject jobs need no pandas

    softplus = lambda v: np.log1p(np.exp(v))
    rows = []
    for s in subjects:
        sc = s.scores
        rows.append({
            "participant_id": f"sub-{s.label}", "diagnosis": s.diagnosis, "age": s.age, "sex": s.sex, "site": s.site,
            "updrs_iii": round(float(8 * softplus(sc["motor"] + 0.5)), 3),      # monotone in the score
            "rbdsq": round(float(3 * softplus(sc["rbd"] + 0.5)), 3),
            "nfl_pg_ml": round(float(np.exp(2.4 + 0.35 * sc["serum"])), 3),
        })
    return pd.DataFrame(rows)


PARTICIPANTS_JSON = {
    "diagnosis": {"Description": "Diagnostic group (the prediction target)"},
    "age": {"Description": "Age at scan", "Units": "years"},
    "sex": {"Description": "Sex", "Levels": {"F": "female", "M": "male"}},
    "site": {"Description": "Acquisition site (for site-grouped cross-validation)"},
    "updrs_iii": {"Description": "MDS-UPDRS part III motor score (simulated)"},
    "rbdsq": {"Description": "REM sleep behaviour disorder screening questionnaire (simulated)"},
    "nfl_pg_ml": {"Description": "Serum neurofilament light chain (simulated)", "Units": "pg/mL"},
}


def write_dataset(cfg: dict, root: Path):
    """Dataset-level files: dataset_description.json, README, participants.tsv/json, truth/bayes.json,
    and what every subject is made from (truth/generator_cache.npz, read by the subject jobs)."""
    bids, truth = Path(demo_paths(root)["bids"]), Path(demo_paths(root)["truth"])
    bids.mkdir(parents=True, exist_ok=True)
    truth.mkdir(parents=True, exist_ok=True)
    subjects = plan(cfg)
    files = bids_dataset_files(bids)                 # the names the demo rule declares
    bf_io.save_json({"Name": "brainfuse phantom cohort", "BIDSVersion": "1.9.0", "DatasetType": "raw",
                     "GeneratedBy": [{"Name": "brainfuse.demo", "Version": __import__("brainfuse").__version__}]},
                    files["description"])
    (bids / "README").write_text("Simulated multimodal cohort generated by brainfuse.demo; ground truth in ../truth.\n")
    table = clinical_table(cfg, subjects)
    table.to_csv(files["participants"], sep="\t", index=False)
    bf_io.save_json(PARTICIPANTS_JSON, bids / "participants.json")
    write_generator_cache(cfg, root)
    bf_io.save_json({**bayes_accuracy(cfg), **cohort_bayes(cfg, subjects), **bayes.truth_mappings(), "config": cfg,
                     "subjects": [{"label": s.label, "diagnosis": s.diagnosis, "has_dwi": s.has_dwi, "has_bold": s.has_bold,
                                   "dicom": s.dicom, "scores": s.scores} for s in subjects]}, demo_paths(root)["bayes"])


def write_dicom(cfg: dict, subject: SubjectPlan, root: Path):
    """DICOM export of one subject's BIDS images, with FAKE identifying patient fields (for convert tests)."""
    from . import dicom_export

    bids = demo_paths(root)["bids"]
    out = Path(dicom_dir(root, subject.label))
    tmp = Path(tempfile.mkdtemp(dir=Path(root), prefix=".dicom-"))
    rng = np.random.default_rng([cfg["seed"], subject.index, 10])
    patient = {"PatientName": f"Phantom^Alice{subject.label}^Q", "PatientID": f"BF{rng.integers(10**7, 10**8)}",
               "PatientBirthDate": f"19{rng.integers(40, 70)}0{rng.integers(1, 9)}1{rng.integers(0, 9)}",
               "PatientSex": subject.sex}
    series = [(bids_path(bids, subject.label, "anat", "T1w"), "t1_mprage_sag_p2", {})]
    if subject.has_bold:
        series.append((bids_path(bids, subject.label, "func", "bold", task="rest"), "ep2d_bold_rest", {}))
    if subject.has_dwi:
        dwi = bids_path(bids, subject.label, "dwi", "dwi", dir="AP")
        series.append((dwi, "ep2d_diff_30dir_AP", {"bvals": np.loadtxt(dwi.replace(".nii.gz", ".bval")),
                                                   "bvecs": np.loadtxt(dwi.replace(".nii.gz", ".bvec"))}))
    for number, (path, description, extra) in enumerate(series, start=2):
        side = json.loads(Path(path.replace(".nii.gz", ".json")).read_text())
        dicom_export.export_series(path, tmp / f"{number:03d}_{description}", series_number=number,
                                   description=description, patient=patient,
                                   repetition_time=side.get("RepetitionTime"),
                                   phase_encoding_direction=side.get("PhaseEncodingDirection"), **extra)
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, out)
    bf_io.save_json(patient, identity_path(root, subject.label))


def generate(cfg: dict, root, subjects=None, modalities=("T1w", "dwi", "bold"), dicom=True, progress=print):
    """Generate the whole dataset (or some subjects) sequentially: the CLI's and the tests' entry point."""
    root = Path(root)
    write_dataset(cfg, root)
    cohort = plan(cfg)
    chosen = [s for s in cohort if subjects is None or s.label in subjects]
    for i, s in enumerate(chosen, 1):
        progress(f"[demo] sub-{s.label} ({i}/{len(chosen)}): {s.diagnosis}, dwi={s.has_dwi}, bold={s.has_bold}")
        write_subject(cfg, s, root, modalities)
        if dicom and s.dicom:
            write_dicom(cfg, s, root)
    return cohort


def demo_config(overrides: dict | None = None) -> dict:
    """The demo section with schema defaults filled in (and optional overrides)."""
    from ..config import validate

    return validate({"demo": overrides or {}})["demo"]


def _cli_config(params: dict, root: Path) -> dict:
    """``params`` validated, or as they are when the dataset job already wrote them, complete, into
    truth/bayes.json (what the workflow's subject jobs get: spares each of them importing jsonschema)."""
    try:
        if json.loads(Path(demo_paths(root)["bayes"]).read_text())["config"] == params:
            return params
    except (OSError, ValueError, KeyError):
        pass
    return demo_config(params)


def cli(argv=None):
    ap = cliargs.parser("demo")
    args = ap.parse_args(argv)
    params = json.loads(args.params)
    cfg = _cli_config(params, Path(args.out_dir)) if args.what != "dataset" else demo_config(params)
    modalities = tuple(args.modality or ("T1w", "dwi", "bold"))
    cohort = {s.label: s for s in plan(cfg)}
    unknown = set(args.subject or ()) - set(cohort)
    if unknown:
        ap.error(f"unknown demo subjects {sorted(unknown)} (the demo has {len(cohort)} subjects)")
    if args.what == "all":
        generate(cfg, args.out_dir, args.subject, modalities)
    elif args.what == "dataset":
        write_dataset(cfg, Path(args.out_dir))
    elif args.what == "subject":
        for label in args.subject or cohort:
            write_subject(cfg, cohort[label], Path(args.out_dir), modalities, stage=args.stage)
    else:
        for label in args.subject or [s for s in cohort if cohort[s].dicom]:
            write_dicom(cfg, cohort[label], Path(args.out_dir))
    print(f"[demo] done: {args.out_dir}", file=sys.stderr)
