import importlib.util
import sys
from pathlib import Path

TRAINING = Path(__file__).resolve().parents[1] / "training"


def _load(name: str, path: Path) -> None:
    """The training/ scripts are not a package: import them under a module name for tests."""
    if name not in sys.modules:
        sys.path.insert(0, str(TRAINING))
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)


_load("training_cli", TRAINING / "train.py")
_load("training_evaluate", TRAINING / "evaluate.py")
