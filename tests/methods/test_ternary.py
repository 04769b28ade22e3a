"""TWN: the threshold and alpha of the paper (per layer 0.7, per filter 0.75), exactly three
values per layer (or per filter), the straight-through update of the full-precision weights,
the 2-bit packing and its loader (identical outputs), and, through the real loop under 2 gloo
ranks, identical replicas, crash + resume, evaluation with ternary weights, the exported
network and the 2-bit file beside it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from we_dist.export import PACKED_FILE, load_2bit, load_exported, pack_2bit, pack_codes, unpack_codes, write_2bit
from we_dist.methods.masked import TernaryConv2d, TernaryLinear, ternary_codes, ternary_layers
from we_dist.methods.ternary import TernaryMethod, TernarySettings
from we_dist.models import create_model

from loop_harness import check_export_in_fresh_process, crash_resume_and_compare, prepared_from


def ternary_net(name="small_cnn", **settings):
    torch.manual_seed(0)
    return TernaryMethod(TernarySettings(**settings)).prepare_model(create_model(name, 10), None)


def test_threshold_and_alpha_per_layer_and_per_filter():
    w = torch.tensor([[0.1, -0.5, 0.9, -1.5], [0.05, 0.0, -0.3, 0.2]])
    codes, alpha = ternary_codes(w, per_filter=False, delta_factor=0.7)
    delta = 0.7 * float(w.abs().mean())  # 0.7 * 0.43125 = 0.301875
    assert codes.tolist() == [[0, -1, 1, -1], [0, 0, 0, 0]]
    assert float(alpha) == pytest.approx((0.5 + 0.9 + 1.5) / 3) and alpha.dim() == 0 and delta > 0.3
    codes, alpha = ternary_codes(w, per_filter=True, delta_factor=0.75)
    # filter 0: delta = 0.75 * 0.75 = 0.5625 -> keeps 0.9, -1.5; filter 1: 0.75 * 0.1375 -> keeps -0.3, 0.2
    assert codes.tolist() == [[0, 0, 1, -1], [0, 0, -1, 1]]
    assert alpha.flatten().tolist() == pytest.approx([1.2, 0.25])
    zero = ternary_codes(torch.zeros(2, 3), per_filter=True, delta_factor=0.75)
    assert torch.equal(zero[1], torch.zeros(2, 1)) and not zero[0].any()  # no NaN from an empty mean


@pytest.mark.parametrize("granularity", ["layer", "filter"])
@pytest.mark.parametrize("name", ["small_cnn", "cifar_resnet20"])
def test_ternary_weights_take_exactly_three_values(name, granularity):
    model = ternary_net(name, granularity=granularity)
    layers = ternary_layers(model)
    assert layers
    for lname, layer in layers:
        wt = layer.effective_weight()
        codes, alpha = layer.codes_and_scale()
        if granularity == "layer":
            assert sorted(torch.unique(wt).tolist()) == pytest.approx([-float(alpha), 0.0, float(alpha)]), lname
        else:
            for f in range(wt.shape[0]):
                values = set(torch.unique(wt[f]).tolist())
                a = float(alpha.flatten()[f])
                assert values <= {-a, 0.0, a} and len(values) >= 2, (lname, f)
            assert len(torch.unique(alpha)) > 1  # alphas really differ by filter
        assert torch.equal(wt, codes.float() * alpha)
    # First conv and classifier stay full precision by default; a setting ternarises them.
    assert type(model.features[0][0] if name == "small_cnn" else model.conv1) is nn.Conv2d
    assert type(model.fc) is nn.Linear
    every = ternary_net(name, granularity=granularity, quantize_first_conv=True, quantize_classifier=True)
    assert len(ternary_layers(every)) == len(layers) + 2


def test_the_forward_uses_ternary_weights_and_the_update_goes_to_the_full_precision_ones():
    torch.manual_seed(0)
    layer = TernaryLinear(8, 3, bias=True)
    x = torch.randn(5, 8)
    out = layer(x)
    assert torch.equal(out, nn.functional.linear(x, layer.effective_weight(), layer.bias))
    g = torch.randn_like(out)
    out.backward(g)
    assert torch.allclose(layer.weight.grad, g.T @ x)  # straight through: d loss / d W_t
    conv = TernaryConv2d(3, 4, 3, padding=1, bias=False, per_filter=True, delta_factor=0.75)
    y = torch.randn(2, 3, 6, 6)
    assert torch.equal(conv(y), conv.deploy()(y))
    before = conv.weight.detach().clone()
    conv(y).square().mean().backward()
    with torch.no_grad():
        conv.weight -= 0.5 * conv.weight.grad
    assert not torch.equal(before, conv.weight)  # the kept float weights move


@pytest.mark.parametrize("n", [1, 3, 4, 5, 17])
def test_2bit_codes_round_trip(n):
    codes = torch.randint(-1, 2, (n,), generator=torch.Generator().manual_seed(n)).to(torch.int8)
    packed = pack_codes(codes)
    assert packed.dtype == torch.uint8 and packed.numel() == (n + 3) // 4
    assert torch.equal(unpack_codes(packed, [n]), codes)
    with pytest.raises(ValueError, match="-1, 0 or"):
        pack_codes(torch.tensor([2]))
    with pytest.raises(ValueError, match="corrupt"):
        unpack_codes(torch.tensor([3], dtype=torch.uint8), [1])


@pytest.mark.parametrize("granularity", ["layer", "filter"])
def test_unpacked_2bit_network_gives_identical_outputs(tmp_path, granularity):
    model = ternary_net(granularity=granularity).eval()
    path = write_2bit(model, tmp_path / PACKED_FILE)
    fresh = create_model("small_cnn", 10).eval()  # plain layers: the 2-bit file needs no project layer
    fresh.load_state_dict(load_2bit(path))
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    payload = pack_2bit(model)
    n_ternary = sum(m.weight.numel() for _, m in ternary_layers(model))
    assert sum(e["codes"].numel() for e in payload["packed"].values()) == sum(
        (m.weight.numel() + 3) // 4 for _, m in ternary_layers(model))
    # Packed: the ternary weights shrink 16x (plus their alphas); the rest is float32 in both.
    assert payload["float32_bytes"] - payload["packed_bytes"] >= 4 * n_ternary - n_ternary // 4 - n_ternary // 8
    assert abs(path.stat().st_size - payload["packed_bytes"]) < 20_000  # the file is what is counted (+ headers)
    with pytest.raises(ValueError, match="not a"):
        torch.save({"x": 1}, tmp_path / "other.pt")
        load_2bit(tmp_path / "other.pt")


def test_ternary_through_the_loop(gloo, tmp_path, digits_memory):
    cfg, _, whole, resumed, final_dir = crash_resume_and_compare(
        gloo, tmp_path, digits_memory, ["method.name=ternary", "method.ternary.granularity=filter"])
    for key, value in whole["model"].items():
        assert torch.equal(value, resumed["model"][key]), key
    assert all(torch.isfinite(v).all() for v in resumed["model"].values() if v.is_floating_point())
    model = prepared_from(cfg, resumed)
    for name, layer in ternary_layers(model):
        wt = layer.effective_weight()
        for f in range(wt.shape[0]):
            assert len(torch.unique(wt[f])) <= 3, (name, f)
    m = resumed["metrics"]
    assert 0 < m["ternary/packed_bytes"] < m["ternary/float32_bytes"] / 4
    assert m["ternary/compression"] == pytest.approx(m["ternary/float32_bytes"] / m["ternary/packed_bytes"])
    assert 0 < m["ternary/zero_fraction"] < 1
    check_export_in_fresh_process(model, final_dir, tmp_path)
    # The 2-bit file beside the export: unpacked into the exported module, the same outputs.
    net = load_exported(final_dir / "exported.pt2")
    net.load_state_dict(load_2bit(final_dir / PACKED_FILE))
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(net(x), model(x))
