"""host/gradients.py: backprop through modules and tensors made inside inference mode, as every
ComfyUI prompt makes them (DESIGN §0). Pure torch: the module imports no comfy."""
from __future__ import annotations

import pytest
import torch

from stylekit.host.gradients import autograd_enabled, differentiable_copy, thaw_parameters_, thawed


def _frozen_net_made_in_inference_mode() -> torch.nn.Module:
    torch.manual_seed(0)
    with torch.inference_mode():
        net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.GELU(), torch.nn.LayerNorm(8), torch.nn.Linear(8, 3))
        net.register_buffer("offset", torch.ones(3))
    net.requires_grad_(False)
    return net


def _grad_of_input(net: torch.nn.Module) -> torch.Tensor:
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    (net(x) + net.offset).square().sum().backward()
    return x.grad


def test_autograd_enabled_leaves_inference_mode_and_turns_grad_on():
    with torch.inference_mode(), torch.no_grad():
        with autograd_enabled():
            assert not torch.is_inference_mode_enabled() and torch.is_grad_enabled()
        assert torch.is_inference_mode_enabled()


def test_backprop_through_an_inference_mode_module_fails_until_its_parameters_are_thawed():
    net = _frozen_net_made_in_inference_mode()
    with torch.inference_mode(), autograd_enabled():
        with pytest.raises(RuntimeError, match="Inference tensors cannot be saved for backward"):
            _grad_of_input(net)
        before = {k: v.clone() for k, v in net.state_dict().items()}
        assert thaw_parameters_(net) == 7  # 2 x (weight, bias), LayerNorm weight and bias, the buffer
        grad = _grad_of_input(net)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert not any(p.is_inference() for p in net.parameters()) and not net.offset.is_inference()
    assert not any(p.requires_grad for p in net.parameters())


def test_thawing_twice_replaces_nothing_the_second_time():
    net = _frozen_net_made_in_inference_mode()
    thaw_parameters_(net)
    ids = [id(p) for p in net.parameters()]
    assert thaw_parameters_(net) == 0 and ids == [id(p) for p in net.parameters()]


def test_thawed_clones_inference_tensors_inside_a_conditioning_and_leaves_the_rest():
    normal = torch.ones(2)
    with torch.inference_mode():
        cond, pooled = torch.randn(1, 77, 8), torch.randn(1, 8)
    conditioning = [[cond, {"pooled_output": pooled, "width": 64, "tags": ("a", normal)}]]
    out = thawed(conditioning)
    assert not out[0][0].is_inference() and torch.equal(out[0][0], cond)
    assert not out[0][1]["pooled_output"].is_inference()
    assert out[0][1]["width"] == 64 and out[0][1]["tags"][1] is normal and isinstance(out[0][1]["tags"], tuple)
    assert conditioning[0][0] is cond and cond.is_inference()  # the input is not modified


def test_differentiable_copy_is_a_frozen_cast_twin_and_leaves_the_original_alone():
    net = _frozen_net_made_in_inference_mode()
    with torch.inference_mode():
        twin = differentiable_copy(net, dtype=torch.float64)
        with autograd_enabled():
            x = torch.randn(4, 6, dtype=torch.float64).requires_grad_(True)
            twin(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert all(p.is_inference() for p in net.parameters())
    assert all(p.dtype == torch.float64 and not p.requires_grad for p in twin.parameters())
    assert not twin.training
    assert torch.allclose(twin[0].weight, net[0].weight.double())
