#!/usr/bin/env bash
# Stop the test cluster that tests/cluster/start_slurm.sh started, and only that one:
# `scontrol shutdown` (slurmctld and slurmd end cleanly), then munged if start_slurm.sh
# started it, then the /etc/slurm/slurm.conf symlink (only if it points at our config:
# a config left without a controller would slow every SLURM client call by ~10 s). Every process is identified by the PID file in $POSERFT_SLURM_DIR
# (default /tmp/poserft-slurm); a daemon that ignores the request for 15 s gets SIGKILL.
# Safe to run twice. The state directory (logs, jobcomp.log) is kept for inspection.
set -uo pipefail

STATE=${POSERFT_SLURM_DIR:-/tmp/poserft-slurm}
export SLURM_CONF=$STATE/slurm.conf
export PATH=$PATH:/usr/sbin

log() { echo "[stop_slurm] $*" >&2; }

pid_of() { [[ -s $STATE/$1.pid ]] && cat "$STATE/$1.pid"; }
alive() { [[ -n ${1:-} ]] && kill -0 "$1" 2>/dev/null; }

wait_gone() {  # pid name
    local pid=$1 name=$2
    for _ in $(seq 150); do alive "$pid" || return 0; sleep 0.1; done
    log "$name (pid $pid) still running after 15 s: SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
}

ctld=$(pid_of slurmctld || true)
slurmd=$(pid_of slurmd || true)
munged=$(pid_of munged || true)

if alive "$ctld" || alive "$slurmd"; then
    # shutdown tells slurmctld to stop every slurmd, then itself.
    if [[ -f $SLURM_CONF ]] && scontrol shutdown >/dev/null 2>&1; then
        log "scontrol shutdown sent"
    else
        log "scontrol shutdown failed; sending SIGTERM"
        for pid in $ctld $slurmd; do alive "$pid" && kill -TERM "$pid" 2>/dev/null; done
    fi
    alive "$slurmd" && wait_gone "$slurmd" slurmd
    alive "$ctld" && wait_gone "$ctld" slurmctld
    # slurmd ignores a shutdown when it cannot reach slurmctld: end it directly.
    if alive "$slurmd"; then kill -TERM "$slurmd" 2>/dev/null; wait_gone "$slurmd" slurmd; fi
fi
rm -f "$STATE/slurmctld.pid" "$STATE/slurmd.pid"

if alive "$munged"; then
    kill -TERM "$munged" 2>/dev/null
    wait_gone "$munged" munged
fi
rm -f "$STATE/munged.pid"

if [[ -L /etc/slurm/slurm.conf && $(readlink /etc/slurm/slurm.conf) == "$SLURM_CONF" ]]; then
    rm -f /etc/slurm/slurm.conf
fi
log "stopped (state kept in $STATE)"
