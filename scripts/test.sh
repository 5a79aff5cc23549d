#!/usr/bin/env bash
# Run the test suite, creating and filling .venv first when needed.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k checkpoint`.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_venv.sh

# Each test may take up to 10 minutes; the first test that needs the default model
# waits for its one-time GGUF conversion (about 25 s).
python -m pytest -q tests --timeout=600 "$@"
