#!/usr/bin/env bash
# Issue 21's runs (README "Small-scale results"), two at a time (one CPU thread each), every one resumable:
# run this script again, in any later sitting, and each run continues from its last checkpoint; finished runs
# only re-check their budget. Output: RUNS/<name>/fidelity.jsonl, grids, RUNS/curves-*.png; the MNIST NICE
# experiment (DDAEBM against maximum likelihood, side by side, configs/small/mnist_nice.yaml) in RUNS/nice.
#
#   bash bench/fidelity_runs.sh RUNS DATA [MNIST_10K]     e.g. bash bench/fidelity_runs.sh ~/runs/t21 ~/data
#
# DATA holds the shard sets fashion32 (fashion-{train,test}), mnist32 and mnist28 (mnist-{train,test}) and
# stackedmnist (stackedmnist-{train,test}); missing ones are written first from /usr/share/datasets/fashion-mnist
# and MNIST_10K (default ../shared/data/mnist-10k). STEPS (default 10000) bounds every run; MINUTES (default 240)
# is the wall-clock guard. In-loop rows use 1,000 FID samples (500 refined) every 20 training minutes (one takes
# 5-10 minutes beside a training run); the final 10,000-sample FIDs are one --eval-only row per run at the end.
set -euo pipefail
RUNS=${1:?RUNS dir}
DATA=${2:?DATA dir}
MNIST10K=${3:-$(cd "$(dirname "$0")/.." && pwd)/../shared/data/mnist-10k}
STEPS=${STEPS:-10000}
MINUTES=${MINUTES:-240}
cd "$(dirname "$0")/.."
mkdir -p "$RUNS" "$DATA"

shards() {  # NAME SOURCE INPUT SPLIT [args]
    local name=$1 source=$2 input=$3 split=$4; shift 4
    [ -f "$DATA/$name/${name%32}-$split.json" ] ||
        python -m data_shards "$source" --input "$input" --out "$DATA/$name" --name "${name%32}" --split "$split" "$@"
}
for split in train test; do
    shards fashion32 fashion_mnist /usr/share/datasets/fashion-mnist $split --resolution 32
    shards mnist32 mnist "$MNIST10K" $split --resolution 32
done
for split in train test; do  # 28² MNIST for the StackedMNIST classifier
    [ -f "$DATA/mnist28/mnist-$split.json" ] || python -m data_shards mnist --input "$MNIST10K" --out "$DATA/mnist28" \
        --name mnist --split $split
done
[ -f "$DATA/stackedmnist/stackedmnist-train.json" ] || python -m data_shards stackedmnist --input "$MNIST10K" \
    --out "$DATA/stackedmnist" --name stackedmnist --split train --num-samples 60000
[ -f "$DATA/stackedmnist/stackedmnist-test.json" ] || python -m data_shards stackedmnist --input "$MNIST10K" \
    --out "$DATA/stackedmnist" --name stackedmnist --split test --num-samples 10000 --seed 1

EVAL=(--eval-every 20 --no-eval-at-start --num 1000 --refine-num 500 --ref-num 10000)
FASHION=(--ood "$DATA/mnist32:mnist:test" "data.root=$DATA/fashion32")
SMALL=configs/small/fashion32.yaml
NCSNPP=configs/small/fashion32_ncsnpp.yaml  # its own train.steps (3,200: ~2 h)
fashion() {  # NAME CONFIG [OVERRIDES...]: train (or resume) RUNS/fashion-NAME
    local name=$1 config=$2; shift 2
    OMP_NUM_THREADS=1 python bench/fidelity.py "$config" --run-dir "$RUNS/fashion-$name" --minutes "$MINUTES" \
        "${EVAL[@]}" "${FASHION[@]}" "$@" >> "$RUNS/fashion-$name.log" 2>&1
}
final() {  # NAME CONFIG [OVERRIDES...]: the 10,000-sample FID of RUNS/fashion-NAME's newest checkpoint, once
    local name=$1 config=$2; shift 2
    local dir=$RUNS/fashion-$name
    grep -q '"eval_only": true' "$dir/fidelity.jsonl" 2>/dev/null ||
        OMP_NUM_THREADS=1 python bench/fidelity.py "$config" --run-dir "$dir" --eval-only --num 10000 --ref-num 10000 \
            "${FASHION[@]}" "$@" >> "$dir.log" 2>&1
}
ablation() { fashion "$1" "$SMALL" "loss.ablation=$1" "train.steps=$STEPS"; }
ablation_final() { final "$1" "$SMALL" "loss.ablation=$1"; }
ncsnpp() { fashion ncsnpp-full "$NCSNPP" --label "full (DDPM++)"; }
smnist() {
    OMP_NUM_THREADS=1 python bench/fidelity.py configs/small/stackedmnist.yaml --run-dir "$RUNS/stackedmnist-full" \
        --minutes "$MINUTES" --eval-every 20 --no-eval-at-start --num 0 --modes-mnist "$DATA/mnist28:mnist" \
        "data.root=$DATA/stackedmnist" "train.steps=$STEPS" >> "$RUNS/stackedmnist-full.log" 2>&1
}
nice_run() {  # METHOD: MNIST NICE by DDAEBM or maximum likelihood for NICE_MINUTES (default 30), once (not resumable:
    # an unfinished run starts again)
    local out=$RUNS/nice
    [ -f "$out/exact-$1.png" ] && return
    rm -f "$out/curve-$1.jsonl"
    OMP_NUM_THREADS=1 python bench/nice_experiment.py --shards "$DATA/mnist28" --config configs/small/mnist_nice.yaml \
        --method "$1" --minutes "${NICE_MINUTES:-30}" --eval-every 300 --out "$out" >> "$RUNS/nice-$1.log" 2>&1
}

# The floors: real Fashion training images against the same test reference; real StackedMNIST digits' modes.
[ -f "$RUNS/floor-fashion/floor.jsonl" ] || OMP_NUM_THREADS=1 python bench/fidelity.py "$SMALL" \
    --run-dir "$RUNS/floor-fashion" --floor --num 10000 --ref-num 10000 "data.root=$DATA/fashion32"
[ -f "$RUNS/floor-stackedmnist/floor.jsonl" ] || OMP_NUM_THREADS=1 python bench/fidelity.py \
    configs/small/stackedmnist.yaml --run-dir "$RUNS/floor-stackedmnist" --floor --num 0 \
    --modes-mnist "$DATA/mnist28:mnist" "data.root=$DATA/stackedmnist"

ablation full & ablation no_latent & wait
ablation kl_only & ablation kl_no_entropy & wait
smnist & ncsnpp & wait
ablation_final full & ablation_final no_latent & wait
nice_run ddaebm & nice_run mle & wait
python bench/nice_experiment.py --plot --out "$RUNS/nice"
ablation_final kl_only & ablation_final kl_no_entropy & wait
final ncsnpp-full "$NCSNPP"
python bench/fidelity.py --plot "$RUNS/curves-fashion.png" "$RUNS"/fashion-{full,no_latent,kl_only,kl_no_entropy} \
    "$RUNS/fashion-ncsnpp-full" "$RUNS/floor-fashion"
python bench/fidelity.py --plot "$RUNS/curves-stackedmnist.png" "$RUNS/stackedmnist-full" "$RUNS/floor-stackedmnist"
