"""fp16 / bf16 graph variants: structure (what stays fp32), numbers against the fp32 graph.

Numbers come from two independent runtimes: ONNX Runtime's CPU provider runs fp16 graphs, and
onnx's reference evaluator (numpy, ml_dtypes) runs bf16 graphs, which the CPU provider cannot.
Tolerances on the tiny model's logits (range 0.64), with what was measured on 2 crops:
fp16: max |error| < 1 % of the range (0.07 %), argmax agreement >= 99 % (100 %);
bf16 (8 significant bits): mean |error| < 1 % of the range (0.46 %), max < 8 % (5.3 %),
argmax agreement >= 99 % (100 %).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper, shape_inference  # noqa: E402
from onnx.reference import ReferenceEvaluator  # noqa: E402

from recyclelora.deploy.manifest import ExportError  # noqa: E402
from recyclelora.deploy.onnx_precision import reduced_precision_onnx, variant_name  # noqa: E402

from .onnx_trace import trace  # noqa: E402

KEPT = {"LayerNormalization", "Softmax", "InstanceNormalization"}


def ort_run(path: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"images": x})[0]


def reference_run(path: Path, x: np.ndarray) -> np.ndarray:
    return ReferenceEvaluator(onnx.load(str(path))).run(None, {"images": x})[0]


def tensor_types(path: Path) -> dict[str, int]:
    """Every tensor's element type, by onnx's own inference on the written file."""
    g = shape_inference.infer_shapes(onnx.load(str(path)), strict_mode=True).graph
    types = {v.name: v.type.tensor_type.elem_type for v in (*g.value_info, *g.input, *g.output)}
    types.update({t.name: t.data_type for t in g.initializer})
    return types


def assert_kept_ops_fp32(path: Path) -> None:
    """No fp16/bf16 tensor enters or leaves LayerNorm, Softmax, InstanceNorm or a Reduce*."""
    types = tensor_types(path)
    model = onnx.load(str(path))
    kept = [n for n in model.graph.node if n.op_type in KEPT or n.op_type.startswith("Reduce")]
    assert kept
    for node in kept:
        for name in (*node.input, *node.output):
            if name:  # float32 or not a float at all (e.g. int64 axes)
                assert types[name] not in (TensorProto.FLOAT16, TensorProto.BFLOAT16), name


def small_graph(opset: int = 18, scale: float = 1.0) -> onnx.ModelProto:
    """Conv -> LayerNorm -> MatMul -> Softmax, a ReduceMean, a float Constant, Resize by float
    scales: each rule of the rewrite once. Activations reach the hundreds before the norm."""
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((64, 3, 3, 3)) * 0.05 * scale).astype(np.float32)
    inits = [
        numpy_helper.from_array(w, "conv_w"),
        numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "ln_scale"),
        numpy_helper.from_array(np.zeros(8, np.float32), "ln_bias"),
        numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), "proj"),
        numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales"),
    ]
    nodes = [
        helper.make_node("Conv", ["images", "conv_w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("LayerNormalization", ["c", "ln_scale", "ln_bias"], ["n"], axis=-1),
        helper.make_node("MatMul", ["n", "proj"], ["m"]),
        helper.make_node("Softmax", ["m"], ["s"], axis=-1),
        helper.make_node("ReduceMean", ["c"], ["r"], keepdims=1),
        helper.make_node("Constant", [], ["half"], value_float=0.5),
        helper.make_node("Mul", ["r", "half"], ["rh"]),
        helper.make_node("Add", ["s", "rh"], ["a"]),
        helper.make_node("Resize", ["a", "", "scales"], ["logits"], mode="linear"),
    ]
    graph = helper.make_graph(
        nodes,
        "small",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["B", 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["B", 64, 16, 16])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


@pytest.fixture
def small(tmp_path) -> Path:
    path = tmp_path / "model.onnx"
    onnx.save(small_graph(), str(path))
    return path


def images(batch: int = 2, size: int = 8, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.random((batch, 3, size, size)) * 255).astype(np.float32)


def test_fp16_variant_keeps_io_and_overflow_prone_ops_fp32(small, tmp_path):
    dst = reduced_precision_onnx(small, tmp_path / variant_name("fp16"), "fp16")
    assert dst.name == "model.fp16.onnx"
    model = onnx.load(str(dst))
    inits = {t.name: t.data_type for t in model.graph.initializer}
    # weights low; the norm's parameters (read only by the fp32 op) and Resize's scales fp32
    assert inits["conv_w"] == inits["proj"] == TensorProto.FLOAT16
    assert inits["ln_scale"] == inits["ln_bias"] == inits["scales"] == TensorProto.FLOAT
    types = tensor_types(dst)
    assert types["images"] == types["logits"] == TensorProto.FLOAT
    assert types["c"] == types["m"] == types["half"] == TensorProto.FLOAT16  # the low path
    assert_kept_ops_fp32(dst)
    x = images()
    ref, low = ort_run(small, x), ort_run(dst, x)
    assert low.dtype == np.float32 and low.shape == ref.shape
    np.testing.assert_allclose(low, ref, atol=2e-3 * np.ptp(ref))


def test_bf16_follows_the_opset_schema(tmp_path):
    """Conv admits bfloat16 only from opset 22: below it, the Conv runs in fp32."""
    for opset, conv_type in ((18, TensorProto.FLOAT), (22, TensorProto.BFLOAT16)):
        src = tmp_path / f"model{opset}.onnx"
        onnx.save(small_graph(opset), str(src))
        dst = reduced_precision_onnx(src, tmp_path / f"model{opset}.bf16.onnx", "bf16")
        types = tensor_types(dst)
        conv_w = next(t for t in onnx.load(str(dst)).graph.initializer if t.name == "conv_w")
        assert conv_w.data_type == conv_type
        assert types["proj"] == types["m"] == TensorProto.BFLOAT16
        assert_kept_ops_fp32(dst)
        x = images()
        ref, low = reference_run(src, x), reference_run(dst, x)
        # bf16 keeps 8 significant bits (0.4 % per rounding); the MatMul of rounded normalised
        # activations feeds a Softmax, so a few % of the range here (measured 3 %)
        assert np.abs(low - ref).max() < 5e-2 * np.ptp(ref)


def test_external_weights_stay_external(tmp_path):
    src = tmp_path / "model.onnx"
    onnx.save(small_graph(), str(src), save_as_external_data=True, location="model.onnx.data")
    dst = reduced_precision_onnx(src, tmp_path / "model.fp16.onnx", "fp16")
    inits = {t.name: t for t in onnx.load(str(dst), load_external_data=False).graph.initializer}
    assert inits["conv_w"].data_location == TensorProto.EXTERNAL  # 64x3x3x3 fp16: 3456 bytes
    assert inits["scales"].data_location == TensorProto.DEFAULT  # small ones inline, as onnx
    assert (tmp_path / "model.fp16.onnx.data").stat().st_size == 64 * 27 * 2
    x = images()
    np.testing.assert_allclose(ort_run(dst, x), ort_run(src, x), atol=2e-3)


def test_weights_beyond_fp16_are_refused(tmp_path):
    src = tmp_path / "model.onnx"
    onnx.save(small_graph(scale=3e6), str(src))  # conv weights up to ~1e6 > 65504
    with pytest.raises(ExportError, match="conv_w.*fp16 range"):
        reduced_precision_onnx(src, tmp_path / "model.fp16.onnx", "fp16")
    reduced_precision_onnx(src, tmp_path / "model.bf16.onnx", "bf16")  # bf16 has fp32's range


def test_unknown_precision(small, tmp_path):
    with pytest.raises(ValueError, match="fp16"):
        reduced_precision_onnx(small, tmp_path / "x.onnx", "int8")


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    """The tiny model (gather sampler) exported once as fp32, with its PyTorch logits."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("onnxscript")
    from recyclelora.models.segmentor import build_model

    torch.manual_seed(0)
    model = build_model("tiny", adapters=None, deform_attn_impl="gather", img_size=64).eval()
    x = images(2, 64, seed=1)
    path = tmp_path_factory.mktemp("tiny") / "model.onnx"
    trace(model, torch.from_numpy(x), path)
    with torch.no_grad():
        logits = model(torch.from_numpy(x)).numpy()
    return path, x, logits


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    return float((a.argmax(1) == b.argmax(1)).mean())


@pytest.mark.slow
def test_tiny_model_fp16_and_bf16_match_fp32(tiny_export, tmp_path):
    src, x, torch_logits = tiny_export
    ref = ort_run(src, x)
    np.testing.assert_allclose(ref, torch_logits, atol=1e-5)  # the fp32 graph is the model
    span = float(np.ptp(ref))

    fp16 = reduced_precision_onnx(src, tmp_path / "model.fp16.onnx", "fp16")
    assert_kept_ops_fp32(fp16)
    low = ort_run(fp16, x)
    assert np.abs(low - ref).max() < 1e-2 * span
    assert agreement(low, ref) >= 0.99

    bf16 = reduced_precision_onnx(src, tmp_path / "model.bf16.onnx", "bf16")
    assert_kept_ops_fp32(bf16)
    low = reference_run(bf16, x)
    assert np.abs(low - ref).mean() < 1e-2 * span
    assert np.abs(low - ref).max() < 8e-2 * span
    assert agreement(low, ref) >= 0.99
