#!/usr/bin/env bash
# Run the swarmlens demo, creating and filling .venv first when needed.
# Extra arguments go to `swarmlens demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_venv.sh

swarmlens demo "$@"
