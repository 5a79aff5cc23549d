"""Errors of the intervention language, each naming the user's line when known."""


class InterventionError(Exception):
    """Base class: a problem with an intervention graph, its tracing or its execution."""

    def __init__(self, message: str, source: str = ""):
        self.message = message
        self.source = source
        super().__init__(f"{message}\n  at {source}" if source else message)


class TraceError(InterventionError):
    """Tracing code used a proxy in a way that cannot be recorded."""


class InvalidGraphError(InterventionError):
    """A graph breaks a rule: unknown module, op outside the allow-list, bad reference."""


class OrderError(InvalidGraphError):
    """A value is needed at a site that runs before the value exists."""


class ExecutionError(InterventionError):
    """A node failed while running; the message carries the original exception type."""

    def __init__(self, message: str, source: str = "", original_type: str = "", peer: str = ""):
        self.original_type = original_type
        self.peer = peer
        if peer:
            message = f"{message}\n  raised on peer {peer}"
        super().__init__(message, source)


class StopForward(Exception):
    """Raised by a STOP node to end the forward pass; executors catch it. Not an error."""


class BudgetError(InvalidGraphError):
    """A graph needs more nodes, memory or compute than the executor allows."""
