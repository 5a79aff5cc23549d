"""Load a span of decoder blocks, and the rotary embedding that every block needs."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from torch import nn
from transformers import PretrainedConfig

from swarmlens.checkpoint.architecture import build_meta_skeleton, find_decoder_layers, find_rotary_embedding
from swarmlens.checkpoint.errors import CheckpointError
from swarmlens.checkpoint.load import load_config
from swarmlens.checkpoint.tensors import load_tensors

logger = logging.getLogger(__name__)


def check_block_span(start: object, end: object, num_blocks: int) -> None:
    """Raise ValueError unless `start` and `end` are ints with 0 <= start < end <= num_blocks."""
    for label, value in (("start", start), ("end", end)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"Block span {label} must be an int, got {value!r} ({type(value).__name__}).")
    if not 0 <= start < end <= num_blocks:
        raise ValueError(
            f"Invalid block span {start}:{end}: expected 0 <= start < end <= {num_blocks}, "
            f"because the model has {num_blocks} blocks, numbered 0 to {num_blocks - 1}, and end is exclusive."
        )


def load_blocks(path: Path | str, start: int, end: int, dtype: torch.dtype = torch.float32) -> nn.ModuleList:
    """Load decoder blocks start..end-1 of a checkpoint, reading only their own tensors.

    Element k of the returned list is block start + k, built with `layer_idx=start + k`
    (the index that KV caches use) and set to eval mode. The blocks are built on the
    meta device, so no memory is spent on weights that are then overwritten.
    """
    started = time.perf_counter()
    config = load_config(path)
    num_blocks = config.num_hidden_layers
    check_block_span(start, end, num_blocks)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating point torch.dtype such as torch.float32, got {dtype!r}.")

    skeleton = build_meta_skeleton(config)
    prefix, all_layers = find_decoder_layers(skeleton, num_blocks)
    blocks = nn.ModuleList(all_layers[index] for index in range(start, end))
    del skeleton, all_layers

    def in_span(name: str) -> bool:
        return _block_index(name, prefix) in range(start, end)

    tensors = load_tensors(path, in_span)
    local_state = {_local_name(name, prefix, start): tensor for name, tensor in tensors.items()}
    try:
        blocks.load_state_dict(local_state, strict=True, assign=True)
    except RuntimeError as error:
        raise CheckpointError(
            f"The tensors of blocks {start}:{end} in {path} do not match the {config.model_type} architecture: {error}"
        ) from error

    blocks.to(dtype)
    _check_nothing_on_meta(blocks, start)
    blocks.eval()
    logger.info(
        "Loaded blocks %d:%d of %s (%d tensors) in %.2f s", start, end, path, len(tensors), time.perf_counter() - started
    )
    return blocks


def load_rotary_embedding(config: PretrainedConfig) -> nn.Module:
    """Build the rotary position embedding module of the architecture of `config`, e.g. LlamaRotaryEmbedding.

    Called as `rotary(hidden_states, position_ids)`, it returns the (cos, sin) pair that
    every block takes as `position_embeddings`.
    """
    rotary_class = type(find_rotary_embedding(build_meta_skeleton(config)))
    return rotary_class(config=config).eval()


def _block_index(name: str, prefix: str) -> int | None:
    """Return i for a tensor named '{prefix}.{i}.…', else None."""
    if not name.startswith(prefix + "."):
        return None
    index = name[len(prefix) + 1 :].split(".", 1)[0]
    return int(index) if index.isdigit() else None


def _local_name(name: str, prefix: str, start: int) -> str:
    """Turn 'model.layers.17.mlp.up_proj.weight' into '2.mlp.up_proj.weight' for start=15."""
    index, rest = name[len(prefix) + 1 :].split(".", 1)
    return f"{int(index) - start}.{rest}"


def _check_nothing_on_meta(blocks: nn.ModuleList, start: int) -> None:
    # A buffer that the checkpoint does not store (non-persistent) stays on the meta device.
    on_meta = [name for name, tensor in [*blocks.named_parameters(), *blocks.named_buffers()] if tensor.is_meta]
    if on_meta:
        raise CheckpointError(
            f"Blocks starting at {start} have tensors that the checkpoint does not store: {on_meta[:5]}. "
            "This architecture is not supported."
        )
