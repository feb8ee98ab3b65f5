#!/usr/bin/env bash
# slurm_cluster.sh up|down|status [DIR] -- a throw-away single-node SLURM (munged + slurmctld +
# slurmd, 2 fake GPUs) on localhost, every file under DIR (default /tmp/omlrelion-slurm, the folder
# the slurm tests look in; OMLRELION_SLURM_DIR overrides). `up` is idempotent: a cluster already
# answering from DIR is left alone; a half-dead one is stopped and started afresh. It prints the
# two variables a client needs: eval "$(tests/workflow/slurm_cluster.sh up)".
# Needs root and Debian's slurmctld, slurmd, slurm-client and munge (recipe: shared docs, slurm-local.md).
set -euo pipefail
CMD=${1:-up}
D=$(realpath -m "${2:-${OMLRELION_SLURM_DIR:-/tmp/omlrelion-slurm}}")
CTLD_PORT=${CTLD_PORT:-6817}; SLURMD_PORT=${SLURMD_PORT:-6818}; NGPU=${NGPU:-2}

exports() { echo "export SLURM_CONF=$D/slurm.conf PATH=$D/bin:\$PATH"; }

answering() {
  [ -f "$D/slurm.conf" ] || return 1
  local state
  state=$(SLURM_CONF=$D/slurm.conf timeout 10 sinfo -h -n localhost -o %T 2>/dev/null || true)
  [ "$state" = idle ] || [ "$state" = mixed ] || [ "$state" = allocated ]
}

down() {
  [ -d "$D" ] || return 0
  export SLURM_CONF=$D/slurm.conf
  if [ -f "$D/slurmctld.bgpid" ] && kill -0 "$(cat "$D/slurmctld.bgpid")" 2>/dev/null; then
    timeout 15 scancel --user="$(id -un)" 2>/dev/null || true
    for _ in $(seq 50); do [ -z "$(timeout 5 squeue -h 2>/dev/null)" ] && break; sleep 0.2; done
  fi
  for n in slurmd slurmctld munged; do
    f=$D/$n.bgpid; [ -f "$f" ] || continue; pid=$(cat "$f")
    kill -TERM "$pid" 2>/dev/null || continue
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
  done
  rm -rf "$D"
}

up() {
  if answering; then exports; return 0; fi
  down
  for tool in munged mungekey slurmctld slurmd sinfo srun; do
    command -v "$tool" >/dev/null || { echo "$tool not found: apt-get install slurmctld slurmd slurm-client munge" >&2; exit 1; }
  done
  local real_srun topo mem
  real_srun=$(command -v srun)
  mkdir -p "$D"/{munge,state,spool,log,bin}
  chmod 755 "$D" "$D/munge"   # munged: every folder above its socket must be world-traversable
  mungekey --create --keyfile="$D/munge/munge.key"
  for i in $(seq 0 $((NGPU - 1))); do ln -sf /dev/null "$D/gpu$i"; done   # fake GPUs: character devices
  topo=$(slurmd -C | head -1 | sed -E 's/^NodeName=[^ ]+ //; s/ RealMemory=[0-9]+//')
  mem=$(( $(awk '/^MemTotal:/{print int($2/1024)}' /proc/meminfo) * 9 / 10 ))
  cat > "$D/slurm.conf" <<CONF
ClusterName=omlrelion
SlurmctldHost=localhost
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$D/munge/munge.sock
StateSaveLocation=$D/state
SlurmdSpoolDir=$D/spool
SlurmctldPidFile=$D/slurmctld.pid
SlurmdPidFile=$D/slurmd.pid
SlurmctldLogFile=$D/log/slurmctld.log
SlurmdLogFile=$D/log/slurmd.log
MailProg=/bin/true
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1000
ReturnToService=2
MinJobAge=600
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
GresTypes=gpu
NodeName=localhost NodeAddr=127.0.0.1 $topo RealMemory=$mem Gres=gpu:fake:$NGPU State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
  cat > "$D/gres.conf" <<CONF
AutoDetect=off
NodeName=localhost Name=gpu Type=fake File=$D/gpu[0-$((NGPU - 1))]
CONF
  # the jobstep plugin drops SLURM_CONF before its nested srun; this shim (first on PATH) restores it
  printf '#!/bin/sh\nSLURM_CONF=%s exec %s "$@"\n' "'$D/slurm.conf'" "'$real_srun'" > "$D/bin/srun"
  chmod +x "$D/bin/srun"

  setsid munged -F --socket="$D/munge/munge.sock" --key-file="$D/munge/munge.key" \
    --pid-file="$D/munge/munged.pid" --log-file="$D/log/munged.log" \
    --seed-file="$D/munge/munged.seed" >"$D/log/munged.out" 2>&1 < /dev/null &
  echo $! > "$D/munged.bgpid"
  for _ in $(seq 50); do [ -S "$D/munge/munge.sock" ] && break; sleep 0.1; done
  munge -n -S "$D/munge/munge.sock" | unmunge -S "$D/munge/munge.sock" >/dev/null

  export SLURM_CONF=$D/slurm.conf
  setsid slurmctld -D -f "$D/slurm.conf" >"$D/log/slurmctld.out" 2>&1 < /dev/null &
  echo $! > "$D/slurmctld.bgpid"
  setsid slurmd -D -N localhost -f "$D/slurm.conf" >"$D/log/slurmd.out" 2>&1 < /dev/null &
  echo $! > "$D/slurmd.bgpid"
  for _ in $(seq 100); do answering && break; sleep 0.2; done
  answering || { echo "slurm did not come up; see $D/log" >&2; exit 1; }
  exports
}

case "$CMD" in
  up) up ;;
  down) down ;;
  status) if answering; then echo "up: $D"; else echo "down: $D"; exit 1; fi ;;
  *) echo "usage: $0 up|down|status [DIR]" >&2; exit 2 ;;
esac
