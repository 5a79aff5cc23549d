"""Look up model classes and modules of an architecture through a skeleton on the meta device.

Building `AutoModelForCausalLM.from_config(config)` on the meta device allocates no
weights, so it is a cheap way to learn, for any architecture that transformers implements, the
decoder layer modules, their key prefix in the checkpoint, and the rotary embedding.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from swarmlens.checkpoint.errors import CheckpointError

# Used when a model class declares its tied weights in a form older than transformers 5.
_DEFAULT_TIED_WEIGHTS = {"lm_head.weight": "model.embed_tokens.weight"}


def causal_lm_class(config: PretrainedConfig) -> type[nn.Module]:
    try:
        return MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError as error:
        raise CheckpointError(
            f"transformers has no causal language model class for model_type {config.model_type!r}."
        ) from error


def tied_weights(config: PretrainedConfig) -> dict[str, str]:
    """Map each tied parameter name to the name it shares storage with, e.g. lm_head.weight -> model.embed_tokens.weight.

    Empty unless the config sets `tie_word_embeddings`.
    """
    if not getattr(config, "tie_word_embeddings", False):
        return {}
    declared = getattr(causal_lm_class(config), "_tied_weights_keys", None)
    if isinstance(declared, dict) and declared:
        return dict(declared)
    return dict(_DEFAULT_TIED_WEIGHTS)


def build_meta_skeleton(config: PretrainedConfig) -> nn.Module:
    """Build the causal language model of `config` on the meta device, without allocating weights."""
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def find_decoder_layers(skeleton: nn.Module, num_layers: int) -> tuple[str, nn.ModuleList]:
    """Return the checkpoint key prefix and the module list of the decoder layers, e.g. ("model.layers", ...)."""
    for name, module in skeleton.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == num_layers:
            return name, module
    raise CheckpointError(
        f"Found no list of {num_layers} decoder layers in {type(skeleton).__name__}. "
        "This architecture is not supported."
    )


def find_rotary_embedding(skeleton: nn.Module) -> nn.Module:
    """Return the model-level rotary embedding module, named `rotary_emb` in transformers models."""
    for name, module in skeleton.named_modules():
        if name.rsplit(".", 1)[-1] == "rotary_emb":
            return module
    raise CheckpointError(
        f"Found no rotary_emb module in {type(skeleton).__name__}. This architecture is not supported."
    )
