"""``recyclelora-export`` (also ``python export/merge_and_export.py``): ship a trained model.

    recyclelora-export                                  # newest checkpoint under runs/
    recyclelora-export --checkpoint iter_40000.pth --out exports/g2cbm [--trt --precision fp16]
    recyclelora-export --from-export exports/g2cbm --trt --precision fp16   # on the GPU machine
    recyclelora-export --checkpoint iter_40000.pth --mmseg OUT.pth [--merged]
    recyclelora-export --checkpoint g2cbm_iter_40000.pth --inspect

By default it writes an export directory (``exports/<run>-iter<N>/``): the merged weights
(``model.safetensors``), ``model.onnx``, ``model.json`` and ``export_report.json`` with every
check's figures. ``--checkpoint`` is anything :func:`recyclelora.load_model` opens: a training
checkpoint, or an mmseg-format file (the authors' release, or ours). ``--mmseg`` writes the model
in the authors' mmseg 1.x layout instead (``--merged``: adapters folded in, plain DINOv2 keys).
Exit codes: 0 done, 2 bad input (nothing written), 3 written but no TensorRT engine here,
4 TensorRT could not build or load the engine (its messages printed; nothing written).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..checkpoints import LoadedModel, export_mmseg_checkpoint, inspect_checkpoint, load_model
from ..checkpoints.soma_mmseg import export_soma_checkpoint, is_soma_model
from ..checkpoints.training import newest_checkpoint
from . import fail

if TYPE_CHECKING:
    from ..deploy.manifest import Manifest

RUNS = Path("runs")
EXPORTS = Path("exports")
NO_ENGINE = 3  # exit code: the export is written, the engine must be built on a GPU machine
ENGINE_FAILED = 4  # exit code: TensorRT could not build or load the engine
DEFAULT_EVAL_SCALE = (2048, 1024)
CHECK_IMAGES = 4


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="recyclelora-export",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = p.add_argument_group("source")
    source.add_argument(
        "--checkpoint",
        type=Path,
        help=f"checkpoint to read (default: the newest complete one under {RUNS}/)",
    )
    source.add_argument(
        "--inspect",
        action="store_true",
        help="print what the checkpoint holds (nothing in it is executed) and stop",
    )
    export = p.add_argument_group("export directory (the default action)")
    export.add_argument(
        "--out", type=Path, help=f"directory to write (default: {EXPORTS}/<run>-iter<N>/)"
    )
    export.add_argument("--force", action="store_true", help="replace an existing --out")
    export.add_argument(
        "--onnx",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="write and check model.onnx (default: on)",
    )
    export.add_argument(
        "--input-size",
        type=int,
        nargs=2,
        metavar=("H", "W"),
        help="the graph's crop, a multiple of the patch size (default: the training crop)",
    )
    export.add_argument(
        "--max-batch", type=int, default=8, help="largest batch of the graph (default: 8)"
    )
    engine = p.add_argument_group("TensorRT (on a machine with a CUDA GPU and tensorrt)")
    engine.add_argument("--trt", action="store_true", help="also build a TensorRT engine")
    engine.add_argument(
        "--precision",
        choices=("fp32", "fp16", "bf16"),
        default="fp16",
        help="engine precision, and its ONNX variant (default: fp16)",
    )
    engine.add_argument(
        "--from-export",
        type=Path,
        metavar="DIR",
        help="build the engine into this existing export directory (with --trt)",
    )
    mmseg = p.add_argument_group("mmseg 1.x layout")
    mmseg.add_argument(
        "--mmseg",
        type=Path,
        metavar="OUT.pth",
        help="write the model there: the RecycleLoRA authors' layout, or SoMA's for a SoMA model "
        "(with the EMA section, training weights, of a training checkpoint that has one)",
    )
    mmseg.add_argument(
        "--merged",
        action="store_true",
        help="fold the adapters in (plain DINOv2 keys) instead of the authors' adapter keys",
    )
    return p


def _checkpoint(arg: Path | None) -> Path:
    if arg is not None:
        return arg
    found = newest_checkpoint(RUNS)
    if found is None:
        raise FileNotFoundError(f"no checkpoint under {RUNS}/; pass --checkpoint PATH")
    iteration, path = found
    print(f"checkpoint: {path} (iteration {iteration})")
    return path


def check_images(height: int, width: int, n: int = CHECK_IMAGES) -> np.ndarray:
    """(n, 3, H, W) float32 street scenes of the demo generator, both domains: the checks'
    inputs (real-looking colours, edges and textures rather than noise)."""
    from ..data.synthetic import render_scene, stylize

    rng = np.random.default_rng(0)
    frames = [
        stylize(render_scene(rng, height, width), rng, ("synthetic", "real")[i % 2])
        for i in range(n)
    ]
    return np.stack(frames).transpose(0, 3, 1, 2).astype(np.float32)


def _eval_scale(loaded: LoadedModel) -> tuple[int, int]:
    """The targets' common (long, short) rescale bound, else Cityscapes' (docs/method.md §4)."""
    from ..data.transforms import EVAL_SCALES
    from ..recipes import DATASET_DIRS

    if loaded.recipe is None:
        return DEFAULT_EVAL_SCALE
    scales = {EVAL_SCALES.get(DATASET_DIRS[t]) for t in loaded.recipe.data.targets}
    return scales.pop() if len(scales) == 1 and None not in scales else DEFAULT_EVAL_SCALE


def _geometry(loaded: LoadedModel, input_size: list[int] | None):
    """(input size, crop, stride): the training crop by default; the recipe's evaluation stride
    where its crop is the graph's, else two thirds of the crop (mmseg's 341 for 512)."""
    model = loaded.model
    if input_size is None:
        crop = loaded.recipe.data.crop if loaded.recipe is not None else None
        size = (crop, crop) if crop else tuple(int(s) for s in model.backbone.img_size)
    else:
        size = (int(input_size[0]), int(input_size[1]))
    ev = loaded.recipe.eval if loaded.recipe is not None else None
    if ev is not None and size == (ev.crop, ev.crop):
        stride = (ev.stride, ev.stride)
    else:
        stride = (max(2 * size[0] // 3, 1), max(2 * size[1] // 3, 1))
    return size, size, stride


def default_out(loaded: LoadedModel) -> Path:
    """``exports/<run>-iter<N>``: the run folder (relative to runs/, joined by '-') of a
    training checkpoint, the file's stem for other kinds."""
    path = Path(loaded.source)
    name = path.stem
    if loaded.kind == "training" and path.parent.name == "checkpoints":
        run = path.parent.parent.resolve()
        try:
            name = "-".join(run.relative_to(RUNS.resolve()).parts) or run.name
        except ValueError:
            name = run.name
    return EXPORTS / (name if loaded.iteration is None else f"{name}-iter{loaded.iteration}")


def _tensorrt_missing() -> str | None:
    """Why this machine cannot build an engine, or None."""
    from ..deploy.tensorrt import trt_available

    ok, why = trt_available()
    return None if ok else why


def _no_engine_message(out: Path, manifest: Manifest, precision: str, why: str) -> str:
    from ..deploy.tensorrt import onnx_for, profile_batches, trtexec_command

    again = shlex.join(
        [
            "python",
            "export/merge_and_export.py",
            "--from-export",
            str(out),
            "--trt",
            "--precision",
            precision,
        ]
    )
    opt, top = profile_batches(manifest.max_batch)
    trtexec = trtexec_command(
        out,
        precision,
        save_as=f"model.trtexec.{precision}.plan",
        input_size=manifest.input_size,
        max_batch=top,
        opt_batch=opt,
    )
    graph = onnx_for(precision)
    held = graph in manifest.artefacts
    variant = "" if held else f", after the line above has written {graph}"
    return (
        f"no TensorRT engine was built: {why}. Everything else is in {out}. On the GPU machine, "
        f"with the directory copied there, run:\n  {again}\nor, for an engine to use outside "
        f"this package (load_export builds and lists its own){variant}:\n  {trtexec}"
    )


def export_checkpoint(
    checkpoint: Path,
    out: Path | None = None,
    *,
    input_size: list[int] | None = None,
    max_batch: int = 8,
    onnx: bool = True,
    force: bool = False,
    engine_precision: str | None = None,
    graph_precision: str | None = None,
) -> Path:
    """Write the export directory of ``checkpoint`` (default :func:`default_out`) and return it:
    the one path from a checkpoint to an export, for this command and the training demo.

    ``engine_precision``: also build a TensorRT engine of that precision (needs a CUDA GPU and
    the tensorrt package here); ``graph_precision``: only write (and check) the fp16 / bf16
    graph such an engine is built from, where no engine can be built.
    """
    from ..data.labels import CLASS_NAMES, palette
    from ..deploy.export import (
        ExportRequest,
        add_engine,
        add_precision_graph,
        check_input_size,
        export_directory,
    )

    start = time.perf_counter()
    loaded = load_model(checkpoint)
    print(f"load: {time.perf_counter() - start:.1f} s, {str(loaded).splitlines()[0]}")
    size, crop, stride = _geometry(loaded, input_size)
    check_input_size(size, int(loaded.model.size_divisor), Path(loaded.source))
    request = ExportRequest(
        out=out if out is not None else default_out(loaded),
        classes=list(CLASS_NAMES),
        palette=palette().tolist(),
        images=check_images(*size),
        input_size=size,
        crop=crop,
        stride=stride,
        eval_scale=_eval_scale(loaded),
        max_batch=max_batch,
        onnx=onnx,
        force=force,
    )
    engine = None
    if engine_precision is not None:

        def engine(directory, manifest, report):
            add_engine(directory, manifest, report, engine_precision, request.images)

    elif graph_precision not in (None, "fp32"):

        def engine(directory, manifest, report):
            add_precision_graph(directory, manifest, report, graph_precision, request.images)

    stage = "engine" if engine_precision is not None else f"ONNX {graph_precision}"
    export_directory(loaded, request, engine=engine, engine_stage=stage)
    return request.out


def _export(args: argparse.Namespace) -> int:
    from ..deploy.manifest import Manifest

    missing = _tensorrt_missing() if args.trt else None
    out = export_checkpoint(
        _checkpoint(args.checkpoint),
        args.out,
        input_size=args.input_size,
        max_batch=args.max_batch,
        onnx=args.onnx,
        force=args.force,
        engine_precision=args.precision if args.trt and missing is None else None,
        graph_precision=args.precision if args.trt and missing is not None else None,
    )
    if missing is not None:
        print(_no_engine_message(out, Manifest.read(out), args.precision, missing), file=sys.stderr)
        return NO_ENGINE
    return 0


def _from_export(args: argparse.Namespace) -> int:
    from ..deploy.export import engine_into_export
    from ..deploy.manifest import Manifest

    manifest = Manifest.read(args.from_export)
    missing = _tensorrt_missing()
    if missing is not None:
        print(
            _no_engine_message(args.from_export, manifest, args.precision, missing),
            file=sys.stderr,
        )
        return NO_ENGINE
    engine_into_export(args.from_export, args.precision, check_images(*manifest.input_size))
    return 0


def _usage_error(args: argparse.Namespace) -> str | None:
    if args.merged and args.mmseg is None:
        return "--merged applies to --mmseg"
    if (args.mmseg is not None or args.inspect) and (args.trt or args.out or args.from_export):
        return "--out, --trt and --from-export apply to the export directory, not --mmseg/--inspect"
    if args.from_export is not None and not args.trt:
        return "--from-export builds a TensorRT engine: add --trt"
    if args.from_export is not None and args.checkpoint is not None:
        return "--from-export takes the weights from the export directory: drop --checkpoint"
    if args.trt and not args.onnx:
        return "--trt builds the engine from model.onnx: drop --no-onnx"
    return None


def main(argv: list[str] | None = None) -> int:
    from ..deploy.tensorrt import EngineBuildError, TensorRTUnavailable

    args = build_parser().parse_args(argv)
    usage = _usage_error(args)
    if usage is not None:
        return fail(usage)
    try:
        if args.from_export is not None:
            return _from_export(args)
        if args.inspect:
            print(inspect_checkpoint(_checkpoint(args.checkpoint)))
            return 0
        if args.mmseg is None:
            return _export(args)
        loaded = load_model(_checkpoint(args.checkpoint))
        print(loaded)
        if is_soma_model(loaded.model) and not args.merged:
            out = export_soma_checkpoint(loaded.model, args.mmseg, ema=loaded.ema)
        else:
            keys = "merged" if args.merged else "recyclelora"
            out = export_mmseg_checkpoint(loaded.model, args.mmseg, adapter_keys=keys)
    except (OSError, ValueError) as e:
        return fail(" ".join(str(e).split()))
    except (EngineBuildError, TensorRTUnavailable) as e:
        where = "" if args.from_export else "; nothing was written"
        return fail(f"{e}{where}", ENGINE_FAILED)  # TensorRT's own lines kept as it wrote them
    print(f"wrote {out}")
    return 0
