"""Model accounting: what a network costs, measured the same way for every method.

* ``model/params``: parameters; ``model/nonzero_params``: those not exactly zero (masked or
  soft-pruned weights count as zero). Everything is measured on the network as deployed
  (:func:`we_dist.export.deployable`): a masked or ternary layer counts as the plain layer
  holding its effective weight (``weight * mask``, ``alpha * codes``), so the training-time
  scores and full-precision shadows are not counted and masked-out weights count as zero.
* ``model/macs``: multiply-accumulates of one forward pass of one image at the validation
  resolution, counted by ``torch.utils.flop_counter.FlopCounterMode`` (convolutions and
  matrix products; normalisation and activations are not counted, as in the papers).
  Papers call MACs "FLOPs"; we label MACs as MACs and log ``model/flops`` = 2 x MACs beside.
* ``model/cpu_latency_ms_b1`` / ``_b64``: median wall time of an eval-mode forward pass on
  CPU at batch 1 and 64, over ``repeats`` timed runs after one warm-up, in this process's
  torch thread setting (noted as ``model/cpu_threads``). 0 repeats skips the timing. To
  compare two networks (a run's start and its end), time them side by side with
  :func:`latency_side_by_side`: in turns, in one process, so that whatever else the machine
  does slows both alike (timed minutes apart, the same network measured 0.52x "faster").

Example::

    >>> stats = account(model, (3, 32, 32), repeats=5)
    >>> stats["model/macs"]
"""

from __future__ import annotations

import copy
import statistics
import time
from typing import Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from we_dist.export import deployable


def count_params(model: nn.Module) -> tuple[int, int]:
    """(all parameters, nonzero parameters) of the deployed network (:func:`deployable`)."""
    total = nonzero = 0
    for p in deployable(model).parameters():
        total += p.numel()
        nonzero += int(torch.count_nonzero(p.detach()))
    return total, nonzero


@torch.no_grad()
def count_macs(model: nn.Module, input_shape: Sequence[int]) -> int:
    """Multiply-accumulates of one forward pass of one input of ``input_shape`` (C, H, W)."""
    model = _cpu_eval_copy(model)
    x = torch.zeros((1, *input_shape))
    counter = FlopCounterMode(display=False)
    with counter:
        model(x)
    return int(counter.get_total_flops()) // 2


@torch.no_grad()
def cpu_latency_ms(model: nn.Module, input_shape: Sequence[int], batch: int, repeats: int) -> float:
    """Median milliseconds of one eval-mode forward pass on CPU at ``batch``."""
    model = _cpu_eval_copy(model)
    x = torch.randn((batch, *input_shape))
    model(x)  # warm-up: allocations, lazy initialisation
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(x)
        times.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(times)


LATENCY_BATCHES = (1, 64)


@torch.no_grad()
def latency_side_by_side(networks: dict[str, nn.Module], input_shape: Sequence[int], repeats: int,
                         batches: Sequence[int] = LATENCY_BATCHES) -> dict[str, dict[str, float]]:
    """Median CPU milliseconds per eval-mode forward of each of ``networks`` at each batch,
    timed in turns (a, b, a, b, ... ``repeats`` rounds after one warm-up each), so that load on
    the machine hits every network alike. Returns ``{name: {"model/cpu_latency_ms_b<batch>":
    ms, ..., "model/cpu_threads": n}}``."""
    copies = {name: _cpu_eval_copy(net) for name, net in networks.items()}
    out: dict[str, dict[str, float]] = {name: {"model/cpu_threads": float(torch.get_num_threads())}
                                        for name in networks}
    for batch in batches:
        x = torch.randn((batch, *input_shape))
        times: dict[str, list[float]] = {name: [] for name in copies}
        for net in copies.values():
            net(x)   # warm-up: allocations, lazy initialisation
        for _ in range(repeats):
            for name, net in copies.items():
                start = time.perf_counter()
                net(x)
                times[name].append((time.perf_counter() - start) * 1000.0)
        for name in copies:
            out[name][f"model/cpu_latency_ms_b{batch}"] = statistics.median(times[name])
    return out


def account(model: nn.Module, input_shape: Sequence[int], repeats: int = 5) -> dict[str, float]:
    """Every ``model/*`` metric of the module docstring, for ``model`` (left unchanged)."""
    params, nonzero = count_params(model)
    macs = count_macs(model, input_shape)
    out = {"model/params": float(params), "model/nonzero_params": float(nonzero),
           "model/macs": float(macs), "model/flops": float(2 * macs)}
    if repeats > 0:
        out["model/cpu_latency_ms_b1"] = cpu_latency_ms(model, input_shape, 1, repeats)
        out["model/cpu_latency_ms_b64"] = cpu_latency_ms(model, input_shape, 64, repeats)
        out["model/cpu_threads"] = float(torch.get_num_threads())
    return out


def _cpu_eval_copy(model: nn.Module) -> nn.Module:
    # A copy: eval mode and the move to CPU must not touch the model being trained.
    clone = deployable(copy.deepcopy(model).cpu().float().eval())
    return clone.to(memory_format=torch.contiguous_format)


def summary_lines(start: dict[str, float], end: dict[str, float]) -> str:
    """A small before/after table for the console."""
    rows = [("params", "model/params", "{:,.0f}"), ("nonzero params", "model/nonzero_params", "{:,.0f}"),
            ("MACs", "model/macs", "{:,.0f}"), ("CPU ms, batch 1", "model/cpu_latency_ms_b1", "{:.2f}"),
            ("CPU ms, batch 64", "model/cpu_latency_ms_b64", "{:.1f}")]
    lines = [f"{'':<18}{'start':>16}{'end':>16}{'end/start':>11}"]
    for label, key, fmt in rows:
        if key not in start or key not in end:
            continue
        ratio = end[key] / start[key] if start[key] else float("nan")
        lines.append(f"{label:<18}{fmt.format(start[key]):>16}{fmt.format(end[key]):>16}{ratio:>11.3f}")
    return "\n".join(lines)
