"""``we-dist sensitivity``: how much each layer can lose, to choose L1 pruning ratios.

Li et al. (ICLR 2017, section 4.1) choose per-layer pruning ratios from a sensitivity analysis:
prune each layer *alone* by its smallest-L1 filters at several ratios and measure the validation
accuracy without retraining. A layer whose accuracy falls fast is sensitive (skip it, or prune it
less); a flat line can lose many filters. This command does that for a trained network:

    we-dist sensitivity recipes/fashion_mnist_resnet20.yaml model.init_from=runs/fmnist_base \\
        --ratios 0.1,0.3,0.5,0.7,0.9

For every layer :class:`~we_dist.methods.l1_filter.L1FilterPruningMethod` can prune (numbered
as in the paper: convs in module order from 1) and every ratio, a copy of the trained network
loses that layer's ``ceil(ratio x filters)`` smallest-L1 filters (physically, as the method
does), and its validation top-1 is measured on the recipe's FFCV validation set in this one
process (its batches decoded once and kept in memory; ``--max-batches`` caps them). Output: a table on the console, ``sensitivity.csv`` (one row per layer and ratio, ratio
0 = the unpruned network) and ``sensitivity.png`` (top-1 against ratio, one line per layer) in
``--out`` (default ``sensitivity/<base run>_<epoch>``, after the network analysed); both are
logged to MLflow (a run ``<name>_sensitivity`` in the recipe's experiment) when
``tracking.enabled``. A conv without a row of its own is listed under the table with the reason
(:func:`left_out`): in the small CNN, layer 2's filters go with those of the depthwise layer 3.
"""

from __future__ import annotations

import argparse
import copy
import csv
import itertools
import re
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from we_dist.methods.l1_filter import (conv_names, conv_stages, layer_decision, module_to_paper_layer,
                                      prunable_layers)
from we_dist.methods.channels import BatchNorm, all_groups, apply_decision, passes_zero_padding

CSV_FILE = "sensitivity.csv"
PLOT_FILE = "sensitivity.png"


def parse_ratios(text: str) -> list[float]:
    """``"0.1,0.5"`` -> ``[0.1, 0.5]``; each in (0, 1), or a clear error."""
    from we_dist.config import ConfigError

    try:
        ratios = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"--ratios must be comma-separated numbers, got {text!r}") from None
    if not ratios or any(not 0 < r < 1 for r in ratios):
        raise ConfigError(f"--ratios must be numbers in (0, 1), got {text!r}")
    return sorted(set(ratios))


def analyse(model: nn.Module, input_shape: Sequence[int], ratios: Sequence[float],
            evaluate: Any) -> list[dict[str, Any]]:
    """Rows ``{layer, module, stage, filters, ratio, removed, top1}``: ``evaluate(net)`` (top-1) of
    ``model`` with one prunable layer at a time losing its smallest-L1 filters at each ratio, and
    of the unpruned network (``layer`` 0, ``ratio`` 0). ``model`` itself is left unchanged."""
    model = model.eval()
    baseline = evaluate(model)
    rows = [{"layer": 0, "module": "(none)", "stage": 0, "filters": 0, "ratio": 0.0, "removed": 0, "top1": baseline}]
    stages = conv_stages(model, input_shape)
    modules = dict(model.named_modules())
    for name in sorted(prunable_layers(model, input_shape), key=lambda n: module_to_paper_layer(model, n)):
        n = modules[name].out_channels
        base_row = {"layer": module_to_paper_layer(model, name), "module": name, "stage": stages[name], "filters": n}
        rows.append({**base_row, "ratio": 0.0, "removed": 0, "top1": baseline})
        for ratio in ratios:
            pruned = copy.deepcopy(model)
            idxs = layer_decision(pruned, name, ratio)
            apply_decision(pruned, input_shape, {"prune": {name: idxs}})
            rows.append({**base_row, "ratio": float(ratio), "removed": len(idxs), "top1": evaluate(pruned.eval())})
    return rows


def left_out(model: nn.Module, input_shape: Sequence[int]) -> list[tuple[int, str, str]]:
    """The conv layers without a row of their own, as ``(paper layer, module, why)``: a layer
    whose filters go with another layer's (the conv before a depthwise conv: removing one of
    its filters removes that depthwise filter too, so the pair is one row, under the depthwise
    conv) or that cannot be pruned alone (channels through a zero-padding shortcut, no BatchNorm)."""
    modules = {m: n for n, m in model.named_modules()}
    rows = set(prunable_layers(model, input_shape))
    groups = {}   # conv name -> the group that removes its filters
    for group in all_groups(model, input_shape):
        for dep, _ in group:
            removes_filters = getattr(dep.handler, "__name__", "") == "prune_out_channels"
            if isinstance(dep.target.module, nn.Conv2d) and removes_filters:
                groups.setdefault(modules[dep.target.module], group)
    out = []
    for name in conv_names(model):
        if name in rows:
            continue
        group = groups.get(name)
        root = modules[group[0].dep.target.module] if group is not None else None
        if root in rows:
            layer = module_to_paper_layer(model, root)
            why = (f"its filters go with layer {layer}'s ({root}): pruning one removes the other, so layer "
                   f"{layer}'s row removes both (chosen by layer {layer}'s filter norms)")
        elif group is not None and passes_zero_padding(group):
            why = "its channels pass through a zero-padding shortcut (the residual stream): never pruned"
        elif group is not None and not any(isinstance(dep.target.module, BatchNorm) for dep, _ in group):
            why = "its group has no BatchNorm: not pruned by this method"
        else:
            why = "not prunable alone"
        out.append((module_to_paper_layer(model, name), name, why))
    return out


def table(rows: list[dict[str, Any]], ratios: Sequence[float], missing: Sequence[tuple[int, str, str]] = ()) -> str:
    """The console table: one line per layer, top-1 (%) at each ratio; then the layers without
    a row and why (``missing``, from :func:`left_out`)."""
    head = f"{'layer':>5} {'module':<22} {'stage':>5} {'filters':>7} " + " ".join(f"{r:>6.0%}" for r in ratios)
    lines = [head]
    baseline = next(r["top1"] for r in rows if r["layer"] == 0)
    layers = [r for r in rows if r["layer"] and r["ratio"] == 0.0]
    for lay in layers:
        accs = {r["ratio"]: r["top1"] for r in rows if r["module"] == lay["module"]}
        lines.append(f"{lay['layer']:>5} {lay['module']:<22} {lay['stage']:>5} {lay['filters']:>7} "
                     + " ".join(f"{100 * accs[float(r)]:>6.2f}" for r in ratios))
    lines.append(f"unpruned top-1: {100 * baseline:.2f}%  (layers numbered as in Li et al. 2017: convs in "
                 "module order from 1; each pruned alone, no retraining)")
    lines += [f"not in the table: layer {layer} {module}: {why}" for layer, module, why in missing]
    return "\n".join(lines)


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    """One CSV row per (layer, ratio)."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["layer", "module", "stage", "filters", "ratio", "removed", "top1"])
        writer.writeheader()
        writer.writerows(rows)


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """Top-1 (%) against the fraction of filters pruned away, one line per layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    modules = [r["module"] for r in rows if r["layer"] and r["ratio"] == 0.0]
    cmap = plt.get_cmap("viridis", max(len(modules), 2))
    for i, module in enumerate(modules):
        mine = sorted((r for r in rows if r["module"] == module), key=lambda r: r["ratio"])
        layer = mine[0]["layer"]
        ax.plot([100 * r["ratio"] for r in mine], [100 * r["top1"] for r in mine], marker="o", ms=3,
                color=cmap(i), label=f"{layer} {module}")
    ax.set_xlabel("filters pruned away (%)")
    ax.set_ylabel("validation top-1 (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if len(modules) <= 30:
        ax.legend(fontsize=6, ncol=2 if len(modules) > 12 else 1, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def load_base(cfg: Any, tracking_uri: str | None, device: torch.device) -> tuple[nn.Module, str]:
    """The network ``cfg.model.init_from`` names (architecture and weights), on ``device``, and
    the checkpoint directory it came from."""
    from we_dist.models import architecture, create_model
    from we_dist.train.init_from import load_network

    source = load_network(cfg.model.init_from, tracking_uri, map_location="cpu")
    model = create_model(cfg.model.name, cfg.model.num_classes, cfg.model.blurpool)
    if source.get("architecture"):
        architecture.rebuild(model, source["architecture"])
    model.load_state_dict(source["model"])
    print(f"[we_dist] sensitivity of the network from {source['source']}", flush=True)
    return model.to(device).eval(), source["source"]


def load_trained(cfg: Any, tracking_uri: str | None, device: torch.device) -> nn.Module:
    """The network ``cfg.model.init_from`` names (architecture and weights), on ``device``."""
    return load_base(cfg, tracking_uri, device)[0]


def default_out(init_from: str, source: str) -> Path:
    """``sensitivity/<base run>_<epoch>``: named after the network analysed (the run of its
    checkpoint ``source``, or the MLflow run id ``init_from`` names), so that analyses of two
    bases under one recipe do not overwrite each other."""
    checkpoint = Path(source)
    run_id = re.fullmatch(r"[0-9a-f]{32}", init_from) and not Path(init_from).exists()
    run = init_from if run_id else checkpoint.parent.name
    return Path("sensitivity") / f"{run}_{checkpoint.name}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `we-dist sensitivity`."""
    parser.add_argument("recipe", help="YAML recipe (its model and validation data)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides; model.init_from=... names the trained network")
    parser.add_argument("--ratios", default="0.1,0.3,0.5,0.7,0.9", help="fractions of filters pruned (comma-separated)")
    parser.add_argument("--out", default="", help="where sensitivity.csv and .png go (default: "
                        "sensitivity/<base run>_<epoch>, after the network analysed)")
    parser.add_argument("--max-batches", type=int, default=0, help="evaluate on at most this many validation "
                        "batches (0: all)")
    # Overrides after the options too (`... --ratios 0.1,0.5 tracking.uri=...`), as train and compare take them.
    parser.parse_args = parser.parse_intermixed_args  # type: ignore[method-assign]


def run(args: argparse.Namespace) -> int:
    """`we-dist sensitivity`: see the module docstring."""
    from we_dist.config import ConfigError, load_config
    from we_dist.data import DatasetError, check_beton, make_val_loader
    from we_dist.train.init_from import InitFromError
    from we_dist.train.loop import evaluate
    from we_dist.tracking.store import resolve_uri

    cfg = load_config(args.recipe, args.overrides)
    ratios = parse_ratios(args.ratios)
    if args.max_batches < 0:
        raise ConfigError(f"--max-batches must be >= 0, got {args.max_batches}")
    if not cfg.model.init_from:
        raise ConfigError("sensitivity analyses a trained network: set model.init_from to a checkpoint, run "
                          "directory or MLflow run id")
    uri = resolve_uri(cfg.tracking)
    use_gpu = cfg.scaling.use_gpu and torch.cuda.is_available()
    device = torch.device("cuda") if use_gpu else torch.device("cpu")
    try:
        model, source = load_base(cfg, uri, device)
    except InitFromError as exc:
        raise ConfigError(str(exc)) from None
    try:   # a missing or bad file as one line, with how to make it (not FFCV's traceback)
        check_beton(cfg.data.val_path, num_classes=cfg.model.num_classes)
    except DatasetError as exc:
        raise ConfigError(f"data.val_path: {exc}") from None
    loader = make_val_loader(cfg.data, distributed=False, device=device)
    input_shape = cfg.data.input_shape

    # Validation batches carry no augmentation: decode them once and score every pruned copy on
    # the same tensors (dozens of evaluations; FFCV's per-pass start-up would dominate).
    batches = list(itertools.islice(loader, args.max_batches or None))

    def top1(net: nn.Module) -> float:
        return evaluate(net, batches, device, nullcontext)["val/top1"]

    rows = analyse(model, input_shape, ratios, top1)
    missing = left_out(model, input_shape)
    out = Path(args.out) if args.out else default_out(cfg.model.init_from, source)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(rows, out / CSV_FILE)
    plot(rows, out / PLOT_FILE, f"{out.name}: L1 pruning sensitivity (each layer alone, no retraining)")
    print(table(rows, ratios, missing), flush=True)
    print(f"[we_dist] wrote {out / CSV_FILE} and {out / PLOT_FILE}", flush=True)
    if cfg.tracking.enabled:
        _log(cfg, uri, rows, out, missing)
    return 0


def _log(cfg: Any, uri: str, rows: list[dict[str, Any]], out: Path,
         missing: Sequence[tuple[int, str, str]] = ()) -> None:
    """The CSV, the plot and the baseline accuracy as an MLflow run of the recipe's experiment."""
    from we_dist.tracking import RunLogger
    from we_dist.tracking.runs import finish_run, open_run

    run_id = open_run(cfg.tracking, run_name=f"{cfg.name}_sensitivity", config_dict=cfg, resume=False)
    logger = RunLogger(uri, run_id, enabled=True)
    logger.log_metrics({"sensitivity/unpruned_top1": next(r["top1"] for r in rows if r["layer"] == 0)}, step=0)
    logger.log_files([out / CSV_FILE, out / PLOT_FILE], "sensitivity")
    logger.log_text(table(rows, sorted({r["ratio"] for r in rows if r["ratio"] > 0}), missing),
                    "sensitivity/table.txt")
    finish_run(uri, run_id)
    print(f"[we_dist] logged to MLflow run {run_id} (experiment {cfg.tracking.experiment})", flush=True)
