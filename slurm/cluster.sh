#!/usr/bin/env bash
# A real two-node SLURM (with accounting) on this one machine, for tests and CI.
#
#   slurm/cluster.sh start   # install what is missing, start the daemons, print the env line
#   slurm/cluster.sh stop    # stop the daemons this script started, by PID, in reverse order
#   slurm/cluster.sh status  # what runs, and sinfo
#
# Daemons: munged (only if none answers), a private MariaDB, slurmdbd, slurmctld and two
# slurmd (nodes n1, n2; NodeAddr=127.0.0.1, one port each). Everything lives under the state
# folder ($OPEN_CLIP_HN_SLURM_DIR, default /tmp/open_clip_hn_slurm): configs, spool, logs, and
# one `<daemon>.pid` per daemon started, which `stop` kills and nothing else.
# `source $STATE/env` (or `export SLURM_CONF=$STATE/etc/slurm.conf`) to use the cluster.
set -euo pipefail

STATE="${OPEN_CLIP_HN_SLURM_DIR:-/tmp/open_clip_hn_slurm}"
PORT="${OPEN_CLIP_HN_SLURM_PORT:-16810}"   # MariaDB, slurmdbd, slurmctld, n1, n2 = PORT+0..4
CLUSTER=ochn
DB_PASS=ochn-slurm
NODES=(n1 n2)
ETC="$STATE/etc"
LOG="$STATE/log"
# The daemons this script starts, in start order (stop goes backwards).
DAEMONS=(munged mariadbd slurmdbd slurmctld slurmd-n1 slurmd-n2)

die() { echo "cluster.sh: $*" >&2; exit 1; }

alive() {  # alive NAME: the daemon NAME this script started is running
  local f="$STATE/$1.pid"
  [[ -f "$f" ]] && kill -0 "$(cat "$f")" 2>/dev/null
}

wait_for() {  # wait_for SECONDS DESCRIPTION CMD...: poll CMD until it succeeds, bounded
  local limit=$1 what=$2; shift 2
  local end=$((SECONDS + limit))
  until "$@" >/dev/null 2>&1; do
    (( SECONDS < end )) || die "timed out after ${limit}s waiting for $what (logs: $LOG, $STATE/mysql/run)"
    sleep 0.2
  done
}

install_packages() {
  local missing=()
  command -v slurmctld >/dev/null || missing+=(slurm-wlm)
  command -v munged >/dev/null || missing+=(munge)
  command -v slurmdbd >/dev/null || missing+=(slurmdbd)
  command -v mariadbd >/dev/null || missing+=(mariadb-server)
  (( ${#missing[@]} == 0 )) && return
  [[ $EUID -eq 0 ]] || die "missing ${missing[*]}; run as root or: apt-get install ${missing[*]}"
  echo "installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

ensure_hosts() {  # torch's rendezvous connects to the first node by name
  local node
  for node in "${NODES[@]}"; do
    getent hosts "$node" >/dev/null || echo "127.0.0.1 $node" >> /etc/hosts
  done
}

start_munge() {
  if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then return; fi
  mkdir -p /run/munge && chown munge:munge /run/munge
  [[ -f /etc/munge/munge.key ]] || die "no /etc/munge/munge.key: run 'mungekey -c' (or reinstall munge)"
  runuser -u munge -- /usr/sbin/munged
  wait_for 10 munged test -s /run/munge/munged.pid
  cp /run/munge/munged.pid "$STATE/munged.pid"
  wait_for 10 "munge round trip" bash -c 'munge -n | unmunge'
}

write_configs() {
  local host node i
  host="$(hostname -s)"
  mkdir -p "$ETC" "$LOG" "$STATE/ctld" "$STATE/spool"
  cat > "$ETC/slurm.conf" <<EOF
# Written by slurm/cluster.sh: two nodes on one machine, for tests.
ClusterName=$CLUSTER
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$((PORT + 2))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=cred_expire=10
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool/%n
SlurmctldPidFile=$STATE/slurmctld.daemon.pid
SlurmdPidFile=$STATE/slurmd-%n.daemon.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$((PORT + 1))
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
ReturnToService=2
MailProg=/bin/true
KillWait=5
MinJobAge=3600
InactiveLimit=0
EOF
  i=3
  for node in "${NODES[@]}"; do
    echo "NodeName=$node NodeAddr=127.0.0.1 Port=$((PORT + i)) CPUs=4 RealMemory=8000 State=UNKNOWN" \
      >> "$ETC/slurm.conf"
    i=$((i + 1))
  done
  echo "PartitionName=debug Nodes=$(IFS=,; echo "${NODES[*]}") Default=YES MaxTime=INFINITE State=UP" \
    >> "$ETC/slurm.conf"

  cat > "$ETC/slurmdbd.conf" <<EOF
AuthType=auth/munge
DbdAddr=127.0.0.1
DbdHost=$host
DbdPort=$((PORT + 1))
SlurmUser=root
PidFile=$STATE/slurmdbd.daemon.pid
LogFile=$LOG/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$PORT
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
EOF
  chown root:root "$ETC/slurmdbd.conf"
  chmod 600 "$ETC/slurmdbd.conf"
  echo "export SLURM_CONF=$ETC/slurm.conf" > "$STATE/env"
}

start_mariadb() {
  local data="$STATE/mysql/data" run="$STATE/mysql/run"  # owned by mysql: it drops root
  local sock="$run/mysqld.sock"
  mkdir -p "$data" "$run" && chown mysql:mysql "$data" "$run"
  mariadb-install-db --no-defaults --datadir="$data" --user=mysql --skip-test-db \
    > "$LOG/mariadb-install.log" 2>&1 || die "mariadb-install-db failed: $LOG/mariadb-install.log"
  setsid mariadbd --no-defaults --datadir="$data" --user=mysql --socket="$sock" \
    --pid-file="$run/mariadbd.pid" --bind-address=127.0.0.1 --port="$PORT" \
    --skip-name-resolve --innodb-use-native-aio=0 --innodb-buffer-pool-size=32M \
    --log-error="$run/mariadb.log" < /dev/null > /dev/null 2>&1 &
  echo $! > "$STATE/mariadbd.pid"
  wait_for 30 MariaDB mariadb-admin --no-defaults --socket="$sock" -u root ping
  mariadb --no-defaults --socket="$sock" -u root <<EOF
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
EOF
}

start_daemon() {  # start_daemon NAME CMD...: run CMD in the foreground mode, detached, record PID
  local name=$1; shift
  setsid "$@" < /dev/null > "$LOG/$name.out" 2>&1 &
  echo $! > "$STATE/$name.pid"
}

start() {
  local node
  for name in "${DAEMONS[@]}"; do
    alive "$name" && die "already running ($name, state $STATE): run '$0 stop' first"
  done
  install_packages
  rm -rf "$STATE"
  mkdir -p "$STATE" "$LOG"
  ensure_hosts
  write_configs
  export SLURM_CONF="$ETC/slurm.conf"
  start_munge
  start_mariadb
  start_daemon slurmdbd slurmdbd -D
  wait_for 30 slurmdbd sacctmgr -n list cluster
  sacctmgr -i add cluster "$CLUSTER" >/dev/null
  start_daemon slurmctld slurmctld -D -f "$SLURM_CONF"
  wait_for 30 slurmctld scontrol ping
  for node in "${NODES[@]}"; do
    start_daemon "slurmd-$node" slurmd -D -N "$node" -f "$SLURM_CONF"
  done
  for node in "${NODES[@]}"; do
    wait_for 30 "node $node" bash -c "sinfo -h -n $node -o %T | grep -qx idle"
  done
  echo "SLURM cluster '$CLUSTER' up (nodes ${NODES[*]}, state $STATE)"
  cat "$STATE/env"
}

stop() {
  local i name pid end
  for (( i=${#DAEMONS[@]}-1; i>=0; i-- )); do
    name=${DAEMONS[$i]}
    alive "$name" || { rm -f "$STATE/$name.pid"; continue; }
    pid=$(cat "$STATE/$name.pid")
    kill -TERM "$pid"
    end=$((SECONDS + 15))
    while kill -0 "$pid" 2>/dev/null && (( SECONDS < end )); do sleep 0.2; done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
    rm -f "$STATE/$name.pid"
    echo "stopped $name ($pid)"
  done
}

status() {
  local name
  for name in "${DAEMONS[@]}"; do
    if alive "$name"; then echo "$name: running ($(cat "$STATE/$name.pid"))"; else echo "$name: -"; fi
  done
  if [[ -f "$STATE/env" ]]; then
    SLURM_CONF="$ETC/slurm.conf" sinfo 2>/dev/null || true
  fi
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 start|stop|status   (state folder: \$OPEN_CLIP_HN_SLURM_DIR, default $STATE)" >&2
     exit 2 ;;
esac
