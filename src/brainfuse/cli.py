"""``brainfuse <command> …``: one entry point. Every command's options are in brainfuse.cliargs (one vocabulary,
standard library only); a stage module is imported only once its arguments have parsed (``import ants`` alone costs
seconds, ``--help`` does not wait for it).
"""
from __future__ import annotations

import importlib
import sys
import traceback

from . import cliargs
from .errors import debug_enabled, one_line

# command -> (module exposing ``cli(argv) -> int | None``, one-line summary for the top-level help)
COMMANDS = {
    "demo": ("brainfuse.phantom.generator", "generate the phantom cohort (BIDS, DICOM export, ground truth)"),
    "convert": ("brainfuse.convert", "DICOM -> BIDS with dcm2niix: de-identified, with a series manifest"),
    "templates": ("brainfuse.templates", "MNI152NLin2009aSym template, mask and tissues at a resolution"),
    "anat": ("brainfuse.anat", "T1w: N4, brain mask, tissues, SyN to the template, QC"),
    "dwi": ("brainfuse.dwi", "DWI: motion/eddy with b-vector rotation, tensor maps to the template, QC"),
    "func": ("brainfuse.func", "BOLD: motion, confounds, denoising, ALFF/fALFF/ReHo, connectivity"),
    "qc": ("brainfuse.stageqc", "a subject's func QC record (flags, metrics) from its runs' motion QC"),
    "tensors": ("brainfuse.tensors", "cache and check model inputs: per-subject arrays, manifest, tables"),
    "train": ("brainfuse.train", "participant-grouped CV splits and one fold of one MoE preset or baseline"),
    "evaluate": ("brainfuse.evaluate", "scores with CIs, missing-modality grid, ablations, report figures"),
    "predict": ("brainfuse.predict", "predict new subjects with the trained models"),
}


def _version() -> str:
    """The release and a hash of every source file (a checkout between releases is told apart)."""
    from . import __version__
    from .provenance import source_hash

    return f"brainfuse {__version__} (code {source_hash()})"


def _command_lines(width: int):
    for name, (_, summary) in COMMANDS.items():
        yield f"  {name:<{width}}  {summary}"
        for sub, sub_summary in cliargs.SUBCOMMANDS.get(name, {}).items():
            yield f"  {'':<{width}}  {sub:<8} {sub_summary}"


def usage() -> str:
    width = max(map(len, COMMANDS))
    return ("usage: brainfuse [--version] [--debug] <command> [options]\n\n"
            "DICOM or BIDS to a cross-validated multimodal mixture-of-experts model.\n\ncommands:\n" +
            "\n".join(_command_lines(width)) +
            "\n\nRun `brainfuse <command> [<sub-command>] --help` for the options. Errors are one line; --debug (or "
            "BRAINFUSE_DEBUG=1) adds the traceback.")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = debug_enabled(argv)
    argv = [a for a in argv if a != "--debug"]
    if argv[:1] == ["--version"]:
        print(_version())
        return 0
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"brainfuse: unknown command {command!r} (known: {', '.join(COMMANDS)})", file=sys.stderr)
        return 2
    try:
        if command in cliargs.PARSERS:      # --help and usage errors exit here, before the stage module loads
            cliargs.parse(command, rest)
        module = COMMANDS[command][0]
        if rest and (command, rest[0]) in cliargs.SUBCOMMAND_MODULES:
            module, rest = cliargs.SUBCOMMAND_MODULES[command, rest[0]], rest[1:]
        return importlib.import_module(module).cli(rest) or 0
    except KeyboardInterrupt:
        print(f"brainfuse {command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:      # one line for the user; the traceback only when asked for
        if debug:
            traceback.print_exc()
        print(f"brainfuse {command}: error: {one_line(e, _outputs(rest))}", file=sys.stderr)
        return 1


def _outputs(args: list) -> list:
    """The folders and files a command writes (the values of --out-dir and --output, either spelling)."""
    flags = ("--out-dir", "--output")
    return ([b for a, b in zip(args, args[1:]) if a in flags]
            + [a.split("=", 1)[1] for a in args if a.split("=", 1)[0] in flags and "=" in a])


if __name__ == "__main__":
    sys.exit(main())
