"""Envoys: the module tree a user navigates while tracing (`model.model.layers[3].mlp`)."""

from typing import TYPE_CHECKING, Any

from torch import nn

from swarmlens.intervene.errors import InvalidGraphError, TraceError
from swarmlens.intervene.graph import INPUT, INPUTS, OUTPUT, Site
from swarmlens.intervene.ops import Op, suggest
from swarmlens.intervene.proxy import Proxy, user_source

if TYPE_CHECKING:
    from swarmlens.intervene.model import TracedModel


class ModulePathError(InvalidGraphError, AttributeError):
    """A module path that does not exist in the model, or has no sites.

    An AttributeError, so `hasattr(model, name)` works. When the `output`,
    `input` or `inputs` property raises it, Python retries through
    `__getattr__`, which runs the property again to re-raise the real error.
    """


_SITE_PROPERTIES = ("output", "input", "inputs")


class Envoy:
    """Stands for one module of the model; gives proxies for its input and output."""

    def __init__(self, model: "TracedModel", module: nn.Module, path: str):
        object.__setattr__(self, "_model", model)
        object.__setattr__(self, "_module", module)
        object.__setattr__(self, "_path", path)
        object.__setattr__(self, "_children", {})

    # --- navigation --------------------------------------------------------

    def __getattr__(self, name: str) -> "Envoy":
        if name.startswith("__"):
            raise AttributeError(name)
        if name in _SITE_PROPERTIES:
            return getattr(type(self), name).fget(self)
        child = self._module._modules.get(name)
        if child is None and name in self._model.aliases:
            return self._alias(name)
        if child is None:
            names = list(self._module._modules)
            raise ModulePathError(
                f"module {self._describe()} has no submodule {name!r}.{suggest(name, names)} "
                f"Its submodules are: {', '.join(names) or 'none'}",
                user_source(),
            )
        return self._child(name, child)

    def _alias(self, alias: str) -> "Envoy":
        real = self._model.aliases[alias]
        if "." not in real and real in self._module._modules:
            return self._child(real, self._module._modules[real])
        if "." in real and not self._path:
            envoy = self
            for part in real.split("."):
                envoy = envoy._child(part, envoy._module._modules[part])
            return envoy
        raise ModulePathError(f"alias {alias!r} ({real!r}) does not apply to module {self._describe()}",
                              user_source())

    def __getitem__(self, index: int) -> "Envoy":
        if not isinstance(self._module, (nn.ModuleList, nn.Sequential)):
            raise TraceError(f"module {self._describe()} is not a list of modules and cannot be indexed", user_source())
        if not isinstance(index, int):
            raise TraceError(f"index module lists with an int, got {type(index).__name__}", user_source())

        size = len(self._module)
        if not -size <= index < size:
            raise ModulePathError(
                f"module index {index} is out of range for {self._describe()}, which has {size} modules "
                f"(valid: 0 to {size - 1})",
                user_source(),
            )
        name = str(index % size)
        return self._child(name, self._module._modules[name])

    def __len__(self) -> int:
        return len(self._module)

    def __iter__(self):
        return (self[index] for index in range(len(self._module)))

    def _child(self, name: str, module: nn.Module) -> "Envoy":
        if name not in self._children:
            path = f"{self._path}.{name}" if self._path else name
            self._children[name] = Envoy(self._model, module, path)
        return self._children[name]

    def _describe(self) -> str:
        return repr(self._path) if self._path else "the model root"

    # --- sites -------------------------------------------------------------

    @property
    def output(self) -> Proxy:
        return self._model._active_tracer().read_site(self._site(OUTPUT))

    @output.setter
    def output(self, value: Any) -> None:
        self._model._active_tracer().write_site(self._site(OUTPUT), value)

    @property
    def input(self) -> Proxy:
        return self._model._active_tracer().read_site(self._site(INPUT))

    @input.setter
    def input(self, value: Any) -> None:
        self._model._active_tracer().write_site(self._site(INPUT), value)

    @property
    def inputs(self) -> Proxy:
        """All arguments of the call: (args tuple, kwargs dict of tensors, numbers and strings)."""
        return self._model._active_tracer().read_site(self._site(INPUTS))

    @inputs.setter
    def inputs(self, value: Any) -> None:
        self._model._active_tracer().write_site(self._site(INPUTS), value)

    def _site(self, kind: str) -> Site:
        order = self._model.site_order
        if (self._path, OUTPUT if kind == OUTPUT else INPUT) not in order.index:
            client = ", ".join(order.architecture.client_modules())
            raise ModulePathError(
                f"module {self._describe()} has no {kind} site: sites exist on the decoder blocks "
                f"({order.architecture.blocks}.N and their submodules) and on {client}. "
                "For logits, read lm_head.output",
                user_source(),
            )
        return Site(self._path, kind, self._model._active_tracer().site_step())

    def __setattr__(self, name: str, value: Any) -> None:
        if name in ("output", "input", "inputs"):
            object.__setattr__(self, name, value)
            return
        raise TraceError(f"cannot set {name!r} on module {self._describe()}; assign .output or .input", user_source())

    def skip(self, output: Any) -> None:
        """Do not run this module; use `output` as its output (its output hooks still see it)."""
        tracer = self._model._active_tracer()
        tracer.check_whole_batch(f"skipping {self._describe()}")
        tracer.record(Op.SKIP, None, (output,), site=self._site(INPUT))

    # --- calls -------------------------------------------------------------

    def __call__(self, *args, **kwargs) -> Proxy:
        """Record a call of this module on traced values; it runs where the module lives."""
        if not self._path:
            raise TraceError("the model root cannot be called inside a trace", user_source())
        return self._model._active_tracer().record(Op.CALL_MODULE, self._path, args, kwargs)

    def __repr__(self) -> str:
        return f"Envoy({self._path or '<root>'}: {type(self._module).__name__})"
