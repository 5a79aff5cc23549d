"""TracedModel: what the local executor and the swarm client have in common.

It mirrors the Hugging Face module tree through envoys, opens traces, turns
prompts into token ids, and checks and schedules a graph before a backend
runs it.
"""

import dataclasses
from typing import Any, Callable, Sequence

import torch
from torch import nn

from swarmlens.intervene.envoy import Envoy
from swarmlens.intervene.errors import StopForward, TraceError
from swarmlens.intervene.graph import Graph, map_leaves
from swarmlens.intervene.budget import USER_LIMITS
from swarmlens.intervene.interpreter import Interpreter
from swarmlens.intervene.partition import Partition, partition
from swarmlens.intervene.schedule import schedule
from swarmlens.intervene.sites import Architecture, SiteOrder
from swarmlens.intervene.tracer import GenerationConfig, Tracer
from swarmlens.intervene.validate import validate


@dataclasses.dataclass
class ModelInputs:
    input_ids: torch.Tensor  # [batch, tokens]
    attention_mask: torch.Tensor  # [batch, tokens], 1 for real tokens, 0 for padding
    position_ids: torch.Tensor  # [batch, tokens], counted from the first real token
    attn_implementation: str = "sdpa"  # "eager" also returns attention weights, as output[1] of self_attn


ATTN_IMPLEMENTATIONS = ("sdpa", "eager")


@dataclasses.dataclass
class RunResult:
    logits: torch.Tensor  # [batch, tokens, vocab]
    saved: dict[int, Any]  # SAVE node id -> value
    partition: Partition | None = None  # where each node ran
    hops: list[dict] = dataclasses.field(default_factory=list)  # per-peer report of a swarm run
    transfer: dict = dataclasses.field(default_factory=dict)  # what the client sent and received
    tokens: torch.Tensor | None = None  # generation only: [batch, prompt + new tokens]


class TracedModel:
    """Base of LocalModel and SwarmModel: `model.trace(prompt)` and module envoys."""

    def __init__(self, skeleton: nn.Module, architecture: Architecture, tokenizer: Any,
                 rename: dict[str, str] | None = None):
        self.aliases = _check_aliases(skeleton, rename or {})
        self.skeleton = skeleton
        self.architecture = architecture
        self.tokenizer = tokenizer
        self.config = skeleton.config
        self.num_blocks = self.config.num_hidden_layers
        self.site_order = SiteOrder.from_skeleton(skeleton, architecture, self.num_blocks)
        self.limits = USER_LIMITS  # for the graph parts that run in this process
        self.envoy = Envoy(self, skeleton, "")
        if tokenizer is not None:
            tokenizer.padding_side = "left"  # generation appends at the right end of every row
        self._tracer: Tracer | None = None
        self._scan_model: nn.Module | None = None

    # --- tracing -----------------------------------------------------------

    def trace(self, inputs: Any = None, *, attn_implementation: str = "sdpa") -> Tracer:
        """Open a trace: `with model.trace("The capital of France is") as tracer: ...`.

        Without inputs, add them with `tracer.invoke(...)` blocks, one batch in all.
        `attn_implementation="eager"` makes attention modules return their weights
        (`self_attn.output[1]`), as Hugging Face does with `output_attentions`.
        """
        _check_attn_implementation(attn_implementation)
        prepared = None if inputs is None else self.prepare_inputs(inputs)
        tracer = Tracer(self, prepared)
        tracer.attn_implementation = attn_implementation
        return tracer

    def combine_inputs(self, parts: list[ModelInputs]) -> ModelInputs:
        """Stack several inputs into one batch, padded on the left to the longest."""
        length = max(part.input_ids.shape[1] for part in parts)
        pad = self.tokenizer.pad_token_id if self.tokenizer is not None and self.tokenizer.pad_token_id is not None else 0
        input_ids = torch.cat([_pad_left(part.input_ids, length, pad) for part in parts])
        attention_mask = torch.cat([_pad_left(part.attention_mask, length, 0) for part in parts])
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        return ModelInputs(input_ids, attention_mask, position_ids)

    def scan(self, inputs: Any) -> Tracer:
        """Open a trace that runs on the meta device: shapes only, no weights, no network.

        Saved values come back as meta tensors with the shapes the real run would
        give, and a shape error raises here, naming the user's line, before any
        request is sent.
        """
        return Tracer(self, self.prepare_inputs(inputs), scan=True)

    def _scan_graph(self, graph: Graph, inputs: ModelInputs) -> RunResult:
        plan = self.plan(graph)
        if self._scan_model is None:
            with torch.device("meta"):
                self._scan_model = type(self.skeleton)(self.config).eval()
        nodes = [dataclasses.replace(node, args=_to_meta(node.args), kwargs=_to_meta(node.kwargs))
                 for node in graph.nodes]
        interpreter = Interpreter(nodes, plan.at, dict(self._scan_model.named_modules()), keep=graph.saved(),
                                  events=plan.events)

        logits = None
        input_ids = torch.empty(inputs.input_ids.shape, dtype=torch.int64, device="meta")
        try:
            with torch.no_grad(), interpreter.hooks():
                logits = self._scan_model(input_ids=input_ids).logits
        except StopForward:
            pass
        interpreter.check_done()
        return RunResult(logits, interpreter.take(graph.saved()), plan)

    def generate(self, inputs: Any, max_new_tokens: int = 16, *, do_sample: bool = False, temperature: float = 1.0,
                 top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
                 stop_tokens: Sequence[int] | None = None,
                 streamer: Callable[[torch.Tensor], None] | None = None,
                 attn_implementation: str = "sdpa") -> Tracer:
        """Open a traced generation: `with model.generate(prompt, max_new_tokens=8) as tracer: ...`.

        Greedy by default; `do_sample=True` samples with `temperature`, `top_k` and
        `top_p`, repeatably for a given `seed`. `stop_tokens` defaults to the
        tokenizer's end-of-sequence token; pass `[]` to always generate
        `max_new_tokens`. The tokens come back in `tracer.output`; `streamer`, if
        given, is called with each step's new tokens ([batch] ids) as they arrive.
        """
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
        if do_sample and (temperature <= 0 or not 0 < top_p <= 1 or top_k < 0):
            raise ValueError("sampling needs temperature > 0, 0 < top_p <= 1 and top_k >= 0")
        if stop_tokens is None:
            eos = getattr(self.tokenizer, "eos_token_id", None)
            stop_tokens = [] if eos is None else [eos]
        _check_attn_implementation(attn_implementation)
        config = GenerationConfig(max_new_tokens, do_sample, temperature, top_k, top_p, seed, tuple(stop_tokens),
                                  streamer)
        tracer = Tracer(self, self.prepare_inputs(inputs), config)
        tracer.attn_implementation = attn_implementation
        return tracer

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_") or name in ("envoy", "skeleton"):
            raise AttributeError(name)
        return getattr(self.envoy, name)

    def _active_tracer(self) -> Tracer:
        if self._tracer is None:
            raise TraceError("module inputs and outputs exist only inside `with model.trace(...)`")
        return self._tracer

    def _enter_trace(self, tracer: Tracer) -> None:
        if self._tracer is not None:
            raise TraceError("a trace is already open on this model; nested traces are not supported")
        self._tracer = tracer

    def _exit_trace(self, tracer: Tracer) -> None:
        self._tracer = None

    def run_graph(self, graph: Graph, inputs: Any, generation: GenerationConfig | None = None) -> RunResult:
        """Run a graph built elsewhere (for example by `load_graph`) on new inputs.

        Saved values come back in `result.saved`, keyed by the SAVE node ids.
        """
        return self._run_graph(graph, self.prepare_inputs(inputs), generation)

    # --- inputs ------------------------------------------------------------

    def prepare_inputs(self, inputs: Any) -> ModelInputs:
        """Accept a string, a list of strings, a tensor of token ids or a dict of them."""
        if isinstance(inputs, ModelInputs):
            return inputs
        if isinstance(inputs, str) or (isinstance(inputs, list) and inputs and isinstance(inputs[0], str)):
            prompts = [inputs] if isinstance(inputs, str) else inputs
            if any(not isinstance(prompt, str) or not prompt for prompt in prompts):
                raise ValueError("every prompt must be a non-empty string, but one is empty; "
                                 "pass text, or token ids if the model should start from a special token")
            encoded = self.tokenizer(inputs, return_tensors="pt", padding=True)
            input_ids, attention_mask = encoded["input_ids"], encoded["attention_mask"]
        elif isinstance(inputs, torch.Tensor):
            input_ids = inputs if inputs.dim() == 2 else inputs.unsqueeze(0)
            attention_mask = torch.ones_like(input_ids)
        elif isinstance(inputs, dict) and "input_ids" in inputs:
            input_ids = torch.as_tensor(inputs["input_ids"])
            attention_mask = torch.as_tensor(inputs.get("attention_mask", torch.ones_like(input_ids)))
        else:
            raise TypeError(
                "inputs must be a string, a list of strings, a tensor of token ids, or a dict with "
                f"'input_ids' (and optionally 'attention_mask'); got {type(inputs).__name__}"
            )
        if input_ids.dtype not in (torch.int64, torch.int32) or input_ids.dim() != 2 or input_ids.numel() == 0:
            raise ValueError(f"input_ids must be a non-empty [batch, tokens] integer tensor, got {tuple(input_ids.shape)}")
        if input_ids.max() >= self.config.vocab_size or input_ids.min() < 0:
            raise ValueError(f"token ids must be in 0..{self.config.vocab_size - 1}")

        attention_mask = attention_mask.to(torch.int64)
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        return ModelInputs(input_ids.to(torch.int64), attention_mask, position_ids)

    # --- checking ----------------------------------------------------------

    def plan(self, graph: Graph) -> Partition:
        """Validate a graph against this model and partition it by location."""
        validate(graph, self.site_order.index, self._callable_modules())
        return partition(graph, schedule(graph, self.site_order), self.site_order)

    def _callable_modules(self) -> set[str]:
        return {module for module in self.site_order.modules if module != self.architecture.blocks}

    def _run_graph(self, graph: Graph, inputs: ModelInputs, generation: GenerationConfig | None) -> RunResult:
        raise NotImplementedError


def _check_attn_implementation(name: str) -> None:
    if name not in ATTN_IMPLEMENTATIONS:
        raise ValueError(f"attn_implementation must be one of {', '.join(ATTN_IMPLEMENTATIONS)}, got {name!r}")


def _pad_left(tensor: torch.Tensor, length: int, value: int) -> torch.Tensor:
    padding = torch.full((tensor.shape[0], length - tensor.shape[1]), value, dtype=tensor.dtype)
    return torch.cat([padding, tensor], dim=1)


def _to_meta(value: Any) -> Any:
    return map_leaves(value, lambda leaf: leaf.to("meta") if isinstance(leaf, torch.Tensor) else leaf)


def _check_aliases(skeleton: nn.Module, rename: dict[str, str]) -> dict[str, str]:
    """Return {alias: real} for `rename` given as {real module path or name: alias}.

    A dotted path ("model.layers") becomes an attribute of the model root; a
    single name ("self_attn") is an alias wherever a module of that name exists.
    Graphs always record real paths, so peers never see aliases.
    """
    names = {path.rsplit(".", 1)[-1] for path, _ in skeleton.named_modules() if path}
    paths = {path for path, _ in skeleton.named_modules() if path}
    aliases = {}
    for real, alias in rename.items():
        if not alias.isidentifier():
            raise ValueError(f"alias {alias!r} for {real!r} is not a valid Python identifier")
        if real not in paths and real not in names:
            raise ValueError(f"cannot rename {real!r}: the model has no module path or name {real!r}")
        aliases[alias] = real
    return aliases

