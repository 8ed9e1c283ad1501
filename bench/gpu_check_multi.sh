#!/usr/bin/env bash
# Two or more GPUs on one machine: a 2-rank, 20-step DeepSpeed ZeRO 1 run preempted by SIGUSR1 and resumed, under
# torchrun, and under srun --gpus-per-task=1 where SLURM is there. Prints one line per check; exit 1 if any failed.
#
#   bash bench/gpu_check_multi.sh [CONFIG]      (default configs/tiny/cifar10.yaml; random data from made shards)
set -u
cd "$(dirname "$0")/.."
CONFIG=${1:-configs/tiny/cifar10.yaml}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
FAILED=0
python -m data_shards stackedmnist --input ../shared/data/mnist-10k --out "$WORK/shards" --name stackedmnist \
    --split train --num-samples 256 >/dev/null || { echo "multi: cannot make shards"; exit 1; }
ARGS=("$CONFIG" --steps 20 "data.dataset=stackedmnist" "data.root=$WORK/shards" dist.backend=deepspeed
      dist.zero_stage=1 train.ckpt_every=5 train.log_every=1 train.eval_at_end=false data.batch=8)

check() {  # name, then the command prefix that starts 2 ranks
    local name=$1; shift
    local run="$WORK/run-$name"
    "$@" -m ddaebm train "${ARGS[@]}" --run-dir "$run" >"$run.log1" 2>&1 &
    local pid=$!
    for _ in $(seq 600); do  # SIGUSR1 once step 7 is logged
        grep -q '"step": 7' "$run/stats.jsonl" 2>/dev/null && break
        sleep 0.5
    done
    # the ranks, not the launcher (torchrun dies of a signal it is sent; the ranks checkpoint and exit 143)
    for p in $(pgrep -f -- "--run-dir $run"); do [ "$p" != "$pid" ] && kill -USR1 "$p"; done
    wait $pid; local first=$?
    "$@" -m ddaebm train "${ARGS[@]}" --run-dir "$run" >"$run.log2" 2>&1; local second=$?
    local rows; rows=$(wc -l <"$run/stats.jsonl")
    local steps; steps=$(python -c "import json,sys; print(sorted({json.loads(l)['step'] for l in open('$run/stats.jsonl')})==list(range(1,21)))")
    echo "{\"check\": \"$name\", \"preempted_exit\": $first, \"resumed_exit\": $second, \"rows\": $rows, \"one_row_per_step\": \"$steps\"}"
    if [ "$second" != 0 ] || [ "$steps" != True ]; then FAILED=1; tail -n 20 "$run.log1" "$run.log2"; fi
}

check torchrun torchrun --nproc_per_node 2
if command -v srun >/dev/null && timeout 10 sinfo >/dev/null 2>&1; then
    check srun srun -n2 --gpus-per-task=1 python
else
    echo '{"check": "srun", "status": "skipped", "reason": "no responding SLURM here"}'
fi
exit $FAILED
