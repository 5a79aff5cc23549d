"""Where sites live and in which order they run.

The order of sites comes from one forward pass of the model's skeleton on the
meta device, with hooks that record each module's input and output events.
That order decides when each node of a graph can run, and the module path of a
site decides where it runs: on the client (embeddings before the blocks, final
norm and LM head after them) or on the peer that holds its block.
"""

import dataclasses
import re
from typing import Any

import torch
from torch import nn

from swarmlens.intervene.graph import INPUT, OUTPUT, Site

CLIENT = "client"


@dataclasses.dataclass(frozen=True)
class Architecture:
    """Module paths of the parts that swarmlens splits between client and peers."""

    blocks: str  # the ModuleList of decoder blocks
    embeddings: str
    final_norm: str
    lm_head: str

    def client_modules(self) -> tuple[str, ...]:
        return (self.embeddings, self.final_norm, self.lm_head)


ARCHITECTURES = {
    "llama": Architecture(blocks="model.layers", embeddings="model.embed_tokens",
                          final_norm="model.norm", lm_head="lm_head"),
}


def architecture_for(model_type: str) -> Architecture:
    try:
        return ARCHITECTURES[model_type]
    except KeyError:
        supported = ", ".join(sorted(ARCHITECTURES))
        raise ValueError(f"model type {model_type!r} is not supported; supported types: {supported}") from None


class SiteOrder:
    """The events of one forward pass, in order, and the location of each.

    An event number counts across generation steps: `step * size + index`,
    where `index` is the position in `events`. A location is an int: -1 for
    the client before the blocks, i for block i, and `num_blocks` for the
    client after the blocks.
    """

    def __init__(self, events: list[tuple[str, str]], architecture: Architecture, num_blocks: int,
                 tensor_sites: set[tuple[str, str]] | None = None, shared: dict[tuple[str, str], int] | None = None):
        self.events = events
        self.tensor_sites = tensor_sites if tensor_sites is not None else set(events)
        self.shared = shared or {}  # site -> group of sites that hold the same tensor object
        self.size = len(events)
        self.architecture = architecture
        self.num_blocks = num_blocks
        self.index = {event: position for position, event in enumerate(events)}
        self.modules = {module for module, _ in events}
        self._block_pattern = re.compile(rf"^{re.escape(architecture.blocks)}\.(\d+)(\.|$)")
        self.post_start = next(i for i, (module, _) in enumerate(events) if self.location_of(module) == num_blocks)

    @classmethod
    def from_skeleton(cls, skeleton: nn.Module, architecture: Architecture, num_blocks: int) -> "SiteOrder":
        tensor_sites: set[tuple[str, str]] = set()
        shared: dict[tuple[str, str], int] = {}
        events = _record_events(skeleton, architecture, tensor_sites, shared)
        return cls(events, architecture, num_blocks, tensor_sites, shared)

    def event_of(self, site: Site) -> int:
        return site.step * self.size + self.index[(site.module, site.event_kind)]

    def site_of_event(self, event: int) -> tuple[str, str, int]:
        """Return (module, kind, step) of an event number."""
        module, kind = self.events[event % self.size]
        return module, kind, event // self.size

    def describe_event(self, event: int) -> str:
        module, kind, step = self.site_of_event(event)
        return f"{module}.{kind}" + (f" at step {step}" if step else "")

    def block_of(self, module: str) -> int | None:
        match = self._block_pattern.match(module)
        return int(match.group(1)) if match else None

    def location_of(self, module: str) -> int:
        block = self.block_of(module)
        if block is not None:
            return block
        if module == self.architecture.embeddings or module.startswith(self.architecture.embeddings + "."):
            return -1
        return self.num_blocks

    def location_of_event(self, event: int) -> int:
        return self.location_of(self.events[event % self.size][0])

    def first_event_of_block(self, block: int, step: int = 0) -> int:
        return step * self.size + self.index[(f"{self.architecture.blocks}.{block}", INPUT)]

    def last_event_of_block(self, block: int, step: int = 0) -> int:
        return step * self.size + self.index[(f"{self.architecture.blocks}.{block}", OUTPUT)]

    def post_start_of(self, step: int) -> int:
        return step * self.size + self.post_start

    def describe_location(self, location: int) -> str:
        if location < 0:
            return "the client (before the blocks)"
        if location >= self.num_blocks:
            return "the client (after the blocks)"
        return f"block {location}"


def _is_site_module(path: str, architecture: Architecture) -> bool:
    for root in (architecture.blocks, *architecture.client_modules()):
        if path.startswith(root + ".") or (path == root and root != architecture.blocks):
            return True
    return False


def _record_events(skeleton: nn.Module, architecture: Architecture, tensor_sites: set[tuple[str, str]],
                   shared: dict[tuple[str, str], int]) -> list[tuple[str, str]]:
    """Run the meta skeleton once and list (module path, kind) in call order.

    Also adds to `tensor_sites` the sites whose value is a single tensor, and
    fills `shared` with a group number per site whose tensor is the very same
    object as another site's (block k's output is block k + 1's input).
    """
    events: list[tuple[str, str]] = []
    handles = []
    seen: dict[int, tuple[torch.Tensor, int]] = {}  # id -> (tensor kept alive so ids stay unique, group)

    def note(site: tuple[str, str], value: Any) -> None:
        if not isinstance(value, torch.Tensor):
            return
        tensor_sites.add(site)
        _, group = seen.setdefault(id(value), (value, len(seen)))
        shared[site] = group

    def on_input(module, args, kwargs, path):
        events.append((path, INPUT))
        note((path, INPUT), args[0] if args else next(iter(kwargs.values()), None))

    def on_output(module, args, output, path):
        events.append((path, OUTPUT))
        note((path, OUTPUT), output)

    for path, module in skeleton.named_modules():
        if not _is_site_module(path, architecture):
            continue
        handles.append(module.register_forward_pre_hook(
            lambda module, args, kwargs, path=path: on_input(module, args, kwargs, path), with_kwargs=True))
        handles.append(module.register_forward_hook(
            lambda module, args, output, path=path: on_output(module, args, output, path)))
    try:
        with torch.no_grad():
            skeleton(input_ids=torch.zeros(1, 2, dtype=torch.long, device="meta"))
    finally:
        for handle in handles:
            handle.remove()

    if len(events) != len(set(events)):
        raise ValueError("a module runs more than once per forward pass; swarmlens cannot address its calls yet")
    return events
