"""Export every test form to a temp dir and print a table of what the graphs look like.

    python tools/show_forms.py                 # hand-written zoo, both exporters
    python tools/show_forms.py --hf            # add the Hugging Face models
    python tools/show_forms.py --dynamo 1 --qk # dynamo only, also print the q/k branches

Columns: form, dynamo, dynamic batch, ok / FAIL / xfail (known failure), node count, Softmax
(or Attention) count, and the op types from each Softmax's input MatMul to the output
projection (the first MatMul/Gemm with a constant weight), '*' marking that projection;
distinct patterns of one model are separated by ' || '.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from forms import FORMS, KNOWN_FAILURES, export_form, verify_export

Graph = onnx.GraphProto
Node = onnx.NodeProto
MAX_STEPS = 16


class GraphIndex:
    """Producer / consumer maps and the names of constant tensors."""

    def __init__(self, graph: Graph) -> None:
        self.producer = {o: n for n in graph.node for o in n.output}
        self.consumers: dict[str, list[Node]] = {}
        for n in graph.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self.const = {t.name for t in graph.initializer}
        for n in graph.node:  # Identity of an initializer: the TorchScript exporter's dedup
            if n.op_type == "Constant" or (n.op_type == "Identity" and n.input[0] in self.const):
                self.const.add(n.output[0])

    def is_projection(self, node: Node) -> bool:
        """A MatMul/Gemm whose second input is a constant weight."""
        return node.op_type in ("MatMul", "Gemm") and node.input[1] in self.const

    def data_parent(self, node: Node) -> Node | None:
        """The producer of the first non-constant input."""
        for name in node.input:
            if name and name not in self.const and name in self.producer:
                return self.producer[name]
        return None


def back_to(index: GraphIndex, start: Node | None, stop: Callable[[Node], bool]) -> list[str]:
    """Op types walking back along data inputs from ``start`` until ``stop`` (inclusive)."""
    ops: list[str] = []
    node = start
    while node is not None and len(ops) < MAX_STEPS:
        ops.append(node.op_type)
        if stop(node):
            break
        node = index.data_parent(node)
    return ops[::-1]


def forward_to_projection(index: GraphIndex, start: Node) -> list[str]:
    """Op types from ``start`` along first consumers to the output projection (marked '*')."""
    ops, node = [], start
    for _ in range(MAX_STEPS):
        users = index.consumers.get(node.output[0], [])
        if not users:
            break
        node = users[0]
        if index.is_projection(node):
            ops.append(node.op_type + "*")
            break
        ops.append(node.op_type)
    return ops


def anchors(graph: Graph) -> Iterator[Node]:
    return (n for n in graph.node if n.op_type in ("Softmax", "Attention"))


def attention_pattern(index: GraphIndex, anchor: Node) -> str:
    """QK MatMul ... Softmax ... output projection, as op types joined by '>'."""
    before: list[str] = []
    if anchor.op_type == "Softmax":
        before = back_to(index, index.data_parent(anchor), lambda n: n.op_type == "MatMul")
    return ">".join([*before, anchor.op_type, *forward_to_projection(index, anchor)])


def qk_branches(index: GraphIndex, anchor: Node) -> str:
    """The q and k inputs of the QK MatMul (or Attention) traced back to their projection."""
    node: Node | None = anchor
    if anchor.op_type == "Softmax":
        node = index.data_parent(anchor)
        while node is not None and node.op_type != "MatMul":
            node = index.data_parent(node)
    if node is None:
        return "?"
    branches = []
    for label, name in zip("qk", node.input[:2], strict=False):
        start = index.producer.get(name)
        branches.append(f"{label}: " + ">".join(back_to(index, start, index.is_projection)))
    return "  ".join(branches)


def describe(path: str, qk: bool) -> tuple[int, int, str]:
    """(node count, attention count, distinct attention patterns) of an ONNX file."""
    graph = onnx.load(path).graph
    index = GraphIndex(graph)
    found = list(anchors(graph))
    pats = [attention_pattern(index, a) for a in found]
    if qk:
        pats = [f"{p}   [{qk_branches(index, a)}]" for p, a in zip(pats, found, strict=True)]
    return len(graph.node), len(found), " || ".join(dict.fromkeys(pats))


def jobs(include_hf: bool) -> Iterator[tuple[str, Callable[..., dict[str, Any]], bool]]:
    """(name, exporter, is a Hugging Face model) for every model to show."""
    for name in FORMS:
        yield name, lambda p, n=name, **kw: export_form(n, p, **kw), False
    if include_hf:
        from hf_forms import HF_FORMS, export_hf

        for name in HF_FORMS:
            yield name, lambda p, n=name, **kw: export_hf(n, p, **kw), True


def known_failure(name: str, dynamo: bool, dyn: bool, hf: bool) -> str | None:
    if hf:
        from hf_forms import HF_KNOWN_FAILURES

        return HF_KNOWN_FAILURES.get((name, dynamo, dyn))
    return KNOWN_FAILURES.get((name, dynamo, dyn))


def show_one(
    name: str,
    export: Callable[..., dict[str, Any]],
    hf: bool,
    dynamo: bool,
    dyn: bool,
    tmp: str,
    qk: bool,
) -> str:
    path = str(Path(tmp) / f"{name}_{int(dynamo)}{int(dyn)}.onnx")
    expected = known_failure(name, dynamo, dyn, hf)
    t0 = time.perf_counter()
    try:
        verify_export(export(path, dynamo=dynamo, dynamic_batch=dyn))
        status = "ok" if expected is None else "XPASS"
    except Exception as exc:  # the table reports every failure instead of stopping
        status = "xfail" if expected else f"FAIL {type(exc).__name__}: {str(exc)[:80]!r}"
    secs = time.perf_counter() - t0
    nodes, natt, pattern = describe(path, qk) if Path(path).exists() else (0, 0, "-")
    return (
        f"{name:20s} {int(dynamo):^6d} {int(dyn):^5d} {status:6s} {secs:5.1f} {nodes:5d} "
        f"{natt:3d}  {pattern}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hf", action="store_true", help="also export the Hugging Face models")
    ap.add_argument("--dynamo", choices=["0", "1", "both"], default="both")
    ap.add_argument("--qk", action="store_true", help="also show the q and k branches")
    ap.add_argument("names", nargs="*", help="only these forms")
    args = ap.parse_args()
    modes = {"0": [False], "1": [True], "both": [False, True]}[args.dynamo]
    print(f"{'form':20s} dynamo dynb  status secs  nodes att  QK-MatMul .. Softmax .. out-proj*")
    with tempfile.TemporaryDirectory() as tmp:
        for dynamo in modes:
            for name, export, hf in jobs(args.hf):
                if args.names and name not in args.names:
                    continue
                for dyn in (False, True):
                    line = show_one(name, export, hf, dynamo, dyn, tmp, args.qk)
                    print(line, flush=True)


if __name__ == "__main__":
    main()
