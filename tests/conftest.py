"""Shared fixtures: real gloo process groups (forked ranks on 127.0.0.1)."""

from __future__ import annotations

import multiprocessing as mp
import os
import traceback
from typing import Any, Callable

import pytest

from we_dist.ports import free_port


def _rank_main(fn: Callable, rank: int, world: int, port: int, args: tuple, results: Any) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
        results.put((rank, "ok", fn(rank, world, *args)))
    except BaseException:  # report every failure to the parent, then exit non-zero
        results.put((rank, "error", traceback.format_exc()))
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_gloo(fn: Callable, world: int = 2, *args: Any, timeout: float = 180) -> list[Any]:
    """Run ``fn(rank, world, *args)`` in ``world`` forked processes joined by a real gloo
    group; returns each rank's return value, or fails with the rank's traceback."""
    ctx = mp.get_context("fork")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank_main, args=(fn, r, world, port, args, results)) for r in range(world)]
    for p in procs:
        p.start()
    out: dict[int, Any] = {}
    try:
        for _ in range(world):
            rank, status, value = results.get(timeout=timeout)
            if status == "error":
                raise AssertionError(f"rank {rank} failed:\n{value}")
            out[rank] = value
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    return [out[r] for r in range(world)]


@pytest.fixture(scope="session")   # a function: module fixtures may use it too
def gloo() -> Callable[..., list[Any]]:
    return run_gloo


os.environ.setdefault("OMP_NUM_THREADS", "1")


def _start_autograd_before_any_export() -> None:
    """Run one backward pass in the pytest process now, before any test runs.

    Autograd starts its engine once per process, at the first backward. If that first
    backward comes after a ``torch.export.export`` (which registers more device types),
    the engine also starts device threads and marks every later ``fork`` as unsafe: the
    forked gloo ranks of ``run_gloo`` then fail at their first backward ("Unable to handle
    autograd's threading in combination with fork-based multiprocessing"). Whether that
    happened depended on which tests ran first (``pytest tests/methods`` failed, the whole
    suite passed); starting the engine here, while only the CPU is known, removes the
    dependence on order.
    """
    import torch

    x = torch.ones(1, requires_grad=True)
    x.sum().backward()


_start_autograd_before_any_export()


@pytest.fixture(scope="session")
def digits_betons(tmp_path_factory):
    """scikit-learn's real digits as train/val .beton files (32 px RGB), once per session."""
    from we_dist.data.convert import write_digits

    return write_digits(tmp_path_factory.mktemp("digits"), workers=1)


def train_workers(driver_pid: int) -> list:
    """The Ray Train worker processes of a run: descendants of its driver (which started the
    local Ray), so other Ray instances on the machine are never touched."""
    import psutil

    found = []
    for proc in psutil.Process(driver_pid).children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(proc.cmdline()):
                found.append(proc)
        except psutil.NoSuchProcess:
            continue
    return found


@pytest.fixture
def ray_train_workers() -> Callable[[int], list]:
    """:func:`train_workers`, for tests that kill a worker of a real run."""
    return train_workers


@pytest.fixture(scope="module")
def local_ray():
    """A real local Ray cluster for one test module (logical CPUs oversubscribed: 2 cores here)."""
    import ray

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=True)
    yield ray
    ray.shutdown()


def _shrink_first_conv(model):
    """Remove every other filter of a small_cnn's first conv by hand, with its BatchNorm entries
    and the next conv's matching input channels (what a pruner does), in place; returns it."""
    import torch

    conv, bn, nxt = model.features[0][0], model.features[0][1], model.features[1][0]
    keep = torch.arange(0, conv.out_channels, 2)
    with torch.no_grad():
        conv.weight = torch.nn.Parameter(conv.weight[keep].clone())
        conv.out_channels = len(keep)
        for name in ("weight", "bias"):
            setattr(bn, name, torch.nn.Parameter(getattr(bn, name)[keep].clone()))
        bn.running_mean, bn.running_var = bn.running_mean[keep].clone(), bn.running_var[keep].clone()
        bn.num_features = len(keep)
        nxt.weight = torch.nn.Parameter(nxt.weight[:, keep].clone())
        nxt.in_channels = len(keep)
    return model


@pytest.fixture
def shrink_first_conv():
    """A hand-made pruning of a small_cnn (see :func:`_shrink_first_conv`), for shape tests."""
    return _shrink_first_conv
