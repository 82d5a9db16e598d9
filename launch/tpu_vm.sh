#!/usr/bin/env bash
# Trains facediff on every worker of a Cloud TPU VM slice (one process per host, all
# of them one jax.distributed job; jax finds the slice's hosts by itself).
#
#   bash launch/tpu_vm.sh TPU_NAME ZONE --config configs/diffsfsr.py:tiny \
#       --workdir /mnt/shared/runs/diffsfsr [--config.data.global_batch_size=256 ...]
#
# Run it from a machine with gcloud set up for the TPU's project. It copies the
# repository's tracked files (git ls-files, as they are in the working tree) to
# ~/$FACEDIFF_REMOTE_DIR on every worker, runs launch/setup.sh there (idempotent),
# adds the TPU build of the same jax version, and starts
#   .venv/bin/python -m launch.train --distributed <your arguments>
# on all workers at once. Every argument after ZONE is passed through unchanged.
# The workdir must be a path every worker sees (an NFS/Filestore mount or a gcsfuse
# bucket mounted at the same path); the same command again resumes from its newest
# complete checkpoint.
#
# Environment: FACEDIFF_REMOTE_DIR (default facediff), FACEDIFF_REMOTE_PYTHON (the
# workers' Python >= 3.11 that setup.sh builds the venv from; default python3: images
# whose python3 is older need e.g. python3.11 installed), FACEDIFF_SKIP_SYNC=1 (do not
# copy the sources again), FACEDIFF_DRY_RUN=1 (print the gcloud commands only).
set -euo pipefail

if [ $# -lt 3 ]; then
  echo "usage: $0 TPU_NAME ZONE --config CONFIG --workdir DIR [launch.train flags...]" >&2
  exit 2
fi
TPU=$1
ZONE=$2
shift 2
REMOTE_DIR=${FACEDIFF_REMOTE_DIR:-facediff}
REMOTE_PYTHON=${FACEDIFF_REMOTE_PYTHON:-python3}
cd "$(dirname "$0")/.."

run() {
  if [ "${FACEDIFF_DRY_RUN:-0}" = 1 ]; then
    printf '%q ' "$@"
    echo
  else
    "$@"
  fi
}

gcloud_tpu=(gcloud compute tpus tpu-vm)
if [ "${FACEDIFF_SKIP_SYNC:-0}" != 1 ]; then
  tarball=$(mktemp -t facediff-src.XXXXXX)
  trap 'rm -f "$tarball"' EXIT
  git ls-files -z | tar --null -czf "$tarball" -T -
  run "${gcloud_tpu[@]}" scp "$tarball" "$TPU:facediff-src.tar.gz" --zone="$ZONE" --worker=all
fi

# What each worker runs: unpack, set up, add jax's TPU runtime, train. The launch
# arguments are quoted once here (printf %q) so that they reach python unchanged.
read -r -d '' remote <<'EOF' || true
set -euo pipefail
mkdir -p "$HOME/@DIR@" && cd "$HOME/@DIR@"
if [ -f "$HOME/facediff-src.tar.gz" ]; then tar -xzf "$HOME/facediff-src.tar.gz"; fi
PYTHON=@PY@ bash launch/setup.sh
if ! .venv/bin/python -c 'import jax; jax.devices("tpu")' >/dev/null 2>&1; then
  v=$(.venv/bin/python -c 'import jax; print(jax.__version__)')
  .venv/bin/python -m pip install -q "jax[tpu]==$v"
fi
exec .venv/bin/python -m launch.train --distributed
EOF
remote=${remote//@DIR@/$REMOTE_DIR}
remote=${remote//@PY@/$(printf '%q' "$REMOTE_PYTHON")}
remote+=" $(printf '%q ' "$@")"

run "${gcloud_tpu[@]}" ssh "$TPU" --zone="$ZONE" --worker=all --command="$remote"
