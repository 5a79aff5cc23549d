"""Checkpoints: find or convert a model, and load its config, tokenizer, tensors and block spans."""

from swarmlens.checkpoint.blocks import load_blocks, load_rotary_embedding
from swarmlens.checkpoint.errors import CheckpointError
from swarmlens.checkpoint.load import load_config, load_reference_model, load_tokenizer
from swarmlens.checkpoint.locate import DEFAULT_MODEL_NAME, cache_dir, find_default_gguf, model_id
from swarmlens.checkpoint.resolve import resolve_checkpoint
from swarmlens.checkpoint.tensors import load_tensors

__all__ = [
    "DEFAULT_MODEL_NAME",
    "CheckpointError",
    "cache_dir",
    "find_default_gguf",
    "load_blocks",
    "load_config",
    "load_reference_model",
    "load_rotary_embedding",
    "load_tensors",
    "load_tokenizer",
    "model_id",
    "resolve_checkpoint",
]
