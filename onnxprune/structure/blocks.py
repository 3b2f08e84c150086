"""Attention and feed-forward blocks: anchors found by small patterns (attention forms in
``onnxprune.ops``), everything else by the coupled-axis engine (axes.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from onnxprune.errors import NotPrunableError
from onnxprune.ops import AttentionAnchors, form_for
from onnxprune.ops.skip_layernorm import is_skip_layernorm, skip_residual
from onnxprune.structure.axes import Flow, LabelPropagator, cache_outputs, column_labels
from onnxprune.structure.cost import const_size, node_flops
from onnxprune.structure.graph import ELEMENTWISE, LAYOUT, NONLINEAR, GraphView

# layout ops the FFN walk passes: reshapes around a [B·T, D] Gemm, and the Split/Slice of a
# fused gate_up projection (the label engine then proves where the channels go)
_RESHAPES = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Split", "Slice"})
# contrib elementwise ops an FFN's activation may be fused into (their bias is an operand)
_FFN_ELEMENTWISE = ELEMENTWISE | {"BiasGelu", "BiasAdd", "QuickGelu"}
_FFN_NONLINEAR = NONLINEAR | {"BiasGelu", "QuickGelu"}
_OUTPUT_OPS = frozenset({"Add", "Sub", "Mul", "Div", "Reshape", "Transpose", "Squeeze",
                         "Unsqueeze", "Identity", "Dropout", "Cast", "Flatten"})


@dataclass
class Block:
    """What every prunable block has: a name, its seeds (projections whose output columns
    are labelled), the label flow, and whether it can be removed whole."""

    name: str
    kind: str
    anchor: str
    seeds: dict[str, int]                       # projection node -> label base
    flow: Flow | None
    module_output: str | None = None            # tensor entering the residual add
    residual_add: str | None = None             # node name of that add
    removable: bool = False
    reason: str = ""
    prunable: bool = True                       # sub-units (heads, channels) can be cut
    params: int = 0
    flops: int = 0
    nodes: set[str] = field(default_factory=set)

    def label_of(self, node: str, col: int) -> int:
        return self.seeds[node] + col


@dataclass
class AttentionBlock(Block):
    heads: int = 0
    qk_dim: int = 0
    vo_dim: int = 0
    q_proj: str = ""
    k_proj: str = ""
    v_proj: str = ""
    o_proj: str = ""
    q_labels: np.ndarray | None = None          # [H, qk_dim] label ids
    k_labels: np.ndarray | None = None
    v_labels: np.ndarray | None = None
    tokens: dict[int, int] = field(default_factory=dict)   # head token -> head index
    channel_prunable: bool = True
    channel_reason: str = ""
    qk_reason: str = ""                         # why QK channels alone cannot be cut
    kv_heads: int = 0                           # key/value heads (== heads unless grouped)
    groups: np.ndarray | None = None            # [H]: query head -> its key/value group
    k_copies: np.ndarray | None = None          # grouped, repeated by Expand: [H, qk_dim]
    v_copies: np.ndarray | None = None          # labels of each query head's K/V copy
    # key/value cache: past graph input -> present graph output (empty without a cache)
    cache: dict[str, str] = field(default_factory=dict)

    @property
    def grouped(self) -> bool:
        """Grouped-query (or multi-query) attention: query heads share key/value heads."""
        return 0 < self.kv_heads < self.heads


@dataclass
class FfnBlock(Block):
    channels: int = 0
    activation: str = ""
    gated: bool = False
    up_projs: list[str] = field(default_factory=list)
    down_proj: str = ""
    up_labels: np.ndarray | None = None         # [n_up, F] label ids, column c of each up


@dataclass
class Structure:
    blocks: list[Block]
    params: int
    flops: int
    input_shapes: dict[str, tuple[int, ...]]

    def block(self, name: str) -> Block:
        for b in self.blocks:
            if b.name == name:
                return b
        raise KeyError(name)

    @property
    def attention(self) -> list[AttentionBlock]:
        return [b for b in self.blocks if isinstance(b, AttentionBlock)]

    @property
    def ffn(self) -> list[FfnBlock]:
        return [b for b in self.blocks if isinstance(b, FfnBlock)]


class BlockFinder:
    def __init__(self, view: GraphView, trace: dict[str, np.ndarray]):
        self.view = view
        self.trace = trace
        self.propagator = LabelPropagator(view, trace)
        self._next_base = 0
        self._packed: dict[str, tuple] = {}     # fused attention node -> (form, PackedQKV)

    # -- shared helpers -------------------------------------------------------------------
    def _bases(self, nodes: list[str]) -> dict[str, int]:
        seeds = {}
        for name in nodes:
            seeds[name] = self._next_base
            self._next_base += self._cols(name)
        return seeds

    def _cols(self, node: str) -> int:
        if node in self._packed:  # a fused attention op: the columns of its packed weight
            return self._packed[node][1].width
        out = self.view.node[node].outputs[0].name
        if out not in self.trace:
            raise NotPrunableError(f"tensor {out!r} has no traced value")
        return int(np.shape(self.trace[out])[-1])

    def _propagate(self, seeds: dict[str, int]) -> Flow:
        labels = {}
        packed = {name: base for name, base in seeds.items() if name in self._packed}
        for name, base in seeds.items():
            if name in packed:
                continue
            out = self.view.node[name].outputs[0].name
            if out not in self.trace:
                raise NotPrunableError(f"tensor {out!r} has no traced value")
            labels[out] = column_labels(np.shape(self.trace[out]), base)
        # a fused attention op labels its own output and records its contractions
        seeded = Flow({}, [], [], [], [], [], None)
        for name, base in packed.items():
            form = self._packed[name][0]
            form.seed(self.propagator, self.view.node[name], base, seeded)
        labels.update(seeded.labels)
        flow = self.propagator.propagate(labels)
        flow.contractions[:0] = seeded.contractions
        flow.nodes[:0] = seeded.nodes
        return flow

    def projection_above(self, tensor: gs.Tensor, limit: int = 40) -> set[str]:
        """Projections (MatMul/Gemm with a constant weight) feeding ``tensor`` through layout
        and elementwise ops only."""
        def follow(node: gs.Node) -> list[str]:
            if self.view.is_projection(node):
                return []
            if node.op == "Concat" and len(node.inputs) == 2 \
                    and self.view.graph_input_behind(node.inputs[0].name) is not None:
                return [node.inputs[1].name]   # Concat(past cache, new keys/values)
            if node.op in LAYOUT:
                return [node.inputs[0].name]
            if node.op in ELEMENTWISE:
                return [t.name for t in self.view.data_inputs(node)]
            return []

        return {n.name for n in self.view.walk_up(tensor.name, follow, limit)
                if n is not None and self.view.is_projection(n)}

    def residual_of(self, block: Block, start: str, inputs: list[str]) -> None:
        """Walk from the block's last projection to the residual add, if there is one."""
        tensor = self.view.node[start].outputs[0].name
        for _ in range(12):
            users = [u for u in self.view.consumers.get(tensor, []) if u.op != "Shape"]
            if len(users) != 1 or tensor in self.view.output_names:
                block.reason = "its output has several users"
                return
            node = users[0]
            others = [t for t in self.view.data_inputs(node) if t.name != tensor] \
                if node.op in ELEMENTWISE else []
            # the residual: the other summand of an Add, or the add inside com.microsoft
            # SkipLayerNormalization
            residual = skip_residual(node, tensor)
            if residual is None and node.op == "Add" and others:
                residual = others[0].name
            if residual is not None:
                if residual in self._upstream(inputs):
                    block.module_output, block.residual_add = tensor, node.name
                    block.removable = True
                else:
                    block.reason = "the add after it is not a residual connection"
                return
            if node.op not in _OUTPUT_OPS or others:
                block.reason = f"no residual add after it ({node.op} node {node.name})"
                return
            tensor = node.outputs[0].name
        block.reason = "no residual add found after it"

    def _upstream(self, inputs: list[str]) -> set[str]:
        """Tensors upstream of the block's inputs, with the sibling outputs of their producers:
        a fused SkipLayerNormalization gives the next block its normalised input (output 0)
        and the residual sum (output 3) side by side."""
        upstream = set().union(*(self.view.ancestors(i) for i in inputs))
        siblings = {t.name for name in upstream if (p := self.view.producer.get(name))
                    is not None and is_skip_layernorm(p) for t in p.outputs if t.name}
        return upstream | siblings

    def _cost(self, block: Block, extra_nodes: list[str]) -> None:
        flow = block.flow
        names = set(block.seeds) | set(extra_nodes)
        if flow is not None:
            names |= {s.node for s in flow.sinks} | {c.node for c in flow.contractions}
        block.nodes = names | (set(flow.nodes) if flow else set())
        params = 0
        for name in names:
            node = self.view.node[name]
            params += sum(const_size(self.view, t) for t in node.inputs[1:])
        if flow is not None:
            for op in flow.operands:  # biases and other per-column constants
                value = self.view.const(self.view.node[op.node].inputs[op.index])
                if value is not None and np.issubdtype(value.dtype, np.floating) \
                        and value.size > 1:
                    params += value.size
            for sink in flow.sinks:
                params += self._bias_after(sink.node)
        block.params = params
        block.flops = sum(node_flops(self.view, self.view.node[n], self.trace) for n in names)

    def _bias_after(self, node: str) -> int:
        out = self.view.node[node].outputs[0].name
        users = self.view.consumers.get(out, [])
        if len(users) == 1 and users[0].op == "Add":
            return sum(const_size(self.view, t) for t in users[0].inputs
                       if self.view.const(t) is not None)
        if len(users) == 1 and skip_residual(users[0], out) is not None \
                and len(users[0].inputs) > 4:  # SkipLayerNormalization's bias (input 4)
            return const_size(self.view, users[0].inputs[4])
        return 0

    # -- attention ------------------------------------------------------------------------
    def attention(self, anchor: gs.Node, found: AttentionAnchors) -> AttentionBlock:
        """The attention block at ``anchor``, whose form found its contractions and q/k/v."""
        qk, av = found.qk, found.av
        block = AttentionBlock("", "attention", anchor.name, {}, None)
        form = form_for(anchor, self.view.opset)
        packed = form.packed(self.view, anchor) if hasattr(form, "packed") else None
        if packed is not None:  # Q/K/V projections inside the fused op (attention_ms.py)
            self._packed[anchor.name] = (form, packed)
            q_src = k_src = v_src = {anchor.name}
        else:
            q_src = self.projection_above(found.q)
            k_src = self.projection_above(found.k)
            v_src = self.projection_above(found.v)
        if len(q_src) != 1 or len(k_src) != 1 or len(v_src) != 1:
            block.prunable, block.reason = False, "query/key/value projections not found"
            return block
        block.q_proj, block.k_proj, block.v_proj = next(iter(q_src)), next(iter(k_src)), \
            next(iter(v_src))
        block.seeds = self._bases(sorted({block.q_proj, block.k_proj, block.v_proj},
                                         key=self.view.order.get))
        try:
            block.flow = self._propagate(block.seeds)
            self._attention_heads(block, qk.name, av.name)
            limit = form.channel_limit(self.view, anchor)
            if limit and block.channel_prunable:
                block.channel_prunable, block.channel_reason = False, limit
        except NotPrunableError as exc:
            block.prunable, block.reason, block.flow = False, str(exc), None
            self._cost(block, [qk.name, av.name])
            return block
        block.cache = {past: present for present, past in
                       sorted(cache_outputs(self.view, block.flow).items())}
        inputs = [self.view.node[p].inputs[0].name for p in block.seeds]
        self.residual_of(block, block.o_proj, inputs)
        self._cost(block, [])
        return block

    def _attention_heads(self, block: AttentionBlock, qk: str, av: str) -> None:
        flow = block.flow
        channel = [c for c in flow.contractions if c.kind == "channel"]
        mix = [c for c in flow.contractions if c.kind == "mix"]
        if [c.node for c in channel] != [qk] or [c.node for c in mix] != [av]:
            raise NotPrunableError("attention heads interact with another matmul")
        if len(flow.sinks) != 1:
            raise NotPrunableError(f"{len(flow.sinks)} output projections found, expected 1")
        block.o_proj = flow.sinks[0].node
        ch, mx = channel[0], mix[0]
        q_rows = {tuple(r): None for r in ch.left}
        order = sorted(q_rows, key=min)
        head_of_row = {row: h for h, row in enumerate(order)}
        k_of: dict[int, tuple[int, ...]] = {}
        for row, krow in zip(map(tuple, ch.left), map(tuple, ch.right)):
            if k_of.setdefault(head_of_row[row], krow) != krow:
                raise NotPrunableError("a query head meets several key heads")
        block.tokens = {ch.token_of[row]: h for row, h in head_of_row.items()}
        v_of: dict[int, tuple[int, ...]] = {}
        for token, vrow in zip(mx.left, map(tuple, mx.right)):
            if int(token) not in block.tokens:
                raise NotPrunableError("attention weights of unknown origin reach A·V")
            if v_of.setdefault(block.tokens[int(token)], vrow) != vrow:
                raise NotPrunableError("a head meets several value heads")
        heads = len(order)
        k_rows = np.array([k_of[h] for h in range(heads)], np.int64)
        v_rows = np.array([v_of[h] for h in range(heads)], np.int64)
        copies = getattr(self.propagator, "copy_of", None)
        block.k_copies = block.v_copies = None
        if copies:  # second pass of a grouped block: rows met after the repeat are copies
            def original(rows: np.ndarray) -> np.ndarray:
                return np.array([[copies.get(x, x) for x in row] for row in rows.tolist()],
                                np.int64).reshape(rows.shape)
            k_orig, v_orig = original(k_rows), original(v_rows)
            if np.any(k_orig != k_rows) and np.any(v_orig != v_rows):
                block.k_copies, block.v_copies = k_rows, v_rows
            k_rows, v_rows = k_orig, v_orig
        block.q_labels = np.array(order, np.int64)
        block.k_labels, block.v_labels = k_rows, v_rows
        block.heads, block.qk_dim, block.vo_dim = heads, block.q_labels.shape[1], \
            block.v_labels.shape[1]
        self._check_coverage(block)
        if _channels_rotate_in_pairs(block):
            block.qk_reason = "rotary embedding rotates query/key channels in pairs"
        if block.grouped and copies is None:
            # label the repeated K/V heads per query head (Expand rule), so that a query
            # head inside a group can be cut without its shared K/V columns
            self.propagator.copy_of = {}
            try:
                block.flow = self._propagate(block.seeds)
                self._attention_heads(block, qk, av)
            finally:
                del self.propagator.copy_of
            return
        if block.v_copies is None:
            self._check_rows(block)
        elif not np.isin(block.flow.sinks[0].rows, block.v_copies).all():
            raise NotPrunableError("output projection reads features that are not values")

    def _check_coverage(self, block: AttentionBlock) -> None:
        self._kv_groups(block)
        keys = np.unique(block.k_labels, axis=0) if block.grouped else block.k_labels
        values = np.unique(block.v_labels, axis=0) if block.grouped else block.v_labels
        used = np.concatenate([block.q_labels.ravel(), keys.ravel(), values.ravel()])
        if len(np.unique(used)) != used.size:
            raise NotPrunableError("heads share key/value columns in an unsupported way")
        if block.grouped:
            block.channel_prunable = False
            block.channel_reason = ("query heads share key/value channels (grouped-query "
                                    "attention)")
        total = sum(self._cols(n) for n in block.seeds)
        if used.size != total:
            raise NotPrunableError("some projection columns never reach the attention")
        for labels in (block.q_labels, keys, values):
            flat = labels.ravel()
            if not (np.all(np.diff(flat) == 1)) and block.channel_prunable:
                block.channel_prunable = False
                block.channel_reason = "projection columns are not head-major"

    @staticmethod
    def _kv_groups(block: AttentionBlock) -> None:
        """Group query heads by the key row they meet (grouped-query attention, where the
        export repeats K/V per group); the value rows must group them the same way."""
        keys = {tuple(r): None for r in block.k_labels.tolist()}
        key_group = {row: g for g, row in enumerate(keys)}
        groups = np.array([key_group[tuple(r)] for r in block.k_labels.tolist()], np.int64)
        values = {tuple(r): None for r in block.v_labels.tolist()}
        value_group = {row: g for g, row in enumerate(values)}
        by_value = np.array([value_group[tuple(r)] for r in block.v_labels.tolist()])
        if len(keys) != len(values) or np.any(by_value != groups):
            raise NotPrunableError("query heads share keys and values in different groups")
        sizes = np.bincount(groups)
        if len(set(sizes.tolist())) != 1:
            raise NotPrunableError("key/value groups hold different numbers of query heads")
        block.kv_heads, block.groups = len(keys), groups

    def _check_rows(self, block: AttentionBlock) -> None:
        rows = block.flow.sinks[0].rows
        if np.any(rows < 0) or not np.isin(rows, block.v_labels).all():
            raise NotPrunableError("output projection reads features that are not values")

    # -- feed-forward ---------------------------------------------------------------------
    def ffn(self, down: gs.Node, claimed: set[str]) -> FfnBlock | None:
        ups, ops = self._elementwise_sources(down.inputs[0])
        if ups is None or not ups or len(ups) > 2 or ups & claimed:
            return None
        if not ops & _FFN_NONLINEAR:
            return None
        upstream = {self.view.node[u].inputs[0].name for u in ups}
        if len(upstream) != 1:
            return None
        order = sorted(ups, key=self.view.order.get)
        block = FfnBlock("", "ffn", down.name, self._bases(order), None)
        block.up_projs, block.down_proj = order, down.name
        block.gated = len(order) == 2
        block.activation = _activation_name(ops, block.gated)
        try:
            block.flow = self._propagate(block.seeds)
            self._ffn_channels(block)
            block.activation = _activation_name(ops, block.gated)
        except NotPrunableError as exc:
            block.prunable, block.reason, block.flow = False, str(exc), None
            return block
        self.residual_of(block, down.name, list(upstream))
        self._cost(block, [])
        return block

    def _elementwise_sources(self, tensor: gs.Tensor) -> tuple[set[str] | None, set[str]]:
        """Projections feeding ``tensor`` through elementwise ops (and reshapes, which a
        [B·T, D] Gemm form puts around the activation: the label engine then proves that
        they keep the channel axis) only, and those ops; None when anything else is on the
        way."""
        ups: set[str] = set()
        ops: set[str] = set()

        def follow(node: gs.Node) -> list[str]:
            if self.view.is_projection(node):
                return []
            if node.op in _RESHAPES:
                return [node.inputs[0].name]
            if node.op not in _FFN_ELEMENTWISE:
                return []
            return [t.name for t in self.view.data_inputs(node)]

        for node in self.view.walk_up(tensor.name, follow, 64):
            if node is None:
                return None, ops
            if self.view.is_projection(node):
                ups.add(node.name)
            elif node.op in _RESHAPES:
                continue
            elif node.op in _FFN_ELEMENTWISE:
                ops.add(node.op)
            else:
                return None, ops
        return ups, ops

    def _ffn_channels(self, block: FfnBlock) -> None:
        """Channels are the groups of up-projection columns the label engine joined (a gate
        column and its up column meet at the gating multiply, in separate projections or in
        one fused gate_up projection); each must reach the down projection."""
        flow = block.flow
        if flow.contractions or [s.node for s in flow.sinks] != [block.down_proj]:
            raise NotPrunableError("feed-forward channels reach more than the down projection")
        labels = np.concatenate([block.seeds[u] + np.arange(self._cols(u))
                                 for u in block.up_projs])
        roots = np.array([flow.uf.find(int(x)) for x in labels])
        order = list(dict.fromkeys(roots.tolist()))          # channel c: the c-th root seen
        groups = [labels[roots == r] for r in order]
        if len({len(g) for g in groups}) != 1:
            raise NotPrunableError("gate and up channels do not pair one to one")
        rows = flow.sinks[0].rows
        if np.any(rows < 0) or {flow.uf.find(int(r)) for r in rows} != set(order):
            raise NotPrunableError("down projection rows do not match the channels")
        block.up_labels = np.stack(groups, axis=1)             # [columns per channel, F]
        block.channels = len(order)
        block.gated = len(block.up_labels) > 1


def _channels_rotate_in_pairs(block: AttentionBlock) -> bool:
    """Whether two query (or key) channels were added together on the way to Q·Kᵀ, as
    rotary embeddings do (q·cos + rotate_half(q)·sin joins channel c with c + d/2): cutting
    one of them alone would change the other's rotation."""
    uf = block.flow.uf
    for labels in (block.q_labels, block.k_labels):
        unique = np.unique(labels)
        if len({uf.find(int(x)) for x in unique}) < len(unique):
            return True
    return False


def _activation_name(ops: set[str], gated: bool) -> str:
    if ops & {"Gelu", "FastGelu", "BiasGelu", "QuickGelu"}:
        name = "gelu"
    elif "Erf" in ops:
        name = "gelu(erf)"
    elif "Tanh" in ops:
        name = "gelu(tanh)"
    elif "Relu" in ops:
        name = "relu"
    elif "Sigmoid" in ops:
        name = "silu" if "Mul" in ops else "sigmoid"
    else:
        name = "/".join(sorted(ops & NONLINEAR)).lower()
    return f"{name}-gated" if gated else name


def attention_anchors(view: GraphView, node: gs.Node) -> AttentionAnchors | None:
    """What the attention form anchored at ``node``'s op finds there, if any."""
    form = form_for(node, view.opset)
    return None if form is None else form.anchors(view, node)


def find_blocks(view: GraphView, trace: dict[str, np.ndarray]) -> list[Block]:
    """All attention blocks, then feed-forward blocks among the remaining projections,
    numbered in topological order."""
    finder = BlockFinder(view, trace)
    attention = [finder.attention(n, found) for n in view.nodes
                 if (found := attention_anchors(view, n)) is not None]
    claimed = set().union(*(b.nodes for b in attention)) if attention else set()
    ffn = []
    for node in view.nodes:
        if view.is_projection(node) and node.name not in claimed:
            block = finder.ffn(node, claimed)
            if block is not None:
                ffn.append(block)
                claimed |= block.nodes
    for kind, blocks in (("attn", attention), ("ffn", ffn)):
        blocks.sort(key=lambda b: view.order[b.anchor])
        for i, block in enumerate(blocks):
            block.name = f"{kind}{i}"
    return sorted(attention + ffn, key=lambda b: view.order[b.anchor])
