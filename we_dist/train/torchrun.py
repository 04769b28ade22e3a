"""Run the same worker loop under plain ``torchrun`` (no Ray): for comparison and debugging.

    torchrun --nproc_per_node 2 -m we_dist.train.torchrun recipes/demo.yaml tracking.enabled=false

Checkpoints go to ``checkpoint.storage_path/<name>`` and a re-run resumes from them;
tracking is not started here (use `we-dist train` for the full service).
"""

from __future__ import annotations

import json
import os
import sys

from we_dist.config import load_config
from we_dist.data.loaders import numba_off_unless_compiled
from we_dist.train.driver import resolve_paths
from we_dist.train.loop import run_training
from we_dist.train.session import TorchrunSession


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    cfg = resolve_paths(load_config(argv[0], argv[1:]))
    numba_off_unless_compiled(cfg.data)
    session = TorchrunSession(os.path.join(cfg.checkpoint.storage_path, cfg.name), use_gpu=cfg.scaling.use_gpu)
    started = os.environ.get("WE_DIST_STARTED_AT")   # set by a launcher, e.g. benchmarks/startup.py
    metrics = run_training(cfg, session, started_at=float(started) if started else None)
    if session.rank == 0:
        print("[we_dist] final " + json.dumps(metrics, sort_keys=True), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
