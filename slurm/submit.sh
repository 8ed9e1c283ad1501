#!/usr/bin/env bash
# sbatch with a pre-flight: refuse, in one line and at once, a request this cluster can never run, instead of a
# job that SLURM rejects with a terse gres error or leaves PENDING for ever (a partition without EnforcePartLimits
# queues a job no node can hold: reason PartitionConfig or Resources, no other hint).
#
#   slurm/submit.sh [sbatch flags] SCRIPT [ddaebm train arguments]
#   e.g. slurm/submit.sh --gpus-per-node=0 --ntasks-per-node=2 --cpus-per-task=1 slurm/lsun_church.sh data.root=...
#
# The flags and arguments are those of `sbatch` (SCRIPT is the first argument that names a file and is no flag).
# The check is SLURM's own: `sbatch --test-only` with the same flags and the script's #SBATCH header, which places
# the job on the cluster as it is configured now (nodes, CPUs, GPUs, memory, partition limits) without queueing it.
# When it cannot, this prints SLURM's reason, the nodes there are and the flags to change, and exits 2 with nothing
# queued; otherwise it runs the same `sbatch` and prints what sbatch prints.
set -uo pipefail

die() { echo "slurm/submit.sh: $*" >&2; exit 2; }

flags=()
while (( $# )) && { [[ $1 == -* ]] || ! [[ -f $1 ]]; }; do
    flags+=("$1")
    shift
done
(( $# )) || die "usage: slurm/submit.sh [sbatch flags] SCRIPT [ddaebm train arguments]"
command -v sbatch >/dev/null || die "sbatch not found: run this where SLURM's client commands are"

check=$(sbatch --test-only "${flags[@]}" "$@" 2>&1)
if (( $? != 0 )); then
    reason=$(grep -m 1 -iE "error|failure|invalid|unavailable|not available" <<<"$check" | sed -E 's/^sbatch: (error: )?//')
    nodes=$(sinfo -h -o "%D node(s) of %c CPUs, %m MB, gres %G (partition %P)" 2>/dev/null | sort -u | paste -sd ';' -)
    die "this cluster cannot run the request: ${reason:-${check//$'\n'/ }}. Nodes here: ${nodes:-unknown}." \
        "Override the script's #SBATCH header with sbatch flags, e.g. on CPU-only nodes or a small machine" \
        "--gpus-per-node=0 --ntasks-per-node=N --cpus-per-task=C --mem=M (slurm/README.md, \"CPU-only nodes and" \
        "small machines\")"
fi
exec sbatch "${flags[@]}" "$@"
