"""The options of every ``brainfuse`` command, built without importing any stage module.

Standard library only, so that ``brainfuse <command> --help`` and usage errors answer in a fraction of a second:
the stage module (numpy, ANTs, torch: seconds to import) is imported only after its arguments have parsed.

One vocabulary for what several commands share (``SHARED``): ``--subject``/``--session`` (BIDS labels),
``--out-dir`` (a folder written below), ``--output`` (one file written), ``--resolution`` (template grid, mm),
``--threads``, ``--params`` (JSON of the config section(s)), ``--strict``, ``--device``.
"""
from __future__ import annotations

import argparse

SHARED = {
    "--subject": dict(metavar="LABEL", help="subject label (with or without sub-)"),
    "--session": dict(metavar="LABEL", help="session label (with or without ses-)"),
    "--out-dir": dict(metavar="DIR", help="output folder"),
    "--output": dict(metavar="FILE", help="output file"),
    "--resolution": dict(type=int, metavar="MM", help="template grid resolution (mm)"),
    "--threads": dict(type=int, default=1, help="CPU threads (default: %(default)s)"),
    "--params": dict(default="{}", metavar="JSON", help="JSON of the config section (overrides its defaults)"),
    "--strict": dict(action="store_true", help="a QC threshold not met stops the job (else: WARNING in the log, "
                                              "flag in the QC JSON)"),
    "--device": dict(default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1 ... (default: auto)"),
}

# sub-commands and their one-line summaries (shown by `brainfuse --help` and `brainfuse <command> --help`)
SUBCOMMANDS = {
    "convert": {"dataset": "dataset_description.json, participants.tsv and the merged manifest of a BIDS root",
                "verify": "compare converted images with the BIDS images a DICOM export was made from (demo)"},
    "func": {"atlas": "build the atlas-brainfuse parcellation (k-means of the template's grey matter)"},
    "tensors": {"subject": "cache one subject's modalities as fixed-shape tensors",
                "gather": "stack every subject's caches into the cohort (manifest, tables)"},
    "train": {"splits": "write participant-grouped CV splits",
              "fold": "train one preset (MoE or baseline) on one fold"},
}
# sub-commands run by another module than their command's (imported alone: `func atlas` needs no ANTs or torch)
SUBCOMMAND_MODULES = {("func", "atlas"): "brainfuse.atlas"}
# sub-commands picked by the first word, the command without one doing its own work (argparse cannot mix both)
_DISPATCHED = {"convert": ("dataset", "verify"), "func": ("atlas",)}


def shared(p: argparse.ArgumentParser, flag: str, **override) -> None:
    """Add one option of the shared vocabulary (``override``: required, default, help ...)."""
    p.add_argument(flag, **{**SHARED[flag], **override})


def _new(prog: str, description: str, command: str | None = None) -> argparse.ArgumentParser:
    epilog = None
    if command in _DISPATCHED:
        subs = SUBCOMMANDS[command]
        width = max(map(len, subs))
        epilog = "sub-commands (`brainfuse %s <sub-command> --help`):\n" % command + "\n".join(
            f"  {name:<{width}}  {summary}" for name, summary in subs.items())
    # no abbreviations: `--sub` or `--out` would silently stand for --subject or --out-dir (the retired spellings)
    return argparse.ArgumentParser(prog=f"brainfuse {prog}", description=description, epilog=epilog,
                                   formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)


def _demo(p):
    shared(p, "--out-dir", required=True, help="output folder (bids/, truth/, dicom/ are written below it)")
    shared(p, "--params", help="JSON of demo settings (keys of the config's demo section)")
    shared(p, "--subject", action="append", help="only these subject labels (repeatable)")
    p.add_argument("--modality", action="append", choices=["T1w", "dwi", "bold"], help="only these modalities")
    p.add_argument("--what", choices=["all", "dataset", "subject", "dicom"], default="all")
    p.add_argument("--stage", help="with --what subject: write DWI and BOLD images below this folder (BIDS names)")


def _convert(p):
    p.add_argument("--dicom-dir", required=True, help="this subject's (or session's) DICOM folder")
    p.add_argument("--bids-dir", required=True, help="BIDS root to write into")
    shared(p, "--subject", required=True)
    shared(p, "--session")
    p.add_argument("--manifest", required=True, help="this subject's manifest TSV to write")
    p.add_argument("--config", help="brainfuse config YAML (its convert: section is used)")
    shared(p, "--params", default=None, help="the convert: section as JSON (instead of --config)")
    p.add_argument("--outputs", help="also write a JSON listing the BIDS files produced")
    p.add_argument("--work-dir", help="where dcm2niix writes before files are moved (default: system temp)")
    p.add_argument("--log", help="also write log lines to this file")
    shared(p, "--strict", help="fail (no BIDS files, no manifest) when the subject has no usable T1w, instead of "
                               "warning and carrying it on without anatomy")


def _convert_dataset(p):
    p.add_argument("--bids-dir", required=True)
    p.add_argument("--subject-manifests", nargs="*", default=[], help="per-subject manifest TSVs")
    p.add_argument("--manifest", required=True, help="merged manifest TSV to write")
    p.add_argument("--participants-tsv", help="clinical table to merge into participants.tsv")
    p.add_argument("--log", help="also write log lines to this file")


def _convert_verify(p):
    p.add_argument("--converted", required=True, help="BIDS root the conversion wrote")
    p.add_argument("--reference", required=True, help="BIDS root of the reference images")
    p.add_argument("--manifests", nargs="+", required=True, help="conversion manifests")
    p.add_argument("--identity", nargs="*", default=[], help="JSON files of the identifying values the export carried")
    shared(p, "--output", required=True, help="verification TSV to write")
    p.add_argument("--log", help="also write log lines to this file")


def _templates(p):
    shared(p, "--resolution", required=True, choices=[1, 2, 3, 4])
    shared(p, "--out-dir", required=True, help="root folder (tpl-<template>/ is created below it; the workflow "
                                               "uses <output_dir>/templates)")


def _anat(p):
    p.add_argument("--t1w", required=True, help="T1w NIfTI (BIDS raw)")
    shared(p, "--out-dir", required=True, help="derivatives root (DERIV); writes DERIV/sub-X[/ses-Y]/{anat,figures}")
    shared(p, "--subject", required=True)
    shared(p, "--session")
    p.add_argument("--template-dir", required=True, help="tpl-<template> folder (built by `brainfuse templates`)")
    shared(p, "--resolution", required=True)
    shared(p, "--threads")
    shared(p, "--params", help="JSON of the config's anat section (overrides defaults)")
    shared(p, "--strict")


def _dwi(p):
    p.add_argument("--dwi", nargs="+", required=True, help="every DWI run of the subject (.nii[.gz] with .bval/.bvec)")
    shared(p, "--subject", required=True)
    shared(p, "--session")
    shared(p, "--out-dir", required=True, help="derivatives root (DERIV); writes DERIV/sub-X[/ses-Y]/{dwi,figures}")
    p.add_argument("--t1w", required=True, help="anat desc-preproc T1w")
    p.add_argument("--t1w-mask", help="anat desc-brain mask")
    p.add_argument("--transforms", nargs="+", required=True, help="T1w -> template list ([warp, affine])")
    p.add_argument("--template", required=True, help="template T1w at the working resolution")
    shared(p, "--resolution", required=True)
    shared(p, "--params", help="JSON of the config's dwi section")
    shared(p, "--threads")
    shared(p, "--strict")


def _func(p):
    p.add_argument("--bold", required=True, help="one BOLD run (BIDS raw)")
    p.add_argument("--t1w", required=True, help="subject T1w (anat desc-preproc)")
    p.add_argument("--t1w-mask", help="subject brain mask (anat desc-brain_mask)")
    p.add_argument("--anat-dir", help="anat derivatives folder (transforms: brainfuse.layout.to_mni_transforms)")
    p.add_argument("--mni-xfm", nargs="+", help="ANTs transform list template -> T1w (instead of --anat-dir)")
    p.add_argument("--template", required=True, help="template T1w at the working resolution")
    p.add_argument("--template-mask", required=True, help="template brain mask")
    p.add_argument("--wm", required=True, help="MNI-space WM probability map")
    p.add_argument("--csf", required=True, help="MNI-space CSF probability map")
    p.add_argument("--atlas", required=True, help="atlas dseg NIfTI (`brainfuse func atlas`)")
    p.add_argument("--atlas-tsv", required=True, help="atlas dseg TSV")
    shared(p, "--out-dir", required=True, help="derivatives root (DERIV); writes DERIV/sub-X[/ses-Y]/{func,figures}")
    shared(p, "--resolution", required=True)
    shared(p, "--params", help="JSON of the config's func section")
    shared(p, "--threads")
    shared(p, "--strict", help="a motion QC warning stops the run (else: WARNING in the log and a flag in the "
                               "subject's QC JSON)")


def _func_atlas(p):
    p.add_argument("--gm", required=True, help="template GM probability map at the working resolution")
    p.add_argument("--mask", help="template brain mask on the same grid")
    shared(p, "--output", required=True, help="atlas dseg NIfTI to write")
    p.add_argument("--output-tsv", required=True, help="atlas dseg TSV to write (index, name, hemisphere, x, y, z)")
    p.add_argument("--n-parcels", type=int, default=100, help="default: %(default)s")
    p.add_argument("--coverage", choices=("gm", "brain", "anatomical"), default="gm",
                   help="gm: grey-matter parcels (connectivity); brain: the whole brain mask (region features); "
                        "anatomical: Harvard-Oxford structures and Juelich tracts (region features, named)")


def _qc(p):
    p.add_argument("--motion-qc", nargs="+", required=True, help="every run's _desc-confounds_timeseries.json")
    shared(p, "--output", required=True, help="DERIV/sub-X[/ses-Y]/func/sub-X[_ses-Y]_desc-qc_bold.json")
    shared(p, "--strict", help="a flag stops here, nothing written")


def _tensors(p):
    sub = p.add_subparsers(dest="command", required=True, metavar="{subject,gather}")
    s = _subparser(sub, "tensors", "subject")
    s.add_argument("--modality", nargs="+", action="append", required=True, metavar=("NAME", "SOURCE"),
                   help="a modality and its derivatives in channel order; repeat for each modality")
    s.add_argument("--mask", required=True, help="template brain mask defining the working grid")
    shared(s, "--resolution", required=True)
    shared(s, "--subject", required=True)
    shared(s, "--session", default=None)
    shared(s, "--out-dir", required=True, help="tensors folder (files go to <out-dir>/sub-X[/ses-Y]/)")
    s.add_argument("--qc", nargs="*", default=None, help="the unit's image QC JSONs (*_desc-qc_{T1w,dwi,bold}.json)")
    g = _subparser(sub, "tensors", "gather")
    shared(g, "--out-dir", required=True, help="tensors folder")
    g.add_argument("--participants", required=True, help="participants.tsv")
    shared(g, "--params", help="JSON of the config's tensors section")
    g.add_argument("--tensors", nargs="*", default=[], help="per-subject tensor files or unit folders")
    g.add_argument("--units", nargs="*", default=[], help="cohort rows (sub-X[_ses-Y]); default participants.tsv")
    g.add_argument("--atlas", nargs=2, default=None, metavar=("NIFTI", "TSV"),
                   help="labels on the working grid + TSV (index, name): image modalities become region tables")


def _train(p):
    sub = p.add_subparsers(dest="what", required=True, metavar="{splits,fold}")
    s = _subparser(sub, "train", "splits")
    s.add_argument("--tensors", required=True, help="tensors folder (manifest.tsv)")
    shared(s, "--params", help="JSON {model: ..., cv: ...} (config sections)")
    shared(s, "--output", required=True, help="splits TSV to write")
    f = _subparser(sub, "train", "fold")
    f.add_argument("--tensors", required=True, help="tensors folder (manifest.tsv)")
    f.add_argument("--splits", required=True, help="splits TSV (`brainfuse train splits`)")
    f.add_argument("--fold", type=int, required=True)
    f.add_argument("--preset", required=True)
    shared(f, "--params", help="JSON {model: ..., cv: ...} (config sections)")
    shared(f, "--out-dir", required=True, help="output folder (checkpoint.pt, predictions.tsv)")
    shared(f, "--device")
    shared(f, "--threads", default=None, help="CPU threads (default: torch's)")


def _evaluate(p):
    p.add_argument("--tensors", required=True, help="tensors folder (manifest.tsv)")
    p.add_argument("--splits", required=True, help="splits TSV")
    p.add_argument("--models", required=True, help="folder with <preset>/fold-<k>/checkpoint.pt")
    p.add_argument("--presets", nargs="+", required=True)
    shared(p, "--params", help="JSON {model: ..., cv: ...} (config sections)")
    p.add_argument("--bayes", default=None, help="demo truth/bayes.json (drawn on the performance plot)")
    shared(p, "--threads", default=None, help="CPU threads (default: torch's)")
    shared(p, "--out-dir", required=True, help="reports folder")


def _predict(p):
    p.add_argument("--tensors", required=True, help="tensors folder of the subjects to predict")
    p.add_argument("--models", required=True, help="models folder (<preset>/fold-<k>/checkpoint.pt)")
    p.add_argument("--preset", required=True, help="preset name, or 'best' (needs --summary)")
    p.add_argument("--summary", default=None, help="evaluation summary.json naming the best preset")
    shared(p, "--device")
    shared(p, "--output", required=True, help="predictions TSV to write")


def _subparser(sub, command: str, name: str) -> argparse.ArgumentParser:
    summary = SUBCOMMANDS[command][name]
    return sub.add_parser(name, help=summary, description=summary[0].upper() + summary[1:] + ".", allow_abbrev=False)


# parser name ("func", "func atlas" ...) -> (description, builder)
PARSERS = {
    "demo": ("Generate the phantom dataset (BIDS + truth + DICOM).", _demo),
    "convert": ("Convert one subject's DICOM folder to BIDS (dcm2niix), with a manifest.", _convert),
    "convert dataset": ("Write dataset_description.json, participants.tsv and the merged manifest.", _convert_dataset),
    "convert verify": ("Compare converted images with the BIDS images a DICOM export was made from.", _convert_verify),
    "templates": ("Write the MNI152NLin2009aSym template files at one resolution (from nilearn).", _templates),
    "anat": ("T1w preprocessing: N4, brain mask, tissues, SyN to the template, QC.", _anat),
    "dwi": ("DWI preprocessing: motion/eddy with b-vector rotation, tensor maps to the template, QC.", _dwi),
    "func": ("Process one BOLD run: motion, confounds, denoising, ALFF/fALFF/ReHo, connectivity.", _func),
    "func atlas": ("Build the atlas-brainfuse parcellation: k-means parcels of the template's grey matter, "
                   "per hemisphere.", _func_atlas),
    "qc": ("A subject's func QC JSON from its runs' motion QC (brainfuse.stageqc.func_subject_qc).", _qc),
    "tensors": ("Cache and check model inputs: per-subject arrays, the cohort manifest, tables.", _tensors),
    "train": ("Participant-grouped CV splits, and one fold of one MoE preset or baseline.", _train),
    "evaluate": ("Scores with CIs, missing-modality grid, ablations and report figures.", _evaluate),
    "predict": ("Predict new subjects with the trained models.", _predict),
}


def parser(name: str) -> argparse.ArgumentParser:
    """The parser of ``brainfuse <name>`` (name: a command, or "command sub-command" for convert and func)."""
    description, build = PARSERS[name]
    p = _new(name, description, name)
    build(p)
    return p


def split(command: str, argv: list[str]) -> tuple[str, list[str]]:
    """(parser name, its arguments): `convert verify ...` -> ("convert verify", [...])."""
    if argv and argv[0] in _DISPATCHED.get(command, ()):
        return f"{command} {argv[0]}", list(argv[1:])
    return command, list(argv)


def parse(command: str, argv: list[str]) -> argparse.Namespace:
    """Parse ``brainfuse <command> argv``: --help and usage errors exit here, before any stage module loads."""
    name, rest = split(command, argv)
    return parser(name).parse_args(rest)
