"""Sparse binary programming against a loop transcription of its algorithm
(tests/methods/oracles/sparse_binary.py) on a plain (small_cnn), a residual (cifar_resnet20)
and a depthwise network (cifar_mobilenet_v2), every layer masked as the method prepares them.

Compared: every layer's exactly-k projection (on relaxed masks with many entries clipped to 0
and 1, so ties are exercised), the penalty's gradient added by the method's own
``on_after_backward`` at several epochs (and that it is the gradient of ``(rho/2)||m - z||^2``),
the clipping in ``on_step_end``, and the straight-through gradient of the loss to ``m``.
"""

from __future__ import annotations

import os
import random
import sys

import pytest
import torch

from we_dist.methods.base import FitContext
from we_dist.methods.masked import MaskedConv2d, MaskedLinear
from we_dist.methods.sparse_binary import SparseBinaryMethod, SparseBinarySettings
from we_dist.models import create_model

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from oracles import sparse_binary as oracle  # noqa: E402

NETWORKS = ["small_cnn", "cifar_resnet20", "cifar_mobilenet_v2"]
SETTINGS = SparseBinarySettings(density=0.3, rho=1e-3, rho_final=0.5)


def _layers(model):
    # Found by the attribute the method's layers carry, not by the project's helpers.
    return [(n, m) for n, m in model.named_modules() if isinstance(getattr(m, "scores", None), torch.nn.Parameter)]


@pytest.fixture(scope="module", params=NETWORKS)
def prepared(request):
    """(name, method, model) with relaxed masks ``clamp(0.5 + 0.6 N(0, 1), 0, 1)``: about 20%
    of entries sit exactly on 0 or 1 (ties the projection must break the stated way)."""
    torch.manual_seed(1)
    method = SparseBinaryMethod(SETTINGS, seed=2)
    model = method.prepare_model(create_model(request.param, 10), None)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, layer in _layers(model):
            layer.scores.copy_((0.5 + 0.6 * torch.randn(layer.scores.shape, generator=g)).clamp(0, 1))
    return request.param, method, model


def test_every_layer_is_masked_as_the_card_says(prepared):
    name, _, model = prepared
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    layers = [m for _, m in _layers(model)]
    assert len(layers) == len(convs) + len(linears)          # mask_first_conv, mask_classifier: true
    if name == "cifar_mobilenet_v2":
        assert any(m.groups > 1 for m in convs)              # the depthwise convs are masked too


def test_the_projection_is_the_oracles_in_every_layer(prepared):
    name, _, model = prepared
    ties = 0
    for lname, layer in _layers(model):
        m = layer.scores.detach().reshape(-1).double().tolist()
        k = oracle.kept(len(m), SETTINGS.density)
        z = oracle.projection(m, k)
        ours = layer.mask().reshape(-1).tolist()
        assert ours == z, (name, lname)
        assert sum(ours) == k
        ties += sum(1 for v in m if v in (0.0, 1.0))
    assert ties > 1000                                       # the tie rule was exercised


def test_the_oracles_projection_is_the_nearest_point_by_enumeration():
    rng = random.Random(4)
    for n in range(1, 9):
        for _ in range(6):
            m = [min(1.0, max(0.0, rng.gauss(0.5, 0.5))) for _ in range(n)]
            for k in range(1, n + 1):
                best, _ = oracle.brute_projection(m, k)
                z = oracle.projection(m, k)
                assert abs(sum((a - b) ** 2 for a, b in zip(m, z)) - best) < 1e-12
                density = k / n
                if oracle.kept(n, density) == k:              # the project's count reaches k here
                    layer = MaskedLinear(n, 1, density=density, by_abs=False)
                    with torch.no_grad():
                        layer.scores.copy_(torch.tensor([m], dtype=torch.float64).float())
                    ours_z = layer.mask().reshape(-1).tolist()
                    # float32 storage can merge two float64 values; compare the distance.
                    mf = layer.scores.detach().reshape(-1).double().tolist()
                    assert abs(sum((a - b) ** 2 for a, b in zip(mf, ours_z))
                               - oracle.brute_projection(mf, k)[0]) < 1e-12


@pytest.mark.parametrize("epoch", [0, 3, 7])
def test_the_penalty_gradient_is_the_oracles(prepared, epoch):
    name, method, model = prepared
    epochs = 8
    g = torch.Generator().manual_seed(10 + epoch)
    layers = _layers(model)
    for _, layer in layers:
        layer.scores.grad = torch.randn(layer.scores.shape, generator=g) * 1e-2
    before = [layer.scores.grad.clone() for _, layer in layers]
    method.on_after_backward(FitContext(model=model, epoch=epoch, step=0, epochs=epochs, steps_per_epoch=1))
    rho = oracle.rho_at(SETTINGS.rho, SETTINGS.rho_final, epoch, epochs)
    for (lname, layer), grad in zip(layers, before):
        m = layer.scores.detach().reshape(-1).double().tolist()
        z = oracle.projection(m, oracle.kept(len(m), SETTINGS.density))
        expected = oracle.penalty_gradient(grad.reshape(-1).double().tolist(), m, z, rho)
        ours = layer.scores.grad.reshape(-1).double()
        # float32 arithmetic against float64: |error| below float32 rounding of |g| + rho.
        assert torch.allclose(ours, torch.tensor(expected, dtype=torch.float64), rtol=1e-6, atol=1e-7 * (1 + rho)), \
            (name, lname)
        layer.scores.grad = None


def test_the_penalty_gradient_is_the_gradient_of_the_penalty():
    rng = random.Random(5)
    m = [rng.random() for _ in range(12)]
    z = oracle.projection(m, 5)
    rho, h = 0.3, 1e-6
    grad = oracle.penalty_gradient([0.0] * 12, m, z, rho)
    for i in range(12):
        up = list(m)
        up[i] += h
        down = list(m)
        down[i] -= h
        numeric = (oracle.penalty_value(up, z, rho) - oracle.penalty_value(down, z, rho)) / (2 * h)
        assert abs(numeric - grad[i]) < 1e-8


def test_the_box_projection_is_the_oracles(prepared):
    name, method, model = prepared
    g = torch.Generator().manual_seed(6)
    layers = _layers(model)
    saved = [layer.scores.detach().clone() for _, layer in layers]
    with torch.no_grad():
        for _, layer in layers:
            layer.scores.add_(torch.randn(layer.scores.shape, generator=g) * 0.3)   # a step that leaves the box
    moved = [layer.scores.detach().reshape(-1).double().tolist() for _, layer in layers]
    method.on_step_end(FitContext(model=model, epoch=0, step=1, epochs=1, steps_per_epoch=1))
    for (lname, layer), m in zip(layers, moved):
        assert layer.scores.detach().reshape(-1).double().tolist() == oracle.clip_to_box(m), (name, lname)
    with torch.no_grad():
        for (_, layer), s in zip(layers, saved):
            layer.scores.copy_(s)


def test_the_loss_gradient_reaches_the_mask_straight_through():
    g = torch.Generator().manual_seed(8)
    lin = MaskedLinear(6, 4, density=0.5, by_abs=False)
    conv = MaskedConv2d(2, 3, 3, density=0.4, by_abs=False, bias=False)
    with torch.no_grad():
        for layer in (lin, conv):
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=g))
            layer.scores.copy_(torch.rand(layer.scores.shape, generator=g))
    x = torch.randn(5, 6, generator=g)
    up = torch.randn(5, 4, generator=g)
    (lin(x) * up).sum().backward()
    expected = oracle.linear_mask_gradient(x.double().tolist(), lin.weight.detach().double().tolist(),
                                           up.double().tolist())
    assert torch.allclose(lin.scores.grad.double(), torch.tensor(expected, dtype=torch.float64), atol=1e-5)
    xc = torch.randn(2, 2, 6, 6, generator=g)
    upc = torch.randn(2, 3, 4, 4, generator=g)
    (conv(xc) * upc).sum().backward()
    expected = oracle.conv_mask_gradient(xc.double().tolist(), conv.weight.detach().double().tolist(),
                                         upc.double().tolist())
    assert torch.allclose(conv.scores.grad.double(), torch.tensor(expected, dtype=torch.float64), atol=1e-5)
    # Entries outside the mask get the gradient too (that is what lets them come back).
    outside = conv.mask() == 0
    assert bool((conv.scores.grad[outside] != 0).any())
