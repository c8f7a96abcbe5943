"""``recyclelora-export``: convert a checkpoint, or say what it holds.

    recyclelora-export --mmseg OUT.pth                  # newest checkpoint under runs/
    recyclelora-export --checkpoint iter_40000.pth --mmseg OUT.pth --merged
    recyclelora-export --checkpoint g2cbm_iter_40000.pth --inspect

``--checkpoint`` is anything :func:`recyclelora.load_model` opens: a training checkpoint, or an
mmseg-format file (the authors' release, or ours). ``--mmseg`` writes the model in the authors'
mmseg 1.x layout (``--merged``: adapters folded in, plain DINOv2 keys).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..checkpoints import export_mmseg_checkpoint, inspect_checkpoint, load_model
from ..checkpoints.training import newest_checkpoint
from . import fail

RUNS = Path("runs")


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
    mmseg = p.add_argument_group("mmseg 1.x layout")
    mmseg.add_argument("--mmseg", type=Path, metavar="OUT.pth", help="write the model there")
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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.inspect and args.mmseg is None:
        return fail("nothing to do: pass --mmseg OUT.pth or --inspect")
    if args.merged and args.mmseg is None:
        return fail("--merged applies to --mmseg")
    try:
        path = _checkpoint(args.checkpoint)
        if args.inspect:
            print(inspect_checkpoint(path))
            return 0
        loaded = load_model(path)
        print(loaded)
        out = export_mmseg_checkpoint(
            loaded.model, args.mmseg, adapter_keys="merged" if args.merged else "recyclelora"
        )
    except (OSError, ValueError) as e:
        return fail(str(e).splitlines()[0])
    print(f"wrote {out}")
    return 0
