"""``derivatives/brainfuse/dataset_description.json``: what makes the folder a BIDS-derivatives dataset
(``DatasetType: derivative``, ``GeneratedBy`` with the code version, ``SourceDatasets``: the BIDS input).

Standard library only: the workflow writes it in every imaging run, and it must not cost an import of numpy.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import __version__
from . import io as bf_io
from .provenance import source_hash

BIDS_VERSION = "1.10.0"          # the version the converted datasets declare (brainfuse.convert)
DESCRIPTION = ("Anatomical (N4, brain mask, tissues, SyN to MNI152NLin2009aSym), diffusion (motion/eddy, tensor "
               "maps) and functional (motion, confounds, ALFF/fALFF/ReHo, atlas-brainfuse connectivity) "
               "derivatives with QC records. The version's +code.<hash> part is `brainfuse --version`'s hash of "
               "the source files.")


def description(source_dir, code: str | None = None) -> dict:
    """The dataset_description.json content for derivatives of the BIDS dataset at ``source_dir``."""
    return {
        "Name": "brainfuse derivatives",
        "BIDSVersion": BIDS_VERSION,
        "DatasetType": "derivative",
        "GeneratedBy": [{"Name": "brainfuse", "Version": f"{__version__}+code.{code or source_hash()}",
                         "Description": DESCRIPTION}],
        # a file:// URI of the absolute path: the schema wants a URI, and the path names the input unambiguously
        "SourceDatasets": [{"URL": Path(source_dir).resolve().as_uri()}],
    }


def write(path, source_dir, code: str | None = None) -> dict:
    """Write it atomically (same input and code: the same bytes)."""
    content = description(source_dir, code)
    bf_io.save_json(content, path)
    return content


def cli(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m brainfuse.derivatives", description=__doc__.split("\n")[0])
    ap.add_argument("--source-dir", required=True, help="the BIDS dataset the derivatives come from")
    ap.add_argument("--output", required=True, help="dataset_description.json to write")
    ap.add_argument("--code", help="source hash (default: computed, as brainfuse --version prints it)")
    args = ap.parse_args(argv)
    write(args.output, args.source_dir, args.code)
    return 0


if __name__ == "__main__":
    sys.exit(cli())
