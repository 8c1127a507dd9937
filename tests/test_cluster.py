"""Cluster runs: what Snakemake makes of profiles/, training resources from the config, and the README's SLURM
command on a real one-node SLURM (tests/cluster/slurm.sh) against a local run of the same config.

The real-SLURM test runs where BRAINFUSE_SLURM_TEST=1 (.ci/run sets it); it installs SLURM with apt-get as root
and skips, with the reason, only where that is impossible."""
import math
import os
import random
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

from conftest import REPO, job_counts

PROFILES = REPO / "profiles"
CLUSTER = REPO / "tests" / "cluster"
CONFIG = CLUSTER / "config.yaml"          # six subjects through `train`, small model: the cluster test's run
SNAKEMAKE = [sys.executable, "-m", "snakemake"]
# Settings that belong to a cluster profile: in the workflow profile (loaded for every run, winning key by key)
# they would silently replace the cluster's (issue #18: default-resources, latency-wait, cores).
CLUSTER_KEYS = {"executor", "jobs", "cores", "local-cores", "latency-wait", "default-resources", "set-resources",
                "set-threads", "resources", "groups", "group-components", "max-threads"}


def profile(name: str) -> dict:
    return yaml.safe_load((PROFILES / name / "config.yaml").read_text())


def snakemake(*args, cwd=REPO, check=True, env=None):
    proc = subprocess.run([*SNAKEMAKE, *args], cwd=cwd, capture_output=True, text=True, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake {shlex.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


# ------------------------------------------------------------------------------------------ profiles, statically
@pytest.mark.parametrize("name", sorted(p.name for p in PROFILES.iterdir() if (p / "config.yaml").exists()))
def test_every_profile_key_is_a_snakemake_or_slurm_plugin_option(name):
    from snakemake.cli import get_argument_parser

    options = {s for action in get_argument_parser()._actions for s in action.option_strings}   # plugins' too
    unknown = [key for key in profile(name) if f"--{key}" not in options]
    assert not unknown, f"profiles/{name}: not options of this Snakemake / its plugins: {unknown}"


def test_resource_names_are_ones_snakemake_or_the_slurm_plugin_read():
    """A misspelt resource (slurm_partiton) is passed along silently and ignored: check every name the profile
    and the training rules set against Snakemake's own and those the slurm plugin's code reads."""
    import snakemake_executor_plugin_slurm as plugin

    source = "\n".join(p.read_text() for p in Path(plugin.__file__).parent.glob("*.py"))
    read = set(re.findall(r"resources\.get\(\s*[\"'](\w+)[\"']", source)) | set(re.findall(r"resources\.(\w+)", source))
    known = read | {"mem_mb", "disk_mb", "runtime", "tmpdir"}
    used = set(profile("slurm")["default-resources"]) | {"gres", "slurm_partition"}     # train.smk's
    assert "slurm_partition" in read and "gres" in read
    assert used <= known, f"resource names no one reads: {sorted(used - known)}"


def test_workflow_profile_sets_nothing_a_cluster_profile_sets():
    local, slurm = set(profile("default")), set(profile("slurm"))
    assert not local & slurm, f"profiles/default overrides profiles/slurm's {local & slurm}"
    assert not local & CLUSTER_KEYS, f"profiles/default would override any cluster profile's {local & CLUSTER_KEYS}"


def test_slurm_profile_reaches_snakemake_as_written(monkeypatch):
    """What `snakemake --profile profiles/slurm` gets, after Snakemake has also loaded the workflow profile."""
    from snakemake.cli import parse_args

    monkeypatch.chdir(REPO)
    written = profile("slurm")
    _, args = parse_args(["--profile", "profiles/slurm"])
    assert args.executor == "slurm" and args.jobs == written["jobs"] and args.cores == written["cores"]
    assert args.latency_wait == written["latency-wait"]
    assert args.slurm_status_command == "squeue"          # sacct hangs without accounting
    assert {k: args.default_resources[k].value for k in written["default-resources"]} == written["default-resources"]
    assert args.groups == written["groups"] and args.group_components == written["group-components"]
    assert args.scheduler == "greedy" and args.keep_going       # the workflow profile still applies
    _, local = parse_args([])
    assert local.scheduler == "greedy" and local.executor is None and local.default_resources is None


# ------------------------------------------------------------------------------ training resources from the config
def job_blocks(stdout: str, rule: str) -> list[dict]:
    """threads and resources of every job of ``rule`` in a dry run's listing."""
    blocks = []
    for block in re.split(r"^\s*\[\w{3} \w{3} [^\]]+\].*$", stdout, flags=re.M):   # a job per time stamp
        if not re.search(rf"^\s*(local)?rule {rule}:", block, re.M):
            continue
        threads = re.search(r"^\s+threads: (\d+)", block, re.M)
        res = re.search(r"^\s+resources: (.*)$", block, re.M).group(1)
        blocks.append({"threads": int(threads.group(1)) if threads else 1,
                       "resources": dict(kv.split("=", 1) for kv in res.split(", "))})
    return blocks


@pytest.mark.parametrize("model, expect", [
    ({}, {"threads": 2, "mem_mb": "1000", "runtime": "20", "slurm_partition": "train", "gres": None}),
    ({"device": "auto", "partition": None}, {"threads": 2, "slurm_partition": None, "gres": None}),
    ({"device": "cuda", "gpus": 2, "threads": 3, "partition": "gpu"},
     {"threads": 3, "mem_mb": "1000", "slurm_partition": "gpu", "gres": "gpu:2"}),
], ids=["cpu", "auto", "cuda"])
@pytest.mark.slow
def test_training_jobs_ask_for_what_the_model_section_says(tmp_path, model, expect):
    """GPUs only with model.device cuda; threads (= SLURM CPUs), memory, partition from the model section."""
    cfg = yaml.safe_load(CONFIG.read_text())
    cfg["model"].update(model)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    out = snakemake("-n", "train", "predict", "--profile", "profiles/slurm",
                    "--configfile", str(tmp_path / "config.yaml"), "--config", f"output_dir={tmp_path}").stdout
    for rule, n in (("train_fold", 6), ("predict", 1)):
        jobs = job_blocks(out, rule)
        assert len(jobs) == n, f"{rule}: {len(jobs)} jobs in the dry run"
        for job in jobs:
            assert job["threads"] == expect["threads"]
            for key, value in expect.items():
                if key != "threads":
                    assert job["resources"].get(key) == value, (rule, key, job["resources"])


@pytest.mark.slow
@pytest.mark.parametrize("model, message", [("{device: cuda, gpus: 0}", "model.gpus"),
                                            ("{device: gpu}", "'model.device'")])
def test_contradictory_device_settings_stop_the_run(tmp_path, model, message):
    proc = snakemake("-n", "train", "--configfile", str(CONFIG), "--config", f"output_dir={tmp_path}",
                     f"model={model}", check=False)
    assert proc.returncode != 0 and message in proc.stdout + proc.stderr


# ------------------------------------------------------------------------------------------ a real one-node SLURM
def free_port_pair() -> int:
    """slurmctld's port and the next (slurmd's), both free."""
    for _ in range(100):
        port = random.randrange(20000, 60000, 2)
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue
    raise RuntimeError("no two free consecutive ports")


@pytest.fixture(scope="module")
def slurm_env(tmp_path_factory):
    """Environment for commands that talk to a private one-node SLURM started (and stopped) here."""
    if os.environ.get("BRAINFUSE_SLURM_TEST") != "1":
        pytest.skip("BRAINFUSE_SLURM_TEST is not 1 (.ci/run sets it): no real-SLURM run")
    state = tmp_path_factory.mktemp("slurm")
    env = {**os.environ, "SLURMCTLD_PORT": str(free_port_pair())}
    # Room for two of the profile's largest jobs (a group asks for up to `cores` CPUs), so that independent groups
    # run side by side as on a real cluster instead of queueing behind each other; CPUs and memory are declared to
    # SLURM, not enforced (a 2-core CI machine runs them).
    cpus = max(os.cpu_count() or 1, 2 * profile("slurm")["cores"])
    start = subprocess.run(["bash", str(CLUSTER / "slurm.sh"), "start", str(state), str(cpus), "64000"],
                           capture_output=True, text=True, env=env, timeout=900)
    if start.returncode == 77:
        pytest.skip(f"no SLURM on this machine: {start.stderr.strip().splitlines()[-1]}")
    assert start.returncode == 0, f"tests/cluster/slurm.sh start failed:\n{start.stderr[-5000:]}"
    env["SLURM_CONF"] = str(state / "slurm.conf")
    try:
        yield env
    finally:
        subprocess.run(["bash", str(CLUSTER / "slurm.sh"), "stop", str(state)], env=env, timeout=120)


def slurm_jobs(env: dict, workdir: Path) -> list[dict]:
    """Every SLURM job submitted from ``workdir`` (MinJobAge keeps finished ones), with the Snakemake jobs its
    batch script ran (--target-jobs 'rule:wildcards' ...)."""
    out = subprocess.run(["scontrol", "show", "job", "-o"], env=env, capture_output=True, text=True, check=True)
    jobs = []
    for line in out.stdout.splitlines():
        fields = dict(re.findall(r"(\w+)=(\S*)", line))
        if fields.get("WorkDir") != str(workdir.resolve()):
            continue
        script = subprocess.run(["scontrol", "write", "batch_script", fields["JobId"], "-"], env=env,
                                capture_output=True, text=True, check=True).stdout
        words = shlex.split(script.split("--target-jobs", 1)[1].split(" --", 1)[0])
        fields["targets"] = [tuple(w.split(":", 1)) for w in words]
        jobs.append(fields)
    return jobs


def minutes(limit: str) -> int:
    """SLURM TimeLimit ([D-]HH:MM:SS) in minutes."""
    days, _, hms = limit.rpartition("-")
    h, m, s = (int(x) for x in hms.split(":"))
    return int(days or 0) * 1440 + h * 60 + m + math.ceil(s / 60)


def output_files(root: Path) -> dict[str, bytes]:
    """Every output of a run (outputs and the templates it built under out/templates; logs and Snakemake's own
    folder left out), with the run's folder written as <workdir>: sidecars name their inputs by absolute path."""
    files = {}
    for p in sorted((root / "out").rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and not rel.startswith("out/logs/"):
            files[rel] = p.read_bytes().replace(str(root).encode(), b"<workdir>")
    return files


@pytest.mark.slow
def test_readme_slurm_command_runs_the_workflow_as_a_local_run_does(slurm_env, tmp_path):
    """The README's `snakemake --profile profiles/slurm` on a real SLURM without accounting: it finishes, each job
    is submitted with the profile's groups and cores and the model section's resources, and the outputs equal
    those of the README's local command on the same config."""
    cfg = yaml.safe_load(CONFIG.read_text())
    slurm_profile = profile("slurm")
    runs = {"local": ["--cores", "2"],
            # a tiny run on an idle cluster: poll every 5 s instead of the plugin's 40 (MinJobAge is 3600 s)
            "slurm": ["--profile", "profiles/slurm", "--slurm-init-seconds-before-status-checks", "5"]}
    # Both runs from one copy of the workflow: an edit of the tree during the run cannot make them differ.
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copy(REPO / "Snakefile", repo)
    for item in ("workflow", "config", "src", "profiles", "envs"):
        shutil.copytree(REPO / item, repo / item, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    procs = {}
    t0 = time.time()
    for name, args in runs.items():
        (tmp_path / name).mkdir()
        with open(tmp_path / f"{name}.log", "w") as log:      # side by side: the cluster run mostly waits for polls
            procs[name] = subprocess.Popen(
                [*SNAKEMAKE, *args, "train", "--directory", str(tmp_path / name), "--configfile", str(CONFIG),
                 "--config", "output_dir=out"], cwd=repo, env=slurm_env, stdout=log, stderr=subprocess.STDOUT)
    deadline = t0 + 1500
    for name, proc in procs.items():
        try:
            proc.wait(timeout=max(1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            for p in procs.values():
                p.terminate()                     # Snakemake cancels its SLURM jobs on SIGTERM
            for p in procs.values():
                p.wait(timeout=120)
            pytest.fail(f"the {name} run did not finish in {deadline - t0:.0f} s (a status command that cannot see "
                        f"finished jobs waits forever):\n{(tmp_path / f'{name}.log').read_text()[-3000:]}")
    print(f"local and SLURM runs side by side: {time.time() - t0:.0f} s")
    for name, proc in procs.items():
        assert proc.returncode == 0, f"{name} run failed:\n{(tmp_path / f'{name}.log').read_text()[-5000:]}"
    local_log = (tmp_path / "local.log").read_text()
    assert "Using profiles profiles/slurm and workflow specific profile profiles/default" in \
        (tmp_path / "slurm.log").read_text()

    # --- what was submitted: every job once, grouped as the profile says, with the profile's and config's resources
    jobs = slurm_jobs(slurm_env, tmp_path / "slurm")
    planned = job_counts(local_log)
    planned.pop("train")                                             # the target rule: no job
    ran = Counter(rule for job in jobs for rule, _ in job["targets"])
    assert ran == planned, f"SLURM ran {dict(ran)}, the local run {dict(planned)}"
    assert all(j["JobState"] == "COMPLETED" and j["ExitCode"] == "0:0" for j in jobs), jobs
    default_partition = subprocess.run(["sinfo", "-h", "-o", "%P"], env=slurm_env, capture_output=True, text=True,
                                       check=True).stdout.split()
    default_partition = next(p.rstrip("*") for p in default_partition if p.endswith("*"))
    groups, sizes, cores = slurm_profile["groups"], slurm_profile["group-components"], slurm_profile["cores"]
    per_group = Counter()
    components = Counter()
    for job in jobs:
        rules = {rule for rule, _ in job["targets"]}
        assert "gpu" not in job.get("TresPerNode", "") + job.get("TRES", ""), f"GPU asked for on CPU: {job}"
        training = rules == {"train_fold"}
        assert job["Partition"] == (cfg["model"]["partition"] if training else default_partition), job
        threads = cfg["model"]["threads"] if training else cfg["threads"]      # every other rule: 1 or `threads`
        group = {groups.get(rule) for rule in rules}
        if group == {None}:                                          # an ungrouped job: one rule, one job
            assert len(job["targets"]) == 1 and int(job["NumCPUs"]) == threads, job
            continue
        assert len(group) == 1, f"one SLURM job mixes groups: {rules}"
        group = group.pop()
        n = len({wildcards for _, wildcards in job["targets"]})   # a component: one subject (or fold) of the stage
        assert n <= sizes[group], f"{group}: {n} components in one SLURM job, the profile allows {sizes[group]}"
        per_group[group] += 1
        components[group] += n
        side_by_side = min(n, cores // threads)                       # the profile's cores bound a group's width
        assert int(job["NumCPUs"]) == side_by_side * threads, (group, n, job["NumCPUs"])
        if training:                                                  # memory and time from the model section
            assert job["MinMemoryNode"] == f"{side_by_side * cfg['model']['mem_mb']}M", job
            assert minutes(job["TimeLimit"]) == math.ceil(n / side_by_side) * cfg["model"]["runtime"], job
    assert set(per_group) == {"demo", "anat", "dwi", "func", "tensors", "train"}
    for group, n_jobs in per_group.items():
        assert n_jobs == math.ceil(components[group] / sizes[group]), (group, n_jobs, components[group])
    for name in runs:                                                 # torch used the CPUs SLURM gave
        for log in (tmp_path / name / "out" / "logs" / "train_fold").glob("*.log"):
            assert f"({cfg['model']['threads']} CPU threads)" in log.read_text(), log

    # --- the same outputs as the local run, byte for byte
    local, cluster = output_files(tmp_path / "local"), output_files(tmp_path / "slurm")
    assert set(local) == set(cluster), set(local) ^ set(cluster)
    differ = sorted(rel for rel in local if local[rel] != cluster[rel])    # Atropos included (seeded)
    print(f"{len(local)} outputs compared, identical but for {len(differ)}")
    assert not differ, f"outputs that differ between the local and the SLURM run: {differ}"
    for rel in ("out/models/splits.tsv", "out/tensors/clinical.tsv", "out/tensors/DTI.npy",
                "out/models/single/fold-0/predictions.tsv"):
        assert rel in local                                   # among the compared outputs

    # --- moving training to other nodes (threads, memory, partition) does not retrain; a model setting does
    work = ["-n", "train", "--directory", str(tmp_path / "local"), "--configfile", str(CONFIG), "--config",
            "output_dir=out"]
    assert "Nothing to be done" in snakemake(*work, "model={threads: 1, mem_mb: 500, partition: other}",
                                             cwd=repo).stdout
    assert job_counts(snakemake(*work, "model={epochs: 4}", cwd=repo).stdout)["train_fold"] == 6
