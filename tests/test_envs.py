"""Static checks of the rules and their conda environments (conda itself cannot run here).

Each rule that runs a command must declare log, conda, threads, resources and a code version; each
environment must be conda-forge only, pinned, and list every third-party package its rules' code imports.
"""
import ast
import re
import sys

import pytest
import yaml

from brainfuse.cli import COMMANDS
from brainfuse.provenance import _module_file, dependencies
from conftest import REPO

RULES = REPO / "workflow" / "rules"
ENVS = REPO / "envs"
# import name -> conda-forge package name, where they differ
PACKAGE_OF = {"ants": "antspyx", "yaml": "pyyaml", "sklearn": "scikit-learn", "torch": "pytorch",
              "fsl": "fslpy", "bids": "pybids", "PIL": "pillow", "skimage": "scikit-image",
              "filelock": "filelock"}
NOT_PACKAGES = {"brainfuse", "snakemake"}     # snakemake runs the rules; it is not needed inside the env


def rule_blocks():
    """(file, rule name, text of the rule) for every rule and checkpoint in workflow/rules."""
    for smk in sorted(RULES.glob("*.smk")):
        text = smk.read_text()
        starts = [(m.start(), m.group(2)) for m in re.finditer(r"^(rule|checkpoint) (\w+):", text, re.M)]
        for i, (start, name) in enumerate(starts):
            end = starts[i + 1][0] if i + 1 < len(starts) else len(text)
            block = text[start:end]
            # A rule ends at the first line back at column 0 that is not part of it.
            body = [block.splitlines()[0]]
            for line in block.splitlines()[1:]:
                if line and not line[0].isspace() and not line.startswith("#"):
                    break
                body.append(line)
            yield smk.name, name, "\n".join(body)


def command_rules():
    return [(f, n, b) for f, n, b in rule_blocks() if re.search(r"^\s+(shell|run|script):", b, re.M)]


def third_party_imports(module: str) -> set[str]:
    names = set()
    for dep in dependencies(module):
        tree = ast.parse(_module_file(dep).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return {n for n in names if n not in sys.stdlib_module_names and n not in NOT_PACKAGES}


def env_packages(path) -> tuple[dict, dict]:
    """(conda packages -> pin, pip packages -> pin) of an environment file."""
    spec = yaml.safe_load(path.read_text())
    conda, pip = {}, {}
    for dep in spec["dependencies"]:
        if isinstance(dep, dict):
            for p in dep.get("pip", []):
                name, _, version = p.partition("==")
                pip[name.strip().lower()] = version.strip()
        else:
            name, version = re.fullmatch(r"([A-Za-z0-9_.\-]+)\s*(?:==?\s*(\S*))?", dep.strip()).groups()
            conda[name.lower()] = version or ""
    return conda, pip


def test_there_are_rules_to_check():
    names = {n for _, n, _ in command_rules()}
    assert {"demo_dataset", "demo_subject", "demo_dwi", "demo_bold"} <= names


@pytest.mark.parametrize("smk,rule,block", command_rules(), ids=lambda v: v if isinstance(v, str) and "\n" not in v else "")
def test_every_command_rule_declares_log_conda_threads_resources_and_code(smk, rule, block):
    for key in ("log", "conda", "threads", "resources"):
        assert re.search(rf"^\s+{key}:", block, re.M), f"{smk}: rule {rule} has no {key}:"
    assert re.search(r"code=code_version\(", block), f"{smk}: rule {rule} does not pass code=code_version(...)"
    conda = re.search(r"conda:\s*\n\s*\"([^\"]+)\"", block)
    assert conda, f"{smk}: rule {rule}: conda: must be a path string"
    assert (RULES / conda.group(1)).resolve().parent == ENVS, f"{smk}: rule {rule}: env outside envs/"
    assert (RULES / conda.group(1)).resolve().is_file(), f"{smk}: rule {rule}: {conda.group(1)} does not exist"


@pytest.mark.parametrize("env", sorted(ENVS.glob("*.yaml")), ids=lambda p: p.name)
def test_env_is_conda_forge_only_and_pinned(env):
    spec = yaml.safe_load(env.read_text())
    assert spec["channels"] == ["conda-forge"], f"{env.name}: channels must be [conda-forge]"
    conda, pip = env_packages(env)
    assert "python" in conda
    for name, version in {**conda, **pip}.items():
        assert re.fullmatch(r"[0-9][0-9A-Za-z.]*", version or ""), f"{env.name}: {name} is not pinned"
    if pip:
        assert "pip" in conda, f"{env.name}: a pip section needs pip itself"


@pytest.mark.parametrize("smk,rule,block", command_rules(), ids=lambda v: v if isinstance(v, str) and "\n" not in v else "")
def test_env_lists_every_third_party_package_the_rule_imports(smk, rule, block):
    commands = set(re.findall(r"\{BRAINFUSE\} (\w+)", block))
    conda_path = re.search(r"conda:\s*\n\s*\"([^\"]+)\"", block).group(1)
    conda, pip = env_packages((RULES / conda_path).resolve())
    listed = set(conda) | set(pip)
    for command in commands:
        module = COMMANDS[command][0].split(".", 1)[1]
        missing = {PACKAGE_OF.get(n, n).lower() for n in third_party_imports(module)} - listed
        assert not missing, f"{smk}: rule {rule} runs `brainfuse {command}`, whose code imports {sorted(missing)}, " \
                            f"missing from {conda_path}"


def test_envs_agree_on_versions():
    """One tested set of versions: a package pinned in two environments has the same pin in both."""
    seen = {}
    for env in sorted(ENVS.glob("*.yaml")):
        conda, pip = env_packages(env)
        for name, version in {**conda, **pip}.items():
            seen.setdefault(name, {})[env.name] = version
    clashes = {n: v for n, v in seen.items() if len(set(v.values())) > 1}
    assert not clashes, f"different pins of the same package: {clashes}"


def test_slurm_profile_groups_name_real_rules():
    """Per-subject cluster batching lives in profiles/slurm (groups + group-components), not in the rules: every
    grouped rule must exist (a renamed rule would silently fall out of its group) and every group be batched."""
    profile = yaml.safe_load((REPO / "profiles" / "slurm" / "config.yaml").read_text())
    rules = {m.group(1) for smk in RULES.glob("*.smk")
             for m in re.finditer(r"^\s*(?:rule|checkpoint) (\w+):", smk.read_text(), re.M)}
    assert set(profile["groups"]) <= rules, set(profile["groups"]) - rules
    assert set(profile["groups"].values()) == set(profile["group-components"])
    for smk in RULES.glob("*.smk"):
        assert not re.search(r"^\s+group:", smk.read_text(), re.M), f"{smk.name}: group: belongs in profiles/slurm"
