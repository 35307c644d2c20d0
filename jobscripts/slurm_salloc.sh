#!/usr/bin/env bash
# slurm_salloc.sh - interactive: allocate, then run the job's ranks in the allocation.
#
#   jobscripts/slurm_salloc.sh [salloc options] -- <job> [job options...]
#   e.g. jobscripts/slurm_salloc.sh -N 8 --ntasks-per-node=44 -c 1 -p mpi -t 8:00:00 -- \
#            auto-refine --project /lustre/me/proj ...
#
# runs:  salloc <options> srun --mpi=pmi2 --kill-on-bad-exit=1 -c <cpus-per-task> cistem-mpi <job> ...
# salloc waits for the allocation; srun inside it starts one rank per task.
# The terminal stays attached (progress bar); if you need to log out, use
# slurm_sbatch.sh instead: the job never depends on the client staying connected.
set -euo pipefail

CISTEM_MPI=${CISTEM_MPI:-cistem-mpi}
opts=()
while [[ $# -gt 0 && $1 != -- ]]; do opts+=("$1"); shift; done
[[ ${1:-} == -- && $# -ge 2 ]] || { sed -n '2,12p' "$0" >&2; exit 2; }
shift
exe=$(command -v "$CISTEM_MPI") || { echo "slurm_salloc.sh: $CISTEM_MPI not found (set CISTEM_MPI)" >&2; exit 2; }

if [[ -z ${SRUN_MPI:-} ]]; then
  py=$(sed -n '1s/^#!//p' "$exe"); py=${py:-python3}
  lib=$($py -c 'from mpi4py import MPI; print(MPI.Get_library_version())' 2>/dev/null | head -n1 || true)
  case $lib in *"Open MPI"*) SRUN_MPI=pmix ;; *) SRUN_MPI=pmi2 ;; esac
fi
# cpus-per-task as given to salloc (srun does not inherit it since Slurm 22.05)
cpt=1
for ((i = 0; i < ${#opts[@]}; i++)); do
  case ${opts[i]} in
    -c|--cpus-per-task) cpt=${opts[i+1]} ;;
    -c*) cpt=${opts[i]#-c} ;;
    --cpus-per-task=*) cpt=${opts[i]#*=} ;;
  esac
done
export OMP_NUM_THREADS=$cpt NUMBA_NUM_THREADS=$cpt
exec salloc "${opts[@]}" srun --mpi="$SRUN_MPI" --kill-on-bad-exit=1 --cpus-per-task="$cpt" "$exe" "$@"
