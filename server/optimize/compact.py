"""Strip what an ONNX model file carries that running it does not need.

Quantisation keeps every tensor's inferred shape (value_info), long generated names
("MatMul1/MatMulAddFusion_MatMul_quant_output_scale_mul") and, after ONNX Runtime's offline
optimisation, an opset import for every domain ONNX Runtime knows. On a small model these
outweigh the int8 weights. Nothing here changes what the model computes:

* value_info and doc strings go (ONNX Runtime infers shapes again at load);
* opset imports that no node uses go;
* nodes go in topological order (the float16 converter appends its Cast nodes at the end);
* nodes and the tensors inside the graph get short names (n0, t0, ...); the graph's inputs and
  outputs keep theirs, because the served config names them.

Models with subgraphs (If, Loop, Scan) keep their order and names: a subgraph may refer to an
outer tensor by name.
"""

from __future__ import annotations

import heapq
from pathlib import Path
from typing import Any

STEP = (
    "compacted: value_info, doc strings and unused opset imports dropped, inner nodes and "
    "tensors renamed short (inputs and outputs keep their names)"
)


def compact(path: Path) -> str:
    """Rewrite the model at `path` in place; returns the step for the report."""
    import onnx

    model = onnx.load(str(path))
    graph = model.graph
    del graph.value_info[:]
    graph.doc_string = ""
    model.doc_string = ""
    for node in graph.node:
        node.doc_string = ""
    used = {node.domain for node in graph.node} | {""}
    kept = [o for o in model.opset_import if o.domain in used or o.domain == "ai.onnx"]
    del model.opset_import[:]
    model.opset_import.extend(kept)
    if not _has_subgraphs(graph):
        _sort(graph)
        _rename(graph)
        onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return STEP


def _has_subgraphs(graph: Any) -> bool:
    return any(attr.g.node or attr.graphs for node in graph.node for attr in node.attribute)


def _sort(graph: Any) -> None:
    """Kahn's algorithm, keeping the original order among nodes that are ready together."""
    nodes = list(graph.node)
    producer = {name: i for i, node in enumerate(nodes) for name in node.output if name}
    waiting = [0] * len(nodes)
    users: list[list[int]] = [[] for _ in nodes]
    for i, node in enumerate(nodes):
        for source in {producer[name] for name in node.input if name in producer}:
            waiting[i] += 1
            users[source].append(i)
    ready = [i for i, count in enumerate(waiting) if count == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for user in users[i]:
            waiting[user] -= 1
            if waiting[user] == 0:
                heapq.heappush(ready, user)
    if len(order) != len(nodes):
        return  # a cycle: leave the graph to the checker
    copies = [type(nodes[i])() for i in order]
    for copy, i in zip(copies, order, strict=True):
        copy.CopyFrom(nodes[i])
    del graph.node[:]
    graph.node.extend(copies)


def _rename(graph: Any) -> None:
    public = {v.name for v in graph.input} | {v.name for v in graph.output}
    names: dict[str, str] = {}

    def short(name: str) -> str:
        if not name or name in public:
            return name
        if name not in names:
            names[name] = f"t{len(names)}"
        return names[name]

    for tensor in graph.initializer:
        tensor.name = short(tensor.name)
    for tensor in graph.sparse_initializer:
        tensor.values.name = short(tensor.values.name)
        tensor.indices.name = short(tensor.indices.name)
    for index, node in enumerate(graph.node):
        node.name = f"n{index}"
        node.input[:] = [short(n) for n in node.input]
        node.output[:] = [short(n) for n in node.output]
