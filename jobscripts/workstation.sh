#!/usr/bin/env bash
# workstation.sh - run a cistem-mpi job on one machine with mpiexec.
#
#   jobscripts/workstation.sh [-n RANKS] <job> [job options...]
#   e.g. jobscripts/workstation.sh -n 17 auto-refine --project ~/proj ...
#
# RANKS: rank 0 is the controller (it hands out work, writes the database and
# mostly sleeps), ranks 1..N-1 compute.  On a machine with C cores use
# N = C + 1 (the default) so that every core has a worker.
#
# Environment: CISTEM_MPI (the cistem-mpi command), MPIEXEC (default: the
# mpiexec beside cistem-mpi, i.e. the pip MPICH, else the one on PATH).
set -euo pipefail

CISTEM_MPI=${CISTEM_MPI:-cistem-mpi}
RANKS=""
if [[ ${1:-} == -n ]]; then RANKS=$2; shift 2; fi
[[ $# -ge 1 ]] || { sed -n '2,14p' "$0" >&2; exit 2; }

exe=$(command -v "$CISTEM_MPI") || { echo "workstation.sh: $CISTEM_MPI not found (set CISTEM_MPI)" >&2; exit 2; }
if [[ -z ${MPIEXEC:-} ]]; then
  if [[ -x $(dirname "$exe")/mpiexec ]]; then MPIEXEC=$(dirname "$exe")/mpiexec; else MPIEXEC=mpiexec; fi
fi
[[ -n $RANKS ]] || RANKS=$(( $(nproc) + 1 ))

extra=()
if "$MPIEXEC" --version 2>&1 | grep -qi "open mpi\|open-mpi\|openrte"; then
  # Open MPI refuses more ranks than cores (the controller is one extra) and root without these.
  extra+=(--oversubscribe --bind-to none)
  [[ $(id -u) -eq 0 ]] && export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
fi
# one thread per rank: the ranks already fill the cores
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} NUMBA_NUM_THREADS=${NUMBA_NUM_THREADS:-1}
exec "$MPIEXEC" "${extra[@]}" -n "$RANKS" "$exe" "$@"
