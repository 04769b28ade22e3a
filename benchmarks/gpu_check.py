"""Every registered method through the real training loop on one device, then the loop's
GPU throughput: one script for a lent GPU machine (no Ray, FFCV or MLflow needed), whose
correctness part also runs in the test suite on CPU (tests/benchmarks/test_gpu_check.py).

Correctness, per method (a CIFAR-shaped network, in-memory data, ``--epochs`` short epochs):

* **replicas**: ``--world`` ranks (gloo; on one GPU both ranks share it) train with the
  method, its structural change and its export; every epoch's losses must be finite, every
  rank must end with the same parameter checksum (``train.check_replicas`` checks each
  epoch), the exported ``exported.pt2`` must load and compute what the network computes;
* **decisions** (one rank): at each hook where a method decides (fit start, epoch end, last
  epoch end) the same hook is run again on a CPU copy of the network and of the method's
  state, on the same batches; the result (architecture, which weights are zero, the values)
  must equal what the method did on the device. On CPU this checks that decisions are
  deterministic; on CUDA, that they do not depend on the device.

Throughput (``--bench``, CUDA only): ResNet-50 training images/s through the loop itself
(in-memory batches already on the GPU, bf16 autocast, channels_last) against a bare
forward/backward/step on the same batches, at 160 and 224 px and two batch sizes, and one
WE call's share of an ImageNet epoch at each measured speed.

    python benchmarks/gpu_check.py --device cuda --world 2 --bench      # on a GPU machine
    python benchmarks/gpu_check.py --device cpu --world 2               # what the suite runs

Prints one table row per method and check; ``--json FILE`` writes every number.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from we_dist import network, sync  # noqa: E402
from we_dist.config import load_config  # noqa: E402
from we_dist.data.memory import memory_loaders  # noqa: E402
from we_dist.evolution import WEConfig, WeightEvolution  # noqa: E402
from we_dist.export import load_exported  # noqa: E402
from we_dist.methods import FitContext, Method, create_method, registered_methods  # noqa: E402
from we_dist.models import create_model  # noqa: E402
from we_dist.ports import free_port  # noqa: E402
from we_dist.train.checkpoint import load_state  # noqa: E402
from we_dist.train.events import Callback  # noqa: E402
from we_dist.train.loop import run_training  # noqa: E402
from we_dist.train.session import TorchrunSession  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
IMAGENET_TRAIN_IMAGES = 1_281_167
BATCH, STEPS = 16, 3

# What each method needs to act within a couple of short epochs (every other setting is its
# default). l1 prunes the network the `none` run trained; scratch trains the architecture the
# l1 run ended with.
SETTINGS: dict[str, list[str]] = {
    "we": ["method.we.milestones=[0]", "method.we.stage_divisors=[1.0]", "method.we.ramp_tau=1.0"],
    "repr": ["method.repr.unit=step", "method.repr.s1=1", "method.repr.s2=1", "method.repr.cycles=1"],
    "l1": ["method.l1.ratios=[0.5]", "model.init_from={workdir}/check-none"],
    "slim": ["method.slim.sparsity_epochs=1", "method.slim.finetune_epochs=1"],
    "dynamic_attention": ["method.dynamic_attention.ramp_epochs=1", "method.dynamic_attention.calibration_batches=1"],
    "thinet": ["method.thinet.calibration_batches=1", "method.thinet.finetune_epochs=2"],
    "lasso": ["method.lasso.calibration_batches=1", "method.lasso.finetune_epochs=2", "method.lasso.lasso_steps=30",
              "method.lasso.lambda_search=6"],
    "apoz": ["method.apoz.calibration_batches=1", "method.apoz.rounds=2", "method.apoz.round_epochs=1"],
    "scratch": ["method.scratch.budget=B", "model.init_architecture_only=true", "model.init_from={workdir}/check-l1"],
}
ORDER = ["none", "l1", "scratch"]   # each needs the one before; the others follow in name order


def method_names() -> list[str]:
    """Every registered method, none, l1 and scratch first (each starts from the one before)."""
    names = sorted(registered_methods())
    return [n for n in ORDER if n in names] + [n for n in names if n not in ORDER]


def config(name: str, workdir: Path, device: str, model: str, epochs: int, *extra: str):
    """The check's config of method ``name``: 32 px, no tracking, replicas checked, export on."""
    overrides = [f"name=check-{name}", f"method.name={name}", f"model.name={model}", f"schedule.epochs={epochs}",
                 f"checkpoint.storage_path={workdir}", "tracking.enabled=false", "train.progress=false",
                 "train.check_replicas=true", "train.accounting_repeats=0", "train.export=true",
                 "schedule.milestones=[]", "schedule.warmup_epochs=0", f"data.batch_size={BATCH}",
                 f"scaling.use_gpu={'true' if device == 'cuda' else 'false'}", "train.precision=bf16",
                 "train.channels_last=true", *(o.format(workdir=workdir) for o in SETTINGS.get(name, []))]
    return load_config(ROOT / "recipes" / "demo.yaml", [*overrides, *extra])


def tensors(world: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """A learnable 10-class problem (the class is which band of rows is bright), CIFAR-shaped."""
    g = torch.Generator().manual_seed(seed)
    n_train, n_val = world * BATCH * STEPS, 48
    labels = torch.randint(0, 10, (n_train + n_val,), generator=g)
    images = 0.3 * torch.randn(labels.numel(), 3, 32, 32, generator=g)
    for i, y in enumerate(labels.tolist()):
        images[i, :, 3 * y:3 * y + 3, :] += 2.0
    return images[:n_train], labels[:n_train], images[n_train:], labels[n_train:]


def _session(root: Path, device: str) -> TorchrunSession:
    session = TorchrunSession(str(root), use_gpu=False)
    session.device = torch.device(device)   # gloo ranks may share one GPU
    return session


# --- replicas, losses, export ------------------------------------------------------------------


def check_replicas(rank: int, world: int, name: str, workdir: Path, device: str, model: str = "cifar_resnet20",
                   epochs: int = 2) -> dict[str, Any]:
    """Train method ``name`` on this rank; what it ends with (call on every rank)."""
    cfg = config(name, workdir, device, model, epochs)
    root = workdir / cfg.name
    x, y, vx, vy = tensors(world)
    t0 = time.perf_counter()
    final = FinalChecksum()
    metrics = run_training(cfg, _session(root, device), callbacks=[final],
                           loaders=memory_loaders(x, y, vx, vy, BATCH, seed=cfg.seed, device=device))
    out: dict[str, Any] = {"method": name, "seconds": time.perf_counter() - t0, "val_top1": metrics["val/top1"],
                           "checksum": final.value}
    if rank == 0:   # what the run saved: rank 0 writes the checkpoints (a method's phases set the epochs)
        last = root / f"epoch_{int(metrics['epoch']):04d}"
        state = load_state(last)
        out["finite"] = all(math.isfinite(h[k]) for h in state["history"] for k in ("train/loss", "val/loss"))
        net = network.build(cfg, create_method(cfg), torch.device("cpu"))
        network.restore(net, state)
        out["changed"] = _widths(network.deployed(net)) != _widths(create_model(cfg.model.name, cfg.model.num_classes))
        out["export"] = _export_matches(net, last, vx)
    return out


def _widths(net: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """Every conv and linear layer's weight shape: what channel pruning changes."""
    return {n: tuple(m.weight.shape) for n, m in net.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))}


class FinalChecksum(Callback):
    """This rank's bit-exact parameter checksum once training ended."""

    value: int | None = None

    def on_fit_end(self, loop: Any) -> None:
        self.value = int(sync.parameter_checksum(loop.model))


def _export_matches(net: torch.nn.Module, checkpoint: Path, images: torch.Tensor) -> float:
    """Largest difference between the exported program's logits and the network's (CPU, fp32)."""
    deployed = network.deployed(net)
    exported = load_exported(checkpoint / "exported.pt2")
    with torch.no_grad():
        return float((exported(images[:8]) - deployed(images[:8])).abs().max())


# --- decisions on the device against the CPU ---------------------------------------------------


class DecisionCheck:
    """Wraps a method: every hook where it decides is replayed on a CPU copy of the network and
    of the method's state, and the two results are compared (one rank only). Every other
    attribute is the inner method's own."""

    def __init__(self, inner: Method, cfg: Any) -> None:
        self.inner, self.cfg = inner, cfg
        self.results: list[dict[str, Any]] = []

    def __getattr__(self, attr: str) -> Any:
        return getattr(self.inner, attr)

    def on_fit_start(self, ctx: FitContext) -> None:
        self._both("on_fit_start", ctx)

    def on_epoch_end(self, ctx: FitContext) -> None:
        self._both("on_epoch_end", ctx)

    def on_last_epoch_end(self, ctx: FitContext) -> None:
        self._both("on_last_epoch_end", ctx)

    def _both(self, hook: str, ctx: FitContext) -> None:
        twin = create_method(self.cfg)
        twin.load_state_dict(_to_cpu(self.inner.state_dict()))
        cpu_model = copy.deepcopy(ctx.model).cpu().float().to(memory_format=torch.contiguous_format)
        cpu_ctx = FitContext(model=cpu_model, epoch=ctx.epoch, step=ctx.step, epochs=ctx.epochs,
                             steps_per_epoch=ctx.steps_per_epoch, phase=ctx.phase, phase_epoch=ctx.phase_epoch,
                             phase_last_epoch=ctx.phase_last_epoch, input_shape=ctx.input_shape,
                             loaders={k: _OnCPU(v) for k, v in ctx.loaders.items()})
        getattr(self.inner, hook)(ctx)
        try:
            getattr(twin, hook)(cpu_ctx)
        except Exception as exc:   # noqa: BLE001 - reported, not hidden: the table says why
            self.results.append({"hook": hook, "epoch": ctx.epoch, "compared": False,
                                 "why": f"{type(exc).__name__}: {exc}"})
            return
        self.results.append({"hook": hook, "epoch": ctx.epoch, "compared": True, **_compare(ctx.model, cpu_model),
                             "changed": ctx.changed == cpu_ctx.changed})


class _OnCPU:
    def __init__(self, loader: Any) -> None:
        self.loader = loader

    def __iter__(self):
        for x, y in self.loader:
            yield x.cpu().float().contiguous(), y.cpu()


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def _compare(device_model: torch.nn.Module, cpu_model: torch.nn.Module) -> dict[str, Any]:
    a = {k: v.detach().float().cpu() for k, v in device_model.state_dict().items()}
    b = {k: v.detach().float() for k, v in cpu_model.state_dict().items()}
    same_shape = network.describe(device_model) == network.describe(cpu_model) and a.keys() == b.keys() and all(
        a[k].shape == b[k].shape for k in a)
    if not same_shape:
        return {"same_architecture": False, "same_zeros": False, "max_rel_diff": math.inf}
    zeros = all(torch.equal(a[k] == 0, b[k] == 0) for k in a)
    rel = max((float((a[k] - b[k]).abs().max() / (b[k].abs().max() + 1e-12)) for k in a if b[k].numel()), default=0.0)
    return {"same_architecture": True, "same_zeros": zeros, "max_rel_diff": rel}


def check_decisions(name: str, workdir: Path, device: str, model: str = "cifar_resnet20",
                    epochs: int = 2) -> dict[str, Any]:
    """Train method ``name`` on one rank, replaying each decision on the CPU (no process group).
    ``workdir`` is where :func:`check_replicas` ran (l1 and scratch start from its runs)."""
    cfg = config(name, workdir, device, model, epochs, f"name=decide-{name}")
    x, y, vx, vy = tensors(1)
    probe = DecisionCheck(create_method(cfg), cfg)
    run_training(cfg, _session(workdir / cfg.name, device), method=probe,
                 loaders=memory_loaders(x, y, vx, vy, BATCH, seed=cfg.seed, device=device))
    compared = [r for r in probe.results if r["compared"]]
    return {"method": name, "calls": len(probe.results), "compared": len(compared),
            "equal": all(r["same_architecture"] and r["same_zeros"] and r["changed"] for r in compared),
            "max_rel_diff": max((r["max_rel_diff"] for r in compared), default=0.0),
            "not_compared": [r["why"] for r in probe.results if not r["compared"]]}


# --- throughput ---------------------------------------------------------------------------------


def throughput(batch: int, res: int, steps: int = 30, device: str = "cuda") -> dict[str, float]:
    """ResNet-50 images/s through the loop and in a bare step, on the same batches in the
    device's memory (``device="cpu"`` only to try the code path)."""
    device = torch.device(device)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else contextlib.nullcontext
    x = torch.randn(batch * 4, 3, res, res, device=device)
    y = torch.randint(0, 1000, (batch * 4,), device=device)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(ROOT / "recipes" / "demo.yaml", [
            "name=throughput", "method.name=none", "model.name=resnet50", "model.num_classes=1000",
            f"data.val_res={res}", f"data.batch_size={batch}", "schedule.epochs=3", "schedule.milestones=[]",
            "schedule.warmup_epochs=0", f"train.max_steps_per_epoch={steps}", f"checkpoint.storage_path={tmp}",
            "tracking.enabled=false", "train.progress=false", "train.check_replicas=false", "train.export=false",
            "train.accounting_repeats=0", "train.precision=bf16", "train.channels_last=true"])
        loaders = memory_loaders(x.repeat(steps // 4 + 1, 1, 1, 1), y.repeat(steps // 4 + 1), x[:batch], y[:batch],
                                 batch, device=device, channels_last=True)
        run_training(cfg, _session(Path(tmp) / "throughput", str(device)), loaders=loaders)
        history = load_state(Path(tmp) / "throughput" / "epoch_0002")["history"]
    loop_rate = statistics.median(h["throughput/train_images_per_s"] for h in history[1:])
    model = network.build(cfg, create_method(cfg), device).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-5)
    xb = x[:batch].contiguous(memory_format=torch.channels_last)

    def step() -> None:
        with autocast():
            loss = F.cross_entropy(model(xb), y[:batch])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def wait() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(min(10, steps)):
        step()
    wait()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    wait()
    bare_rate = batch * steps / (time.perf_counter() - t0)
    we, times = WeightEvolution(WEConfig.imagenet()), []
    for i in range(5):
        wait()
        t0 = time.perf_counter()
        we.step(model, epoch=10 + i)
        wait()
        times.append(time.perf_counter() - t0)
    we_s = statistics.median(times[1:])
    return {"batch": batch, "res": res, "loop_images_per_s": loop_rate, "bare_images_per_s": bare_rate,
            "loop_over_bare": loop_rate / bare_rate, "we_call_ms": we_s * 1000,
            "we_share_of_imagenet_epoch": we_s / (IMAGENET_TRAIN_IMAGES / loop_rate)}


# --- running it -----------------------------------------------------------------------------------


def _rank(rank: int, world: int, port: int, names: list[str], workdir: str, device: str, model: str,
          queue: Any) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    try:
        queue.put((rank, [check_replicas(rank, world, n, Path(workdir), device, model) for n in names]))
    except BaseException:   # the parent reports it instead of waiting for a result forever
        queue.put((rank, traceback.format_exc()))
        raise
    finally:
        dist.destroy_process_group()


def run_replicas(names: list[str], workdir: Path, device: str, world: int, model: str) -> list[dict[str, Any]]:
    """:func:`check_replicas` of every method on ``world`` spawned gloo ranks; rank 0's rows,
    with ``replicas_equal`` from every rank's checksum."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank, args=(r, world, port, names, str(workdir), device, model, queue))
             for r in range(world)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=3600) for _ in procs)
    for p in procs:
        p.join()
    for rank, result in results.items():
        if isinstance(result, str):
            raise RuntimeError(f"rank {rank} failed:\n{result}")
    rows = results[0]
    for i, row in enumerate(rows):
        row["replicas_equal"] = len({results[r][i]["checksum"] for r in results}) == 1
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--model", default="cifar_resnet20")
    parser.add_argument("--methods", default="all", help="comma-separated names, or all")
    parser.add_argument("--bench", action="store_true", help="ResNet-50 throughput (CUDA)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    names = method_names() if args.methods == "all" else args.methods.split(",")
    if args.device == "cuda":
        print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    report: dict[str, Any] = {"device": args.device, "torch": torch.__version__}
    with tempfile.TemporaryDirectory(prefix="we_dist_check_") as tmp:
        # One folder: the decisions' l1 and scratch runs start from the replicas' none and l1 runs.
        report["replicas"] = run_replicas(names, Path(tmp), args.device, args.world, args.model)
        report["decisions"] = [check_decisions(n, Path(tmp), args.device, args.model) for n in names]
    failed = 0
    print("| method | finite | pruned | export max diff | replicas equal | decisions equal "
          "(compared/calls) | max rel diff | s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for rep, dec in zip(report["replicas"], report["decisions"]):
        ok = rep["finite"] and rep["replicas_equal"] and rep["export"] < 1e-3 and dec["equal"]
        failed += not ok
        print(f"| {rep['method']} | {rep['finite']} | {rep['changed']} | {rep['export']:.1e} | "
              f"{rep['replicas_equal']} | {dec['equal']} ({dec['compared']}/{dec['calls']}) | "
              f"{dec['max_rel_diff']:.1e} | {rep['seconds']:.1f} |" + (f" not compared: {dec['not_compared']}"
                                                                      if dec["not_compared"] else ""))
    if args.bench:
        report["throughput"] = [throughput(b, r) for r in (160, 224) for b in (128, 256)]
        print("\n| batch | px | loop img/s | bare img/s | loop / bare | WE call ms | WE share of an ImageNet epoch |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for t in report["throughput"]:
            print(f"| {t['batch']} | {t['res']} | {t['loop_images_per_s']:,.0f} | {t['bare_images_per_s']:,.0f} | "
                  f"{t['loop_over_bare']:.3f} | {t['we_call_ms']:.2f} | {t['we_share_of_imagenet_epoch']:.4%} |")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
