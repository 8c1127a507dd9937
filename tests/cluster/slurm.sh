#!/usr/bin/env bash
# A throw-away one-node SLURM on localhost, for tests/test_cluster.py (and for trying profiles/slurm by hand).
#
#   tests/cluster/slurm.sh start DIR [CPUS] [MEM_MB]   install (apt, as root) if needed, start munged, slurmctld,
#                                                      slurmd; config, state and logs under DIR; prints the
#                                                      SLURM_CONF line to export
#   tests/cluster/slurm.sh stop DIR                    stop the daemons started in DIR (by their pid files)
#
# Exit status 77: SLURM is not installed and cannot be (not root, no apt-get, apt-get failed): the caller skips.
# Any other failure (installed but a daemon does not come up) is an error, with the daemons' logs printed.
#
# Everything is private to DIR: own munge key and socket, non-default ports (SLURMCTLD_PORT, default 16817, and
# the next one for slurmd), so that a SLURM or munge already on the machine is neither used nor disturbed.
# As ENVIRONMENT.md found: ProctrackType=proctrack/linuxproc and TaskPlugin=task/none (no cgroups in a
# container), no accounting (sacct then fails: profiles/slurm polls with squeue, which needs MinJobAge >= 120 s).
set -euo pipefail
export PATH="$PATH:/usr/sbin:/sbin"

cmd="${1:-}"
dir="${2:-}"
[ -n "$cmd" ] && [ -n "$dir" ] || { echo "usage: $0 start|stop DIR [CPUS] [MEM_MB]" >&2; exit 2; }
[ "$cmd" = start ] && mkdir -p "$dir"
[ -d "$dir" ] && dir="$(cd "$dir" && pwd)"

# The slurm jobstep plugin runs each job with a nested srun whose environment it strips of every SLURM_*
# variable, SLURM_CONF included: inside a job, srun only finds the default /etc/slurm/slurm.conf. Link it to
# ours while the cluster runs, never over a machine's own configuration.
SYSTEM_CONF=/etc/slurm/slurm.conf

stop() {
    local name pid
    if [ -L "$SYSTEM_CONF" ] && [ "$(readlink "$SYSTEM_CONF")" = "$dir/slurm.conf" ]; then rm -f "$SYSTEM_CONF"; fi
    for name in slurmd slurmctld munged; do
        [ -f "$dir/$name.pid" ] || continue
        pid="$(cat "$dir/$name.pid")"
        if kill "$pid" 2>/dev/null; then
            for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
            kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null || true
        fi
        rm -f "$dir/$name.pid"
    done
}

logs() {
    local f
    for f in "$dir"/munged.log "$dir"/slurmctld.log "$dir"/slurmd.log; do
        [ -f "$f" ] && { echo "---- $f (last 30 lines)" >&2; tail -n 30 "$f" >&2; }
    done
    return 0
}

fail() { echo "slurm.sh: $*" >&2; logs; stop; exit 1; }

if [ "$cmd" = stop ]; then
    stop
    exit 0
fi
[ "$cmd" = start ] || { echo "usage: $0 start|stop DIR [CPUS] [MEM_MB]" >&2; exit 2; }

# ---- install (Debian/Ubuntu: slurm-wlm 22.05 in bookworm, munge)
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null \
        || ! command -v sbatch >/dev/null; then
    [ "$(id -u)" = 0 ] || { echo "slurm.sh: SLURM is not installed and installing it needs root" >&2; exit 77; }
    command -v apt-get >/dev/null || { echo "slurm.sh: SLURM is not installed and there is no apt-get" >&2; exit 77; }
    echo "slurm.sh: apt-get install slurm-wlm munge" >&2
    # policy-rc.d 101: the packages' postinst must not start the system daemons (we start our own below)
    policy=/usr/sbin/policy-rc.d
    created_policy=0
    if [ ! -e "$policy" ]; then printf '#!/bin/sh\nexit 101\n' > "$policy"; chmod +x "$policy"; created_policy=1; fi
    if ! { DEBIAN_FRONTEND=noninteractive apt-get update -qq \
           && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends slurm-wlm munge; } >&2
    then
        [ "$created_policy" = 1 ] && rm -f "$policy"
        echo "slurm.sh: apt-get could not install slurm-wlm and munge" >&2
        exit 77
    fi
    [ "$created_policy" = 1 ] && rm -f "$policy"
fi
[ "$(id -u)" = 0 ] || { echo "slurm.sh: slurmd must run as root (it starts jobs as their user)" >&2; exit 77; }

# ---- configuration
cpus="${3:-$(nproc)}"
mem_mb="${4:-$(awk '/MemTotal/ {print int($2 / 1024)}' /proc/meminfo)}"
port="${SLURMCTLD_PORT:-16817}"
node="$(hostname -s)"
mkdir -p "$dir/ctld" "$dir/d"
chmod 700 "$dir"
stop                                   # a previous start in the same DIR
cat > "$dir/slurm.conf" <<EOF
ClusterName=brainfuse
SlurmctldHost=$node(127.0.0.1)
SlurmctldPort=$port
SlurmdPort=$((port + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/munge.socket
StateSaveLocation=$dir/ctld
SlurmdSpoolDir=$dir/d
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
MailProg=/bin/true
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
# squeue shows a finished job for MinJobAge seconds: the profile's squeue polling needs >= 120 s (3 x the plugin's
# first status check delay); an hour keeps every job of a test run visible to scontrol afterwards.
MinJobAge=3600
# The node as declared, not as detected: a job's request has to fit the declared node (memory is not enforced).
SlurmdParameters=config_overrides
NodeName=$node NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=main Nodes=$node Default=YES MaxTime=INFINITE State=UP
# A second partition on the same node, to see jobs routed by name (model.partition in the test's config)
PartitionName=train Nodes=$node MaxTime=INFINITE State=UP
EOF
export SLURM_CONF="$dir/slurm.conf"
# a link left by a start whose folder is gone (the caller was killed before `stop`)
if [ -L "$SYSTEM_CONF" ] && [ ! -e "$SYSTEM_CONF" ]; then rm -f "$SYSTEM_CONF"; fi
# ... or whose folder is still there (pytest's temporary folders are kept) but whose slurmctld no longer runs: a
# link into a folder holding this script's munge.key is ours, not the machine's configuration
old="$(readlink "$SYSTEM_CONF" 2>/dev/null || true)"
if [ -n "$old" ] && [ "$old" != "$SLURM_CONF" ] && [ -f "$(dirname "$old")/munge.key" ]; then
    pidf="$(dirname "$old")/slurmctld.pid"
    { [ -f "$pidf" ] && kill -0 "$(cat "$pidf")" 2>/dev/null; } || rm -f "$SYSTEM_CONF"
fi
if [ -e "$SYSTEM_CONF" ] || [ -L "$SYSTEM_CONF" ]; then
    if [ "$(readlink "$SYSTEM_CONF" || true)" != "$SLURM_CONF" ]; then
        echo "slurm.sh: $SYSTEM_CONF exists: this machine has its own SLURM, which this script leaves alone" >&2
        exit 77
    fi
else
    mkdir -p "$(dirname "$SYSTEM_CONF")"
    ln -s "$SLURM_CONF" "$SYSTEM_CONF"
fi

# ---- munge with a private key and socket
[ -f "$dir/munge.key" ] || { dd if=/dev/urandom of="$dir/munge.key" bs=1024 count=1 status=none; }
chmod 400 "$dir/munge.key"
munged --force --key-file="$dir/munge.key" --socket="$dir/munge.socket" --pid-file="$dir/munged.pid" \
    --log-file="$dir/munged.log" --seed-file="$dir/munged.seed" || fail "munged did not start"
for _ in $(seq 50); do [ -S "$dir/munge.socket" ] && break; sleep 0.1; done

# ---- daemons
slurmctld -c || fail "slurmctld did not start"
slurmd -N "$node" || fail "slurmd did not start"
for _ in $(seq 60); do
    state="$(sinfo -h -N -n "$node" -o %t 2>/dev/null | sort -u || true)"   # one line per partition
    [ "$state" = idle ] && break
    sleep 0.5
done
[ "$state" = idle ] || fail "node $node is '${state:-unknown}', not idle, after 30 s"
out="$(timeout 60 srun -N1 -n1 hostname 2>&1)" || fail "srun hostname failed: $out"
echo "slurm.sh: one-node SLURM up (node $node, $cpus CPUs, $mem_mb MB, port $port); srun ran on $out" >&2
echo "SLURM_CONF=$SLURM_CONF"
