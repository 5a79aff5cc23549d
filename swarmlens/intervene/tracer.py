"""The `with model.trace(...)` and `with model.generate(...)` contexts: record a graph, run it on exit."""

import contextlib
import dataclasses
from typing import TYPE_CHECKING, Any, Callable, Iterator

import torch

from swarmlens.intervene.errors import TraceError
from swarmlens.intervene.graph import Graph, Site, map_leaves
from swarmlens.intervene.ops import Op
from swarmlens.intervene.proxy import Proxy, to_graph_arguments, user_source
from swarmlens.intervene.steps import unroll

if TYPE_CHECKING:
    from swarmlens.intervene.model import RunResult, TracedModel


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0 keeps every token
    top_p: float = 1.0
    seed: int | None = None
    stop_tokens: tuple[int, ...] = ()  # generation of a row ends after it emits one of these
    streamer: Callable[[torch.Tensor], None] | None = None  # called with each step's new tokens, [batch]


class Tracer:
    """Records the intervention graph of one forward pass, or of every step of a generation.

    Leaving the `with` block validates the graph, runs it through the model's
    backend (local or swarm) and fills the proxies returned by `.save()`.
    `tracer.logits` then contains the model's output logits and `tracer.result`
    the backend's full result, including where each value was computed.

    In generation, step 0 runs the prompt and step k produces new token k + 1.
    Sites read outside step blocks belong to the current step (0 unless
    `tracer.next()` moved it); nodes recorded inside `tracer.all()` or
    `tracer.iter[...]` run at every step of the block, and a value saved there
    becomes a list with one entry per step that ran.
    """

    def __init__(self, model: "TracedModel", inputs: Any, generation: GenerationConfig | None = None,
                 scan: bool = False):
        self.model = model
        self.scan = scan
        self.inputs = inputs
        self.generation = generation
        self.num_steps = generation.max_new_tokens if generation is not None else 1
        self.graph = Graph()
        self.result: "RunResult | None" = None
        self._proxies: dict[int, Proxy] = {}
        self._open = False
        self._step = 0
        self._steps: range | None = None
        self._templates: dict[int, range] = {}
        self.iter = _StepIndexer(self)
        self._invokes: list | None = [] if inputs is None else None  # ModelInputs of each invoke
        self._rows: slice | None = None  # rows of the open invoke
        self.attn_implementation = "sdpa"

    # --- steps ---------------------------------------------------------------

    def all(self) -> contextlib.AbstractContextManager:
        """Apply the interventions recorded in this block at every generation step."""
        return self._step_block(range(self.num_steps))

    def stop(self) -> None:
        """End the forward pass as soon as everything recorded so far has run.

        Blocks after that point do not run (on a swarm, later peers are not
        contacted), and `tracer.logits` is None.
        """
        if self.generation is not None:
            raise TraceError("tracer.stop() ends a single forward pass; it is not available in generation",
                             user_source())
        self.record(Op.STOP)

    def next(self) -> None:
        """Move sites read outside step blocks to the next generation step."""
        if self._step + 1 >= self.num_steps:
            raise TraceError(f"there is no step {self._step + 1}: this generation has {self.num_steps} steps",
                             user_source())
        self._step += 1

    @contextlib.contextmanager
    def _step_block(self, steps: range) -> Iterator[None]:
        if self._steps is not None:
            raise TraceError("step blocks cannot be nested", user_source())
        if len(steps) == 0:
            raise TraceError(f"the step block {steps} selects no step of the {self.num_steps} steps", user_source())
        self._steps = steps
        try:
            yield
        finally:
            self._steps = None

    def site_step(self) -> int:
        return self._step

    # --- invokes -------------------------------------------------------------

    @contextlib.contextmanager
    def invoke(self, inputs: Any) -> Iterator[None]:
        """Add `inputs` (a prompt, a list of them, or token ids) as rows of the batch.

        Sites read or written inside the block see only these rows, so each
        invoke intervenes on its own prompts; values pass freely between invokes.
        """
        if self._invokes is None:
            raise TraceError("this trace already has inputs; open `model.trace()` without inputs to use invokes",
                             user_source())
        if self._rows is not None:
            raise TraceError("invokes cannot be nested", user_source())
        prepared = self.model.prepare_inputs(inputs)
        start = sum(len(invoke.input_ids) for invoke in self._invokes)
        self._invokes.append(prepared)
        self._rows = slice(start, start + len(prepared.input_ids))
        try:
            yield
        finally:
            self._rows = None

    def read_site(self, site: Site) -> Proxy:
        value = self.record(Op.READ, site=site)
        if self._rows is None:
            return value
        self._check_tensor_site(site)
        return self.record(Op.GETITEM, None, (value, self._rows))

    def write_site(self, site: Site, value: Any) -> None:
        if self._rows is None:
            self.record(Op.WRITE, None, (value,), site=site)
            return
        self._check_tensor_site(site)
        self.record(Op.SETITEM, None, (self.record(Op.READ, site=site), self._rows, value))

    def check_whole_batch(self, action: str) -> None:
        if self._rows is not None:
            raise TraceError(f"{action} applies to the whole batch; do it outside `tracer.invoke(...)`",
                             user_source())

    def _check_tensor_site(self, site: Site) -> None:
        if (site.module, site.kind) not in self.model.site_order.tensor_sites:
            raise TraceError(
                f"{site.module}.{site.kind} is not a single tensor, so an invoke cannot select its rows; "
                "read it outside `tracer.invoke(...)` and index the rows yourself",
                user_source(),
            )

    def __enter__(self) -> "Tracer":
        self.model._enter_trace(self)
        self._open = True
        return self

    def __exit__(self, exc_type, exc, traceback) -> bool:
        self._open = False
        self.model._exit_trace(self)
        if exc_type is not None:
            return False

        if self._invokes is not None:
            if not self._invokes:
                raise TraceError("this trace has no inputs: pass them to model.trace(...) or use tracer.invoke(...)")
            self.inputs = self.model.combine_inputs(self._invokes)
        self.inputs = dataclasses.replace(self.inputs, attn_implementation=self.attn_implementation)
        unrolled = unroll(self.graph, self._templates)
        if self.scan:
            self.result = self.model._scan_graph(unrolled.graph, self.inputs)
        else:
            self.result = self.model._run_graph(unrolled.graph, self.inputs, self.generation)
        self._fill_proxies(unrolled)
        return False

    def _fill_proxies(self, unrolled) -> None:
        saved = self.result.saved
        for recorded, proxy in self._proxies.items():
            if recorded in unrolled.single:
                proxy.node = unrolled.single[recorded]
                if proxy.node in saved:
                    proxy._set_value(saved[proxy.node])
            elif self.graph.nodes[recorded].op is Op.SAVE:
                copies = unrolled.per_step[recorded]
                proxy._set_value([saved[copies[step]] for step in sorted(copies) if copies[step] in saved])
        self.graph = unrolled.graph

    @property
    def output(self):
        """The token ids of a generation, prompt included: [batch, tokens]."""
        if self.result is None or self.result.tokens is None:
            raise TraceError("generated tokens are available after a `with model.generate(...)` block exits")
        return self.result.tokens

    @property
    def logits(self):
        if self.result is None:
            raise TraceError("logits are available after the `with model.trace(...)` block exits")
        return self.result.logits

    def record(self, op: Op, target: str | None = None, args: tuple = (), kwargs: dict | None = None,
               site: Site | None = None) -> Proxy | None:
        """Add a node for an operation on proxies and return a proxy for its result."""
        if not self._open:
            raise TraceError("this trace has already exited; open a new `with model.trace(...)` block", user_source())
        self._check_owner((args, kwargs))

        node = self.graph.add(
            op,
            target,
            args=to_graph_arguments(tuple(args)),
            kwargs=to_graph_arguments(dict(kwargs or {})),
            site=site,
            source=user_source(),
        )
        if self._steps is not None:
            self._templates[node.id] = self._steps
        if op in (Op.WRITE, Op.SETITEM, Op.SKIP, Op.STOP):
            return None
        proxy = Proxy(self, node.id)
        self._proxies[node.id] = proxy
        return proxy

    def _check_owner(self, value: Any) -> None:
        def check(leaf: Any) -> None:
            if isinstance(leaf, Proxy) and leaf.tracer is not self:
                raise TraceError(
                    f"proxy %{leaf.node} belongs to another trace; values cross traces only through .save()",
                    user_source(),
                )

        map_leaves(value, check)


class _StepIndexer:
    """`tracer.iter[2:5]` or `tracer.iter[3]`: a block of interventions for those steps."""

    def __init__(self, tracer: Tracer):
        self.tracer = tracer

    def __getitem__(self, index: int | slice) -> contextlib.AbstractContextManager:
        steps = range(self.tracer.num_steps)
        if isinstance(index, int):
            if not -len(steps) <= index < len(steps):
                raise TraceError(f"step {index} is out of range for {len(steps)} steps", user_source())
            return self.tracer._step_block(range(index % len(steps), index % len(steps) + 1))
        if isinstance(index, slice):
            return self.tracer._step_block(steps[index])
        raise TraceError(f"index tracer.iter with an int or a slice, got {type(index).__name__}", user_source())

