"""Generation through the swarm: one inference session, one chain step per new token.

The client embeds each step's new tokens, sends them along the session, runs
the final norm and LM head on what returns, and picks the next token. Its own
interpreter runs the client's part of the graph at every step.
"""

import dataclasses

import torch

from swarmlens.client.sampling import next_tokens
from swarmlens.intervene.graph import Graph
from swarmlens.intervene.interpreter import Interpreter
from swarmlens.intervene.model import ModelInputs, RunResult
from swarmlens.intervene.partition import Partition
from swarmlens.intervene.tracer import GenerationConfig
from swarmlens.peer.protocol import SessionOpen, SessionStep



@dataclasses.dataclass
class DecodeState:
    tokens: torch.Tensor  # [batch, prompt + generated so far]
    new_tokens: torch.Tensor  # [batch, tokens of this step]
    attention_mask: torch.Tensor  # [batch, all tokens so far]
    position_ids: torch.Tensor  # [batch, tokens of this step]
    finished: torch.Tensor  # [batch] bool: the row emitted a stop token

    def append(self, chosen: torch.Tensor, pad_token: int, stop_tokens: torch.Tensor) -> None:
        chosen = torch.where(self.finished, torch.full_like(chosen, pad_token), chosen)
        self.tokens = torch.cat([self.tokens, chosen[:, None]], dim=1)
        self.finished = self.finished | torch.isin(chosen, stop_tokens)
        self.new_tokens = chosen[:, None]
        self.attention_mask = torch.cat([self.attention_mask, torch.ones_like(chosen)[:, None]], dim=1)
        self.position_ids = self.position_ids[:, -1:] + 1


def generate(model, graph: Graph, inputs: ModelInputs, config: GenerationConfig, plan: Partition,
             exclude: frozenset[str] = frozenset()) -> RunResult:
    """Run one traced generation on a fresh session; raise on any peer failure."""
    connection = model.connection
    last = model.num_blocks
    interpreter = Interpreter(plan.nodes.get(-1, []) + plan.nodes.get(last, []), plan.at, model._client_modules,
                              keep=set(graph.saved()) | plan.client_keep(), limits=model.limits, events=plan.events)

    batch, prompt_length = inputs.input_ids.shape
    chain = connection.route(exclude, num_tokens=inputs.input_ids.numel())
    remote_nodes = plan.nodes_for_span(0, last)
    opened = SessionOpen(chain, remote_nodes, {node.id: plan.at[node.id] for node in remote_nodes},
                         {step: {block: by_location[block] for block in range(last)}
                          for step, by_location in plan.keep_after.items()},
                         batch, prompt_length + config.max_new_tokens, inputs.attn_implementation)
    session = connection.open_session(chain, opened)

    generator = torch.Generator().manual_seed(config.seed) if config.seed is not None else None
    stop_tokens = torch.tensor(list(config.stop_tokens), dtype=torch.int64)
    pad_token = _pad_token(model.tokenizer)
    state = DecodeState(inputs.input_ids, inputs.input_ids, inputs.attention_mask, inputs.position_ids,
                        torch.zeros(batch, dtype=torch.bool))
    step_logits, hops = [], []
    try:
        for step in range(config.max_new_tokens):
            logits, step_hops = _step(model, session, interpreter, plan, state, step)
            step_logits.append(logits[:, -1])
            hops.append(step_hops)
            state.append(next_tokens(logits[:, -1], config, generator), pad_token, stop_tokens)
            if config.streamer is not None:
                config.streamer(state.new_tokens[:, 0])
            if bool(state.finished.all()):
                break
    finally:
        session.close()

    steps_run = len(step_logits)
    interpreter.check_done(steps=steps_run)
    transfer = {"chain": chain, "bytes_sent_per_step": session.bytes_sent,
                "bytes_received_per_step": session.bytes_received, "steps": steps_run}
    return RunResult(torch.stack(step_logits, dim=1), interpreter.take(graph.saved(), missing_ok=True), plan,
                     hops, transfer, tokens=state.tokens)


def _step(model, session, interpreter: Interpreter, plan: Partition, state: DecodeState, step: int):
    architecture = model.architecture
    modules = model._client_modules
    interpreter.step = step
    with torch.no_grad(), interpreter.hooks():
        hidden = modules[architecture.embeddings](state.new_tokens)
    sent = interpreter.take(plan.keep_after.get(step, {}).get(-1, []))

    response = session.step(SessionStep(step, hidden, state.attention_mask, state.position_ids, sent))
    interpreter.add_values(response.values)

    with torch.no_grad(), interpreter.hooks():
        logits = modules[architecture.lm_head](modules[architecture.final_norm](response.hidden_states))
    return logits, response.hops


def _pad_token(tokenizer) -> int:
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    return tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
