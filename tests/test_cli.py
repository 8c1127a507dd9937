"""`brainfuse` as a user meets it: fast --help for every command and sub-command, one flag vocabulary, every
sub-command listed with a summary, usage errors before any stage module loads."""
import argparse
import os
import subprocess
import sys
import time

import pytest

from brainfuse import cliargs
from brainfuse.cli import COMMANDS
from conftest import REPO

ENV = {**os.environ, "PYTHONPATH": str(REPO / "src"), "NIPYPE_NO_ET": "1"}
# every parser a user can ask --help of: commands, and sub-commands as "command sub-command"
INVOCATIONS = [[c] for c in COMMANDS] + [[c, s] for c, subs in cliargs.SUBCOMMANDS.items() for s in subs]
# spellings replaced by the shared vocabulary (--sub -> --subject, --out -> --out-dir or --output ...)
RETIRED = {"--sub", "--ses", "--out", "--deriv", "--res", "--settings", "--subjects", "--sessions", "--outdir",
           "--output-dir", "--tsv"}


def brainfuse(*argv):
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "brainfuse", *argv], env=ENV, capture_output=True, text=True)
    return done, time.perf_counter() - start


def all_parsers():
    """(name, parser) of every command and sub-command, argparse sub-parsers included."""
    for name in cliargs.PARSERS:
        p = cliargs.parser(name)
        yield name, p
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub, sp in action.choices.items():
                    yield f"{name} {sub}", sp


@pytest.mark.parametrize("argv", INVOCATIONS, ids=" ".join)
def test_help_is_fast_and_loads_no_stage_module(argv):
    # the stage modules import numpy, ANTs, torch (3-4 s for func, train, evaluate); --help must not wait for them
    brainfuse(*argv, "--help")   # a cold file cache is not what is measured
    done, seconds = brainfuse(*argv, "--help")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"usage: brainfuse {' '.join(argv)}"), done.stdout[:200]
    print(f"brainfuse {' '.join(argv)} --help: {seconds:.2f} s")
    assert seconds < 2.0, f"brainfuse {' '.join(argv)} --help took {seconds:.2f} s"


def test_help_imports_no_heavy_module():
    # the cause of slow --help, checked directly: nothing beyond the standard library is imported
    code = ("import sys\nfrom brainfuse.cli import main\n"
            "for argv in %r:\n    try: main(argv + ['--help'])\n    except SystemExit: pass\n"
            "print('loaded:', *sorted(m for m in ('numpy', 'torch', 'ants', 'nibabel', 'pandas', 'scipy') "
            "if m in sys.modules))" % INVOCATIONS)
    done = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "loaded:", done.stdout.splitlines()[-1]


def test_usage_error_comes_before_the_stage_module():
    done, seconds = brainfuse("func", "--bold", "x.nii.gz")
    assert done.returncode == 2
    assert "the following arguments are required: --t1w" in done.stderr
    assert seconds < 2.0


def test_retired_spellings_are_refused_not_abbreviations(capsys):
    # argparse would take --sub for --subject and --res for --resolution: two spellings again, silently
    argv = ["--dwi", "d.nii.gz", "--subject", "01", "--out-dir", "deriv", "--t1w", "t.nii.gz", "--transforms", "w",
            "--template", "tpl.nii.gz", "--resolution", "3"]
    assert cliargs.parse("dwi", argv).subject == "01"
    for new, old in (("--subject", "--sub"), ("--out-dir", "--out"), ("--resolution", "--res")):
        with pytest.raises(SystemExit) as exit:
            cliargs.parse("dwi", [old if a == new else a for a in argv])
        assert exit.value.code == 2
        line = capsys.readouterr().err.splitlines()[-1]
        assert "required" in line and new in line or f"unrecognized arguments: {old}" in line, line


def test_one_flag_vocabulary():
    assert set(COMMANDS) <= set(cliargs.PARSERS), "a command without a parser would load its module for --help"
    for name, p in all_parsers():
        flags = {s for a in p._actions for s in a.option_strings}
        assert not flags & RETIRED, f"brainfuse {name}: {sorted(flags & RETIRED)} (use --subject, --session, " \
                                    "--out-dir, --output, --resolution, --params)"
        # the shared options mean the same everywhere: same type, metavar and action
        for a in p._actions:
            for flag in set(a.option_strings) & set(cliargs.SHARED):
                spec = cliargs.SHARED[flag]
                assert a.type == spec.get("type"), (name, flag)
                if flag != "--subject" or a.nargs is None:
                    assert a.metavar == spec.get("metavar"), (name, flag)
    # every stage that writes below a root or takes JSON settings uses the shared flags
    flags = {name: {s for a in p._actions for s in a.option_strings} for name, p in all_parsers()}
    for name in ("demo", "templates", "anat", "dwi", "func", "tensors subject", "tensors gather", "train fold",
                 "evaluate"):
        assert "--out-dir" in flags[name], name
    for name in ("convert verify", "func atlas", "qc", "train splits", "predict"):
        assert "--output" in flags[name], name
    for name in ("templates", "anat", "dwi", "func", "tensors subject"):
        assert "--resolution" in flags[name], name
    for name in ("anat", "dwi", "func", "tensors gather", "train splits", "train fold", "evaluate", "convert"):
        assert "--params" in flags[name], name
    for name in ("convert", "anat", "dwi", "tensors subject"):    # func: the BOLD file names them
        assert {"--subject", "--session"} <= flags[name], name


def test_top_level_help_lists_every_command_and_sub_command():
    done, _ = brainfuse("--help")
    assert done.returncode == 0
    lines = done.stdout.splitlines()
    for command, (_, summary) in COMMANDS.items():
        assert f"  {command}" in done.stdout and summary in done.stdout, command
    for command, subs in cliargs.SUBCOMMANDS.items():
        for sub, summary in subs.items():
            assert any(line.split()[:1] == [sub] and summary in line for line in lines), f"{command} {sub}"
    # sub-commands dispatched by the first word are listed in their command's help too
    for command in ("convert", "func"):
        done, _ = brainfuse(command, "--help")
        for sub, summary in cliargs.SUBCOMMANDS[command].items():
            assert f"  {sub}" in done.stdout and summary in done.stdout, f"{command} {sub}"


def test_version():
    done, _ = brainfuse("--version")
    assert done.returncode == 0 and done.stdout.startswith("brainfuse ") and "(code " in done.stdout
