"""The intervention language: tracing, the graph, its checks, partition, wire format and interpreter."""

from swarmlens.intervene.errors import (
    BudgetError,
    ExecutionError,
    InterventionError,
    InvalidGraphError,
    OrderError,
    TraceError,
)
from swarmlens.intervene.graph import INPUT, OUTPUT, Graph, Node, Ref, Site
from swarmlens.intervene.graph_file import load_graph, save_graph
from swarmlens.intervene.local import LocalModel
from swarmlens.intervene.ops import Op

__all__ = [
    "BudgetError", "ExecutionError", "InterventionError", "InvalidGraphError", "OrderError", "TraceError",
    "INPUT", "OUTPUT", "Graph", "Node", "Ref", "Site", "LocalModel", "Op", "load_graph", "save_graph",
]
