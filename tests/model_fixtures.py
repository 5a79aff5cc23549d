"""Fixtures that load the real default model once per test session.

Import the fixtures a test module needs from here; pytest then finds them.
"""

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def checkpoint_path() -> Path:
    from swarmlens.checkpoint import resolve_checkpoint

    return resolve_checkpoint(progress=False)


@pytest.fixture(scope="session")
def hf_model(checkpoint_path):
    from swarmlens.checkpoint import load_reference_model

    return load_reference_model(checkpoint_path)


@pytest.fixture(scope="session")
def tokenizer(checkpoint_path):
    from swarmlens.checkpoint import load_tokenizer

    return load_tokenizer(checkpoint_path)


@pytest.fixture(scope="session")
def local_model(hf_model, tokenizer):
    from swarmlens.intervene import LocalModel

    return LocalModel(hf_model, tokenizer)


@pytest.fixture(scope="session")
def swarm_model(local_swarm, checkpoint_path):
    """A client of the session's local swarm (two real peer processes)."""
    from swarmlens.client import SwarmModel

    model = SwarmModel.from_pretrained(str(checkpoint_path), initial_peers=local_swarm.initial_peers)
    yield model
    model.close()
