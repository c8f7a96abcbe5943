"""``recyclelora.load_model``: one loader that tells a training checkpoint from an mmseg-format
file by content, rebuilds the right model, and explains files it cannot read.

References: the model that was saved (its state dict and its outputs), the recipe it was saved
with, and the authors' key layout renamed by hand (``authors_state`` of the mmseg tests).
"""

from __future__ import annotations

import copy
import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from recyclelora import LoadedModel, load_model
from recyclelora.adapters import RecycleLoRAConfig, iter_adapted
from recyclelora.checkpoints import (
    CheckpointError,
    MmsegCheckpointError,
    TrainingCheckpointError,
    export_mmseg_checkpoint,
    load_trained_model,
    save_checkpoint,
)
from recyclelora.models import build_model
from recyclelora.recipes import RECIPES, DataConfig, Recipe, to_dict

from .test_checkpoints_mmseg import CFG, INITIAL, authors_state, write_mmengine_checkpoint

UNSAFE_ADVICE = ("weights_only", "safe_globals", "trust")
CROP = 64


def image() -> torch.Tensor:
    return torch.rand(1, 3, 32, 48, generator=torch.Generator().manual_seed(5)) * 255


def outputs(model) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(image())


def trained_tiny(img_size: int = CROP) -> torch.nn.Module:
    """A tiny adapted model whose adapters and head moved away from their initialisation."""
    torch.manual_seed(0)
    model = build_model("tiny", adapters=CFG, img_size=img_size, progress=False)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.02 * torch.randn(p.shape, generator=g))
    return model.eval()


def tiny_recipe(work: Path) -> Recipe:
    """The syn2real recipe on the tiny preset at a small crop, writing into ``work``."""
    return replace(
        RECIPES["syn2real"],
        model="tiny",
        adapters=CFG,
        backbone_weights="",
        data=DataConfig(crop=CROP, workers=0),
        work_dir=str(work),
    )


def make_run(work: Path) -> tuple[torch.nn.Module, Recipe, Path]:
    """(model, recipe, training checkpoint path) as training/train.py would leave them."""
    recipe = tiny_recipe(work)
    model = trained_tiny()
    state = {
        "iteration": 7,
        "model": model.state_dict(),
        "optimizer": {"state": {}, "param_groups": []},
        "rng": torch.get_rng_state(),
        "recipe": to_dict(recipe),
    }
    return model, recipe, save_checkpoint(state, work / "checkpoints", 7)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("run"))


def assert_same_state(a, b) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_training_checkpoint(run):
    model, recipe, path = run
    loaded = load_model(path)
    assert isinstance(loaded, LoadedModel)
    assert (loaded.kind, loaded.source, loaded.iteration) == ("training", path, 7)
    assert loaded.recipe == recipe and loaded.report is None
    assert not loaded.model.training
    assert_same_state(model, loaded.model)  # A0/B0 included: adapters can be saved alone
    assert torch.equal(outputs(model), outputs(loaded.model))
    assert str(loaded).startswith(f"training checkpoint {path}, iteration 7, recipe syn2real")
    again, again_recipe, iteration = load_trained_model(path)  # the evaluation entry point
    assert iteration == 7 and again_recipe == recipe
    assert torch.equal(outputs(again), outputs(model))


def test_our_mmseg_export_rebuilds_the_model_exactly(run, tmp_path):
    model, _, _ = run
    path = export_mmseg_checkpoint(model, tmp_path / "ours.pth")
    loaded = load_model(path)
    assert (loaded.kind, loaded.iteration, loaded.recipe) == ("mmseg", None, None)
    assert loaded.report.ok and loaded.report.initial_factors == "stored"
    assert loaded.report.notes[0] == "built preset 'tiny', 19 classes, img_size (64, 64)"
    assert_same_state(model, loaded.model)
    assert torch.equal(outputs(model), outputs(loaded.model))
    with pytest.raises(TrainingCheckpointError, match="mmseg checkpoint.*no training recipe"):
        load_trained_model(path)


def test_authors_file_builds_the_preset_its_shapes_say(tmp_path):
    """No meta of ours: preset, classes, image size and ranks from the tensors, alpha from the
    config text, the iteration from mmengine's meta."""
    model = trained_tiny(img_size=96)
    path = tmp_path / "authors_iter_40000.pth"
    write_mmengine_checkpoint(path, authors_state(model))
    loaded = load_model(path)
    assert (loaded.kind, loaded.iteration) == ("mmseg", 40000)
    report = loaded.report
    assert report.initial_factors == "unknown" and report.alpha == 1.0, str(report)
    assert report.notes[0] == "built preset 'tiny', 19 classes, img_size 96"
    assert loaded.model.backbone.img_size == (96, 96)
    layers = dict(iter_adapted(loaded.model))
    assert len(layers) == 16 and all(la.ranks == {"main": 8, "sub": 2} for la in layers.values())
    trained = [k for k in model.state_dict() if not k.endswith(INITIAL)]
    sa, sb = model.state_dict(), loaded.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in trained)
    assert torch.equal(outputs(model), outputs(loaded.model))


def test_alpha_and_merged_files(run, tmp_path):
    model, _, _ = run
    state = authors_state(model)
    write_mmengine_checkpoint(tmp_path / "a.pth", state, cfg_text="r_max = 10\n", config_dict=False)
    loaded = load_model(tmp_path / "a.pth")  # no alpha recorded: the authors' 1.0
    assert any("lora_alpha not recorded" in n for n in loaded.report.notes)
    assert torch.equal(outputs(model), outputs(loaded.model))

    other = copy.deepcopy(model)
    other.backbone.recyclelora_config = RecycleLoRAConfig(8, 2, alpha=2.0)
    path = export_mmseg_checkpoint(other, tmp_path / "alpha2.pth")
    built = load_model(path).model
    assert {la.alpha for _, la in iter_adapted(built)} == {2.0}

    merged = export_mmseg_checkpoint(model, tmp_path / "merged.pth", adapter_keys="merged")
    plain = load_model(merged)
    assert not list(iter_adapted(plain.model)) and plain.report.initial_factors == "n/a"
    assert torch.allclose(outputs(plain.model), outputs(model), atol=1e-4, rtol=1e-4)


def test_what_is_not_a_model_checkpoint(run, tmp_path):
    model, _, _ = run
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_model(tmp_path / "nope.pth")
    with pytest.raises(CheckpointError, match="is a directory; expected a file: a training"):
        load_model(tmp_path)
    torch.save({"epoch": 3, "notes": "hello"}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="not a training checkpoint.*nor .*mmseg"):
        load_model(tmp_path / "other.pth")
    (tmp_path / "text.pth").write_text("hello\n" * 4)
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint"):
        load_model(tmp_path / "text.pth")
    state = authors_state(model)
    state["decode_head.cls_embed.weight"] = torch.zeros(20, 48)  # 48 wide: no preset
    torch.save({"state_dict": state}, tmp_path / "odd.pth")
    with pytest.raises(MmsegCheckpointError, match="match none of the presets"):
        load_model(tmp_path / "odd.pth")


class Payload:
    """Unpickling it would create a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_unreadable_files_say_what_they_are_not(run, tmp_path):
    """A truncated file and a file with a global torch refuses: the messages say what the file
    is not and what to do, and never advise unsafe loading; nothing in the file runs."""
    model, recipe, path = run
    data = path.read_bytes()
    (tmp_path / "iter_8.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as e:
        load_model(tmp_path / "iter_8.pth")
    message = str(e.value)
    assert "iter_8.pth" in message and "truncated" in message
    assert "training checkpoint" in message and "mmseg-format checkpoint" in message
    assert not any(a in message for a in UNSAFE_ADVICE), message

    marker = tmp_path / "pwned"
    state = {"iteration": 9, "model": model.state_dict(), "recipe": to_dict(recipe)}
    torch.save({**state, "hook": Payload(marker)}, tmp_path / "iter_9.pth")
    with pytest.raises(TrainingCheckpointError) as e:
        load_trained_model(tmp_path / "iter_9.pth")
    message = str(e.value)
    assert "system" in message and "another program" in message
    assert not any(a in message for a in UNSAFE_ADVICE), message
    assert not marker.exists()
