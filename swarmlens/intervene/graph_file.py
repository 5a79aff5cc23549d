"""Writing an intervention graph to a file and reading it back, to share and rerun a study.

The file is the wire format (msgpack, schema-versioned), so loading a file
can never run code; `TracedModel.run_graph` validates it like any other graph.
"""

from pathlib import Path

from swarmlens.intervene.graph import Graph
from swarmlens.intervene.wire import WireError, decode_nodes, dumps, encode_nodes, loads

MAX_GRAPH_FILE_BYTES = 1 << 30  # graphs carry their constant tensors; 1 GiB is far above a typical study


def save_graph(graph: Graph, path: str | Path) -> None:
    Path(path).write_bytes(dumps({"nodes": encode_nodes(graph.nodes)}))


def load_graph(path: str | Path) -> Graph:
    """Read a graph written by `save_graph`; raise WireError if the file is not one."""
    data = Path(path).read_bytes()
    body = loads(data, MAX_GRAPH_FILE_BYTES)
    if not isinstance(body, dict) or "nodes" not in body:
        raise WireError(f"{path} is not a swarmlens graph file")
    nodes, _ = decode_nodes(body["nodes"])
    for position, node in enumerate(nodes):
        if node.id != position:
            raise WireError(f"{path}: node ids must count from 0 in order, found %{node.id} at position {position}")
    return Graph(nodes)
