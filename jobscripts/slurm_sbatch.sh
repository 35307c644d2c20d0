#!/usr/bin/env bash
# slurm_sbatch.sh - one Slurm allocation per job; the controller (rank 0) runs on a compute node.
#
#   sbatch [sbatch options] jobscripts/slurm_sbatch.sh <job> [job options...]
#   e.g. sbatch -N 8 --ntasks-per-node=44 -c 1 --mem-per-cpu=4G -p mpi -t 24:00:00 \
#            jobscripts/slurm_sbatch.sh auto-refine --project /lustre/me/proj ...
#
# Command-line options override the #SBATCH defaults below.  Nothing but the
# submission happens on the head node; log out, come back, and follow the job
# with `cistem-mpi status --project DIR` (or the output file below).
#
# Choosing the numbers (see README.md, "Running in parallel"):
#   --ntasks          MPI ranks = 1 controller + workers; one worker per core is usual,
#                     and the controller mostly sleeps, so ntasks = cores (+1 on a workstation)
#   --cpus-per-task   threads per rank (FFTW/numba); 1 unless memory forces fewer ranks per node
#   --mem-per-cpu     3D jobs hold one padded Fourier accumulator per rank: box 256 ~ 0.8 GB,
#                     box 512 ~ 6.1 GB (padding 2); 2D/movie/CTF jobs need < 1 GB per rank
#
#SBATCH --job-name=cistem-mpi
#SBATCH --ntasks=4
#SBATCH --cpus-per-task=1
#SBATCH --mem-per-cpu=2G
#SBATCH --output=cistem-mpi-%j.out
set -euo pipefail

CISTEM_MPI=${CISTEM_MPI:-cistem-mpi}
[[ $# -ge 1 ]] || { echo "usage: sbatch [options] slurm_sbatch.sh <job> [job options...]" >&2; exit 2; }
exe=$(command -v "$CISTEM_MPI") || { echo "slurm_sbatch.sh: $CISTEM_MPI not found (set CISTEM_MPI)" >&2; exit 2; }

# srun --mpi= must match the MPI that mpi4py uses: the pip MPICH wheel needs pmi2
# (pmix fails to initialise, none gives N worlds of 1 rank), Open MPI needs pmix.
if [[ -z ${SRUN_MPI:-} ]]; then
  py=$(sed -n '1s/^#!//p' "$exe"); py=${py:-python3}
  lib=$($py -c 'from mpi4py import MPI; print(MPI.Get_library_version())' 2>/dev/null | head -n1 || true)
  case $lib in
    *"Open MPI"*) SRUN_MPI=pmix ;;
    *) SRUN_MPI=pmi2 ;;  # MPICH, Intel MPI, MVAPICH
  esac
fi
cpt=${SLURM_CPUS_PER_TASK:-1}
export OMP_NUM_THREADS=$cpt NUMBA_NUM_THREADS=$cpt
echo "slurm_sbatch.sh: job $SLURM_JOB_ID: ${SLURM_NTASKS:-1} ranks on ${SLURM_JOB_NODELIST:-?}, srun --mpi=$SRUN_MPI"
# --kill-on-bad-exit: a rank killed by a signal ends the whole step (nothing waits for it);
# -c must be repeated: srun does not inherit --cpus-per-task from sbatch (Slurm >= 22.05).
exec srun --mpi="$SRUN_MPI" --kill-on-bad-exit=1 --cpus-per-task="$cpt" "$exe" "$@"
