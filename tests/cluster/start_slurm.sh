#!/usr/bin/env bash
# Start a one-node SLURM cluster on this host for tests: munged, slurmctld, slurmd.
#
#   sudo tests/cluster/start_slurm.sh     # then sinfo, sbatch, snakemake --profile slurm ...
#   sudo tests/cluster/stop_slurm.sh      # ends exactly the daemons started here
#
# Everything lives in one state directory, $POSERFT_SLURM_DIR (default /tmp/poserft-slurm):
# slurm.conf, spool/state dirs, daemon logs, PID files and the job-completion log
# (jobcomp.log, one line per finished job: the test's record of what SLURM ran).
#
# Clients find the config at the default path /etc/slurm/slurm.conf, a symlink to the state
# directory's file that only lives while the cluster runs (stop_slurm.sh removes it).
# SLURM_CONF alone is not enough: the snakemake plugin's job step strips every SLURM_*
# variable before its nested `srun`. And the symlink must not outlive the cluster: with a
# slurm.conf present but no controller, every client call (the plugin runs `scontrol show
# config` whenever snakemake starts, even for --version) waits ~10 s; with no slurm.conf it
# fails at once. An /etc/slurm/slurm.conf that is not our symlink is never touched.
#
# Needs root (munged runs as the munge user, slurmd as root) and the Debian packages
# slurmctld, slurmd, slurm-client and munge (tests/cluster/ci_setup.sh installs them).
# No systemd: the daemons are started by hand. Idempotent: if this directory's cluster is
# already up it does nothing. Takes about a second.
set -euo pipefail

STATE=${POSERFT_SLURM_DIR:-/tmp/poserft-slurm}
CTLD_PORT=${POSERFT_SLURM_CTLD_PORT:-6817}
SLURMD_PORT=${POSERFT_SLURM_SLURMD_PORT:-6818}
WAIT_S=${POSERFT_SLURM_WAIT_S:-60}
CONF=$STATE/slurm.conf
ETC_CONF=/etc/slurm/slurm.conf
export SLURM_CONF=$CONF

log() { echo "[start_slurm] $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

[[ $(id -u) -eq 0 ]] || die "needs root (munged runs as user munge, slurmd as root); run with sudo"
for bin in munged slurmctld slurmd sinfo scontrol; do
    command -v "$bin" >/dev/null || [[ -x /usr/sbin/$bin ]] || \
        die "'$bin' not found: install the Debian packages (tests/cluster/ci_setup.sh)"
done
export PATH=$PATH:/usr/sbin
if [[ -e $ETC_CONF || -L $ETC_CONF ]] && [[ $(readlink "$ETC_CONF" || true) != "$CONF" ]]; then
    die "$ETC_CONF exists and is not this test cluster's (a real SLURM install?); not touching it"
fi

alive() { [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

node_idle() { sinfo -h -N -o '%t' 2>/dev/null | grep -qx 'idle'; }

if [[ -L $ETC_CONF ]] && alive "$STATE/slurmctld.pid" && alive "$STATE/slurmd.pid" && node_idle; then
    log "already running ($STATE)"
    exit 0
fi

# A half-started cluster would leave the /etc symlink (slowing every client) and daemons
# behind: on any failure from here on, stop whatever was started.
export POSERFT_SLURM_DIR=$STATE
started_ok=0
cleanup_on_failure() {
    if [[ $started_ok != 1 ]]; then
        log "start failed: stopping what was started"
        bash "$(dirname "${BASH_SOURCE[0]}")/stop_slurm.sh" || true
    fi
}
trap cleanup_on_failure EXIT

mkdir -p "$STATE"/{spool,state}
chmod 755 "$STATE"

# --- munge: authentication between clients, slurmctld and slurmd --------------------------
# Reuse a munged that already answers (someone else's: we then never stop it); otherwise
# start our own as the munge user and remember its PID.
munge_ok() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }
if munge_ok; then
    log "munged already running; reusing it (stop_slurm.sh will leave it alone)"
    rm -f "$STATE/munged.pid"
else
    if [[ ! -s /etc/munge/munge.key ]]; then
        log "creating /etc/munge/munge.key"
        install -d -o munge -g munge -m 0700 /etc/munge
        dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
        chown munge:munge /etc/munge/munge.key
        chmod 0400 /etc/munge/munge.key
    fi
    # /run/munge holds the socket; without systemd nobody creates it.
    install -d -o munge -g munge -m 0755 /run/munge
    install -d -o munge -g munge -m 0700 /var/log/munge /var/lib/munge
    runuser -u munge -- /usr/sbin/munged --force
    for _ in $(seq 50); do [[ -s /run/munge/munged.pid ]] && munge_ok && break; sleep 0.1; done
    munge_ok || die "munged did not come up (see /var/log/munge/munged.log)"
    cp /run/munge/munged.pid "$STATE/munged.pid"
fi

# --- slurm.conf for this host -----------------------------------------------------------
# The node line comes from `slurmd -C` (what slurmd detects): a RealMemory or CPU count above
# it makes slurmctld drain the node.
node_line=$(slurmd -C | head -1)
[[ $node_line == NodeName=* ]] || die "unexpected 'slurmd -C' output: $node_line"
node_name=${node_line%% *}; node_name=${node_name#NodeName=}
cat > "$CONF.tmp" <<EOF
# Written by tests/cluster/start_slurm.sh: a one-node test cluster (no accounting daemon).
ClusterName=poserft-test
SlurmctldHost=${node_name}(127.0.0.1)
SlurmctldPort=${CTLD_PORT}
SlurmdPort=${SLURMD_PORT}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=${STATE}/state
SlurmdSpoolDir=${STATE}/spool
SlurmctldPidFile=${STATE}/slurmctld.pid
SlurmdPidFile=${STATE}/slurmd.pid
SlurmctldLogFile=${STATE}/slurmctld.log
SlurmdLogFile=${STATE}/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# No cgroups in a container without systemd: plain process tracking, no task binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
# No slurmdbd: sacct cannot work. The job-completion log is the record of finished jobs, and
# MinJobAge keeps finished jobs visible to squeue/scontrol for 10 minutes, well above the
# snakemake plugin's threshold (3 x its first status interval) for trusting squeue.
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc=${STATE}/jobcomp.log
MinJobAge=600
InactiveLimit=0
KillWait=5
Waittime=0
${node_line} NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=debug Nodes=${node_name} Default=YES MaxTime=INFINITE State=UP
EOF
mv "$CONF.tmp" "$CONF"
chmod 644 "$CONF"
mkdir -p "$(dirname "$ETC_CONF")"
ln -sfn "$CONF" "$ETC_CONF"

# --- daemons ----------------------------------------------------------------------------
# -i: ignore state left by an earlier run of this directory (jobs, node state).
# Wait with a deadline, and stop waiting as soon as the daemon has died (e.g. its port is
# taken): each `scontrol ping` to a silent port can itself block for seconds.
wait_for() {  # name pidfile probe-command...
    local name=$1 pidfile=$2 deadline=$((SECONDS + WAIT_S))
    shift 2
    until timeout 5 "$@" >/dev/null 2>&1; do
        if [[ -s $pidfile ]] && ! alive "$pidfile"; then
            tail -5 "$STATE/$name.log" >&2 || true
            die "$name exited (see $STATE/$name.log)"
        fi
        (( SECONDS < deadline )) || die "$name not ready after ${WAIT_S}s (see $STATE/$name.log)"
        sleep 0.2
    done
}
alive "$STATE/slurmctld.pid" || { rm -f "$STATE/slurmctld.pid"; slurmctld -i; }
wait_for slurmctld "$STATE/slurmctld.pid" scontrol ping
alive "$STATE/slurmd.pid" || { rm -f "$STATE/slurmd.pid"; slurmd; }

deadline=$((SECONDS + WAIT_S))
until node_idle; do
    if [[ -s $STATE/slurmd.pid ]] && ! alive "$STATE/slurmd.pid"; then
        tail -5 "$STATE/slurmd.log" >&2 || true
        die "slurmd exited (see $STATE/slurmd.log)"
    fi
    if (( SECONDS >= deadline )); then
        sinfo -N -l >&2 || true
        die "node not idle after ${WAIT_S}s (see $STATE/slurmctld.log, $STATE/slurmd.log)"
    fi
    state=$(sinfo -h -N -o '%t' 2>/dev/null || true)
    # A node left drained/down by an earlier run of this directory: bring it back.
    if [[ $state == drain* || $state == down* ]]; then
        scontrol update NodeName="$node_name" State=RESUME >/dev/null 2>&1 || true
    fi
    sleep 0.2
done
for _ in $(seq 50); do [[ -s $STATE/slurmctld.pid && -s $STATE/slurmd.pid ]] && break; sleep 0.1; done
started_ok=1
log "up: node $node_name idle; slurmctld pid $(cat "$STATE/slurmctld.pid"), slurmd pid $(cat "$STATE/slurmd.pid"); config $ETC_CONF -> $CONF"
