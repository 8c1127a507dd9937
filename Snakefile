# brainfuse: raw DICOM or BIDS -> preprocessing -> cached tensors -> cross-validated mixture-of-experts.
# Thin on purpose: validation, dataset index and path patterns live in workflow/rules/common.smk (every name
# from src/brainfuse/layout.py),
# each stage in workflow/rules/<stage>.smk, the work itself in src/brainfuse/<stage>.py.
import sys
from pathlib import Path

from snakemake.utils import min_version

min_version("9.0")
sys.path.insert(0, str(Path(workflow.basedir) / "src"))

from brainfuse.config import ConfigError, read_yaml

# Read once more ourselves first: a YAML error then names the file, line and column, which Snakemake's loader
# does not. (A --configfile is loaded by Snakemake's command line before this file runs: it cannot be checked here.)
if Path("config/config.yaml").is_file():
    try:
        read_yaml("config/config.yaml")
    except ConfigError as e:
        raise WorkflowError(str(e)) from None

configfile: "config/config.yaml"
# `snakemake --report`: what was run and how to read it (rendered with this run's config); captions beside it.
report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/demo.smk"
include: "workflow/rules/convert.smk"
include: "workflow/rules/anat.smk"
include: "workflow/rules/dwi.smk"
include: "workflow/rules/func.smk"
include: "workflow/rules/tensors.smk"
include: "workflow/rules/train.smk"


rule all:
    input:
        all_targets(),
    default_target: True
