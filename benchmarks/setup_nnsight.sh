#!/usr/bin/env bash
# Create benchmarks/.venv-nnsight, a virtual environment for NNsight 0.8, the baseline of
# benchmarks/tracing_overhead.py. NNsight is a benchmark-only dependency, so it never enters
# the project's own .venv. swarmlens is installed there too (editable, without its
# dependencies: the local executor needs only torch, transformers, safetensors, msgpack and
# tqdm, not hivemind), so that one process can time both tracers in alternation.
#
# torch is installed first and then held by a constraints file, so that resolving nnsight
# can never replace the local CPU build with another torch. transformers is pinned to the
# version of the project's .venv, so both sides of the benchmark run the same model code.
# Idempotent: a second run only checks the versions.
set -euo pipefail

TORCH_VERSION="2.13.0"
NNSIGHT_SPEC="nnsight>=0.8,<0.9"

benchmarks_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$benchmarks_dir/.." && pwd)"
venv="${NNSIGHT_VENV:-$benchmarks_dir/.venv-nnsight}"
project_python="${SWARMLENS_PYTHON:-$root/.venv/bin/python}"

if [ ! -x "$project_python" ]; then
    echo "error: $project_python not found; run 'source scripts/setup_venv.sh' first, because the" \
         "transformers version is taken from the project's .venv." >&2
    exit 1
fi
transformers_version="$("$project_python" -c 'import transformers; print(transformers.__version__)')"

if [ ! -x "$venv/bin/python" ]; then
    echo "Creating virtual environment $venv" >&2
    python3 -m venv "$venv"
fi

constraints="$venv/torch-constraint.txt"
echo "torch==$TORCH_VERSION" > "$constraints"

"$venv/bin/python" -m pip install --quiet "torch==$TORCH_VERSION"
"$venv/bin/python" -m pip install --quiet -c "$constraints" "$NNSIGHT_SPEC" "transformers==$transformers_version" safetensors
"$venv/bin/python" -m pip install --quiet -c "$constraints" msgpack tqdm
"$venv/bin/python" -m pip install --quiet --no-deps -e "$root"

"$venv/bin/python" - "$TORCH_VERSION" "$transformers_version" <<'PYTHON'
import sys
from importlib.metadata import version

import torch
import transformers

import swarmlens.intervene  # noqa: F401  (fails here if the local executor misses a dependency)

torch_expected, transformers_expected = sys.argv[1:3]
if torch.__version__.split("+")[0] != torch_expected:
    sys.exit(f"error: torch {torch.__version__} is installed in the NNsight venv, expected {torch_expected}.")
if transformers.__version__ != transformers_expected:
    sys.exit(f"error: transformers {transformers.__version__} is installed, expected {transformers_expected}.")
print(f"NNsight venv ready: nnsight {version('nnsight')}, torch {torch.__version__}, "
      f"transformers {transformers.__version__}")
PYTHON
