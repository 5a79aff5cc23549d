"""Read selected tensors from the safetensors file(s) of a checkpoint, without reading the others."""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from safetensors import safe_open

from swarmlens.checkpoint.architecture import tied_weights
from swarmlens.checkpoint.errors import CheckpointError
from swarmlens.checkpoint.load import load_config
from swarmlens.checkpoint.locate import SAFETENSORS_FILENAME, SAFETENSORS_INDEX_FILENAME, check_checkpoint_folder

logger = logging.getLogger(__name__)

TensorSelection = Iterable[str] | Callable[[str], bool]


def load_tensors(path: Path | str, names: TensorSelection) -> dict[str, torch.Tensor]:
    """Read the tensors named by `names` (a collection of names, or a predicate on names).

    Only the requested tensors are read, through `safetensors.safe_open`; sharded
    checkpoints are supported through model.safetensors.index.json.

    With `tie_word_embeddings`, transformers stores `lm_head.weight` only as
    `model.embed_tokens.weight`. A request for such a tied name returns the tensor it is
    tied to, and when both names are requested they map to the same tensor object. A
    predicate sees the stored names plus these tied names.
    """
    path = check_checkpoint_folder(Path(path))
    files = tensor_files(path)
    aliases = {
        tied: source
        for tied, source in tied_weights(load_config(path)).items()
        if tied not in files and source in files
    }
    requested = _select_names(names, available=sorted(set(files) | set(aliases)), path=path)

    stored_names_by_file: dict[Path, set[str]] = defaultdict(set)
    for name in requested:
        stored_name = aliases.get(name, name)
        stored_names_by_file[files[stored_name]].add(stored_name)

    stored_tensors: dict[str, torch.Tensor] = {}
    for file, stored_names in stored_names_by_file.items():
        with safe_open(str(file), framework="pt", device="cpu") as reader:
            for stored_name in sorted(stored_names):
                stored_tensors[stored_name] = reader.get_tensor(stored_name)

    logger.debug("Read %d tensors from %s", len(stored_tensors), path)
    return {name: stored_tensors[aliases.get(name, name)] for name in requested}


def tensor_files(path: Path) -> dict[str, Path]:
    """Map every tensor name stored in the checkpoint folder `path` to the safetensors file that contains it."""
    index_path = path / SAFETENSORS_INDEX_FILENAME
    if index_path.is_file():
        return _read_index(index_path)

    file = path / SAFETENSORS_FILENAME
    try:
        with safe_open(str(file), framework="pt", device="cpu") as reader:
            return {name: file for name in reader.keys()}
    except Exception as error:  # safetensors raises its own SafetensorError and OSError subclasses
        raise CheckpointError(f"Cannot read the safetensors header of {file}: {error}. Re-save the checkpoint.") from error


def _read_index(index_path: Path) -> dict[str, Path]:
    try:
        weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"Cannot read the weight_map of {index_path}: {error}. Re-save the checkpoint.") from error
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"The weight_map of {index_path} must be a JSON object of tensor name -> file name.")

    folder = index_path.parent
    files: dict[str, Path] = {}
    for name, file_name in weight_map.items():
        file = folder / str(file_name)
        # Shards must be files in the checkpoint folder itself, so an index cannot point elsewhere.
        if file.parent != folder or not file.is_file():
            raise CheckpointError(f"{index_path} maps {name!r} to {file_name!r}, which is not a file in {folder}.")
        files[name] = file
    return files


def _select_names(names: TensorSelection, *, available: list[str], path: Path) -> list[str]:
    if isinstance(names, str):
        raise TypeError(f"names must be a collection of tensor names or a predicate, not the string {names!r}. Wrap it in a list.")
    if callable(names):
        return [name for name in available if names(name)]

    requested = list(dict.fromkeys(names))
    available_set = set(available)
    missing = [name for name in requested if name not in available_set]
    if missing:
        shown = ", ".join(repr(name) for name in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise CheckpointError(
            f"Checkpoint {path} has no tensor named {shown}{more}. "
            f"It stores {len(available)} tensors, e.g. {available[0]!r}."
        )
    return requested
