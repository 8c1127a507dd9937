"""Code versions (brainfuse.provenance): which jobs an edit reruns.

What a user relies on: editing the phantom (brainfuse.phantom) reruns the demo jobs and never a job on real data;
the import scan behind it resolves relative imports inside subpackages (else the first check could pass because
nothing was found at all).
"""
import re
import shutil

import pytest

from brainfuse import provenance
from conftest import REPO

RULES = REPO / "workflow" / "rules"


def code_versions(smk_files) -> set[str]:
    return {m for smk in smk_files for m in re.findall(r'code_version\("([^"]+)"\)', smk.read_text())}


def real_data_modules() -> set[str]:
    """Every module whose code version a rule on real data passes (all rule files but the demo's)."""
    return code_versions(p for p in RULES.glob("*.smk") if p.name != "demo.smk")


def is_phantom(module: str) -> bool:
    return module == "phantom" or module.startswith("phantom.")


@pytest.fixture
def package(tmp_path, monkeypatch):
    """provenance pointed at a folder standing in for the package (import scans cached per package)."""
    provenance.local_imports.cache_clear()
    monkeypatch.setattr(provenance, "PACKAGE", tmp_path)
    yield tmp_path
    provenance.local_imports.cache_clear()


def test_real_data_rules_list_the_stages():
    """The check below covers the stages (a renamed rule file would not empty it silently)."""
    assert {"convert", "templates", "anat", "dwi", "func", "atlas", "stageqc", "derivatives", "tensors", "train",
            "evaluate", "predict"} <= real_data_modules()


@pytest.mark.parametrize("module", sorted(real_data_modules()))
def test_no_real_data_job_depends_on_the_phantom(module):
    deps = provenance.dependencies(module)
    assert module in deps and len(deps) > 1
    assert not [d for d in deps if is_phantom(d)], f"{module} imports the phantom: editing it would rerun {module} jobs"


def test_demo_jobs_depend_on_the_whole_phantom():
    names = code_versions([RULES / "demo.smk"])
    assert names == {"phantom.generator"}
    deps = provenance.dependencies("phantom.generator")
    assert {"phantom", "phantom.generator", "phantom.bayes", "phantom.dicom_export", "headmodel", "reference",
            "io", "layout"} <= set(deps)
    # the head model it shares with skull stripping reruns the templates rule, whose head target is an input of
    # every anat job (a new file reruns them)
    assert "headmodel" in provenance.dependencies("templates")


def test_phantom_imports_resolve_inside_the_subpackage():
    found = provenance.local_imports("phantom.generator")
    assert {"phantom", "phantom.bayes", "phantom.dicom_export"} <= found    # from . import bayes / dicom_export
    assert {"io", "cliargs", "layout", "headmodel", "config"} <= found       # from .. import io, from ..layout import …
    assert provenance.local_imports("phantom.bayes") == {"reference"}        # from .. import reference
    assert {"io", "errors"} <= provenance.local_imports("phantom.dicom_export")


def test_relative_and_absolute_imports_resolve_to_package_paths(package):
    for name in ("top.py", "other.py", "sub/__init__.py", "sub/a.py", "sub/b.py", "sub/c.py", "sub/d.py",
                 "sub/e.py", "sub/deep/__init__.py", "sub/deep/f.py"):
        (package / name).parent.mkdir(parents=True, exist_ok=True)
        (package / name).write_text("")
    (package / "sub" / "a.py").write_text(
        "from . import b\n"                     # level 1 in sub -> sub.b
        "from .. import top\n"                  # level 2 in sub -> top
        "from ..other import thing\n"           # level 2 with a module -> other
        "from .c import name\n"                 # sub.c (name is not a module)
        "from brainfuse.sub.d import y\n"       # absolute -> sub.d
        "import brainfuse.sub.e\n"              # -> sub.e
        "from ... import outside\n"             # above the package: ignored
        "def f():\n    from .deep import f\n"   # lazily, a module of a sub-subpackage -> sub.deep, sub.deep.f
        "import os\nfrom numpy import array\n")
    (package / "sub" / "deep" / "f.py").write_text("from ... import top\nfrom ..b import z\n")
    (package / "top.py").write_text("from .sub import a\nfrom brainfuse import other\n")
    assert provenance.local_imports("sub.a") == {"sub", "sub.b", "top", "other", "sub.c", "sub.d", "sub.e",
                                                 "sub.deep", "sub.deep.f"}
    assert provenance.local_imports("sub.deep.f") == {"top", "sub", "sub.b"}
    assert provenance.local_imports("top") == {"sub", "sub.a", "other"}
    assert provenance._module_file("sub") == package / "sub" / "__init__.py"


def test_editing_the_phantom_changes_the_demo_code_version_only(package):
    shutil.copytree(REPO / "src" / "brainfuse", package, dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("__pycache__"))
    before = {m: provenance.code_version(m) for m in real_data_modules() | {"phantom.generator"}}
    (package / "phantom" / "bayes.py").write_text((package / "phantom" / "bayes.py").read_text() + "\n# edit\n")
    provenance.local_imports.cache_clear()
    after = {m: provenance.code_version(m) for m in before}
    assert {m for m in before if before[m] != after[m]} == {"phantom.generator"}


def test_source_hash_covers_the_subpackage(package):
    shutil.copytree(REPO / "src" / "brainfuse", package, dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("__pycache__"))
    before = provenance.source_hash()
    (package / "phantom" / "dicom_export.py").write_text((package / "phantom" / "dicom_export.py").read_text() + "#\n")
    assert provenance.source_hash() != before


def test_import_graph_has_at_most_four_layers():
    """Foundations (errors, io, schema, ...), data access (bids, inputs), building blocks (layout, tensors, models,
    splits, config) and stages / commands on top: a module's layer is its longest chain of brainfuse imports (lazy
    ones too, as code_version reads them). A fifth layer means a stage leaning on another stage (func once imported
    anat for three file names), which reruns the one when the other changes."""
    package = REPO / "src" / "brainfuse"
    modules = [".".join(p.relative_to(package).with_suffix("").parts) for p in package.rglob("*.py")
               if p.name != "__init__.py"]
    layers: dict[str, int] = {}

    def layer(m: str) -> int:
        if m not in layers:
            deps = [d for d in provenance.local_imports(m) if d != m and d != "phantom"]
            layers[m] = 1 + max((layer(d) for d in deps), default=0)
        return layers[m]

    assert len(modules) > 30 and {"evaluate", "func", "train"} <= set(modules)
    deep = {m: layer(m) for m in modules if layer(m) > 4}
    assert not deep, f"modules above layer 4: {deep}"
    assert layer("evaluate") == 4      # the check sees chains at all
