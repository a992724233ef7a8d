#!/usr/bin/env bash
# Install what the SLURM test needs (Debian: slurmctld, slurmd, slurm-client, munge).
# Idempotent and quiet: does nothing when the binaries are present. Without root it only
# says so and exits 0: tests/test_slurm.py then skips with that reason.
# An install that fails as root exits non-zero, so CI does not silently skip the test.
#
# The packages create no /etc/slurm/slurm.conf, and nothing here does: with no slurm.conf
# and no controller, SLURM clients fail at once, so installed binaries do not slow the
# snakemake SLURM plugin (it runs `scontrol show config` whenever snakemake starts) in the
# rest of the test suite. tests/cluster/start_slurm.sh writes its own config elsewhere.
set -euo pipefail

have_all() {
    for bin in munged slurmctld slurmd sinfo squeue scontrol sbatch srun; do
        command -v "$bin" >/dev/null || [[ -x /usr/sbin/$bin ]] || return 1
    done
}

if have_all; then
    exit 0
fi
if [[ $(id -u) -ne 0 ]]; then
    echo "[ci_setup] not root: cannot install the SLURM packages; the SLURM test will skip" >&2
    exit 0
fi
if [[ -e /etc/slurm/slurm.conf ]]; then
    echo "[ci_setup] note: /etc/slurm/slurm.conf exists (a real SLURM install?): tests/cluster/start_slurm.sh will refuse to replace it" >&2
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null
apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
have_all || { echo "[ci_setup] ERROR: SLURM binaries still missing after apt-get install" >&2; exit 1; }
echo "[ci_setup] installed slurmctld slurmd slurm-client munge" >&2
