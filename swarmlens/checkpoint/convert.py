"""Convert the default GGUF model once into a float32 safetensors checkpoint in the cache.

Each cache folder is written once per CACHE_FORMAT_VERSION, safely across processes:

1. A complete folder contains a marker file, which is written last into a temporary
   folder before that folder is renamed into place. Readers that find the marker reuse
   the folder without loading the GGUF file.
2. Writers hold an exclusive `fcntl.flock` on a lock file next to the folder, check the
   marker again after taking the lock, build into a temporary folder in the same parent
   folder, and `os.rename` it into place, which is atomic on one POSIX file system.

A process killed mid-conversion leaves only a temporary folder, which the next writer
removes while it holds the lock.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as transformers_logging

from swarmlens.checkpoint.errors import CheckpointError
from swarmlens.checkpoint.locate import DEFAULT_MODEL_NAME, cache_dir, find_default_gguf

logger = logging.getLogger(__name__)

MARKER_FILENAME = ".swarmlens-complete.json"
# Bump when the layout of a converted folder changes, so that old caches are rebuilt.
CACHE_FORMAT_VERSION = 1


def default_checkpoint_dir() -> Path:
    return cache_dir() / DEFAULT_MODEL_NAME


def is_complete(folder: Path) -> bool:
    """Return whether `folder` is a finished conversion of the current cache format."""
    marker = folder / MARKER_FILENAME
    try:
        content = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(content, dict) and content.get("format_version") == CACHE_FORMAT_VERSION


def ensure_default_checkpoint(progress: bool = True) -> Path:
    """Return the cached safetensors checkpoint of the default model, converting the GGUF file first if needed."""
    target = default_checkpoint_dir()
    if is_complete(target):
        logger.info("Using cached checkpoint %s", target)
        return target

    gguf_path = find_default_gguf()

    def build(folder: Path) -> None:
        convert_gguf(gguf_path, folder, progress=progress)

    return build_once(target, build, source=str(gguf_path))


def build_once(target: Path, build: Callable[[Path], None], *, source: str) -> Path:
    """Run `build(temporary_folder)` and move the result to `target`, unless another process already did.

    `build` writes every file of the checkpoint into the folder it is given. The marker
    file is added after it returns, so a failed `build` leaves no trace in `target`.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    lock_path = target.parent / f".{target.name}.lock"

    with _exclusive_lock(lock_path, target):
        if is_complete(target):
            logger.info("Using checkpoint %s, converted by another process", target)
            return target

        _remove_stale_temporary_folders(target)
        temporary = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            build(temporary)
            _write_marker(temporary, source)
            # mkdtemp creates the folder readable by its owner only; a cache folder is readable by all.
            os.chmod(temporary, 0o755)
            if target.exists():
                logger.warning(
                    "Replacing checkpoint folder %s, which has no completion marker of cache format %d",
                    target,
                    CACHE_FORMAT_VERSION,
                )
                shutil.rmtree(target)
            os.rename(temporary, target)
        except BaseException:
            shutil.rmtree(temporary, ignore_errors=True)
            raise

    return target


@contextlib.contextmanager
def _exclusive_lock(lock_path: Path, target: Path) -> Iterator[None]:
    with open(lock_path, "a+b") as lock_file:
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("Waiting for another process to finish writing %s (lock file %s)", target, lock_path)
            fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def _remove_stale_temporary_folders(target: Path) -> None:
    # Only called while holding the lock, so no live process is writing these folders.
    for leftover in target.parent.glob(f".{target.name}.tmp-*"):
        logger.info("Removing temporary folder %s left by an interrupted conversion", leftover)
        shutil.rmtree(leftover, ignore_errors=True)


def _write_marker(folder: Path, source: str) -> None:
    content = {"format_version": CACHE_FORMAT_VERSION, "source": source, "created": time.time()}
    (folder / MARKER_FILENAME).write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")


def convert_gguf(gguf_path: Path, output_dir: Path, *, progress: bool = True) -> None:
    """Dequantize a GGUF model with transformers and save it as a float32 safetensors checkpoint.

    Writes config.json (without `quantization_config`), model.safetensors and the tokenizer
    files into `output_dir`. Tied weights follow transformers: with `tie_word_embeddings`,
    `lm_head.weight` is stored only as `model.embed_tokens.weight`, and both
    `from_pretrained` and `swarmlens.checkpoint.load_tensors` restore it from there.
    """
    started = time.perf_counter()
    logger.info("Converting %s to a float32 safetensors checkpoint in %s (done once per cache)", gguf_path, output_dir)

    steps = tqdm(total=4, desc=f"Converting {gguf_path.name}", unit="step", disable=not progress)
    with steps, _transformers_progress_bars(progress):
        steps.set_postfix_str("dequantizing GGUF")
        gguf_model = AutoModelForCausalLM.from_pretrained(
            str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32, local_files_only=True
        )
        steps.update()

        # transformers 5.25 raises "The model is quantized with gguf and is not serializable"
        # from save_pretrained, so the weights move into a plain model built from the same
        # config minus its quantization entry.
        steps.set_postfix_str("building float32 model")
        config = copy.deepcopy(gguf_model.config)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        with torch.device("meta"):
            plain_model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain_model.load_state_dict(gguf_model.state_dict(), strict=True, assign=True)
        if getattr(config, "tie_word_embeddings", False):
            plain_model.tie_weights()
        del gguf_model
        steps.update()

        steps.set_postfix_str("saving weights")
        plain_model.save_pretrained(str(output_dir))
        del plain_model
        steps.update()

        steps.set_postfix_str("saving tokenizer")
        tokenizer = AutoTokenizer.from_pretrained(
            str(gguf_path.parent), gguf_file=gguf_path.name, local_files_only=True
        )
        tokenizer.save_pretrained(str(output_dir))
        steps.update()

    _check_saved_config(output_dir)
    logger.info("Converted %s in %.1f s", gguf_path.name, time.perf_counter() - started)


@contextlib.contextmanager
def _transformers_progress_bars(enabled: bool) -> Iterator[None]:
    """Switch the progress bars of transformers on or off for the duration of the block."""
    was_enabled = transformers_logging.is_progress_bar_enabled()
    if enabled:
        transformers_logging.enable_progress_bar()
    else:
        transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            transformers_logging.enable_progress_bar()
        else:
            transformers_logging.disable_progress_bar()


def _check_saved_config(output_dir: Path) -> None:
    config = json.loads((output_dir / "config.json").read_text(encoding="utf-8"))
    if "quantization_config" in config:
        raise CheckpointError(
            f"The converted config {output_dir / 'config.json'} still has a quantization_config entry. "
            "This transformers version saves configs differently than swarmlens expects."
        )
