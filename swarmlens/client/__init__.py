"""The researcher's entry point: SwarmModel, a model whose blocks run on swarm peers."""

from swarmlens.client.model import SwarmModel

__all__ = ["SwarmModel"]
