#!/usr/bin/env bash
# The launcher every slurm/<dataset>.sh hands over to (exec, so it stays the batch shell SLURM signals):
#
#   launch.sh CONFIG [ddaebm train arguments: key=value overrides, --steps N, --slice-steps N, ...]
#
# One rank per SLURM task: `srun` starts SLURM_NTASKS copies of `python -m ddaebm train`, and ddaebm maps
# SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID to its rank, world size and local rank (ddaebm/distributed.py).
# Why not `srun torchrun` (torchtitan's multinode_trainer.slurm): a torchrun agent turns the ranks' exit status
# 143 ("checkpointed after SIGUSR1/SIGTERM") into its own 1 and dies on SIGUSR1 without passing it on, so the
# requeue rule below could not work; srun forwards SIGUSR1/SIGTERM to every rank and returns the highest exit
# status of its tasks. It also makes the number of ranks per node a SLURM setting (--ntasks-per-node), which is
# what CPU-only nodes need; on GPU nodes it must equal --gpus-per-node (checked below).
#
# Preemption and time limits: the job scripts ask for `--signal=B:USR1@300`, i.e. SIGUSR1 to this shell five
# minutes before the time limit. The trap forwards it to srun, the ranks finish their step, checkpoint and
# exit 143, and this script requeues the job (`scontrol requeue`): same job id and name, hence the same run
# directory, and ddaebm resumes from its newest complete checkpoint by itself. SIGTERM (scancel, the time
# limit itself) is forwarded too, so the ranks checkpoint inside SLURM's KillWait, but never requeues.
#
# Environment knobs (exported by sbatch into the job):
#   DDAEBM_CONFIG        config file instead of the job script's (relative to the checkout or the cwd)
#   DDAEBM_VENV          virtual environment to activate (default: <checkout>/.venv when it exists)
#   DDAEBM_PYTHON        python to run instead (wins over DDAEBM_VENV)
#   DDAEBM_RUN_ROOT      folder of run directories (default <checkout>/runs); the run dir is $DDAEBM_RUN_ROOT/<job name>
#   DDAEBM_MASTER_ADDR   rendezvous host (default: the first node of the allocation), DDAEBM_MASTER_PORT (job-id based)
#   DDAEBM_REQUEUE       0 disables the self-requeue; DDAEBM_MAX_REQUEUES caps it (default 50)
#   DDAEBM_SRUN_ARGS     extra srun flags (e.g. "--cpu-bind=cores --gpu-bind=none")
set -uo pipefail  # no -e: the script must go on after srun fails, to read its status

log() { echo "[$(date -u +%Y-%m-%dT%H:%M:%S.%3NZ)] slurm/launch.sh: $*"; }
die() { log "error: $*" >&2; exit 2; }

[[ -n ${SLURM_JOB_ID:-} ]] || die "not inside a SLURM job: submit with sbatch (or run inside salloc)"
(( $# >= 1 )) || die "usage: launch.sh CONFIG [ddaebm train arguments]"
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
config=${DDAEBM_CONFIG:-$1}
shift
[[ -f $config ]] || config=$root/$config
[[ -f $config ]] || die "config ${DDAEBM_CONFIG:-$config} not found (in $PWD or $root)"

# --- Python: an explicit interpreter, a venv, the checkout's .venv, or whatever python3 the login shell has.
if [[ -n ${DDAEBM_PYTHON:-} ]]; then
    python=$DDAEBM_PYTHON
    # Its folder first on the PATH, as an activated venv has it: the tools found there (ninja for DeepSpeed's JIT
    # op) must be the same in every job, or each job rebuilds the op that the previous one cached.
    PATH=$(dirname "$python"):$PATH
elif [[ -n ${DDAEBM_VENV:-} || -f $root/.venv/bin/activate ]]; then
    # shellcheck disable=SC1091
    source "${DDAEBM_VENV:-$root/.venv}/bin/activate" || die "cannot activate ${DDAEBM_VENV:-$root/.venv}"
    python=python
else
    python=python3
fi
"$python" -c "import ddaebm" 2>/dev/null || die "$python cannot import ddaebm (set DDAEBM_VENV or DDAEBM_PYTHON)"

# --- Where the ranks meet: the first node of the allocation, a port derived from the job id (stable across a
# requeue, different between jobs that share a node).
head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
# The address SLURM itself reaches that node at (NodeAddr; the node name unless slurm.conf says otherwise).
head_addr=$(scontrol show node "$head_node" -o 2>/dev/null | sed -n 's/.* NodeAddr=\([^ ]*\).*/\1/p')
export MASTER_ADDR=${DDAEBM_MASTER_ADDR:-${head_addr:-$head_node}}
export MASTER_PORT=${DDAEBM_MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
export PYTHONUNBUFFERED=1
export PYTHONFAULTHANDLER=1
# DeepSpeed JIT-compiles a comm op once; a fixed cache keeps later jobs from compiling it again. (A job killed
# while it compiles can leave $TORCH_EXTENSIONS_DIR/*/lock behind, and later jobs then wait at start: remove it.)
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$HOME/.cache/ddaebm-torch-extensions}

# --- NCCL (GPU clusters). Leave unset unless the fabric needs it; values are examples.
# export NCCL_SOCKET_IFNAME=ib0            # the interface the nodes reach each other on (eth0, ib0, bond0, ...)
# export NCCL_IB_DISABLE=1                 # no InfiniBand: TCP sockets
# export NCCL_P2P_DISABLE=1                # broken peer-to-peer between GPUs of a node
# export NCCL_DEBUG=INFO                   # print the topology and the transports NCCL picked (WARN for less)
# export NCCL_ASYNC_ERROR_HANDLING=1       # a failed collective raises instead of hanging (older torch)
# export NCCL_BUFFSIZE=2097152             # smaller buffers when GPU memory is tight

# --- Ranks per node come from SLURM. On GPU nodes each rank takes the GPU of its SLURM_LOCALID, so there must
# not be more ranks than GPUs on a node.
tasks_per_node=${SLURM_NTASKS_PER_NODE:-$(( SLURM_NTASKS / SLURM_JOB_NUM_NODES ))}
gpus_per_node=${SLURM_GPUS_ON_NODE:-0}
if (( gpus_per_node > 0 && tasks_per_node > gpus_per_node )); then
    die "--ntasks-per-node=$tasks_per_node exceeds --gpus-per-node=$gpus_per_node (one rank per GPU)"
fi

run_dir=${DDAEBM_RUN_ROOT:-$root/runs}/$SLURM_JOB_NAME
mkdir -p "$run_dir"
# The job log, linked into the run directory so a run's history is found beside its checkpoints.
job_log=$(scontrol show job "$SLURM_JOB_ID" | sed -n 's/^ *StdOut=//p')
[[ -n $job_log && -f $job_log ]] && ln -sfn "$job_log" "$run_dir/slurm-$SLURM_JOB_ID.out"

# Each rank starts with SIGUSR1 ignored (an ignored disposition survives exec) until `ddaebm train` installs its
# handler in its first lines: a warning that comes while the interpreter starts must not kill the rank. The
# launcher repeats a received SIGUSR1 every 10 s until the ranks have ended, so a rank gets it once it listens.
cmd=(bash -c 'trap "" USR1; exec "$@"' rank "$python" -m ddaebm train "$config" --run-dir "$run_dir" "$@")
srun_args=(--kill-on-bad-exit=0)  # explicit: a cluster default of 1 would kill ranks still sealing a checkpoint
[[ -n ${SLURM_CPUS_PER_TASK:-} ]] && srun_args+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")  # srun ≥ 22.05 does not inherit it
# shellcheck disable=SC2206
srun_args+=(${DDAEBM_SRUN_ARGS:-})
log "job $SLURM_JOB_ID '$SLURM_JOB_NAME' restart ${SLURM_RESTART_COUNT:-0}: $SLURM_NTASKS ranks on" \
    "$SLURM_JOB_NUM_NODES node(s) ($SLURM_JOB_NODELIST), master $MASTER_ADDR:$MASTER_PORT, run dir $run_dir"
log "srun ${srun_args[*]} ${cmd[*]:4}"

# --- Run the ranks in the background so this shell can take signals while they train.
got_usr1=0
got_term=0
srun_pid=""
# shellcheck disable=SC2317  # called from the traps
forward() {
    if [[ $1 == USR1 ]]; then
        (( got_usr1 )) && return 0  # already being forwarded
        got_usr1=1
    else
        (( got_term )) && return 0
        got_term=1
    fi
    log "SIG$1 received: forwarding it to the ranks (they checkpoint and exit 143)"
    [[ -n $srun_pid ]] || return 0  # srun is being started: sent below
    kill -s "$1" "$srun_pid" 2>/dev/null
    if [[ $1 == USR1 ]]; then
        # Every 10 s; polls each second so that it is gone within a second of srun (the job ends with it).
        (n=0; while sleep 1 && kill -0 "$srun_pid" 2>/dev/null; do
             (( ++n % 10 )) || kill -s USR1 "$srun_pid" 2>/dev/null
         done) &
    fi
    return 0
}
trap 'forward USR1' USR1
trap 'forward TERM' TERM
srun "${srun_args[@]}" "${cmd[@]}" &
srun_pid=$!
# A signal that came while srun was being started: forward it now.
(( got_usr1 )) && { got_usr1=0; forward USR1; }
(( got_term )) && { got_term=0; forward TERM; }

# A trapped signal makes `wait` return early (status > 128) while srun still runs: wait again until it ended.
while :; do
    wait "$srun_pid"
    rc=$?
    (( rc > 128 )) && kill -0 "$srun_pid" 2>/dev/null && continue
    break
done
# If the last wait was the interrupted one and srun ended just then, its status has not been collected yet.
if (( rc > 128 )); then
    wait "$srun_pid" 2>/dev/null
    late=$?
    (( late != 127 )) && rc=$late
fi
signals=$( (( got_usr1 )) && printf ' SIGUSR1'; (( got_term )) && printf ' SIGTERM')
log "ranks ended with exit status $rc${signals:+ after$signals}"

# --- Requeue after a preemption warning: 143 is "checkpoint written, run the same command again". Also when
# SIGUSR1 came before the ranks listened and they died of it anyway: they resume from the last checkpoint.
# Never after a SIGTERM without a warning before it (scancel, a time limit without --signal), nor after 0 (done,
# or --slice-steps), 2 (bad input) or 3 (stopped on non-finite losses).
requeue=0
if (( rc == 143 )) && (( got_usr1 || ! got_term )); then
    requeue=1
elif (( got_usr1 )) && (( rc != 0 && rc != 2 && rc != 3 )); then
    requeue=1
fi
if (( requeue )) && [[ ${DDAEBM_REQUEUE:-1} != 0 ]]; then
    if (( ${SLURM_RESTART_COUNT:-0} >= ${DDAEBM_MAX_REQUEUES:-50} )); then
        log "not requeuing: restart ${SLURM_RESTART_COUNT:-0} reached DDAEBM_MAX_REQUEUES=${DDAEBM_MAX_REQUEUES:-50}"
    else
        log "requeuing job $SLURM_JOB_ID; it resumes from the newest checkpoint in $run_dir"
        trap '' TERM  # SLURM ends this shell as part of the requeue
        scontrol requeue "$SLURM_JOB_ID" && exit 0
        log "scontrol requeue failed: resubmit the same command to resume"
    fi
fi
exit "$rc"
