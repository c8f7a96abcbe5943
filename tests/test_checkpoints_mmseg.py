"""mmseg / mmengine checkpoints: safe reading, the authors' key layout, export, initial factors.

Independent references written here: the authors' adapter names and the mmdet 2.x head names
are produced by hand-written renaming tables (not the module's regexes); mmengine objects
(``HistoryBuffer``, ``ConfigDict``) are classes defined in this file under fake module names
that exist only while the checkpoint is written; the malicious pickles are ordinary
``__reduce__`` payloads that would create marker files.
"""

from __future__ import annotations

import contextlib
import copy
import io
import os
import pathlib
import pickle
import struct
import sys
import types
from collections import OrderedDict

import numpy as np
import pytest
import torch

from recyclelora.adapters import (
    RecycleLoRAConfig,
    iter_adapted,
    load_adapters,
    merge_recyclelora,
    save_adapters,
)
from recyclelora.adapters.io import InitialFactorsUnknownError
from recyclelora.adapters.reconstruct import (
    ReconstructionError,
    initial_factors_known,
    reconstruct_initial_factors,
)
from recyclelora.checkpoints import (
    FACTORS_SECTION,
    MmsegCheckpointError,
    StubObject,
    export_mmseg_checkpoint,
    load_mmseg_checkpoint,
    read_mmseg_checkpoint,
    reconstruct_from_base_weights,
)
from recyclelora.cli.export import main
from recyclelora.models import build_model

CFG = RecycleLoRAConfig(8, 2)  # fits the tiny model (64 wide)
# our name -> the authors' RecycleLoRALinear parameter name (docs §2b)
AUTHORS_NAMES = {
    "lora_main_A": "lora_A_main",
    "lora_main_B": "lora_B_main",
    "lora_sub_A": "lora_A_sub",
    "lora_sub_B": "lora_B_sub",
}
INITIAL = ("lora_main_A0", "lora_main_B0", "lora_sub_A0", "lora_sub_B0")


# ------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(trained adapted model, base backbone file in Meta's layout, folder)."""
    folder = tmp_path_factory.mktemp("mmseg")
    torch.manual_seed(0)
    plain = build_model("tiny", adapters=None)
    base = folder / "dinov2_tiny_base.pth"
    torch.save(plain.backbone.state_dict(), base)
    model = build_model("tiny", adapters=CFG, backbone_weights=base, progress=False)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # "training": adapters and head move away from their init
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.02 * torch.randn(p.shape, generator=g))
    model.eval()
    return model, base, folder


@pytest.fixture(scope="module")
def templates():
    """Fresh (untrained, differently initialised) models to load into, deep-copied per test."""
    torch.manual_seed(123)
    return {
        "adapted": build_model("tiny", adapters=CFG, progress=False),
        "plain": build_model("tiny", adapters=None),
        "other_ranks": build_model("tiny", adapters=RecycleLoRAConfig(4, 2), progress=False),
        # no decomposition: the cheap model to load a full checkpoint into
        "uninitialised": build_model("tiny", adapters=CFG, init_adapters=False),
    }


def fresh(templates, kind="adapted"):
    return copy.deepcopy(templates[kind]).eval()


def image() -> torch.Tensor:
    return torch.rand(1, 3, 32, 48, generator=torch.Generator().manual_seed(5)) * 255


def outputs(model) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(image())


def authors_state(model) -> OrderedDict:
    """The model's state in the authors' layout, renamed by hand: no initial factors."""
    out = OrderedDict()
    for key, value in model.state_dict().items():
        layer, _, leaf = key.rpartition(".")
        if leaf in INITIAL:
            continue
        out[f"{layer}.{AUTHORS_NAMES.get(leaf, leaf)}"] = value.clone()
    return out


def to_mmdet2(key: str) -> str:
    """mmdet 3.x head name -> mmdet 2.x / mmcv 1.x BaseTransformerLayer name (docs §5)."""
    parts = key.split(".")
    if key.startswith("decode_head.transformer_decoder.layers."):
        i, table = 4, {"cross_attn": "attentions.0", "self_attn": "attentions.1", "ffn": "ffns.0"}
    elif key.startswith("decode_head.pixel_decoder.encoder.layers."):
        i, table = 5, {"self_attn": "attentions.0", "ffn": "ffns.0"}
    else:
        return key
    parts[i] = table[parts[i]] if parts[i] in table else parts[i]
    return ".".join(parts)


@contextlib.contextmanager
def fake_modules(**modules: types.ModuleType):
    """Register modules in sys.modules only while a checkpoint is being written."""
    saved = {name: sys.modules.get(name) for name in modules}
    sys.modules.update(modules)
    try:
        yield
    finally:
        for name, old in saved.items():
            if old is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = old


def write_mmengine_checkpoint(
    path, state, cfg_text="r_max = 10\nr_main = 8\nlora_alpha = 1.0\n", config_dict=True
):
    """An mmengine-like checkpoint: HistoryBuffer / ConfigDict instances, numpy values."""
    hb_mod = types.ModuleType("mmengine.logging.history_buffer")
    cfg_mod = types.ModuleType("mmengine.config")

    class HistoryBuffer:
        def __init__(self, values):
            self._log_history = np.asarray(values, dtype=np.float64)
            self._count_history = np.ones(len(values), dtype=np.int64)
            self.max_length = 1000000

    class ConfigDict(dict):
        pass

    for cls, mod in ((HistoryBuffer, hb_mod), (ConfigDict, cfg_mod)):
        cls.__module__ = mod.__name__
        cls.__qualname__ = cls.__name__
        setattr(mod, cls.__name__, cls)
    with fake_modules(
        **{
            "mmengine": types.ModuleType("mmengine"),
            "mmengine.logging": types.ModuleType("mmengine.logging"),
            hb_mod.__name__: hb_mod,
            cfg_mod.__name__: cfg_mod,
        }
    ):
        checkpoint = {
            "meta": {
                "cfg": cfg_text,
                "seed": 42,
                "experiment_name": "g2cbm_recyclelora",
                "mmengine_version": "0.10.4",
                "epoch": 0,
                "iter": 40000,
                "dataset_meta": {"classes": tuple(f"c{i}" for i in range(19))},
                "best_miou": np.float64(0.5),
                "histogram": np.arange(6, dtype=np.float32).reshape(2, 3),
            },
            "state_dict": state,
            "message_hub": {
                "log_scalars": OrderedDict(
                    {"train/loss": HistoryBuffer([1.0, 0.5]), "train/lr": HistoryBuffer([1e-4])}
                ),
                "runtime_info": OrderedDict(iter=40000, max_iters=40000, best=np.float32(0.7)),
                "resumed_keys": OrderedDict(iter=True),
            },
            "optimizer": {
                "state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.ones(8, 64)}},
                "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.999), "params": [0]}],
            },
            "param_schedulers": [{"last_step": 40000, "base_values": [1e-4]}],
        }
        if config_dict:
            model_cfg = ConfigDict(backbone=ConfigDict(r_max=10, lora_alpha=1.0))
            checkpoint["meta"]["model_cfg"] = model_cfg
        torch.save(checkpoint, path)
    assert "mmengine" not in sys.modules


def assert_same_state(a, b, keys=None):
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    for k in keys or sa:
        assert torch.equal(sa[k], sb[k]), k


# ------------------------------------------------------------------------------ round trip


def test_round_trip_is_lossless(setup, templates):
    model, _, folder = setup
    path = export_mmseg_checkpoint(model, folder / "ours.pth")
    assert not [p for p in os.listdir(folder) if p.endswith(".tmp")]  # atomic write
    raw = torch.load(path, map_location="cpu", weights_only=True)  # plain python meta
    keys = raw["state_dict"].keys()
    assert "backbone.blocks.0.attn.qkv.lora_A_main" in keys
    assert not any(".lora_main_" in k or k.endswith("0") and ".lora_" in k for k in keys)
    assert raw["meta"]["recyclelora"]["initial_factors"] == "stored"
    assert "lora_alpha = 1.0" in raw["meta"]["cfg"]

    target = fresh(templates, "uninitialised")
    report = load_mmseg_checkpoint(target, path)
    assert report.ok and report.initial_factors == "stored", str(report)
    assert report.ranks == (8, 2) and report.alpha == 1.0
    assert_same_state(model, target)  # every tensor bit-equal, A0/B0 included
    assert torch.equal(outputs(model), outputs(target))
    save_adapters(target.backbone, folder / "ours.safetensors")  # factors known


def test_authors_checkpoint_loads_safely_and_matches(setup, templates):
    model, _, folder = setup
    path = folder / "authors_iter_40000.pth"
    write_mmengine_checkpoint(path, authors_state(model))
    with pytest.raises(Exception, match="(?i)unsupported global|weights_only"):
        torch.load(path, map_location="cpu", weights_only=True)  # the realistic obstacle

    ckpt = read_mmseg_checkpoint(path)
    assert "mmengine" not in sys.modules  # nothing was imported
    assert set(ckpt["sections"]) == {"message_hub", "optimizer", "param_schedulers"}
    for k, v in authors_state(model).items():
        assert torch.equal(ckpt["state_dict"][k], v), k
    meta = ckpt["meta"]
    assert meta["iter"] == 40000 and meta["cfg"].startswith("r_max")
    assert isinstance(meta["best_miou"], StubObject) and "numpy" in meta["best_miou"].stub_class
    assert isinstance(meta["model_cfg"], StubObject)
    assert meta["model_cfg"].stub_class == "mmengine.config.ConfigDict"
    assert "backbone" in meta["model_cfg"].dict_items
    buf = ckpt["sections"]["message_hub"]["log_scalars"]["train/loss"]
    assert buf.stub_class == "mmengine.logging.history_buffer.HistoryBuffer"
    assert "mmengine.logging.history_buffer.HistoryBuffer" in ckpt["stubbed"]
    assert torch.equal(ckpt["sections"]["optimizer"]["state"][0]["exp_avg"], torch.ones(8, 64))

    target = fresh(templates)
    report = load_mmseg_checkpoint(target, path)
    assert report.ok and report.initial_factors == "unknown", str(report)
    assert report.alpha == 1.0 and report.ranks == (8, 2)
    assert {k for k, _ in report.skipped} == {"[message_hub]", "[optimizer]", "[param_schedulers]"}
    assert torch.equal(outputs(model), outputs(target))
    trained = [k for k in model.state_dict() if not k.endswith(INITIAL)]
    assert_same_state(model, target, trained)
    assert not initial_factors_known(target)
    # honest about A0/B0: NaN buffers, refused by save_adapters with a clear message
    layer = target.backbone.blocks[0].attn.qkv
    assert torch.isnan(layer.state_dict()["lora_main_B0"]).all()
    with pytest.raises(InitialFactorsUnknownError, match="initial factors unknown: .*base_weights"):
        save_adapters(target.backbone, folder / "refused.safetensors")
    # re-export without factors, and load again: still unknown, still exact
    again = export_mmseg_checkpoint(target, folder / "reexport.pth")
    assert FACTORS_SECTION not in torch.load(again, weights_only=True)
    target2 = fresh(templates)
    assert load_mmseg_checkpoint(target2, again).initial_factors == "unknown"
    assert torch.equal(outputs(model), outputs(target2))
    target3 = fresh(templates, "uninitialised")
    assert load_mmseg_checkpoint(target3, path).ok
    assert torch.equal(outputs(model), outputs(target3))
    # the forward-equivalent merge still works
    merged = merge_recyclelora(copy.deepcopy(target))
    assert torch.allclose(outputs(merged), outputs(model), atol=1e-4, rtol=1e-4)


def test_load_into_merged_layers_refreshes_the_cache(setup, templates):
    model, _, folder = setup
    path = export_mmseg_checkpoint(model, folder / "for_merged.pth")
    target = fresh(templates)
    merge_recyclelora(target, unload=False)
    load_mmseg_checkpoint(target, path)
    assert all(layer.is_merged for _, layer in iter_adapted(target))
    assert torch.allclose(outputs(target), outputs(model), atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------ safety


class Evil:
    """Unpickling any of these would run code (create a marker file)."""

    def __init__(self, how: str, marker: pathlib.Path):
        self.how, self.marker = how, marker

    def __reduce__(self):
        if self.how == "os.system":
            return os.system, (f"touch {self.marker}",)
        if self.how == "eval":
            return eval, (f"__import__('pathlib').Path({str(self.marker)!r}).touch()",)
        return pathlib.Path.touch, (self.marker,)


@pytest.mark.parametrize("zipfile", [True, False], ids=["zip", "legacy"])
def test_malicious_reduce_does_not_run(setup, tmp_path, zipfile):
    model, _, _ = setup
    markers = {how: tmp_path / f"pwned_{i}" for i, how in enumerate(("os.system", "eval", "touch"))}
    state = authors_state(model)
    checkpoint = {
        "meta": {"payload": [Evil(how, m) for how, m in markers.items()]},
        "state_dict": state,
        "message_hub": Evil("os.system", markers["os.system"]),
    }
    path = tmp_path / "evil.pth"
    torch.save(checkpoint, path, _use_new_zipfile_serialization=zipfile)
    ckpt = read_mmseg_checkpoint(path)
    assert not any(m.exists() for m in markers.values())
    assert all(isinstance(p, StubObject) for p in ckpt["meta"]["payload"])
    assert "posix.system" in ckpt["stubbed"] or "nt.system" in ckpt["stubbed"]
    assert "builtins.eval" in ckpt["stubbed"]
    for k, v in state.items():
        assert torch.equal(ckpt["state_dict"][k], v)

    # the whole file is a payload: clear error, nothing run
    torch.save(Evil("os.system", markers["os.system"]), tmp_path / "evil2.pth")
    with pytest.raises(MmsegCheckpointError, match=r"evil2\.pth.*no 'state_dict'"):
        read_mmseg_checkpoint(tmp_path / "evil2.pth")
    assert not any(m.exists() for m in markers.values())


def test_torch_objects_load_exactly_and_globals_cannot_be_tampered(tmp_path):
    t = torch.arange(4.0)
    t.note = "python attribute"  # pickled through _rebuild_from_type_v2
    state = OrderedDict(
        p=torch.nn.Parameter(torch.ones(2)),
        t=t,
        h=torch.randn(3, 3).to(torch.bfloat16),
        extra={"size": torch.Size([2, 3]), "dtype": torch.float16, "set": {1, 2}, "b": b"xy"},
    )
    torch.save({"state_dict": state}, tmp_path / "objs.pth")
    got = read_mmseg_checkpoint(tmp_path / "objs.pth")
    assert got["stubbed"] == []
    s = got["state_dict"]
    assert isinstance(s["p"], torch.nn.Parameter) and s["p"].requires_grad
    assert torch.equal(s["t"], t) and s["t"].note == "python attribute"
    assert torch.equal(s["h"], state["h"]) and s["h"].dtype == torch.bfloat16
    assert s["extra"] == state["extra"]

    # pickle's BUILD sets attributes on whatever a GLOBAL resolved to: it must not reach torch
    def u(text: str) -> bytes:
        raw = text.encode()
        return pickle.BINUNICODE + struct.pack("<I", len(raw)) + raw

    def tamper(module: str, name: str) -> bytes:  # GLOBAL; BUILD (None, {"pwned": "pwned"}); POP
        state = pickle.NONE + pickle.EMPTY_DICT + u("pwned") + u("pwned") + pickle.SETITEM
        return (
            pickle.GLOBAL
            + f"{module}\n{name}\n".encode()
            + state
            + pickle.TUPLE2
            + (pickle.BUILD + pickle.POP)
        )

    body = (
        pickle.PROTO
        + b"\x02"
        + tamper("torch._utils", "_rebuild_tensor_v2")
        + tamper("torch", "Tensor")
        + pickle.EMPTY_DICT
        + u("state_dict")
        + pickle.EMPTY_DICT
        + pickle.SETITEM
        + pickle.STOP
    )
    f = io.BytesIO()  # torch's legacy container: magic, protocol, sys info, object, storages
    sys_info = {"protocol_version": 1001, "little_endian": True, "type_sizes": {}}
    for obj in (0x1950A86A20F9469CFC6C, 1001, sys_info):
        pickle.dump(obj, f, protocol=2)
    f.write(body)
    pickle.dump([], f, protocol=2)
    (tmp_path / "tamper.pth").write_bytes(f.getvalue())
    read_mmseg_checkpoint(tmp_path / "tamper.pth")
    assert not hasattr(torch._utils._rebuild_tensor_v2, "pwned")
    assert not hasattr(torch.Tensor, "pwned")


def test_forced_weights_only_route(setup, tmp_path, monkeypatch):
    """TORCH_FORCE_WEIGHTS_ONLY_LOAD makes torch refuse custom pickle modules: the fallback
    (weights-only unpickler with stubs registered) must read the same, safely. It cannot fill
    dict subclasses (ConfigDict): a clear error then."""
    if not hasattr(torch.serialization, "get_unsafe_globals_in_checkpoint"):
        pytest.skip("torch without get_unsafe_globals_in_checkpoint")
    model, _, _ = setup
    marker = tmp_path / "pwned"
    path = tmp_path / "ck.pth"
    write_mmengine_checkpoint(path, authors_state(model), config_dict=False)
    write_mmengine_checkpoint(tmp_path / "cfgdict.pth", authors_state(model))
    evil = tmp_path / "evil.pth"
    torch.save({"meta": {"x": Evil("os.system", marker)}, "state_dict": authors_state(model)}, evil)
    monkeypatch.setenv("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "1")
    ckpt = read_mmseg_checkpoint(path)
    buf = ckpt["sections"]["message_hub"]["log_scalars"]["train/loss"]
    assert buf.stub_class == "mmengine.logging.history_buffer.HistoryBuffer"
    try:  # torch blocks modules like os/posix outright: a clear refusal is fine too
        assert isinstance(read_mmseg_checkpoint(evil)["meta"]["x"], StubObject)
    except MmsegCheckpointError as e:
        assert "evil.pth" in str(e) and "system" in str(e)
    assert not marker.exists()
    with pytest.raises(MmsegCheckpointError, match="TORCH_FORCE_WEIGHTS_ONLY_LOAD.*unset it"):
        read_mmseg_checkpoint(tmp_path / "cfgdict.pth")


def test_unreadable_files_name_the_file(setup, tmp_path):
    model, _, folder = setup
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        read_mmseg_checkpoint(tmp_path / "nope.pth")
    good = export_mmseg_checkpoint(model, tmp_path / "good.pth")
    data = good.read_bytes()
    for name, blob in (("trunc.pth", data[: len(data) // 2]), ("text.pth", b"hello world\n" * 4)):
        (tmp_path / name).write_bytes(blob)
        with pytest.raises(MmsegCheckpointError, match=name.replace(".", r"\.")):
            read_mmseg_checkpoint(tmp_path / name)
    buf = io.BytesIO()
    torch.save({"meta": {"a": 1}, "optimizer": {}}, buf)
    (tmp_path / "nostate.pth").write_bytes(buf.getvalue())
    with pytest.raises(MmsegCheckpointError, match=r"nostate\.pth.*no 'state_dict'"):
        read_mmseg_checkpoint(tmp_path / "nostate.pth")
    # a bare state dict is accepted
    torch.save(authors_state(model), tmp_path / "bare.pth")
    assert "bare state dict" in read_mmseg_checkpoint(tmp_path / "bare.pth")["container"]


# ------------------------------------------------------------------------------ key map


def test_mmdet2_head_names_and_known_ignorable_keys(setup, templates, tmp_path):
    model, _, _ = setup
    state = OrderedDict((f"module.{to_mmdet2(k)}", v) for k, v in authors_state(model).items())
    assert (
        "module.decode_head.transformer_decoder.layers.0.attentions.0.attn.in_proj_weight" in state
    )
    assert "module.decode_head.pixel_decoder.encoder.layers.0.ffns.0.layers.0.0.weight" in state
    state["module.decode_head.conv_seg.weight"] = torch.zeros(19, 64, 1, 1)
    state["module.decode_head.conv_seg.bias"] = torch.zeros(19)
    state["module.data_preprocessor.mean"] = torch.zeros(3)
    state["module.backbone.reins.scale"] = torch.tensor(1e-3)
    path = tmp_path / "mmdet2.pth"
    torch.save({"meta": {"mmcv_version": "1.7.0"}, "state_dict": state}, path)
    target = fresh(templates)
    report = load_mmseg_checkpoint(target, path)
    assert report.ok and "mmdet 2.x head names" in report.format
    skipped = dict(report.skipped)
    assert set(skipped) == {
        "decode_head.conv_seg.weight",
        "decode_head.conv_seg.bias",
        "data_preprocessor.mean",
        "backbone.reins.scale",
    }
    assert "unused" in skipped["decode_head.conv_seg.weight"]
    assert "Rein" in skipped["backbone.reins.scale"]
    assert any("mmdet 2.x" in how for _, _, how in report.renamed)
    assert torch.equal(outputs(target), outputs(model))


def test_unexpected_and_missing_keys(setup, templates, tmp_path):
    model, _, _ = setup
    state = authors_state(model)
    state["decode_head.extra_proj.weight"] = torch.zeros(3)
    del state["decode_head.query_feat.weight"]
    path = tmp_path / "odd.pth"
    torch.save({"state_dict": state}, path)
    target = fresh(templates)
    before = target.state_dict()["decode_head.cls_embed.weight"].clone()
    with pytest.raises(MmsegCheckpointError, match="extra_proj.*strict=False|query_feat"):
        load_mmseg_checkpoint(target, path)
    assert torch.equal(target.state_dict()["decode_head.cls_embed.weight"], before)  # untouched
    report = load_mmseg_checkpoint(target, path, strict=False)
    assert report.unexpected == ["decode_head.extra_proj.weight"]
    assert report.missing == ["decode_head.query_feat.weight"]
    assert "unexpected (1)" in str(report)


def test_rank_and_structure_mismatch_errors(setup, templates, tmp_path):
    model, _, _ = setup
    path = tmp_path / "authors.pth"
    torch.save({"meta": {}, "state_dict": authors_state(model)}, path)
    hint = r"r_main=8, r_sub=2.*RecycleLoRAConfig\(8, 2\)"
    with pytest.raises(MmsegCheckpointError, match=hint):
        load_mmseg_checkpoint(fresh(templates, "other_ranks"), path)
    with pytest.raises(
        MmsegCheckpointError, match="model has none.*" + r"RecycleLoRAConfig\(8, 2\)"
    ):
        load_mmseg_checkpoint(fresh(templates, "plain"), path)
    with pytest.raises(MmsegCheckpointError, match="lora_alpha = 2.*alpha=2"):
        cfg_path = tmp_path / "alpha2.pth"
        torch.save(
            {"meta": {"cfg": "r_max = 10\nlora_alpha = 2.0\n"}, "state_dict": authors_state(model)},
            cfg_path,
        )
        load_mmseg_checkpoint(fresh(templates), cfg_path)
    # alpha inside a ConfigDict (read as a stub) is found too
    cfg_mod = types.ModuleType("mmengine.config")

    class ConfigDict(dict):
        pass

    ConfigDict.__module__, ConfigDict.__qualname__ = cfg_mod.__name__, "ConfigDict"
    cfg_mod.ConfigDict = ConfigDict
    cfg = ConfigDict(model=ConfigDict(backbone=ConfigDict(r_max=10, lora_alpha=0.5)))
    with fake_modules(mmengine=types.ModuleType("mmengine"), **{cfg_mod.__name__: cfg_mod}):
        torch.save({"meta": {"cfg": cfg}, "state_dict": authors_state(model)}, tmp_path / "c.pth")
    with pytest.raises(MmsegCheckpointError, match=r"lora_alpha = 0.5 in meta\['cfg'\] \(Config"):
        load_mmseg_checkpoint(fresh(templates), tmp_path / "c.pth")
    soma = {"backbone.model.blocks.8.attn.q.lora_A.weight": torch.zeros(16, 64)}
    torch.save({"state_dict": soma}, tmp_path / "soma.pth")
    with pytest.raises(MmsegCheckpointError, match="is a SoMA checkpoint.*load_soma_checkpoint"):
        load_mmseg_checkpoint(fresh(templates), tmp_path / "soma.pth")


def test_plain_and_merged_backbones(setup, templates, tmp_path):
    model, base, _ = setup
    merged_path = export_mmseg_checkpoint(model, tmp_path / "merged.pth", adapter_keys="merged")
    keys = torch.load(merged_path, weights_only=True)["state_dict"].keys()
    assert not any(".lora_" in k for k in keys)
    plain = fresh(templates, "plain")
    report = load_mmseg_checkpoint(plain, merged_path)
    assert report.ok and report.initial_factors == "n/a"
    assert torch.allclose(outputs(plain), outputs(model), atol=1e-4, rtol=1e-4)
    with pytest.raises(MmsegCheckpointError, match=r"plain .*adapters=None"):
        load_mmseg_checkpoint(fresh(templates), merged_path)
    # an un-adapted model exports plain keys and round-trips exactly
    path = export_mmseg_checkpoint(plain, tmp_path / "plain.pth")
    again = fresh(templates, "plain")
    load_mmseg_checkpoint(again, path)
    assert_same_state(plain, again)


# ------------------------------------------------------------------------------ initial factors


def test_base_weights_reconstruct_initial_factors(setup, templates, tmp_path):
    model, base, _ = setup
    path = tmp_path / "authors.pth"
    write_mmengine_checkpoint(path, authors_state(model))
    target = fresh(templates)
    report = load_mmseg_checkpoint(target, path, base_weights=base)
    assert report.initial_factors == "reconstructed", str(report)
    assert any("16 exactly" in n for n in report.notes), report.notes
    assert_same_state(model, target)  # A0/B0 bit-exact
    assert initial_factors_known(target)
    adapters = tmp_path / "adapters.safetensors"
    save_adapters(target.backbone, adapters)
    # the adapter file re-attaches to the base backbone and reproduces the model
    rebuilt = fresh(templates, "plain")
    rebuilt.backbone.load_state_dict(torch.load(base, weights_only=True))
    rebuilt.decode_head.load_state_dict(model.decode_head.state_dict())
    load_adapters(rebuilt.backbone, adapters)
    assert torch.equal(outputs(rebuilt), outputs(model))

    # the same after the fact, on a model loaded without base_weights
    later = fresh(templates)
    load_mmseg_checkpoint(later, path)
    notes = reconstruct_from_base_weights(later, base)
    assert "16 exactly" in notes[0]
    assert_same_state(model, later)


def test_reconstruction_from_a_foreign_residual(setup, templates, tmp_path):
    """Factors from another QR implementation (B0 off by ~1e-7): pivots and assignment from our
    RRQR, B0 from the residual, within 1e-6 of the factors that made it."""
    model, base, _ = setup
    state = authors_state(model)
    g = torch.Generator().manual_seed(3)
    true_b0 = {}
    for name, layer in iter_adapted(model):
        s = layer.scaling
        w0 = (
            layer.weight.double()
            + s * sum(b.double() @ a.double() for _, b, a in layer.adapter_pairs(initial=True))
        ).float()
        delta = torch.zeros_like(w0, dtype=torch.float64)
        for adapter, b0, a0 in layer.adapter_pairs(initial=True):
            b0 = b0 + 1e-7 * torch.randn(b0.shape, generator=g)
            true_b0[f"{name}.lora_{adapter}_B0"] = b0
            delta += b0.double() @ a0.double()
        state[f"{name}.weight"] = (w0.double() - s * delta).float()
    path = tmp_path / "foreign.pth"
    torch.save({"state_dict": state}, path)
    target = fresh(templates)
    report = load_mmseg_checkpoint(target, path, base_weights=base)
    assert report.initial_factors == "reconstructed"
    assert any("from the residual" in n for n in report.notes)
    sd, ref = target.state_dict(), model.state_dict()
    for key, b0 in true_b0.items():
        assert (sd[key] - b0).abs().max() < 1e-6, key
        a0 = key.replace("_B0", "_A0")
        assert torch.equal(sd[a0], ref[a0])


def test_wrong_base_weights_are_refused(setup, templates, tmp_path):
    model, _, _ = setup
    path = tmp_path / "authors.pth"
    torch.save({"state_dict": authors_state(model)}, path)
    torch.manual_seed(99)
    other = tmp_path / "other_base.pth"
    torch.save(build_model("tiny", adapters=None).backbone.state_dict(), other)
    target = fresh(templates)
    with pytest.raises(MmsegCheckpointError, match="bias differs|non-zero columns"):
        load_mmseg_checkpoint(target, path, base_weights=other)


def test_inspect_cli(setup, tmp_path, capsys):
    model, _, _ = setup
    path = tmp_path / "ck.pth"
    write_mmengine_checkpoint(path, authors_state(model))
    assert main(["--inspect", "--checkpoint", str(path)]) == 0
    out = capsys.readouterr().out
    assert "RecycleLoRA adapters on 16 layers, (r_main, r_sub) [(8, 2)]" in out
    assert "lora_alpha = 1" in out and "HistoryBuffer" in out


def test_reconstruction_changes_nothing_unless_every_layer_agrees(setup):
    """The adapter-level reconstruction on tensors (no file): one layer whose W0 is not the one
    its residual came from stops it before any layer is touched."""
    model, base, _ = setup
    target = copy.deepcopy(model)
    for _, layer in iter_adapted(target):
        layer.forget_initial_factors()
    w0 = torch.load(base, weights_only=True)
    names = [n for n, _ in iter_adapted(target)]
    mapping = {n: (w0[f"{n[9:]}.weight"], w0[f"{n[9:]}.bias"]) for n in names}
    wrong = dict(mapping)
    last = names[-1]
    wrong[last] = (mapping[last][0] + 1e-3, mapping[last][1])
    with pytest.raises(ReconstructionError, match=last.replace(".", r"\.")):
        reconstruct_initial_factors(target, wrong)
    assert not any(layer.initial_factors_known for _, layer in iter_adapted(target))
    notes = reconstruct_initial_factors(target, mapping, source="the test's base")
    assert len(notes) == 1 and notes[0].startswith(
        f"initial factors reconstructed from the test's base for {len(names)} layers: "
        f"{len(names)} exactly"
    )
    assert_same_state(model, target)
