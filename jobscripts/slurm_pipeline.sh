#!/usr/bin/env bash
# slurm_pipeline.sh - the whole pipeline as a chain of dependent Slurm jobs, each sized for its step.
#
#   jobscripts/slurm_pipeline.sh --project P [--config TOML] [--from STEP] [--until STEP] [--ranks N]
#        [--array STEP=TASKS]... [--wait] [--dir DIR] [sbatch options...]
#   e.g. jobscripts/slurm_pipeline.sh -p /lustre/me/proj -c pipeline.toml \
#            --array align-movies=64 --array find-ctf=16 --array find-particles=16 \
#            --partition=short -t 12:00:00 --mem-per-cpu=4G
#
# One sbatch job per step of `cistem-mpi pipeline` (select-classes runs inside the package-classes
# job), each depending on the one before (--dependency=afterok:<id>, --kill-on-invalid-dep=yes: a
# failed step cancels the rest).  Every job runs
#     cistem-mpi pipeline --project P --config TOML --from STEP --until STEP --ranks R
# so a step that finished already with the same inputs and settings is skipped, an iterative step
# killed by the time limit is resumed when the chain is submitted again, and each step finds its
# inputs (the ids of the previous step's results) in the project database.
#   ranks      R = the step's `ranks` key in the config, else --ranks (default 1).  A job with R > 1
#              gets -n R and launches its ranks with srun (--mpi=pmi2 for the pip MPICH wheel,
#              pmix for Open MPI; detected like slurm_sbatch.sh, or set SRUN_MPI).  Refinement
#              (classify-2d, ab-initio, auto-refine) is best one wide job: give it ranks = 64 ...
#   --array    align-movies, find-ctf or find-particles as a job array of TASKS one-core tasks:
#              three jobs (pipeline --array-prepare DIR, --array-run DIR with --array=0-(TASKS-1),
#              --array-merge DIR), see slurm_array.sh.  Only the merge writes the database.
# sbatch options (partition, time, memory, account ...) apply to every job.  Job logs and the array
# directories go to DIR (default P/Scratch/Pipeline/<date>-<pid>).  Nothing runs on the head node
# but `cistem-mpi pipeline --print-steps`, which checks the config first (a bad key: exit 2, nothing
# submitted).  --wait: wait for the last job; exit 0 only if every job completed.
set -euo pipefail

CISTEM_MPI=${CISTEM_MPI:-cistem-mpi}
project="" ; config="" ; from="" ; until="" ; ranks=1 ; wait="" ; dir="" ; opts=()
declare -A array=()
usage() { sed -n '2,27p' "$0" >&2; exit 2; }
while [[ $# -gt 0 ]]; do
  case $1 in
    --project|-p) project=$2; shift 2 ;;
    --project=*) project=${1#*=}; shift ;;
    --config|-c) config=$2; shift 2 ;;
    --config=*) config=${1#*=}; shift ;;
    --from) from=$2; shift 2 ;;
    --until) until=$2; shift 2 ;;
    --ranks|-n) ranks=$2; shift 2 ;;
    --array) array[${2%%=*}]=${2#*=}; shift 2 ;;
    --array=*) v=${1#*=}; array[${v%%=*}]=${v#*=}; shift ;;
    --wait) wait=1; shift ;;
    --dir) dir=$2; shift 2 ;;
    -h|--help) usage ;;
    *) opts+=("$1"); shift ;;
  esac
done
[[ -n $project && $ranks =~ ^[0-9]+$ && $ranks -ge 1 ]] || usage
exe=$(command -v "$CISTEM_MPI") || { echo "slurm_pipeline.sh: $CISTEM_MPI not found (set CISTEM_MPI)" >&2; exit 2; }
project=$(cd "$project" && pwd)
[[ -z $config ]] || config=$(cd "$(dirname "$config")" && pwd)/$(basename "$config")
for s in "${!array[@]}"; do
  case $s in align-movies|find-ctf|find-particles) ;;
    *) echo "slurm_pipeline.sh: --array $s: only align-movies, find-ctf and find-particles run as arrays" >&2; exit 2 ;;
  esac
  [[ ${array[$s]} =~ ^[0-9]+$ && ${array[$s]} -ge 1 ]] || { echo "slurm_pipeline.sh: --array $s=${array[$s]}: give a task count" >&2; exit 2; }
done

sel=(--project "$project")
[[ -z $config ]] || sel+=(--config "$config")
# the steps and their ranks; checks the config before anything is submitted
steps=$("$exe" pipeline "${sel[@]}" ${from:+--from "$from"} ${until:+--until "$until"} --ranks "$ranks" --print-steps)

if [[ -z ${SRUN_MPI:-} ]]; then  # srun --mpi= must match the MPI mpi4py uses (see slurm_sbatch.sh)
  py=$(sed -n '1s/^#!//p' "$exe"); py=${py:-python3}
  lib=$($py -c 'from mpi4py import MPI; print(MPI.Get_library_version())' 2>/dev/null | head -n1 || true)
  case $lib in *"Open MPI"*) SRUN_MPI=pmix ;; *) SRUN_MPI=pmi2 ;; esac
fi
[[ -n $dir ]] || dir=$project/Scratch/Pipeline/$(date +%Y%m%d-%H%M%S)-$$
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
q() { printf '%q ' "$@"; }
base=$(q "$exe" pipeline "${sel[@]}")
threads='export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1} NUMBA_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}; '
prev=""
submit() {  # submit [sbatch options...] -- command; prints the job id
  local o=() ; while [[ $1 != -- ]]; do o+=("$1"); shift; done; shift
  local dep=()
  [[ -z $prev ]] || dep=(--dependency=afterok:"$prev" --kill-on-invalid-dep=yes)
  local id
  id=$(sbatch --parsable "${opts[@]}" "${dep[@]}" "${o[@]}" --wrap "$threads$*")
  echo "${id%%;*}"
}
: >"$dir/jobs.txt"
while read -r step r; do
  [[ $r -ge 1 ]] || continue  # select-classes: done inside the package-classes job
  one=$(q --from "$step" --until "$step")
  if [[ -n ${array[$step]:-} ]]; then
    m=${array[$step]} ; a=$dir/$step
    p1=$(submit -J "$step-prepare" -n 1 -o "$dir/$step-prepare-%j.out" -- "$base $one --array-prepare $(q "$a")")
    prev=$p1
    p2=$(submit -J "$step-array" -n 1 --array=0-$((m - 1)) -o "$dir/$step-task-%A_%a.out" -- \
      "$base --array-run $(q "$a")")
    prev=$p2
    p3=$(submit -J "$step-merge" -n 1 -o "$dir/$step-merge-%j.out" -- "$base $one --array-merge $(q "$a")")
    prev=$p3
    echo "slurm_pipeline.sh: $step: prepare job $p1, array job $p2 ($m tasks), merge job $p3"
    printf '%s prepare %s\n%s array %s\n%s merge %s\n' "$step" "$p1" "$step" "$p2" "$step" "$p3" >>"$dir/jobs.txt"
  else
    launcher=$(q --mpiexec "srun --mpi=$SRUN_MPI --kill-on-bad-exit=1")
    id=$(submit -J "$step" -n "$r" -o "$dir/$step-%j.out" -- "$base $one --ranks $r $launcher")
    prev=$id
    echo "slurm_pipeline.sh: $step: job $id ($r rank(s))"
    printf '%s job %s\n' "$step" "$id" >>"$dir/jobs.txt"
  fi
done <<<"$steps"
[[ -n $prev ]] || { echo "slurm_pipeline.sh: no step selected" >&2; exit 2; }
echo "slurm_pipeline.sh: logs and job ids in $dir; follow with: cistem-mpi status --project $project"
[[ -n $wait ]] || exit 0

# --wait: poll every job in order (scontrol keeps finished jobs for MinJobAge, 300 s by default)
status=0
while read -r step part id; do
  unknown=0
  while :; do
    info=$(scontrol -o show job "$id" 2>/dev/null || true)
    # an array job shows one line per task: it ends when no task is pending or running
    states=$(grep -o 'JobState=[A-Z_]*' <<<"$info" | cut -d= -f2 | sort -u | tr '\n' ' ')
    if [[ -z $states ]]; then  # forgotten by slurmctld (MinJobAge) or not known yet
      (( ++unknown < 60 )) || { states="UNKNOWN "; break; }
      sleep 1; continue
    fi
    case " $states" in
      *" PENDING "*|*" RUNNING "*|*" CONFIGURING "*|*" COMPLETING "*|*" SUSPENDED "*|*" REQUEUED "*) sleep 1 ;;
      *) break ;;
    esac
  done
  echo "slurm_pipeline.sh: $step $part job $id: ${states% }"
  [[ ${states% } == COMPLETED ]] || status=1
done <"$dir/jobs.txt"
exit $status
