#!/usr/bin/env bash
# A real two-node Slurm cluster on this one machine, for the `slurm` test lane and for
# trying launch/submit.py:  tests/slurm/cluster.sh start | stop | status
#
# node1 and node2 are two slurmd daemons on this host (NodeAddr=127.0.0.1, so Slurm and
# the rendezvous reach them without hosts entries), 2 CPUs each, no GPUs, one partition
# `debug`. Config, state, spool and logs live under $PIXELBERT_SLURM_DIR
# (/tmp/pixelbert_slurm). `start` installs slurm-wlm and munge with apt where missing
# (needs root), starts munged / slurmctld / both slurmd and waits until sinfo shows both
# nodes idle; `stop` cancels the cluster's jobs and stops exactly the daemons `start`
# started (their pid files). Both are idempotent. Clients find the cluster through
# SLURM_CONF (printed by `status`); /etc/slurm/slurm.conf is linked to it when that file
# does not exist, so plain `sinfo` / `sbatch` work too.
set -euo pipefail

DIR="${PIXELBERT_SLURM_DIR:-/tmp/pixelbert_slurm}"
CONF="$DIR/slurm.conf"
ETC_CONF=/etc/slurm/slurm.conf
CTLD_PORT="${PIXELBERT_SLURM_PORT:-16817}"
export SLURM_CONF="$CONF"

say() { echo "cluster.sh: $*"; }
die() { echo "cluster.sh: error: $*" >&2; exit 1; }

alive() {  # alive PIDFILE: the daemon that wrote it still runs
  [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null
}

install_packages() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null; then
    return
  fi
  [ "$(id -u)" -eq 0 ] || die "slurm-wlm / munge are not installed and installing them needs root"
  say "installing slurm-wlm munge with apt (~20 s)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
}

write_conf() {
  mkdir -p "$DIR/state" "$DIR/log" "$DIR/spool/node1" "$DIR/spool/node2" "$DIR/pids"
  cat >"$CONF" <<EOF
# written by tests/slurm/cluster.sh: two slurmd on this host
ClusterName=pixelbert
SlurmctldHost=$(hostname)(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/pids/slurmctld.pid
SlurmdPidFile=$DIR/pids/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
JobRequeue=1
# finished jobs stay in \`scontrol show job\` (JobState=, Restarts=) for 10 minutes: without
# accounting storage that is where the tests read a job's outcome
MinJobAge=600
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
# a job past its time limit gets SIGTERM, then SIGKILL this many seconds later (time to save)
KillWait=30
OverTimeLimit=0
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=60
MessageTimeout=10
NodeName=node[1-2] NodeHostname=$(hostname) NodeAddr=127.0.0.1 Port=17001-17002 CPUs=2 State=UNKNOWN
PartitionName=debug Nodes=node[1-2] Default=YES MaxTime=INFINITE State=UP
EOF
  if [ ! -e "$ETC_CONF" ] && [ -d "$(dirname "$ETC_CONF")" ]; then
    ln -s "$CONF" "$ETC_CONF" && echo "$ETC_CONF" >"$DIR/pids/etc_link"
  fi
}

start_munge() {
  if munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
    return  # a working munged is there already (ours or the system's): leave it be
  fi
  [ -s /etc/munge/munge.key ] || {
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
    chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
  }
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  chown munge:munge /run/munge /var/log/munge /var/lib/munge
  runuser -u munge -- munged --pid-file=/run/munge/munged.pid
  cp /run/munge/munged.pid "$DIR/pids/munged.ours"
}

wait_idle() {
  local i
  for i in $(seq 1 60); do
    if [ "$(sinfo -h -N -o '%N %t' 2>/dev/null | grep -c ' idle$')" -eq 2 ]; then
      return 0
    fi
    sleep 1
  done
  sinfo -N 2>&1 || true
  die "the nodes did not become idle within 60 s (logs: $DIR/log)"
}

start() {
  if alive "$DIR/pids/slurmctld.pid" && alive "$DIR/pids/slurmd-node1.pid" \
     && alive "$DIR/pids/slurmd-node2.pid"; then
    wait_idle
    say "already running (SLURM_CONF=$CONF)"
    return
  fi
  install_packages
  write_conf
  start_munge
  alive "$DIR/pids/slurmctld.pid" || slurmctld -f "$CONF"
  for node in node1 node2; do
    alive "$DIR/pids/slurmd-$node.pid" || slurmd -f "$CONF" -N "$node"
  done
  wait_idle
  say "2 nodes idle in partition debug (SLURM_CONF=$CONF, logs in $DIR/log)"
}

cancel_jobs() {
  alive "$DIR/pids/slurmctld.pid" || return 0
  scancel --partition=debug 2>/dev/null || true
  local i
  for i in $(seq 1 30); do  # let the steps end before their slurmd goes
    [ -z "$(squeue -h -o %i 2>/dev/null)" ] && return 0
    sleep 1
  done
  say "jobs still listed after 30 s: $(squeue -h -o '%i %T' | tr '\n' ' ')"
}

stop_pidfile() {  # stop_pidfile NAME FILE
  if alive "$2"; then
    local pid
    pid="$(cat "$2")"
    kill "$pid"
    for _ in $(seq 1 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
    say "stopped $1 (pid $pid)"
  fi
  rm -f "$2"
}

stop() {
  cancel_jobs
  stop_pidfile slurmd-node1 "$DIR/pids/slurmd-node1.pid"
  stop_pidfile slurmd-node2 "$DIR/pids/slurmd-node2.pid"
  stop_pidfile slurmctld "$DIR/pids/slurmctld.pid"
  stop_pidfile munged "$DIR/pids/munged.ours"
  if [ -s "$DIR/pids/etc_link" ] && [ -L "$ETC_CONF" ]; then
    rm -f "$ETC_CONF" "$DIR/pids/etc_link"
  fi
  say "stopped"
}

status() {
  local name
  for name in slurmctld slurmd-node1 slurmd-node2; do
    if alive "$DIR/pids/$name.pid"; then
      echo "$name: running (pid $(cat "$DIR/pids/$name.pid"))"
    else
      echo "$name: stopped"
    fi
  done
  if alive "$DIR/pids/slurmctld.pid"; then
    echo "SLURM_CONF=$CONF"
    sinfo -N
  fi
  alive "$DIR/pids/slurmctld.pid"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
