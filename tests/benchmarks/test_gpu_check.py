"""The correctness part of benchmarks/gpu_check.py on CPU, so the GPU script cannot rot between
GPU runs: every registered method through the real loop under 2 gloo ranks (finite losses, its
structural change, an export that computes what the network does, bit-identical replicas), and
each method's decisions replayed on a copy give the same network (deterministic decisions)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.py"


def _script():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


check = _script()
METHODS = check.method_names()
STRUCTURAL = {"l1", "scratch", "slim", "soft_prune", "dynamic_attention", "thinet", "lasso", "apoz"}


def _every_method(rank, world, workdir):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world))
    return [check.check_replicas(rank, world, name, Path(workdir), "cpu", model="small_cnn") for name in METHODS]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("gpu_check")


@pytest.fixture(scope="module")
def replicas(gloo, workdir):
    r0, r1 = gloo(_every_method, 2, str(workdir), timeout=900)
    return r0, r1


def test_every_registered_method_is_checked():
    assert len(METHODS) == 15 and METHODS.index("l1") < METHODS.index("scratch")


@pytest.mark.parametrize("index", range(len(METHODS)), ids=METHODS)
def test_method_trains_exports_and_keeps_replicas_identical(replicas, index):
    row0, row1 = replicas[0][index], replicas[1][index]
    assert row0["method"] == row1["method"] == METHODS[index]
    assert row0["finite"]
    assert row0["checksum"] == row1["checksum"]            # bit-identical replicas at the end
    assert row0["export"] < 1e-4                           # exported.pt2 computes the network
    assert row0["changed"] == (METHODS[index] in STRUCTURAL)   # the pruning methods end smaller


@pytest.mark.parametrize("name", ["we", "slim", "l1", "dynamic_attention", "thinet"])
def test_decisions_replayed_on_a_copy_are_the_same(replicas, workdir, name):
    result = check.check_decisions(name, workdir, "cpu", model="small_cnn")   # l1 starts from the `none` run
    assert result["compared"] >= 1 and result["not_compared"] == []
    assert result["equal"] and result["max_rel_diff"] == 0.0
