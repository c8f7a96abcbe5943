"""fp16 / bf16 variants of the fp32 ONNX graph, for strongly typed TensorRT engines.

TensorRT 11 has no FP16/BF16 builder flags: an engine runs in the precision its graph states.
So the reduced precision lives in the graph: weights and activations in fp16 (or bf16), except
the ops where ViT activations overflow fp16 or lose their sums (LayerNormalization, Softmax,
InstanceNormalization and every Reduce*: sums of squares of activations in the hundreds pass
65504), which run in fp32 between Cast nodes. The interface does not change: the input is still
float32 RGB on 0-255 and the output float32 ``logits`` (Casts at the boundaries), so every
backend takes and returns the same arrays. An op whose ONNX schema at the graph's opset has no
such type (Conv takes bfloat16 only from opset 22) also stays fp32.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Literal

import numpy as np

from ..atomic import atomic_write, write_bytes
from .manifest import ExportError

Precision = Literal["fp16", "bf16"]

KEEP_FP32_OPS = frozenset(
    {"LayerNormalization", "Softmax", "LogSoftmax", "InstanceNormalization"}
)  # and every op whose name starts with "Reduce"
EXTERNAL_DATA_MIN_BYTES = 1024  # initializers this large go to ``<name>.data`` (as onnx does)


def variant_name(precision: Precision) -> str:
    """``model.<precision>.onnx``: the variant's file name in an export directory."""
    return f"model.{precision}.onnx"


def reduced_precision_onnx(src: str | Path, dst: str | Path, precision: Precision) -> Path:
    """Write the ``precision`` variant of the fp32 graph ``src`` to ``dst`` and return ``dst``.

    Weights go to ``dst.name + ".data"`` beside it when ``src`` keeps its weights outside the
    graph too. The result passes ``onnx.checker`` with full shape inference.
    """
    import onnx
    from onnx import TensorProto, shape_inference

    lows = {"fp16": TensorProto.FLOAT16, "bf16": TensorProto.BFLOAT16}
    if precision not in lows:
        raise ValueError(f"precision must be one of {sorted(lows)}, got {precision!r}")
    src, dst = Path(src), Path(dst)
    model = onnx.load(src, load_external_data=False)
    external = any(t.data_location == TensorProto.EXTERNAL for t in model.graph.initializer)
    if model.functions:
        from onnx import inliner

        model = inliner.inline_local_functions(model)
    onnx.external_data_helper.load_external_data_for_model(model, str(src.parent))
    try:  # small constants (e.g. Resize scales) are read, so after the data is loaded
        typed = shape_inference.infer_shapes(model, strict_mode=True)
    except Exception as e:
        raise ExportError(f"{src}: ONNX shape inference failed ({e}); re-export the graph") from e
    opset = {o.domain or "ai.onnx": o.version for o in model.opset_import}
    _GraphLowering(model.graph, typed.graph, lows[precision], precision, opset).run()
    _save(model, dst, external)
    try:
        onnx.checker.check_model(str(dst), full_check=True)
    except Exception as e:
        raise ExportError(f"{dst}: the {precision} graph fails the ONNX checker: {e}") from e
    return dst


class _GraphLowering:
    """Rewrites one graph in place: float32 tensors become ``low`` except where kept fp32."""

    def __init__(self, graph, typed_graph, low: int, suffix: str, opset: dict[str, int]) -> None:
        from onnx import TensorProto, helper

        self.graph, self.low, self.suffix, self.opset = graph, low, suffix, opset
        name = helper.tensor_dtype_to_string(low).removeprefix("TensorProto.").lower()
        self.low_str = f"tensor({name})"
        self.np_low = helper.tensor_dtype_to_np_dtype(low)
        self.FLOAT = TensorProto.FLOAT
        self.types = {
            v.name: v.type.tensor_type.elem_type
            for v in (*typed_graph.value_info, *typed_graph.input, *typed_graph.output)
        }
        self.types.update({t.name: t.data_type for t in graph.initializer})
        self.to_fp32: dict[str, str] = {}  # low tensor -> its Cast to fp32
        self.nodes: list = []
        self.plans = [self._plan(node) for node in graph.node]

    def is_float(self, name: str) -> bool:
        """Float32 in the source graph (so ``low`` in the new one, unless kept)."""
        return bool(name) and self.types.get(name) == self.FLOAT

    def needs_fp32(self, index: int, slot: int) -> bool:
        """Whether input ``slot`` of node ``index`` must be fed float32."""
        whole, slots = self.plans[index]
        return whole or slot in slots

    def _plan(self, node) -> tuple[bool, frozenset[int]]:
        """(whether the node runs in fp32, its input slots that are float32 by definition).

        fp32: the overflow-prone ops, and ops whose ONNX schema at this opset does not admit
        ``low`` for one of its float tensors (Conv takes bfloat16 only from opset 22; Range no
        fp16 at all). Fixed float32 slots: e.g. Resize's ``scales``.
        """
        op = node.op_type
        schema = _schema(node.domain, op, self.opset)
        whole, slots = op in KEEP_FP32_OPS or op.startswith("Reduce") or schema is None, set()
        if not whole:
            params = {c.type_param_str: c.allowed_type_strs for c in schema.type_constraints}
            for formals, names, inputs in (
                (schema.inputs, node.input, True),
                (schema.outputs, node.output, False),
            ):
                for i, name in enumerate(names):
                    if not self.is_float(name):
                        continue
                    t = formals[min(i, len(formals) - 1)].type_str
                    if t in params:
                        whole |= self.low_str not in params[t]
                    elif inputs:
                        slots.add(i)
                    else:  # a float32 output by definition: run the node in fp32
                        whole = True
        return whole, frozenset(slots)

    def run(self) -> None:
        from onnx import AttributeProto

        g = self.graph
        graph_attrs = (AttributeProto.GRAPH, AttributeProto.GRAPHS)
        if any(a.type in graph_attrs for n in g.node for a in n.attribute):
            raise ExportError("graphs with control flow (If/Loop/Scan) cannot be lowered")
        fp32 = self._lower_initializers()
        for inp in g.input:  # RGB float32 in, one Cast to low
            if self.is_float(inp.name):
                low_name = f"{inp.name}__{self.suffix}"
                _rename(g.node, inp.name, low_name)
                self.types[low_name] = self.FLOAT
                self._cast(inp.name, self.low, low_name)
        for index, node in enumerate(g.node):
            self._lower_attributes(node)
            for slot, name in enumerate(node.input):
                if name not in fp32 and self.is_float(name) and self.needs_fp32(index, slot):
                    node.input[slot] = self._fp32_of(name)
            self.nodes.append(node)
            if self.plans[index][0]:  # computes in fp32, hands on ``low``
                for i, o in enumerate(node.output):
                    if self.is_float(o):
                        node.output[i] = f"{o}__fp32"
                        self._cast(node.output[i], self.low, o)
        for out in g.output:  # float32 logits out
            if self.is_float(out.name):
                low_name = f"{out.name}__{self.suffix}"
                _rename(self.nodes, out.name, low_name)
                self._cast(low_name, self.FLOAT, out.name)
        del g.node[:]
        g.node.extend(self.nodes)
        del g.value_info[:]  # stale fp32 types; the checker infers them again

    def _lower_initializers(self) -> set[str]:
        """Float initializers to ``low``; those read only by fp32 slots stay fp32 (returned)."""
        readers: dict[str, list[tuple[int, int]]] = defaultdict(list)
        for index, node in enumerate(self.graph.node):
            for slot, name in enumerate(node.input):
                readers[name].append((index, slot))
        outputs = {o.name for o in self.graph.output}
        keep = set()
        for t in self.graph.initializer:
            if t.data_type != self.FLOAT:
                continue
            uses = readers.get(t.name, [])
            if uses and t.name not in outputs and all(self.needs_fp32(n, s) for n, s in uses):
                keep.add(t.name)
            else:
                t.CopyFrom(self._lower_tensor(t, weights=True))
        return keep

    def _lower_tensor(self, t, weights: bool = False):
        """A float32 TensorProto in ``low``. Weights that overflow are refused; a constant
        such as float32's max becomes +-inf, which is what it stands for."""
        from onnx import numpy_helper

        a = numpy_helper.to_array(t)
        with np.errstate(over="ignore"):
            low = a.astype(self.np_low)
        overflow = np.isfinite(a) & ~np.isfinite(low.astype(np.float32))
        if weights and a.size > 1 and overflow.any():
            raise ExportError(
                f"initializer {t.name} has values beyond the {self.suffix} range "
                f"(max |w| = {float(np.abs(a[np.isfinite(a)]).max()):.4g}); export in fp32"
            )
        return numpy_helper.from_array(low, t.name)

    def _lower_attributes(self, node) -> None:
        """Cast(to=float) and float constants produce ``low`` tensors."""
        from onnx import AttributeProto, helper, numpy_helper

        for attr in node.attribute:
            if node.op_type == "Cast" and attr.name == "to" and attr.i == self.FLOAT:
                attr.i = self.low
            elif attr.type == AttributeProto.TENSOR and attr.t.data_type == self.FLOAT:
                attr.t.CopyFrom(self._lower_tensor(attr.t))
            elif node.op_type == "Constant" and attr.name in ("value_float", "value_floats"):
                value = attr.f if attr.name == "value_float" else list(attr.floats)
                tensor = self._lower_tensor(numpy_helper.from_array(np.array(value, np.float32)))
                node.attribute.remove(attr)
                node.attribute.append(helper.make_attribute("value", tensor))
                break

    def _fp32_of(self, name: str) -> str:
        if name not in self.to_fp32:
            self.to_fp32[name] = self._cast(name, self.FLOAT, f"{name}__to_fp32")
        return self.to_fp32[name]

    def _cast(self, src: str, to: int, dst: str) -> str:
        from onnx import helper

        self.nodes.append(
            helper.make_node("Cast", [src], [dst], to=to, name=f"cast_{src}_to_{dst}")
        )
        return dst


def _schema(domain: str, op_type: str, opset: dict[str, int]):
    """The op's schema at the graph's opset, or None for ops onnx does not know."""
    from onnx import defs

    domain = domain or "ai.onnx"
    try:
        return defs.get_schema(op_type, opset.get(domain, 1), "" if domain == "ai.onnx" else domain)
    except defs.SchemaError:
        return None


def _rename(nodes, old: str, new: str) -> None:
    """Point every input and output ``old`` of ``nodes`` at ``new``."""
    for node in nodes:
        for field in (node.input, node.output):
            for i, name in enumerate(field):
                if name == old:
                    field[i] = new


def _save(model, dst: Path, external: bool) -> None:
    """Graph (and ``<name>.data``) via atomic writes: data first, so a graph never names
    weights that are not there yet."""
    from onnx import TensorProto
    from onnx.external_data_helper import set_external_data

    dst.parent.mkdir(parents=True, exist_ok=True)
    if external:
        data = dst.with_name(dst.name + ".data")
        with atomic_write(data, "wb") as f:
            for t in model.graph.initializer:
                if t.HasField("raw_data") and len(t.raw_data) >= EXTERNAL_DATA_MIN_BYTES:
                    offset = f.tell()
                    f.write(t.raw_data)
                    set_external_data(t, data.name, offset, len(t.raw_data))
                    t.ClearField("raw_data")
                    t.data_location = TensorProto.EXTERNAL
    write_bytes(dst, model.SerializeToString())
