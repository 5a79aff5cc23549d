"""`swarmlens demo`: a logit lens, an edit, a cross-block patch and steered generation on a swarm.

Without --initial-peers it starts a local swarm on 127.0.0.1 (a DHT node and
two peers) and stops it again on every exit path, Ctrl-C included.
"""

import argparse
import contextlib
import time
from typing import Iterator

import torch

PROMPT = "The capital of France is"
EDIT_BLOCK_FRACTION = 2 / 3  # block 20 of 30: late enough that the prediction is formed
EDIT_SCALE = 0.0  # ablate the last position's hidden states at that block
PATCH_SOURCE_FRACTION = 1 / 6  # block 5 of 30, on the first peer
PATCH_TARGET_FRACTION = 5 / 6  # block 25 of 30, on the second peer
GENERATION_PROMPT = "The capital of France is"
GENERATION_TOKENS = 12
STEER_BLOCK_FRACTION = 2 / 3  # block 20 of 30
STEER_SCALE = 8.0  # times a fixed random direction; enough to change this small model's prediction
STEER_SEED = 0


class StepTimer:
    """Prints each step's title and wall time, and keeps them for the summary."""

    def __init__(self) -> None:
        self.times: list[tuple[str, float]] = []

    @contextlib.contextmanager
    def step(self, title: str) -> Iterator[None]:
        print(f"\n== {title}", flush=True)
        began = time.perf_counter()
        yield
        elapsed = time.perf_counter() - began
        self.times.append((title, elapsed))
        print(f"   ({elapsed:.2f} s)", flush=True)

    def summary(self) -> None:
        print("\n== Wall time per step")
        for title, elapsed in self.times:
            print(f"   {elapsed:7.2f} s  {title}")
        print(f"   {sum(elapsed for _, elapsed in self.times):7.2f} s  total")


def main(args: argparse.Namespace) -> int:
    from swarmlens.checkpoint import load_config, resolve_checkpoint

    timer = StepTimer()
    with contextlib.ExitStack() as stack:
        with timer.step("Prepare the checkpoint (converted once, then cached)"):
            path = resolve_checkpoint(None if args.model == "default" else args.model)
            num_blocks = load_config(path).num_hidden_layers
            print(f"   {path}")

        initial_peers = list(args.initial_peers or [])
        if not initial_peers:
            with timer.step("Start a local swarm on 127.0.0.1: one DHT node, two peers"):
                initial_peers = _start_local_swarm(stack, str(path), num_blocks)

        with timer.step("Connect the client and find a chain of peers"):
            model = _connect(stack, str(path), initial_peers)
            for hop in model.connection.route():
                print(f"   blocks {hop.start:>2}:{hop.end:<2} on peer {_short(hop.peer_id)}")

        with timer.step(f"Logit lens on {PROMPT!r}"):
            _logit_lens(model)
        with timer.step("Edit one block's output"):
            _edit(model, round(num_blocks * EDIT_BLOCK_FRACTION))
        with timer.step("Cross-block patch, carried peer to peer"):
            _cross_block_patch(model, round(num_blocks * PATCH_SOURCE_FRACTION),
                               round(num_blocks * PATCH_TARGET_FRACTION))
        with timer.step(f"Generate {GENERATION_TOKENS} tokens, plain and steered at every step"):
            _generation(model, round(num_blocks * STEER_BLOCK_FRACTION))
    timer.summary()
    return 0


def _start_local_swarm(stack: contextlib.ExitStack, path: str, num_blocks: int) -> list[str]:
    from swarmlens.launch import local_swarm

    middle = num_blocks // 2
    swarm = stack.enter_context(local_swarm(path, spans=[(0, middle), (middle, num_blocks)]))
    for peer in swarm.peers:
        print(f"   peer {_short(peer.peer_id)} serves blocks {peer.start}:{peer.end} (pid {peer.pid})")
    print(f"   logs: {swarm.log_dir}")
    return swarm.initial_peers


def _connect(stack: contextlib.ExitStack, path: str, initial_peers: list[str]):
    from swarmlens.client import SwarmModel

    model = SwarmModel.from_pretrained(path, initial_peers=initial_peers)
    stack.callback(model.close)
    return model


def _logit_lens(model) -> None:
    with model.trace(PROMPT) as tracer:
        projections = []
        for block in model.model.layers:
            hidden_states = block.output[:, -1]
            projections.append(model.lm_head(model.model.norm(hidden_states)).softmax(-1).save())

    where = _block_hosts(tracer.result.hops)
    print("   block  top token       p      block output read on   projected on")
    for index, probabilities in enumerate(projections):
        token = int(probabilities.value[0].argmax())
        print(f"   {index:>5}  {model.tokenizer.decode(token)!r:<14} {float(probabilities.value[0, token]):.3f}"
              f"  peer {where.get(index, '?'):<17} client")
    print(f"   the model's prediction: {_top(model, tracer.logits)}")


def _edit(model, block: int) -> None:
    with model.trace(PROMPT) as tracer:
        pass
    before = tracer.logits

    with model.trace(PROMPT) as tracer:
        model.model.layers[block].output[:, -1] = model.model.layers[block].output[:, -1] * EDIT_SCALE
    print(f"   edit: model.model.layers[{block}].output[:, -1] *= {EDIT_SCALE}, run on peer "
          f"{_block_hosts(tracer.result.hops).get(block, '?')}")
    print(f"   before: {_top(model, before)}")
    print(f"   after:  {_top(model, tracer.logits)}")


def _cross_block_patch(model, source: int, target: int) -> None:
    with model.trace(PROMPT) as tracer:
        early = model.model.layers[source].output[:, -1]
        model.model.layers[target].output[:, -1] = model.model.layers[target].output[:, -1] + early
    early_id = early.node

    hops = tracer.result.hops
    transfer = tracer.result.transfer
    print(f"   edit: layers[{target}].output[:, -1] += layers[{source}].output[:, -1]  "
          f"(the early value is node %{early_id})")
    for hop in hops:
        print(f"   peer {_short(hop['peer_id'])} blocks {hop['start']}:{hop['end']}: received {hop['received']}, "
              f"sent on {hop['sent']}, {hop['compute_ms']} ms")
    print(f"   client sent values {transfer['sent_values']}, received values {transfer['received_values']}")
    through_client = early_id in transfer["sent_values"] or early_id in transfer["received_values"]
    print(f"   node %{early_id} went through the client: {'yes' if through_client else 'no'}")
    print(f"   prediction: {_top(model, tracer.logits)}")


def _generation(model, block: int) -> None:
    with model.generate(GENERATION_PROMPT, max_new_tokens=GENERATION_TOKENS) as plain:
        pass
    direction = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(STEER_SEED))
    with model.generate(GENERATION_PROMPT, max_new_tokens=GENERATION_TOKENS) as steered:
        with steered.all():
            model.model.layers[block].output[:, -1] += STEER_SCALE * direction

    transfer = steered.result.transfer
    print(f"   plain:   {model.tokenizer.decode(plain.output[0], skip_special_tokens=True)!r}")
    print(f"   steered: {model.tokenizer.decode(steered.output[0], skip_special_tokens=True)!r}")
    print(f"   (steering: layers[{block}].output[:, -1] += {STEER_SCALE} * a random direction, at every step, "
          f"run on the peer that serves block {block})")
    print(f"   {transfer['steps']} steps; bytes sent per step: {transfer['bytes_sent_per_step']}")


def _block_hosts(hops: list[dict]) -> dict[int, str]:
    return {block: f"{_short(hop['peer_id'])} ({hop['start']}:{hop['end']})"
            for hop in hops for block in range(hop["start"], hop["end"])}


def _top(model, logits: torch.Tensor, k: int = 3) -> str:
    probabilities = logits[0, -1].softmax(-1)
    values, tokens = probabilities.topk(k)
    return ", ".join(f"{model.tokenizer.decode(int(token))!r} {float(value):.3f}" for token, value in zip(tokens, values))


def _short(peer_id: str) -> str:
    return "..." + peer_id[-6:]
