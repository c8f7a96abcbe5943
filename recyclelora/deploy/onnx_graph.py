"""The ONNX graph of a segmentor: export at a fixed crop with a dynamic batch, and its facts.

The graph takes ``images`` (B, 3, H, W) float32 RGB on 0-255 and returns ``logits`` (B, K, H, W);
normalisation is inside it (``Segmentor.forward``). :func:`graph_facts` reads what the exporter's
checks compare: the op-type histogram and the initializer name -> shape map (two graphs with the
same of both cost the same to run), the opset, and ops that TensorRT's ONNX parser would refuse.
torch and onnx are imported here only: importing ``recyclelora.deploy`` stays light.
"""

from __future__ import annotations

import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .manifest import ExportError

INPUT, OUTPUT = "images", "logits"
OPSET = 18
MIN_OPSET = 17
#: An ONNX file is a protobuf: over 2 GB the weights go to ``model.onnx.data`` beside it.
EXTERNAL_DATA_BYTES = 2 * 1024**3
#: The release whose parser support matrix (onnx-tensorrt ``docs/operators.md``) the list
#: below was taken from: the ops it marks supported ("Y").
TENSORRT_OPS_VERSION = "10.15"
_TENSORRT_OPS_TABLE = """
    Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh Attention AveragePool
    BatchNormalization BlackmanWindow Cast CastLike Ceil Celu Clip Concat Constant
    ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DeformConv DepthToSpace DequantizeLinear
    Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor Gather GatherElements
    GatherND Gelu Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool Greater GreaterOrEqual
    GridSample GroupNormalization GRU HammingWindow HannWindow HardSigmoid HardSwish Hardmax
    Identity If ImageScaler InstanceNormalization IsInf IsNaN LayerNormalization LeakyRelu Less
    LessOrEqual Log LogSoftmax Loop LRN LSTM LpNormalization LpPool MatMul Max MaxPool Mean
    MeanVarianceNormalization Min Mish Mod Mul Neg NonMaxSuppression NonZero Not OneHot Or Pad
    ParametricSoftplus Pow PRelu QuantizeLinear RandomNormal RandomNormalLike RandomUniform
    RandomUniformLike Range Reciprocal ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax
    ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu Reshape Resize
    ReverseSequence RMSNormalization RNN RoiAlign RotaryEmbedding Round STFT ScaledTanh Scan
    Scatter ScatterElements ScatterND Selu Shape Shrink Sigmoid Sign Sin Sinh Size Slice
    Softmax Softplus Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh TensorScatter
    ThresholdedRelu Tile TopK Transpose Trilu Unsqueeze Upsample Where Xor
"""
TENSORRT_OPS: frozenset[str] = frozenset(_TENSORRT_OPS_TABLE.split())
#: Refused whatever TensorRT supports: the deformable attention must use the gather sampler
#: (``deform_attn_impl="gather"``), whose graph every backend runs the same way.
FORBIDDEN_OPS: frozenset[str] = frozenset({"GridSample"})


@dataclass
class GraphFacts:
    """What the checks compare between two graphs, and what the report lists."""

    opset: int
    ops: dict[str, int]
    initializers: dict[str, list[int]]
    inputs: dict[str, list[int | str]]
    outputs: dict[str, list[int | str]]

    @property
    def forbidden(self) -> list[str]:
        return sorted(set(self.ops) & FORBIDDEN_OPS)

    @property
    def not_in_tensorrt(self) -> list[str]:
        return sorted(set(self.ops) - TENSORRT_OPS)

    @property
    def parameters(self) -> int:
        return sum(_numel(shape) for shape in self.initializers.values())


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def export_onnx(model: Any, path: str | Path, input_size: tuple[int, int], max_batch: int) -> Path:
    """Trace ``model`` (a ``Segmentor`` in eval mode) into ``path`` at ``input_size``.

    The batch axis is dynamic in [1, max_batch] (static 1 when ``max_batch`` is 1). Weights
    over 2 GB go to an external data file next to ``path``.
    """
    import inspect

    import torch

    if "dynamo" not in inspect.signature(torch.onnx.export).parameters:
        raise ExportError(
            f"ONNX export needs torch >= 2.5 (the dynamo exporter); this is torch "
            f"{torch.__version__}. Upgrade torch, or pass --no-onnx to write the weights only"
        )
    path = Path(path)
    h, w = input_size
    batch = 2 if max_batch > 1 else 1
    sample = torch.full((batch, 3, h, w), 128.0)
    dynamic = {INPUT: {0: torch.export.Dim("batch", min=1, max=max_batch)}} if batch > 1 else None
    size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    with torch.no_grad():
        torch.onnx.export(
            model,
            (sample,),
            str(path),
            input_names=[INPUT],
            output_names=[OUTPUT],
            dynamic_shapes=dynamic,
            opset_version=OPSET,
            dynamo=True,
            external_data=size > EXTERNAL_DATA_BYTES,
        )
    return path


def graph_facts(path: str | Path) -> GraphFacts:
    """Run the ONNX checker with full shape inference on ``path`` and read its facts.

    Raises :class:`ExportError` when the checker fails.
    """
    import onnx

    path = Path(path)
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise ExportError(f"{path} fails the ONNX checker ({e}); the export is not usable") from e
    proto = onnx.load(str(path), load_external_data=False)
    opset = max((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), default=0)
    ops = Counter(node.op_type for node in proto.graph.node)
    return GraphFacts(
        opset=int(opset),
        ops=dict(sorted(ops.items())),
        initializers={t.name: [int(d) for d in t.dims] for t in proto.graph.initializer},
        inputs={v.name: _dims(v) for v in proto.graph.input},
        outputs={v.name: _dims(v) for v in proto.graph.output},
    )


def _dims(value: Any) -> list[int | str]:
    return [d.dim_param or int(d.dim_value) for d in value.type.tensor_type.shape.dim]


def base_graph_facts(
    preset: str,
    num_classes: int,
    train_size: tuple[int, int],
    state: dict[str, Any],
    input_size: tuple[int, int],
    max_batch: int,
) -> GraphFacts:
    """The facts of the graph of ``build_model(preset, adapters=None)`` holding ``state``:
    what a merged export must equal. The same values matter: the exporter's optimiser shares
    initializers of equal value, so a model with other weights may list other names."""
    from ..models import build_model

    plain = build_model(
        preset, num_classes, adapters=None, deform_attn_impl="gather", img_size=train_size
    ).eval()
    plain.load_state_dict(state)
    with tempfile.TemporaryDirectory() as tmp:
        return graph_facts(export_onnx(plain, Path(tmp) / "base.onnx", input_size, max_batch))
