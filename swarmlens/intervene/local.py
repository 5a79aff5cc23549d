"""LocalModel: runs an intervention graph on an ordinary in-process model.

This is the reference that every swarm result is tested against: the whole
graph runs in one interpreter, without partition or transport, and generation
runs through Hugging Face's own `generate`.
"""

import contextlib
from typing import Any, Iterator

import torch
from torch import nn

from swarmlens.intervene.errors import StopForward
from swarmlens.intervene.graph import Graph
from swarmlens.intervene.interpreter import Interpreter
from swarmlens.intervene.model import ModelInputs, RunResult, TracedModel
from swarmlens.intervene.sites import architecture_for
from swarmlens.intervene.tracer import GenerationConfig


class LocalModel(TracedModel):
    """Wrap a Hugging Face causal LM so that `model.trace(...)` runs in this process."""

    def __init__(self, model: nn.Module, tokenizer: Any, rename: dict[str, str] | None = None):
        model.eval()
        super().__init__(_meta_skeleton(model), architecture_for(model.config.model_type), tokenizer, rename)
        self.hf_model = model
        self._modules = dict(model.named_modules())

    @classmethod
    def from_pretrained(cls, name_or_path: str | None = None, rename: dict[str, str] | None = None) -> "LocalModel":
        from swarmlens.checkpoint import load_reference_model, load_tokenizer, resolve_checkpoint

        path = resolve_checkpoint(name_or_path)
        return cls(load_reference_model(path), load_tokenizer(path), rename)

    def _run_graph(self, graph: Graph, inputs: ModelInputs, generation: GenerationConfig | None) -> RunResult:
        plan = self.plan(graph)
        interpreter = Interpreter(graph.nodes, plan.at, self._modules, keep=graph.saved(), limits=self.limits,
                                  events=plan.events)
        if generation is not None:
            return self._generate(graph, inputs, generation, plan, interpreter)

        logits = None
        try:
            with torch.no_grad(), interpreter.hooks(), attention_implementation(self.hf_model.config,
                                                                               inputs.attn_implementation):
                logits = self.hf_model(
                    input_ids=inputs.input_ids,
                    attention_mask=inputs.attention_mask,
                    position_ids=inputs.position_ids,
                    use_cache=False,
                ).logits
        except StopForward:
            pass
        interpreter.check_done()
        return RunResult(logits, interpreter.take(graph.saved()), plan)

    def _generate(self, graph: Graph, inputs: ModelInputs, generation: GenerationConfig, plan,
                  interpreter: Interpreter) -> RunResult:
        forwards = 0

        def count_step(module, args, kwargs):
            nonlocal forwards
            interpreter.step = forwards
            forwards += 1

        if generation.seed is not None:
            torch.manual_seed(generation.seed)
        counter = self.hf_model.register_forward_pre_hook(count_step, with_kwargs=True)
        try:
            with torch.no_grad(), interpreter.hooks(), attention_implementation(self.hf_model.config,
                                                                               inputs.attn_implementation):
                output = self.hf_model.generate(
                    input_ids=inputs.input_ids,
                    attention_mask=inputs.attention_mask,
                    **_hf_generation_kwargs(generation, self.tokenizer),
                )
        finally:
            counter.remove()

        interpreter.check_done(steps=forwards)
        logits = torch.stack(output.logits, dim=1)  # [batch, steps, vocab]
        saved = interpreter.take(graph.saved(), missing_ok=True)
        return RunResult(logits, saved, plan, tokens=output.sequences)


def _hf_generation_kwargs(generation: GenerationConfig, tokenizer: Any) -> dict:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    kwargs = dict(
        max_new_tokens=generation.max_new_tokens,
        min_new_tokens=0,
        do_sample=generation.do_sample,
        eos_token_id=list(generation.stop_tokens) or None,
        pad_token_id=pad,
        return_dict_in_generate=True,
        output_logits=True,
        use_cache=True,
    )
    if generation.streamer is not None:
        kwargs.update(streamer=_CallbackStreamer(generation.streamer))
    if generation.do_sample:
        kwargs.update(temperature=generation.temperature, top_k=generation.top_k or None, top_p=generation.top_p)
    else:
        kwargs.update(temperature=None, top_k=None, top_p=None)
    return kwargs


@contextlib.contextmanager
def attention_implementation(config: Any, name: str) -> Iterator[None]:
    """Switch the attention kernel of modules built from `config` for one run.

    Attention modules and the mask builder read `config._attn_implementation`
    at call time, so the switch takes effect without rebuilding anything. Not
    thread-safe: the caller runs one forward at a time on these modules.
    """
    previous = config._attn_implementation
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = previous


class _CallbackStreamer:
    """Adapts a `callback(new_tokens)` to the streamer interface of Hugging Face `generate`."""

    def __init__(self, callback):
        self.callback = callback
        self.seen_prompt = False

    def put(self, value: torch.Tensor) -> None:
        if not self.seen_prompt:  # generate passes the prompt first
            self.seen_prompt = True
            return
        self.callback(value.reshape(-1))

    def end(self) -> None:
        pass


def _meta_skeleton(model: nn.Module) -> nn.Module:
    """Build an empty copy of the model on the meta device, for site ordering and envoys."""
    with torch.device("meta"):
        return type(model)(model.config)
