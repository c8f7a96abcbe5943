"""RecycleLoRALinear's forward: one fused adapter branch; a merged weight that never goes stale."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from recyclelora import RecycleLoRAConfig, RecycleLoRALinear
from recyclelora.adapters.init import rrqr_factors


def trained_layer(main: int = 6, sub: int = 3, dtype: torch.dtype = torch.float32, seed: int = 0):
    """An RRQR-initialised layer whose adapters have moved away from their initial values."""
    torch.manual_seed(seed)
    lin = nn.Linear(24, 40).to(dtype)
    layer = RecycleLoRALinear.from_linear(lin, RecycleLoRAConfig(main, sub))
    with torch.no_grad():
        for _, b, a in layer.adapter_pairs():
            b.add_(torch.randn_like(b) * 0.3)
            a.add_(torch.randn_like(a) * 0.3)
    return layer


def two_branch(x, w, bias, pairs, s):
    """The paper's eq. 6 written out: a residual plus one low-rank branch per adapter."""
    y = x @ w.T + bias
    for b, a in pairs:
        y = y + s * (x @ a.T) @ b.T
    return y


# ------------------------------------------------------------------------------ one branch


@pytest.mark.parametrize(("main", "sub"), [(6, 3), (6, 0), (0, 3)])
def test_fused_branch_equals_two_branches_with_gradients(main, sub):
    layer = trained_layer(main, sub, torch.float64)
    x = torch.randn(5, 7, 24, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    g = torch.randn_like(y)
    params = [t for _, b, a in layer.adapter_pairs() for t in (b, a)]
    names = ["x"] + [f"{n}_{p}" for n, _, _ in layer.adapter_pairs() for p in "BA"]
    got = torch.autograd.grad(y, [x, *params], g)

    leaves = [p.detach().clone().requires_grad_() for p in params]
    x2 = x.detach().clone().requires_grad_()
    pairs = list(zip(leaves[::2], leaves[1::2], strict=True))
    y2 = two_branch(x2, layer.weight, layer.bias, pairs, layer.scaling)
    expected = torch.autograd.grad(y2, [x2, *leaves], g)

    torch.testing.assert_close(y, y2, rtol=1e-12, atol=1e-12)
    for name, a, b in zip(names, got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)


class CountLinear(torch.overrides.TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls += func is F.linear
        return func(*args, **(kwargs or {}))


def test_both_adapters_run_as_one_branch():
    """Residual, down-projection, up-projection: 3 linears per layer, not 1 + 2 per adapter."""
    layer = trained_layer(6, 3)
    with CountLinear() as count:
        layer(torch.randn(2, 24))
    assert count.calls == 3
    # the parameters stay separate: they train at different learning rates
    assert {n for n, p in layer.named_parameters() if p.requires_grad} == {
        "lora_main_A",
        "lora_main_B",
        "lora_sub_A",
        "lora_sub_B",
    }


# ------------------------------------------------------------------------------ merged weight


def unmerged_output(layer: RecycleLoRALinear, x: torch.Tensor) -> torch.Tensor:
    """The adapted output computed from the layer's current tensors, in float64."""
    pairs = [(b.double(), a.double()) for _, b, a in layer.adapter_pairs()]
    y = two_branch(x.double(), layer.weight.double(), layer.bias.double(), pairs, layer.scaling)
    return y.to(layer.weight.dtype)


def assert_serves_current_tensors(layer: RecycleLoRALinear, x: torch.Tensor) -> None:
    assert layer.is_merged
    with torch.no_grad():
        torch.testing.assert_close(layer(x), unmerged_output(layer, x), rtol=1e-6, atol=1e-6)


def test_merged_weight_follows_load_state_dict():
    layer, other = trained_layer(seed=0), trained_layer(seed=1)
    x = torch.randn(4, 24)
    layer.merge()
    layer(x)
    layer.load_state_dict(other.state_dict())
    assert layer.merged_weight is None  # freed at once, not held until the next forward
    assert_serves_current_tensors(layer, x)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), other(x), rtol=1e-5, atol=1e-5)


def test_merged_weight_follows_optimizer_steps():
    layer = trained_layer()
    x = torch.randn(4, 24)
    opt = torch.optim.AdamW(layer.parameters(), lr=0.1)
    layer.merge()
    before = layer(x).detach()
    for p in layer.parameters():
        if p.requires_grad:
            p.grad = torch.randn_like(p)
    opt.step()
    assert (layer(x) - before).abs().max() > 1e-2
    assert_serves_current_tensors(layer, x)


def test_merged_weight_follows_reset_replacement_and_conversion():
    torch.manual_seed(0)
    lin = nn.Linear(24, 40)
    layer = trained_layer()
    x = torch.randn(4, 24)
    layer.merge()
    main, sub = rrqr_factors(lin.weight, 6, 3)
    layer.reset_to_initial(lin.weight, lin.bias, {"main": main, "sub": sub})
    assert_serves_current_tensors(layer, x)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), lin(x), rtol=1e-5, atol=1e-5)

    layer.lora_sub_B = nn.Parameter(torch.randn(40, 3))  # a new tensor, not an in-place update
    assert_serves_current_tensors(layer, x)

    layer.to(torch.float64)  # rebuilt from float64 tensors, not the float32 cache converted
    with torch.no_grad():
        y = layer(x.double())
    torch.testing.assert_close(y, unmerged_output(layer, x), rtol=1e-13, atol=1e-13)


def test_merged_weight_is_reused_while_nothing_changes():
    layer = trained_layer()
    layer.merge()
    cached = layer.merged_weight
    with torch.no_grad():
        layer(torch.randn(2, 24))
        layer(torch.randn(2, 24))
    assert layer.merged_weight is cached


def test_merge_survives_load_and_unmerge_is_exact():
    layer, other = trained_layer(seed=0), trained_layer(seed=1)
    layer.merge()
    layer.load_state_dict(other.state_dict())
    assert layer.is_merged  # loading weights does not leave merged mode
    layer.unmerge()
    assert layer.is_merged is False and layer.merged_weight is None
    x = torch.randn(3, 24)
    assert torch.equal(layer(x), other(x))


def test_backward_through_merged_layer_is_refused():
    layer = trained_layer()
    x = torch.randn(4, 24)
    layer.merge()
    y = layer(x)  # forward under grad mode works: inference without no_grad
    with torch.no_grad():
        assert torch.equal(y, layer(x))
    with pytest.raises(RuntimeError, match=r"(?i)unmerge before training.*unmerge_recyclelora"):
        y.sum().backward()
    layer.unmerge()
    layer(x).sum().backward()
    assert layer.lora_main_A.grad is not None


def test_merged_layer_with_frozen_adapters_gives_input_gradients():
    """Saliency-style gradients with respect to the input need no adapter gradients."""
    layer = trained_layer(dtype=torch.float64)
    layer.requires_grad_(False)
    layer.merge()
    x = torch.randn(4, 24, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(layer(x).sum(), x)
    expected = layer.merged().sum(0).expand(4, -1)
    torch.testing.assert_close(grad, expected, rtol=1e-12, atol=1e-12)


def test_merge_again_refreshes_after_writes_through_data():
    """``.data`` writes escape the staleness check (no version bump): merge() rebuilds anyway."""
    layer = trained_layer()
    x = torch.randn(4, 24)
    layer.merge()
    layer.lora_main_B.data.add_(1.0)
    layer.merge()
    assert_serves_current_tensors(layer, x)
