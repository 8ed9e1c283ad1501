#!/usr/bin/env bash
# A real single-node SLURM on this machine, for tests and for trying the job scripts (root, no systemd needed).
#
#   slurm/ci/local_slurm.sh start DIR   install the Debian packages if missing, start munged (unless one runs),
#                                       slurmctld and slurmd with DIR/slurm.conf; prints the SLURM_CONF line
#   slurm/ci/local_slurm.sh stop DIR    stop what `start DIR` started (by the pid files in DIR)
#
# Then: export SLURM_CONF=DIR/slurm.conf; sbatch ...; squeue; scontrol show job N.
# The configuration is the minimal one (docs/architecture.md, stack notes): one partition, this host as the only node,
# no accounting, no cgroups; ports are picked free so it does not collide with another SLURM on the host.
# Exit status 3: cannot run here (not root, no apt-get and no SLURM installed), so tests can skip with the reason.
set -euo pipefail

PACKAGES=(slurmctld slurmd slurm-client munge)

die() { echo "local_slurm: $*" >&2; exit "${2:-1}"; }

install_packages() {
    [[ $(id -u) == 0 ]] || die "needs root: munged, slurmctld and slurmd run as root here" 3
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
        && command -v munged >/dev/null && return 0
    command -v apt-get >/dev/null || die "SLURM is not installed and there is no apt-get" 3
    export DEBIAN_FRONTEND=noninteractive
    # The package lists of a fresh image may be missing or stale: update once if the first try fails.
    apt-get install -y -q --no-install-recommends "${PACKAGES[@]}" >/dev/null 2>&1 \
        || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q --no-install-recommends "${PACKAGES[@]}" >/dev/null; } \
        || die "apt-get install ${PACKAGES[*]} failed" 3
}

munge_ok() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

start_munge() {
    local dir=$1
    munge_ok && return 0                        # the host's munged serves us; leave it alone at stop
    [[ -s /etc/munge/munge.key ]] || { mungekey --create >/dev/null 2>&1 || dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 2>/dev/null; }
    chown munge: /etc/munge/munge.key 2>/dev/null || true
    chmod 400 /etc/munge/munge.key
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge: /run/munge /var/log/munge /var/lib/munge
    runuser -u munge -- /usr/sbin/munged
    for _ in $(seq 50); do munge_ok && break; sleep 0.1; done
    munge_ok || die "munged did not start"
    cp /run/munge/munged.pid "$dir/munged.pid"  # ours: stop kills it
}

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])' 2>/dev/null \
        || echo "$1"
}

write_conf() {
    local dir=$1 host node
    host=$(hostname -s)
    # slurmd -C prints this node's CPUs, sockets, cores and memory as a NodeName line.
    node=$(slurmd -C | head -n 1)
    cat > "$dir/slurm.conf" <<CONF
ClusterName=local
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$(free_port 6817)
SlurmdPort=$(free_port 6818)
AuthType=auth/munge
# A requeued job waits cred_expire + 1 s before it may start again (default 120): short here, for tests.
AuthInfo=cred_expire=${DDAEBM_SLURM_CRED_EXPIRE:-10}
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
KillWait=30
# Schedule every few seconds (defaults 60 s / 30 s): a requeued job becomes eligible by time, which wakes no scheduler.
SchedulerParameters=sched_interval=5,bf_interval=5
$node NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF
}

start() {
    local dir=$1
    install_packages
    mkdir -p "$dir/state" "$dir/spool"
    dir=$(cd "$dir" && pwd)
    start_munge "$dir"
    write_conf "$dir"
    export SLURM_CONF=$dir/slurm.conf
    slurmctld -f "$SLURM_CONF" -i        # -i: ignore state from an earlier run in this folder
    slurmd -f "$SLURM_CONF"
    for _ in $(seq 300); do
        [[ $(sinfo -h -o %T 2>/dev/null) == idle ]] && { echo "export SLURM_CONF=$SLURM_CONF"; return 0; }
        sleep 0.1
    done
    sinfo >&2 || true
    tail -n 20 "$dir/slurmctld.log" "$dir/slurmd.log" >&2 || true
    die "the node did not become idle in 30 s (logs in $dir)"
}

stop_pidfile() {
    local file=$1 pid
    [[ -s $file ]] || return 0
    pid=$(cat "$file")
    kill "$pid" 2>/dev/null || return 0
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
}

stop() {
    local dir=$1
    # Jobs first: their slurmstepd and ranks would outlive the daemons.
    if [[ -f $dir/slurm.conf && -s $dir/slurmctld.pid ]] && kill -0 "$(cat "$dir/slurmctld.pid")" 2>/dev/null; then
        export SLURM_CONF=$dir/slurm.conf
        squeue -h -o %i | xargs -r scancel >/dev/null 2>&1 || true
        for _ in $(seq 600); do [[ -z $(squeue -h -o %i 2>/dev/null) ]] && break; sleep 0.1; done
    fi
    stop_pidfile "$dir/slurmd.pid"
    stop_pidfile "$dir/slurmctld.pid"
    stop_pidfile "$dir/munged.pid"
    rm -f "$dir/munged.pid"
}

case ${1:-} in
    start) start "${2:?usage: local_slurm.sh start DIR}" ;;
    stop) stop "${2:?usage: local_slurm.sh stop DIR}" ;;
    *) die "usage: local_slurm.sh start|stop DIR" 2 ;;
esac
