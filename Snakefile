# brainfuse: raw DICOM or BIDS -> preprocessing -> cached tensors -> cross-validated mixture-of-experts.
# Thin on purpose: validation, dataset index and path helpers live in workflow/rules/common.smk,
# each stage in workflow/rules/<stage>.smk, the work itself in src/brainfuse/<stage>.py.
import sys
from pathlib import Path

from snakemake.utils import min_version

min_version("9.0")
sys.path.insert(0, str(Path(workflow.basedir) / "src"))

configfile: "config/config.yaml"


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
