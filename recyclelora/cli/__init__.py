"""Command-line entry points: each ``main(argv) -> int`` parses, calls the library and turns
its exceptions into exit codes (2: bad input or configuration, with ``error: ...`` on stderr).

- ``recyclelora-train`` (:mod:`.train`, also ``python training/train.py``)
- ``recyclelora-eval`` (:mod:`.evaluate`, also ``python training/evaluate.py``)
- ``recyclelora-prepare`` (:mod:`.prepare`, also ``python training/prepare_data.py``)
- ``recyclelora-export`` (:mod:`.export`)
"""

from __future__ import annotations

import sys

BAD_INPUT = 2  # exit code of a bad argument, recipe, checkpoint or dataset


def fail(error: BaseException | str, code: int = BAD_INPUT) -> int:
    """Print ``error: <message>`` on stderr and return the exit code."""
    print(f"error: {error}", file=sys.stderr)
    return code
