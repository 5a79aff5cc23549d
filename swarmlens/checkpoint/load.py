"""Load the config, tokenizer and whole reference model of a local checkpoint folder."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedModel

from swarmlens.checkpoint.locate import check_checkpoint_folder, check_config_folder

logger = logging.getLogger(__name__)


def load_config(path: Path | str) -> PretrainedConfig:
    """Load the transformers config of a local checkpoint folder of a supported architecture."""
    folder = check_config_folder(Path(path))
    return AutoConfig.from_pretrained(str(folder), local_files_only=True)


def load_tokenizer(path: Path | str):
    """Load the tokenizer saved in a local checkpoint folder."""
    folder = check_config_folder(Path(path))
    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


def load_reference_model(path: Path | str) -> PreTrainedModel:
    """Load the whole model in float32 and eval mode, for local runs and as the reference in tests."""
    folder = check_checkpoint_folder(Path(path))
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, local_files_only=True)
    return model.eval()
