"""The compute budget rejects oversized and overlong work before it runs (no network)."""

import time

import pytest
import torch

from swarmlens.intervene import BudgetError, ExecutionError, InvalidGraphError
from swarmlens.intervene.budget import HeldMemory, Limits
from swarmlens.intervene.graph import Graph, Ref, Site
from swarmlens.intervene.interpreter import Interpreter
from swarmlens.intervene.ops import Op
from swarmlens.intervene.validate import validate

EVENT = ("model.layers.0", "output", 0)
SITES = {("model.layers.0", "output")}


def run(graph: Graph, site_value, limits: Limits = Limits()):
    interpreter = Interpreter(graph.nodes, {node.id: EVENT for node in graph.nodes}, {}, limits=limits)
    interpreter.run_event(*EVENT[:2], site_value)
    return interpreter


def graph_with(op: Op, target: str, args: tuple, kwargs: dict | None = None) -> Graph:
    graph = Graph()
    graph.add(Op.READ, site=Site(*EVENT[:2]))
    graph.add(op, target, args, kwargs)
    return graph


def test_einsum_outer_product_rejected_before_allocation():
    vector = Ref(0)
    graph = graph_with(Op.FUNCTION, "torch.einsum", ("i,j->ij", vector, vector))
    began = time.perf_counter()
    with pytest.raises(BudgetError, match="would produce 1073741824 elements"):
        run(graph, torch.ones(2**15))
    assert time.perf_counter() - began < 5  # a real 4 GiB allocation and fill would take far longer


@pytest.mark.parametrize("args, kwargs", [
    ((), {"size": (2**29,)}),
    ((torch.tensor(2**15), torch.tensor(2**14)), {}),
    (((2**15, 2**14),), {}),
])
def test_creation_sizes_in_any_form_are_checked(args, kwargs):
    graph = Graph()
    graph.add(Op.READ, site=Site(*EVENT[:2]))
    graph.add(Op.FUNCTION, "torch.zeros", args, kwargs)
    with pytest.raises(BudgetError, match="would produce"):
        run(graph, torch.ones(1))


def test_arange_keyword_end_is_checked():
    graph = graph_with(Op.FUNCTION, "torch.arange", (), {"end": 2**29})
    with pytest.raises(BudgetError, match="would produce"):
        run(graph, torch.ones(1))


def test_matmul_over_flop_limit_is_rejected():
    graph = graph_with(Op.OPERATOR, "matmul", (Ref(0), Ref(0)))
    with pytest.raises(BudgetError, match="FLOPs"):
        run(graph, torch.ones(64, 64), Limits(max_flops_per_node=64**3 - 1))


def test_matmul_within_flop_limit_runs():
    graph = graph_with(Op.OPERATOR, "matmul", (Ref(0), Ref(0)))
    interpreter = run(graph, torch.ones(64, 64), Limits(max_flops_per_node=64**3))
    assert interpreter.env[1].shape == (64, 64)


def test_run_past_deadline_is_stopped():
    graph = Graph()
    graph.add(Op.READ, site=Site(*EVENT[:2]))
    for index in range(50):
        graph.add(Op.OPERATOR, "matmul", (Ref(index), Ref(0)))
    with pytest.raises(BudgetError, match="ran longer than"):
        run(graph, torch.ones(256, 256), Limits(max_seconds=0.0))


def test_expand_then_copy_is_rejected():
    graph = Graph()
    graph.add(Op.READ, site=Site(*EVENT[:2]))
    graph.add(Op.METHOD, "expand", (Ref(0), 2**20, 2**10))
    graph.add(Op.METHOD, "contiguous", (Ref(1),))
    with pytest.raises(BudgetError, match="would produce"):
        run(graph, torch.ones(1, 2**10))


@pytest.mark.parametrize("keyword", ["out", "device"])
def test_out_and_device_keywords_are_invalid(keyword):
    graph = graph_with(Op.FUNCTION, "torch.abs", (Ref(0),), {keyword: "cpu" if keyword == "device" else Ref(0)})
    with pytest.raises(InvalidGraphError, match=f"keyword argument '{keyword}' is not allowed"):
        validate(graph, SITES, set())


def test_write_with_other_shape_is_rejected():
    graph = Graph()
    read = graph.add(Op.READ, site=Site(*EVENT[:2]))
    short = graph.add(Op.GETITEM, args=(Ref(read.id), (slice(None), slice(None, 1))))
    graph.add(Op.WRITE, args=(Ref(short.id),), site=Site(*EVENT[:2]))
    with pytest.raises(ExecutionError, match=r"has shape \(1, 1\), but the model needs \(1, 4\)"):
        run(graph, torch.ones(1, 4))


def test_held_values_over_limit_are_rejected():
    graph = Graph()
    graph.add(Op.READ, site=Site(*EVENT[:2]))
    for scale in range(1, 5):  # the site value and its copies take 4 KiB each, all held to the end
        graph.add(Op.OPERATOR, "mul", (Ref(0), float(scale)))
    with pytest.raises(BudgetError, match=r"after node %3, the graph's values hold 16.0 KiB, above the limit of 14.0 KiB"):
        run(graph, torch.ones(1024), Limits(max_held_bytes=14 * 1024))


def test_held_values_within_limit_run():
    graph = Graph()
    graph.add(Op.READ, site=Site(*EVENT[:2]))
    for scale in range(1, 5):
        graph.add(Op.OPERATOR, "mul", (Ref(0), float(scale)))

    interpreter = run(graph, torch.ones(1024), Limits(max_held_bytes=20 * 1024))

    assert interpreter.memory.nbytes == 5 * 4096


def test_held_memory_counts_views_once():
    memory = HeldMemory(limit=2**20)
    base = torch.ones(256)

    memory.hold(base)
    memory.hold(base[:10])
    memory.hold((base[5:], torch.ones(16)))

    assert memory.nbytes == 1024 + 64


def test_held_memory_release_after_last_view():
    memory = HeldMemory(limit=2**20)
    base = torch.ones(256)
    memory.hold(base)
    memory.hold(base[:10])

    memory.release(base)
    assert memory.nbytes == 1024
    memory.release(base[:10])
    assert memory.nbytes == 0


def test_freed_values_leave_held_memory():
    graph = Graph()
    graph.add(Op.READ, site=Site(*EVENT[:2]))
    for index in range(1, 5):  # a chain: each product is used once, by the next
        graph.add(Op.OPERATOR, "mul", (Ref(index - 1), 2.0))
    interpreter = Interpreter(graph.nodes, {node.id: EVENT for node in graph.nodes}, {},
                              keep={4}, limits=Limits(max_held_bytes=3 * 4096), events=[0] * 5)

    interpreter.run_event(*EVENT[:2], torch.ones(1024))

    assert set(interpreter.env) == {4}
    assert interpreter.memory.nbytes == 4096
