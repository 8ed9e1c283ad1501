#!/bin/bash
# CelebA 64² on SLURM: configs/celeba64.yaml (paper setting 4 GPUs x 32 = data.batch 128).
#
#   sbatch slurm/celeba64.sh [ddaebm train arguments]     e.g.  sbatch slurm/celeba64.sh data.root=/path/to/shards
#
# Any #SBATCH line below can be overridden on the sbatch command line (fewer nodes or GPUs, another time limit or
# partition): sbatch --nodes=2 --time=12:00:00 slurm/celeba64.sh ...  The run directory is
# ${DDAEBM_RUN_ROOT:-<checkout>/runs}/<job name>; the default job name is the config's name, so the run lands where
# `ddaebm train configs/celeba64.yaml` and cluster/train.py put it. Give each experiment its own name
# (sbatch -J NAME). The job requeues itself after its pre-time-limit signal and resumes from its checkpoints.
# CPU-only nodes or a small machine: the flags to override are in slurm/README.md ("CPU-only nodes and small
# machines"); slurm/submit.sh [sbatch flags] THIS_SCRIPT ... checks first that the cluster can run the request.
# How it works, and every knob: slurm/launch.sh and slurm/README.md.
#SBATCH --job-name=celeba64
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=4
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --output=slurm-%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:USR1@300

# sbatch runs a copy of this file from its spool directory: the submitted path (the first word of scontrol's
# Command=) says where the checkout is. DDAEBM_ROOT overrides it.
submitted=$(scontrol show job "${SLURM_JOB_ID:-none}" 2>/dev/null | sed -n 's/^ *Command=\([^ ]*\).*/\1/p')
root=${DDAEBM_ROOT:-$(dirname "${submitted:-$0}")/..}
exec bash "$root/slurm/launch.sh" configs/celeba64.yaml "$@"
