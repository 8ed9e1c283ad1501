#!/usr/bin/env bash
# `ray up` / `ray submit` / `ray down` with cluster/cluster.yaml against this machine (127.0.0.1 over ssh), as a
# user would run them against a head node. Root only (it starts sshd).
#
#   cluster/ci/ray_up_local.sh WORKDIR [cluster/sweep.py arguments]
#
# Everything runs inside fresh PID, network and mount namespaces (unshare): `ray stop`, which `ray up` and `ray
# down` run on the nodes, kills every Ray process it can see, and Ray's ports and /tmp/ray are per machine; so
# other Ray users of this machine are never touched. Inside, /root is WORKDIR/home and /tmp/ray is a tmpfs;
# sshd listens on 127.0.0.1:22 of the private network. The cluster config is cluster/cluster.yaml with only the
# address, the ssh key, the checkout path and the knobs (DDAEBM_VENV = the environment this script runs in, not
# reinstalled; DDAEBM_RUN_ROOT = WORKDIR/runs) replaced; with RAY_UP_FRESH_VENV=1 the setup commands create
# WORKDIR/venv and install the project into it as on a new node instead (minutes, needs the package index).
# The transcript goes to stdout and WORKDIR/transcript.txt.
# Exit status 3: cannot run here (not root, no apt-get for openssh-server/rsync, no namespaces).
set -euo pipefail

die() { echo "ray_up_local: $*" >&2; exit "${2:-1}"; }
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)

if [[ ${1:-} != --inside ]]; then
    work=${1:?usage: ray_up_local.sh WORKDIR [sweep arguments]}
    shift
    [[ $(id -u) == 0 ]] || die "needs root (sshd, namespaces)" 3
    if ! command -v sshd >/dev/null && ! [[ -x /usr/sbin/sshd ]] || ! command -v rsync >/dev/null; then
        command -v apt-get >/dev/null || die "openssh-server/rsync missing and no apt-get" 3
        export DEBIAN_FRONTEND=noninteractive
        apt-get install -y -q --no-install-recommends openssh-server openssh-client rsync >/dev/null 2>&1 \
            || { apt-get update -q >/dev/null 2>&1 \
                 && apt-get install -y -q --no-install-recommends openssh-server openssh-client rsync >/dev/null; } \
            || die "apt-get install openssh-server rsync failed" 3
    fi
    unshare -n -p -f --mount-proc true 2>/dev/null || die "unshare of PID/network/mount namespaces is not allowed here" 3
    mkdir -p "$work"
    work=$(cd "$work" && pwd)
    python=${DDAEBM_PYTHON:-$(command -v python3)}
    exec unshare -n -p -f --mount-proc bash "${BASH_SOURCE[0]}" --inside "$work" "$python" "${RAY_UP_FRESH_VENV:-0}" "$@"
fi

# ----------------------------------------------------------------------------------- inside the namespaces
shift
work=$1 python=$2 fresh=$3
shift 3
venv_bin=$(dirname "$python")
export PATH=$venv_bin:$PATH
ip link set lo up
mkdir -p "$work/home" "$work/ssh" "$work/runs" /tmp/ray /run/sshd
# The interpreter may live under the real /root (pyenv): keep that folder visible in the private home.
real=$(readlink -f "$python")
if [[ $real == /root/* ]]; then
    top=${real#/root/}
    top=${top%%/*}
    mkdir -p "$work/home/$top"
    mount --bind "/root/$top" "$work/home/$top"
fi
mount --rbind "$work/home" /root
mount -t tmpfs tmpfs /tmp/ray
export HOME=/root
exec > >(tee "$work/transcript.txt") 2>&1

# sshd for root on 127.0.0.1:22 with a fresh key pair
[[ -f $work/ssh/host_key ]] || ssh-keygen -q -t ed25519 -N '' -f "$work/ssh/host_key"
[[ -f $work/ssh/id_ed25519 ]] || ssh-keygen -q -t ed25519 -N '' -f "$work/ssh/id_ed25519"
mkdir -p /root/.ssh && cp "$work/ssh/id_ed25519.pub" /root/.ssh/authorized_keys
cp -n /etc/skel/.bashrc /etc/skel/.profile /root/ 2>/dev/null || true  # a fresh account's dot files
cat > "$work/ssh/sshd_config" <<EOF
ListenAddress 127.0.0.1
Port 22
HostKey $work/ssh/host_key
PidFile $work/ssh/sshd.pid
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
Subsystem sftp internal-sftp
EOF
/usr/sbin/sshd -f "$work/ssh/sshd_config"

# The auth token file_mounts copies to the nodes, and the cluster config: cluster.yaml with this machine's values.
mkdir -p /root/.ray
ray get-auth-token --generate >/dev/null
"$python" - "$root/cluster/cluster.yaml" "$work/cluster.yaml" "$root" "$work" "$venv_bin" "$fresh" <<'EOF'
import sys

import yaml

src, dst, root, work, venv_bin, fresh = sys.argv[1:]
cfg = yaml.safe_load(open(src))
cfg["provider"].update(head_ip="127.0.0.1", worker_ips=[])
cfg["auth"] = {"ssh_user": "root", "ssh_private_key": f"{work}/ssh/id_ed25519"}
cfg["file_mounts"] = {remote: (f"{root}/{local[2:]}" if local.startswith("./") else local)
                      for remote, local in cfg["file_mounts"].items()}
knobs = {"DDAEBM_VENV": venv_bin.rsplit("/bin", 1)[0], "DDAEBM_RUN_ROOT": f"{work}/runs", "DDAEBM_INSTALL": "0"}
if fresh == "1":
    knobs.update(DDAEBM_VENV=f"{work}/venv", DDAEBM_INSTALL="1")
cmds = cfg["setup_commands"]
for i, cmd in enumerate(cmds):
    for key, value in knobs.items():
        if cmd.startswith(f"echo 'export {key}="):
            cmds[i] = f"echo 'export {key}={value}' {'>' if i == 0 else '>>'} ~/.ddaebm-env"
yaml.safe_dump(cfg, open(dst, "w"), sort_keys=False)
EOF

cd "$root"
run() { echo "\$ $*"; local t0=$SECONDS; "$@"; echo "[$(( SECONDS - t0 )) s]"; }

# RAY_UP_INTERRUPT=NAME: a second sweep NAME (2 ranks of 0.5 CPU per trial), `ray submit` without a terminal;
# SIGINT to its process group (a Ctrl-C where there is no terminal) once a trial has reported; then the same
# `ray submit` again, which resumes it to the end.
interrupt_and_resume() {
    local name=$1 pid t0 i rc=0
    shift
    local args=("$@" --name "$name" --workers 2 --cpus-per-worker 0.5)
    local exp=$work/runs/sweeps/$name
    echo "\$ ray submit $work/cluster.yaml cluster/sweep.py -- ${args[*]} </dev/null &   # SIGINT after a report"
    t0=$SECONDS
    set -m  # its own process group, as a shell's job
    timeout 900 ray submit "$work/cluster.yaml" cluster/sweep.py -- "${args[@]}" </dev/null &
    pid=$!
    set +m
    for i in $(seq 1200); do
        compgen -G "$exp/run_trial_*/checkpoint_000000" >/dev/null && break
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.5
    done
    echo "[$(( SECONDS - t0 )) s] kill -INT -$pid"
    kill -INT -- "-$pid" 2>/dev/null || true
    wait "$pid" || rc=$?
    echo "[ray submit: exit status $rc]"
    t0=$SECONDS
    for i in $(seq 240); do pgrep -f "python .*sweep.py .*--name $name" >/dev/null || break; sleep 0.5; done
    if pgrep -fa "python .*sweep.py .*--name $name" >/dev/null; then
        echo "ray_up_local: the remote sweep $name is still running $(( SECONDS - t0 )) s later"
    else
        echo "[the remote sweep ended $(( SECONDS - t0 )) s after ray submit]"
    fi
    echo "--- $exp/driver.log, last lines:"
    tail -n 4 "$exp/driver.log" 2>/dev/null || echo "(no driver.log)"
    run timeout 900 ray submit "$work/cluster.yaml" cluster/sweep.py -- "${args[@]}"
}

run timeout 600 ray up -y "$work/cluster.yaml" --no-config-cache
run timeout 900 ray submit "$work/cluster.yaml" cluster/sweep.py -- "$@"
[[ -n ${RAY_UP_INTERRUPT:-} ]] && interrupt_and_resume "$RAY_UP_INTERRUPT" "$@"
run timeout 120 ray exec "$work/cluster.yaml" 'which python ray; ray status | head -12'
run timeout 300 ray down -y "$work/cluster.yaml"
kill "$(cat "$work/ssh/sshd.pid")" 2>/dev/null || true
