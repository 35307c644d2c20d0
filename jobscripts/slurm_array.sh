#!/usr/bin/env bash
# slurm_array.sh - a per-micrograph step (movies, CTF, picking) as a Slurm job array.
#
#   jobscripts/slurm_array.sh --tasks M [--wait] [--dir DIR] [sbatch options] -- <job> --project P [job options]
#   e.g. jobscripts/slurm_array.sh --tasks 64 -p short -c 4 --mem=8G -t 1:00:00 -- \
#            find-ctf --project /lustre/me/proj ...
#
# Submits three jobs and returns (nothing else runs on the head node):
#   1. prepare   cistem-mpi <job> ... --array-prepare DIR     (reads the project, writes DIR/plan.json)
#   2. array     cistem-mpi <job> ... --array-run DIR         (M tasks, --dependency=afterok:1;
#                task k computes items k, k+M, k+2M ... and writes DIR/part_k.pkl; no database access)
#   3. merge     cistem-mpi <job> ... --array-merge DIR       (--dependency=afterok:2; the only step that
#                writes the database: one job record, all results registered in one transaction)
# If an array task fails, the merge never runs (afterok); re-run the failed task ids with
#   sbatch --array=<ids> ... and submit the merge again.
# The sbatch options apply to all three jobs.  --wait: wait until the merge job ends (exit = its exit).
# DIR defaults to P/Scratch/Array/<job>-<date>-<pid>.
set -euo pipefail

CISTEM_MPI=${CISTEM_MPI:-cistem-mpi}
tasks="" ; wait="" ; dir="" ; opts=()
while [[ $# -gt 0 && $1 != -- ]]; do
  case $1 in
    --tasks) tasks=$2; shift 2 ;;
    --tasks=*) tasks=${1#*=}; shift ;;
    --wait) wait=--wait; shift ;;
    --dir) dir=$2; shift 2 ;;
    *) opts+=("$1"); shift ;;
  esac
done
[[ ${1:-} == -- && $# -ge 2 && $tasks =~ ^[0-9]+$ && $tasks -ge 1 ]] || { sed -n '2,22p' "$0" >&2; exit 2; }
shift
job=("$@")
exe=$(command -v "$CISTEM_MPI") || { echo "slurm_array.sh: $CISTEM_MPI not found (set CISTEM_MPI)" >&2; exit 2; }

if [[ -z $dir ]]; then
  project=""
  for ((i = 0; i < ${#job[@]}; i++)); do
    case ${job[i]} in --project|-p) project=${job[i+1]} ;; --project=*) project=${job[i]#*=} ;; esac
  done
  [[ -n $project ]] || { echo "slurm_array.sh: give --project in the job options (or --dir)" >&2; exit 2; }
  dir=$(cd "$project" && pwd)/Scratch/Array/${job[0]}-$(date +%Y%m%d-%H%M%S)-$$
fi
mkdir -p "$dir"
q() { printf '%q ' "$@"; }
cmd=$(q "$exe" "${job[@]}")

prep=$(sbatch --parsable "${opts[@]}" -J "${job[0]}-prepare" -n 1 -o "$dir/prepare-%j.out" \
  --wrap "$cmd --array-prepare $(q "$dir")")
arr=$(sbatch --parsable "${opts[@]}" -J "${job[0]}-array" -n 1 --array=0-$((tasks - 1)) \
  --dependency=afterok:"${prep%%;*}" -o "$dir/task-%A_%a.out" --wrap "$cmd --array-run $(q "$dir")")
echo "slurm_array.sh: prepare job ${prep%%;*}, array job ${arr%%;*} ($tasks tasks), results in $dir"
merge=$(sbatch --parsable "${opts[@]}" -J "${job[0]}-merge" -n 1 --dependency=afterok:"${arr%%;*}" \
  --kill-on-invalid-dep=yes -o "$dir/merge-%j.out" --wrap "$cmd --array-merge $(q "$dir")")
merge=${merge%%;*}
if [[ -z $wait ]]; then
  echo "slurm_array.sh: merge job $merge runs after the array; follow with: cistem-mpi status --project <P>"
  exit 0
fi
# --wait: poll the merge job (scontrol keeps finished jobs for MinJobAge, 300 s by default)
echo "slurm_array.sh: waiting for merge job $merge"
while :; do
  info=$(scontrol -o show job "$merge" 2>/dev/null || true)
  state=$(grep -o 'JobState=[A-Z_]*' <<<"$info" | cut -d= -f2)
  case $state in
    PENDING|RUNNING|CONFIGURING|COMPLETING|SUSPENDED|REQUEUED|"") sleep 1 ;;
    *) break ;;
  esac
done
code=$(grep -o ' ExitCode=[0-9]*' <<<"$info" | cut -d= -f2)
echo "slurm_array.sh: merge job $merge $state (exit code ${code:-?}; log: $dir/merge-$merge.out)"
[[ $state == COMPLETED ]]
