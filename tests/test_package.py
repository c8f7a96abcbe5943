"""Package structure: what importing a part of the library pulls in."""

from __future__ import annotations

import subprocess
import sys

import recyclelora


def _modules_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print(' '.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def test_the_deployment_package_imports_without_torch():
    """A serving image for a robot carries only its backend: deploy needs no torch to import."""
    loaded = _modules_after("import recyclelora.deploy")
    assert "recyclelora.deploy" in loaded
    assert not {"torch", "onnx", "onnxruntime", "tensorrt"} & loaded


def test_the_serving_parts_import_without_torch():
    """The HTTP front decodes and encodes frames: no model framework in its process."""
    modules = "drain, errors, guards, images, remote, render, settings"
    loaded = _modules_after(f"from recyclelora.serving import {modules}")
    assert "recyclelora.serving.images" in loaded
    assert not {"torch", "onnx", "onnxruntime", "tensorrt", "bentoml"} & loaded


def test_public_names_resolve_lazily_and_completely():
    for name in recyclelora.__all__:
        assert getattr(recyclelora, name) is not None
    assert "torch" in _modules_after("from recyclelora import build_model")
    try:
        recyclelora.no_such_name  # noqa: B018
    except AttributeError as e:
        assert "no_such_name" in str(e)
    else:
        raise AssertionError("an unknown attribute must raise AttributeError")
