"""SwarmModel: what a researcher imports to trace a model served by a swarm.

The client keeps the module tree on the meta device (so module paths are the
Hugging Face ones), real weights only for the embeddings, final norm and LM
head, and sends everything between them to a chain of peers.
"""

from typing import Any, Sequence

import torch
from torch import nn

from swarmlens.client.connection import SwarmConnection
from swarmlens.client.generation import generate
from swarmlens.intervene.errors import StopForward
from swarmlens.intervene.graph import Graph
from swarmlens.intervene.interpreter import Interpreter
from swarmlens.intervene.model import ModelInputs, RunResult, TracedModel
from swarmlens.intervene.sites import architecture_for
from swarmlens.intervene.tracer import GenerationConfig
from swarmlens.peer.errors import InvalidResponseError, PeerTimeoutError, PeerUnreachableError, RemoteError
from swarmlens.peer.protocol import ForwardRequest



class SwarmModel(TracedModel):
    """A causal LM whose blocks run on swarm peers; `with model.trace(prompt):` as in NNsight."""

    def __init__(self, checkpoint_path: str, connection_factory, skeleton: nn.Module, tokenizer: Any,
                 model_id: str, rename: dict[str, str] | None = None):
        super().__init__(skeleton, architecture_for(skeleton.config.model_type), tokenizer, rename)
        self.model_id = model_id
        self._client_modules = _materialize_client_modules(skeleton, checkpoint_path, self.architecture)
        self.connection = connection_factory(model_id, self.num_blocks)

    @classmethod
    def from_pretrained(cls, name_or_path: str | None = None, *, initial_peers: Sequence[str],
                        rename: dict[str, str] | None = None, **connection_options) -> "SwarmModel":
        """Load the client's part of a model and join the swarm at `initial_peers`.

        `name_or_path` is None for the default model or a local Hugging Face checkpoint
        folder; the DHT model id is the folder name, as peers announce it. `rename`
        maps module paths or names to aliases, e.g. {"model.layers": "blocks"}.
        """
        from swarmlens.checkpoint import load_config, load_tokenizer, model_id, resolve_checkpoint
        from swarmlens.checkpoint.architecture import build_meta_skeleton

        path = resolve_checkpoint(name_or_path)
        skeleton = build_meta_skeleton(load_config(path))

        def connect(model: str, num_blocks: int) -> SwarmConnection:
            return SwarmConnection(initial_peers, model, num_blocks, **connection_options)

        return cls(str(path), connect, skeleton, load_tokenizer(path), model_id(path), rename)

    def close(self) -> None:
        self.connection.close()

    def __enter__(self) -> "SwarmModel":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # --- running -----------------------------------------------------------

    def _run_graph(self, graph: Graph, inputs: ModelInputs, generation: GenerationConfig | None = None) -> RunResult:
        plan = self.plan(graph)
        if generation is not None:
            return self._generate(graph, inputs, generation, plan)
        last = self.num_blocks
        client_nodes = plan.nodes.get(-1, []) + plan.nodes.get(last, [])
        keep = set(graph.saved()) | plan.client_keep()
        interpreter = Interpreter(client_nodes, plan.at, self._client_modules, keep=keep, limits=self.limits,
                                  events=plan.events)

        try:
            with torch.no_grad(), interpreter.hooks():
                hidden = self._client_modules[self.architecture.embeddings](inputs.input_ids)
        except StopForward:
            return RunResult(None, interpreter.take(graph.saved()), plan)
        sent = interpreter.take(plan.keep_after[0][-1])

        remote_nodes = plan.nodes_for_span(0, last)
        remote_at = {node.id: plan.at[node.id] for node in remote_nodes}
        keep_after = {block: plan.keep_after[0][block] for block in range(last)}

        def build(chain):
            return ForwardRequest(hidden, inputs.attention_mask, inputs.position_ids, chain, remote_nodes,
                                  remote_at, keep_after, sent, inputs.attn_implementation)

        response, transfer = self.connection.forward(build, num_tokens=inputs.input_ids.numel())
        interpreter.add_values(response.values)

        logits = None
        if not response.stopped:
            try:
                with torch.no_grad(), interpreter.hooks():
                    normed = self._client_modules[self.architecture.final_norm](response.hidden_states)
                    logits = self._client_modules[self.architecture.lm_head](normed)
            except StopForward:
                pass
        interpreter.check_done()

        transfer.update(sent_values=sorted(sent), received_values=sorted(response.values))
        return RunResult(logits, interpreter.take(graph.saved()), plan, response.hops, transfer)

    def _generate(self, graph: Graph, inputs: ModelInputs, generation: GenerationConfig, plan) -> RunResult:
        """Generate on a session; if a peer fails, start over on a chain without it.

        Starting over (rather than replaying into a new peer) keeps the result exactly
        what one uninterrupted run gives, sampling included, because the seed restarts too.
        """
        excluded: set[str] = set()
        retry = self.connection.retry
        for attempt in range(1, retry.max_attempts + 1):
            try:
                return generate(self, graph, inputs, generation, plan, frozenset(excluded))
            except (RemoteError, PeerUnreachableError, PeerTimeoutError, InvalidResponseError) as error:
                retry.on_failure(error, attempt, excluded, "Generation")
        raise PeerUnreachableError(",".join(sorted(excluded)) or "?",
                                   f"generation failed on {retry.max_attempts} chains; excluded peers: {sorted(excluded)}")


def _materialize_client_modules(skeleton: nn.Module, checkpoint_path: str, architecture) -> dict[str, nn.Module]:
    """Give the embeddings, final norm and LM head of the skeleton their real weights."""
    from swarmlens.checkpoint import load_tensors

    roots = architecture.client_modules()
    tensors = load_tensors(checkpoint_path, lambda name: name.startswith(tuple(root + "." for root in roots)))

    modules: dict[str, nn.Module] = {}
    for root in roots:
        module = skeleton.get_submodule(root)
        state = {name[len(root) + 1:]: tensor for name, tensor in tensors.items() if name.startswith(root + ".")}
        module.load_state_dict(state, strict=True, assign=True)
        module.eval()
        for name, submodule in module.named_modules():
            modules[f"{root}.{name}" if name else root] = submodule
    return modules
