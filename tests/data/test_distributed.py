"""distributed=True under a real 2-rank gloo group (torch.multiprocessing.spawn, 127.0.0.1):
the ranks read disjoint parts of the data. Labels are sample ids, so overlap is visible."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from we_dist.ports import free_port

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")]

WORLD = 2


def _rank(rank: int, port: int, train_path: str, val_path: str, out_dir: str) -> None:
    import torch.distributed as dist

    from we_dist.config import DataConfig
    from we_dist.data import make_train_loader, make_val_loader

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        cfg = DataConfig(train_path=train_path, val_path=val_path, batch_size=8, min_res=8, max_res=8,
                         val_res=8, loader_workers=1, flip=False)
        cpu = torch.device("cpu")
        train = make_train_loader(cfg, distributed=True, seed=5, device=cpu)
        val = make_val_loader(cfg, distributed=True, device=cpu)
        result = {"train_len": len(train), "val_len": len(val), "train": [], "val": []}
        for epoch in range(2):
            train.set_epoch(epoch)
            result["train"].append(torch.cat([y for _, y in train]).tolist())
        result["val"] = torch.cat([y for _, y in val]).tolist()
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _spawn_on_a_free_port(*args: str, attempts: int = 3) -> None:
    """``mp.spawn`` the ranks on a free port; again on a new one if another process took it
    before rank 0 listened (EADDRINUSE: nothing of the test ran; spawn stops the other rank)."""
    for attempt in range(attempts):
        try:
            mp.spawn(_rank, args=(free_port(), *args), nprocs=WORLD, join=True)
            return
        except mp.ProcessRaisedException as exc:
            if "EADDRINUSE" not in str(exc) or attempt == attempts - 1:
                raise


def _write_ids(path: Path, n: int) -> None:
    from we_dist.data.convert import ArraySource, write_beton

    images = np.zeros((n, 8, 8, 3), np.uint8)
    write_beton(ArraySource(images, np.arange(n)), path, max_resolution=8,
                compress_probability=0.0, workers=1)


def test_ranks_read_disjoint_shards(tmp_path):
    train_path, val_path = tmp_path / "train.beton", tmp_path / "val.beton"
    _write_ids(train_path, 64)  # 32 per rank, 4 full batches of 8
    _write_ids(val_path, 61)    # odd: shards of 31 and 30, nothing padded or repeated
    _spawn_on_a_free_port(str(train_path), str(val_path), str(tmp_path))
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD))

    assert r0["train_len"] == r1["train_len"] == 4
    for epoch in range(2):
        a, b = r0["train"][epoch], r1["train"][epoch]
        assert len(a) == len(b) == 32 and len(set(a)) == 32
        assert not set(a) & set(b)
        assert set(a) | set(b) == set(range(64))
    assert r0["train"][0] != r0["train"][1]  # reshuffled per epoch, still disjoint

    assert (r0["val_len"], r1["val_len"]) == (4, 4)
    assert len(r0["val"]) == 31 and len(r1["val"]) == 30
    assert sorted(r0["val"] + r1["val"]) == list(range(61))
