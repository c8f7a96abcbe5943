"""Fixtures shared across test files."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """(training checkpoint, its export directory, the synthetic data root): a trained-looking
    tiny checkpoint and the export the exporter would make of it (merged weights, the fp32
    graph, model.json) - what `make demo` + export give, small. Treat as read-only."""
    from recyclelora.data.convert import convert
    from recyclelora.data.synthetic import write_demo_datasets

    from .test_deploy_runtime import write_checkpoint, write_export

    root = tmp_path_factory.mktemp("demo_run")
    roots = write_demo_datasets(root / "data", n_source=1, n_target=1, size=(96, 192), seed=3)
    convert("cityscapes", roots["cityscapes"])
    checkpoint = write_checkpoint(root / "run", root / "data")
    return checkpoint, write_export(checkpoint, root / "export"), root / "data"


@pytest.fixture(scope="session")
def demo_export(demo_run):
    return demo_run[1]
