"""ThiNet and TWN against their authors' code, on the inputs stored in tests/methods/reference/
(``thinet.pt``, ``twn.pt``; what was run and how: the README there).

* ThiNet: the authors' ``value_sum`` (Roll920/ThiNet_Code, ``ThiNet_ICCV/compress_model.py``)
  chose the kept channels greedily from the channel contributions ``x`` (N x C) and solved
  ``w = (X_S^T X_S)^-1 X_S^T y``. The project's :func:`thinet_select` works on the Gram matrix
  ``x^T x`` and :func:`channel_scaling` on it and ``x^T y`` (ridge ``1e-6`` of the mean diagonal).
* TWN: the authors' Caffe code (fengfu-chris/caffe-twns) ternarised each weight blob with
  ``delta = 0.7 * mean|W|`` and ``alpha = <b, W> / <b, b>``; the project's
  :func:`ternary_codes` per layer (``per_filter=False``, ``delta_factor=0.7``), and through a
  :class:`TernaryConv2d` / :class:`TernaryLinear`, the forward weight ``alpha * codes``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from we_dist.methods.masked import TernaryConv2d, TernaryLinear, ternary_codes
from we_dist.methods.thinet import channel_scaling, thinet_select

REFERENCE = Path(__file__).parent / "reference"
THINET = torch.load(REFERENCE / "thinet.pt", weights_only=True)["cases"]
TWN = torch.load(REFERENCE / "twn.pt", weights_only=True)["cases"]


@pytest.mark.parametrize("case", THINET, ids=[c["name"] for c in THINET])
def test_thinet_keeps_the_authors_channels_and_scales_them_as_they_do(case):
    x, y = case["x"].double(), case["y"].double()
    channels = x.shape[1]
    keep = int(channels * case["compress_rate"])          # their goal_num
    assert case["kept"].numel() == keep
    a = x.T @ x
    kept = thinet_select(a, keep)
    assert kept == case["kept"].tolist()
    beta = channel_scaling(a, (x.T @ y).reshape(-1), kept)
    assert beta is not None
    # Their exact normal equations against a ridge of 1e-6 x mean(diag): relative 1e-5.
    assert torch.allclose(beta.reshape(-1), case["w"], rtol=1e-5, atol=1e-6)
    # And the least squares lowers the reconstruction error, as in their log line.
    sel = x[:, kept]
    assert float((y - sel @ beta.reshape(-1, 1)).norm()) < float((y - sel.sum(1, keepdim=True)).norm())


def test_thinet_cases_exercise_the_greedy():
    # Not the trivial choice: the kept channels are not simply the largest-norm ones everywhere.
    differs = 0
    for case in THINET:
        x = case["x"].double()
        by_norm = sorted(torch.argsort(x.norm(dim=0), descending=True)[:case["kept"].numel()].tolist())
        differs += by_norm != case["kept"].tolist()
    assert differs >= 3


@pytest.mark.parametrize("case", TWN, ids=[c["name"] for c in TWN])
def test_twn_gives_the_authors_codes_and_scale(case):
    w = case["weight"]
    codes, alpha = ternary_codes(w, per_filter=False, delta_factor=0.7)
    assert torch.equal(codes, case["codes"])
    # float32 sums in a different order than their loop: a few float32 ulps.
    assert float(alpha) == pytest.approx(case["alpha"], rel=1e-6)
    # Their delta falls between the largest |w| zeroed and the smallest kept.
    a = w.abs()
    assert float(a[codes == 0].max()) <= case["delta"] * (1 + 1e-6)
    assert float(a[codes != 0].min()) > case["delta"] * (1 - 1e-6)


@pytest.mark.parametrize("case", TWN, ids=[c["name"] for c in TWN])
def test_the_ternary_layers_forward_weight_is_the_authors(case):
    w = case["weight"]
    if w.dim() == 4:
        layer = TernaryConv2d(w.shape[1], w.shape[0], w.shape[2], bias=False, per_filter=False, delta_factor=0.7)
    else:
        layer = TernaryLinear(w.shape[1], w.shape[0], bias=False, per_filter=False, delta_factor=0.7)
    with torch.no_grad():
        layer.weight.copy_(w)
    theirs = case["codes"].float() * case["alpha"]      # caffe_cpu_scale(alpha, binary)
    assert torch.allclose(layer.effective_weight(), theirs, rtol=1e-6, atol=0)
    assert isinstance(layer, (nn.Conv2d, nn.Linear))


def _chain(channels: int) -> nn.Module:
    """conv(3 -> channels) -> BN -> ReLU -> conv(channels -> 8): one prunable pair of ``channels``."""
    return nn.Sequential(nn.Conv2d(3, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU(),
                         nn.Conv2d(channels, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))


def test_thinet_keeps_as_many_channels_as_the_authors_but_where_docs_say():
    """The project's ``ratio`` removes ``round(ratio * C)``; the authors keep ``int(C * rate)``,
    i.e. remove ``ceil``: one channel more stays here where ``ratio * C`` has a fraction in
    (0, 0.5] (docs/faithfulness.md, the ``thinet`` row)."""
    import math

    from we_dist.methods.calibration import keep_counts

    differ = 0
    for case in THINET:
        channels = case["x"].shape[1]
        ratio = 1 - case["compress_rate"]
        ours = keep_counts(_chain(channels), (3, 8, 8), ratio, 0.0)[0]["3"]
        theirs = case["kept"].numel()
        removed = ratio * channels
        frac = removed - math.floor(round(removed, 9))
        expected_gap = 1 if 1e-9 < frac <= 0.5 + 1e-9 else 0
        assert ours - theirs == expected_gap, (case["name"], ours, theirs)
        differ += expected_gap
    assert differ == 1      # 32 channels at their 0.3 (our 0.7): 10 kept here, 9 theirs
