"""Training and validation loaders on a real digits .beton: shapes, dtypes, normalisation,
progressive resizing, seeded order, early exit, and the errors they raise."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
from collections import Counter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from we_dist.config import DataConfig
from we_dist.data import DatasetError, check_beton, make_train_loader, make_val_loader, resolution_at

CPU = torch.device("cpu")
# numba reports a harmless KeyError from a finalizer of FFCV's recompiled closures at exit.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def _cfg(betons, **kw) -> DataConfig:
    base = dict(train_path=str(betons[0]), val_path=str(betons[1]), batch_size=64, val_batch_size=100,
                min_res=16, max_res=32, start_ramp=0, end_ramp=2, res_step=8, val_res=24,
                loader_workers=1)
    return DataConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def train(digits_betons):
    """One training loader shared by the tests below: each new loader JIT-compiles for seconds."""
    return make_train_loader(_cfg(digits_betons), distributed=False, seed=3, device=CPU)


def _unnormalise(x: torch.Tensor, cfg: DataConfig) -> torch.Tensor:
    return x * torch.tensor(cfg.std).view(1, -1, 1, 1) + torch.tensor(cfg.mean).view(1, -1, 1, 1)


# --- resolution_at ------------------------------------------------------------------------


def test_resolution_schedule_examples():
    cfg = DataConfig(min_res=160, max_res=192, start_ramp=2, end_ramp=4, res_step=16)
    assert [resolution_at(cfg, e) for e in range(6)] == [160, 160, 160, 176, 192, 192]
    assert resolution_at(DataConfig(min_res=160, max_res=256), 50) == 160  # end_ramp 0: no ramp
    ramp = DataConfig(min_res=160, max_res=192, start_ramp=0, end_ramp=10, res_step=32)
    assert [resolution_at(ramp, e) for e in (0, 9, 10)] == [160, 160, 192]  # rounded down
    with pytest.raises(ValueError, match="epoch must be >= 0"):
        resolution_at(cfg, -1)


@settings(max_examples=200, deadline=None)
@given(min_res=st.integers(8, 300), extra=st.integers(0, 300), start=st.integers(0, 30),
       length=st.integers(0, 30), step=st.integers(1, 64))
def test_resolution_schedule_properties(min_res, extra, start, length, step):
    cfg = DataConfig(min_res=min_res, max_res=min_res + extra, start_ramp=start,
                     end_ramp=start + length, res_step=step)
    res = [resolution_at(cfg, e) for e in range(start + length + 3)]
    assert all(min_res <= r <= min_res + extra for r in res)
    assert res == sorted(res)  # never shrinks
    assert res[0] == min_res
    if start + length > 0:
        assert res[-1] == min_res + extra
    assert all(r % step == 0 or r in (cfg.min_res, cfg.max_res) for r in res)


# --- training loader ----------------------------------------------------------------------


def test_training_epoch_shapes_values_and_coverage(train, digits_betons):
    cfg = _cfg(digits_betons)
    train.set_epoch(0)
    assert len(train) == 1437 // 64 and train.resolution == 16
    labels = []
    for images, y in train:
        assert images.shape == (64, 3, 16, 16) and images.dtype == torch.float32
        assert images.is_contiguous() and images.device == CPU
        assert y.shape == (64,) and y.dtype == torch.int64
        pixels = _unnormalise(images, cfg)
        assert pixels.min() > -0.5 and pixels.max() < 255.5
        labels.append(y)
    assert len(labels) == len(train)
    # drop_last: 22 full batches; no sample twice, so no class exceeds its true count.
    # (This also catches reuse of FFCV's batch buffers after they were handed out.)
    seen = Counter(torch.cat(labels).tolist())
    counts = _label_counts(digits_betons[0])
    assert sum(seen.values()) == 22 * 64
    assert all(seen[c] <= counts[c] for c in seen) and len(seen) == 10


def _label_counts(path) -> Counter:
    cfg = DataConfig(val_path=str(path), batch_size=500, val_res=8, loader_workers=1)
    return Counter(torch.cat([y for _, y in make_val_loader(cfg, distributed=False, device=CPU)]).tolist())


def test_progressive_resizing_follows_set_epoch(train):
    for epoch, res in [(1, 24), (2, 32), (7, 32), (0, 16)]:
        train.set_epoch(epoch)
        images, _ = next(iter(train))
        assert train.resolution == res and images.shape[-2:] == (res, res)


def test_order_is_a_function_of_seed_and_epoch(train):
    def order(epoch):
        train.set_epoch(epoch)
        return torch.cat([y for _, y in train]).tolist()

    first, again, other = order(1), order(1), order(2)
    assert first == again
    assert first != other
    # Without set_epoch the loader moves on by itself (epoch 3 after epoch 2).
    after = torch.cat([y for _, y in train]).tolist()
    assert after != other and after == order(3)


def test_augmentation_is_a_function_of_seed_and_epoch(train, digits_betons):
    """Crops and flips are seeded per sample: the same seed and epoch give the same images
    (whatever the decoding thread count), another epoch or seed gives other crops."""
    def images(loader, epoch):
        loader.set_epoch(epoch)
        return torch.cat([x for x, _ in loader])

    first, again, other_epoch = images(train, 2), images(train, 2), images(train, 3)
    assert torch.equal(first, again)
    assert not torch.equal(first, other_epoch)
    flips = make_train_loader(_cfg(digits_betons, flip=True, scale_min=0.5, loader_workers=2), distributed=False,
                              seed=3, device=CPU)
    twin = make_train_loader(_cfg(digits_betons, flip=True, scale_min=0.5, loader_workers=1), distributed=False,
                             seed=3, device=CPU)
    stranger = make_train_loader(_cfg(digits_betons, flip=True, scale_min=0.5), distributed=False, seed=4,
                                 device=CPU)
    a, b = images(flips, 2), images(twin, 2)
    assert torch.equal(a, b)                        # 2 decoding threads or 1: the same images
    assert not torch.equal(a, images(train, 2))     # flips and a wider scale range do change them
    stranger_batch = images(stranger, 2)
    assert stranger_batch.shape == a.shape and not torch.equal(stranger_batch, a)


def test_breaking_out_early_then_full_epoch(train):
    train.set_epoch(0)
    for i, _ in enumerate(train):
        if i == 1:
            break
    assert sum(1 for _ in train) == len(train)


def test_channels_last_and_threads(digits_betons):
    torch.set_num_threads(2)
    cfg = _cfg(digits_betons, loader_workers=1)
    val = make_val_loader(cfg, distributed=False, device=CPU, channels_last=True)
    images, labels = next(iter(val))
    assert images.is_contiguous(memory_format=torch.channels_last) and not images.is_contiguous()
    assert torch.get_num_threads() == 2  # FFCV sets torch's thread count; the loader restores it


def test_validation_epoch_is_complete_and_in_order(digits_betons):
    cfg = _cfg(digits_betons)
    val = make_val_loader(cfg, distributed=False, device=CPU)
    assert len(val) == 4  # 360 samples, batches of 100, last one partial
    batches = list(val)
    assert [len(y) for _, y in batches] == [100, 100, 100, 60]
    assert batches[0][0].shape == (100, 3, 24, 24) and batches[0][0].is_contiguous()
    labels = torch.cat([y for _, y in batches])
    assert labels.tolist() == torch.cat([y for _, y in val]).tolist()  # same order every time
    assert sorted(Counter(labels.tolist()).values())[0] >= 35  # stratified: every digit ~36


def test_loader_errors(digits_betons, tmp_path):
    with pytest.raises(DatasetError, match="fewer than batch_size 5000"):
        make_train_loader(_cfg(digits_betons, batch_size=5000), distributed=False, seed=0, device=CPU)
    with pytest.raises(RuntimeError, match="after init_process_group"):
        make_train_loader(_cfg(digits_betons), distributed=True, seed=0, device=CPU)
    with pytest.raises(RuntimeError, match="after init_process_group"):
        make_val_loader(_cfg(digits_betons), distributed=True, device=CPU)
    assert check_beton(digits_betons[0]).num_samples == 1437


def test_process_cache_reads_the_same_samples(digits_betons):
    """os_cache=False: FFCV's own page cache instead of the OS's; same data, same order."""
    cfg = _cfg(digits_betons, os_cache=False)
    val = make_val_loader(cfg, distributed=False, device=CPU)
    labels = torch.cat([y for _, y in val])
    assert labels.tolist() == torch.cat([y for _, y in make_val_loader(
        _cfg(digits_betons), distributed=False, device=CPU)]).tolist()


def _every_batch(cfg: DataConfig, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    train = make_train_loader(cfg, distributed=False, seed=seed, device=CPU)
    batches = []
    for epoch in (0, 1, 2):            # progressive resizing: 16, 24 and 32 px crops
        train.set_epoch(epoch)
        batches += list(train)
    return batches + list(make_val_loader(cfg, distributed=False, device=CPU))


def test_the_uncompiled_pipeline_gives_the_same_batches(digits_betons):
    """data.jit=False runs FFCV's pipeline (and the seeded crop-and-flip decoder) as plain
    Python: every training batch of three epochs, augmentation included, and every validation
    batch are bit-identical to the compiled pipeline's."""
    from ffcv.pipeline.compiler import Compiler

    try:
        compiled = _every_batch(_cfg(digits_betons, jit=True), seed=5)
        plain = _every_batch(_cfg(digits_betons, jit=False), seed=5)
        assert not Compiler.is_enabled     # the switch reached FFCV
    finally:
        Compiler.set_enabled(True)         # FFCV's default, for the tests after this one
    assert len(compiled) == len(plain) > 3
    assert {x.shape[-1] for x, _ in compiled} == {16, 24, 32}
    for (x1, y1), (x2, y2) in zip(compiled, plain):
        assert torch.equal(y1, y2) and torch.equal(x1, x2)


_NUMBA_OFF_CHILD = r"""
import hashlib, json, sys
import we_dist.train.loop   # what a Ray Train worker has imported when its training function starts
from we_dist.config import DataConfig, validate_section
from we_dist.data.loaders import make_train_loader, make_val_loader, numba_off_unless_compiled
cfg = validate_section(DataConfig, json.loads(sys.argv[1]))
assert not cfg.jit
numba_off_unless_compiled(cfg)
import numba, torch
import ffcv.fields.rgb_image as rgb
assert numba.config.DISABLE_JIT and type(rgb.IMAGE_MODES) is dict, "numba's JIT is still on"
h = hashlib.sha256()
train = make_train_loader(cfg, distributed=False, seed=5, device=torch.device("cpu"))
for epoch in (0, 1, 2):
    train.set_epoch(epoch)
    for x, y in train:
        h.update(x.numpy().tobytes()); h.update(y.numpy().tobytes())
for x, y in make_val_loader(cfg, distributed=False, device=torch.device("cpu")):
    h.update(x.numpy().tobytes()); h.update(y.numpy().tobytes())
print(h.hexdigest())
"""


def test_a_worker_without_the_compile_runs_numba_free_with_the_same_batches(digits_betons):
    """What a Ray Train (or torchrun) worker of a ``data.jit=false`` run does first: switch
    numba's JIT off before FFCV is imported (FFCV's import compiles otherwise). In a fresh
    process, as a worker is, the batches still equal the compiled pipeline's, bit for bit."""
    cfg = _cfg(digits_betons, jit=True)
    h = hashlib.sha256()
    for x, y in _every_batch(cfg, seed=5):
        h.update(x.numpy().tobytes())
        h.update(y.numpy().tobytes())
    settings = json.dumps({**dataclasses.asdict(cfg), "jit": False})
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_DISABLE_JIT"}
    child = subprocess.run([sys.executable, "-c", _NUMBA_OFF_CHILD, settings], capture_output=True, text=True,
                           env=env, timeout=300)
    assert child.returncode == 0, child.stderr[-3000:]
    assert child.stdout.strip().splitlines()[-1] == h.hexdigest()
