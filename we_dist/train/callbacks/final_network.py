"""What the run ends with (rank 0): the network's accounting before and after training, the
epoch summary, the exported network, the final weights and the run's MLflow model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from we_dist import accounting, network
from we_dist.models import architecture, create_model
from we_dist.export import INPUT_NOTE, export_model
from we_dist.tracking import model as mlflow_model
from we_dist.tracking.names import FINAL_DIR
from we_dist.train.callbacks.best_epoch import BestEpoch
from we_dist.train.events import Callback

#: the summary table's columns: metric key, heading, format; a method adds its own
#: (:meth:`~we_dist.methods.base.Method.summary_columns`)
SUMMARY_COLUMNS = [("epoch", "epoch", "{:>5.0f}"), ("train/loss", "loss", "{:>7.4f}"), ("val/top1", "top1", "{:>6.2%}"),
                   ("val/top5", "top5", "{:>6.2%}"), ("lr", "lr", "{:>8.4g}"),
                   ("throughput/train_images_per_s", "img/s", "{:>8.0f}"), ("time/epoch_s", "s", "{:>6.1f}")]


def summary_table(history: list[dict[str, float]], extra: list[tuple[str, str, str]] = ()) -> str:
    """One row per epoch of ``history``; a column only where some epoch has its metric."""
    cols = [c for c in [*SUMMARY_COLUMNS, *extra] if any(c[0] in h for h in history)]
    head = " ".join(f"{label:>{len(fmt.format(0))}}" for _, label, fmt in cols)
    lines = [head, "-" * len(head)]
    for h in history:
        cells = []
        for key, _, fmt in cols:
            width = len(fmt.format(0))
            cells.append(fmt.format(h[key]) if key in h else " " * (width - 1) + "-")
        lines.append(" ".join(cells))
    return "\n".join(lines)


class FinalNetwork(Callback):
    """Rank 0: counts the network as a fresh run starts (params, MACs; the MLflow tags
    ``we_dist.network.start.*``, kept in the checkpoints as ``accounting_start`` with the
    starting widths) and, into the last epoch's checkpoint, as it ends (``we_dist.network.end.*``). The CPU latency of both is timed
    then, side by side (:func:`~we_dist.accounting.latency_side_by_side`; the start's on a
    network of the starting widths), so the end/start ratio is not the machine's load at two
    moments; it costs the start nothing. Then it prints the summary, exports the network
    (``train.export``: ``exported.pt2`` and the method's own artifacts) and logs them with the
    final weights under the run's ``final/``, and the MLflow model, a LoggedModel
    (``tracking.log_model``: the best epoch's network, from ``best``, or the last, per
    ``tracking.model_epoch``)."""

    state_key = "accounting_start"

    def __init__(self, best: BestEpoch | None = None) -> None:
        self.best = best
        self.start: dict[str, float] = {}
        self.start_widths: dict[str, Any] | None = None   # the start's architecture (None: the config's)

    def state_dict(self) -> dict[str, Any]:
        return {**self.start, **({"architecture": self.start_widths} if self.start_widths else {})}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        state = dict(state or {})
        self.start_widths = state.pop("architecture", None)
        self.start = {k: float(v) for k, v in state.items()}

    def on_fit_start(self, loop: Any) -> None:
        if loop.rank == 0 and loop.start_epoch == 0:
            self.start = accounting.account(loop.model, loop.input_shape, repeats=0)
            self.start_widths = network.describe(loop.model)
            loop.logger.log_network("start", self.start)

    def _start_network(self, loop: Any) -> nn.Module:
        """A network of the starting widths (its weights do not matter to its latency)."""
        cfg = loop.cfg
        net = create_model(cfg.model.name, cfg.model.num_classes, cfg.model.blurpool)
        if self.start_widths:
            architecture.rebuild(net, self.start_widths)
        return net

    def on_checkpoint(self, loop: Any, directory: str) -> None:
        if loop.rank != 0 or not loop.last_epoch:
            return
        cfg, model, logger = loop.cfg, loop.model, loop.logger
        end = accounting.account(model, loop.input_shape, repeats=0)
        if cfg.train.accounting_repeats > 0:
            timed = accounting.latency_side_by_side({"start": self._start_network(loop), "end": model},
                                                    loop.input_shape, cfg.train.accounting_repeats)
            end.update(timed["end"])
            if "model/cpu_latency_ms_b1" not in self.start:   # the start's timing is logged once
                logger.log_network("start", timed["start"])
            self.start.update(timed["start"])   # the console's ratio: the pair timed just now
        logger.log_network("end", end)
        print("[we_dist] summary\n" + summary_table(loop.history, loop.method.summary_columns()), flush=True)
        if self.start:
            print("[we_dist] the network, before and after training\n"
                  + accounting.summary_lines(self.start, end), flush=True)
        if cfg.train.export:
            # What the file holds: the last epoch's network (the MLflow model may be the best's).
            what = {"epoch": loop.epoch, "selected": "last", "params": end["model/params"],
                    "nonzero_params": end["model/nonzero_params"], "macs": end["model/macs"]}
            path = export_model(model, loop.input_shape, directory, network=what)
            extra = loop.method.export_artifacts(model, Path(directory))
            logger.log_files([path, Path(directory) / INPUT_NOTE, *extra], FINAL_DIR)
        if cfg.tracking.log_model:
            # The state dict as it always was; the widths beside it rebuild a pruned network first.
            logger.log_state_dict(model.state_dict())
            logger.log_text(json.dumps(network.describe(model), indent=1), f"{FINAL_DIR}/architecture.json")

    def on_epoch_committed(self, loop: Any) -> None:
        # After the last checkpoint is committed and the Tracking callback (before this one) has
        # logged its epoch: the LoggedModel carries the selected epoch's metrics, the last one's too.
        if loop.rank == 0 and loop.last_epoch and loop.cfg.tracking.log_model and loop.logger.enabled:
            self._log_mlflow_model(loop, loop.model)

    def _log_mlflow_model(self, loop: Any, model: nn.Module) -> None:
        """Log the selected network as the run's MLflow model, a LoggedModel (``runs:/<id>/model``),
        registered under ``tracking.register_as`` if set (see :mod:`we_dist.tracking.model`)."""
        cfg, logger, best = loop.cfg, loop.logger, self.best
        last = loop.history[-1] if loop.history else {}
        net, epoch, top1, which = model, int(last.get("epoch", -1)), last.get("val/top1"), "last"
        if best is not None and best.enabled and best.model is not None:
            try:
                net, epoch, top1, which = best.network(model), best.epoch, best.top1, "best"
            except Exception as exc:   # noqa: BLE001 - e.g. a method that swapped layer types later on
                print(f"[we_dist] warning: the best epoch's network (epoch {best.epoch}) could not be rebuilt "
                      f"({type(exc).__name__}: {exc}); the MLflow model is the last epoch's", flush=True)
        try:
            deployed = network.deployed(net)
            info = mlflow_model.network_info(cfg, deployed, epoch=epoch, val_top1=top1, selected=which,
                                             pruned=network.is_pruned(cfg, deployed))
        except Exception as exc:   # noqa: BLE001 - the checkpoints hold the network; training is done
            if logger.strict:
                raise
            print(f"[we_dist] warning: the MLflow model could not be prepared ({type(exc).__name__}: {exc}); "
                  f"the checkpoints hold the network", flush=True)
            return
        if mlflow_model.log_selected(logger, deployed, info, cfg.tracking.register_as):
            print(f"[we_dist] MLflow model: the {which} epoch's network (epoch {epoch}, val top1 "
                  f"{float('nan') if top1 is None else top1:.4f}) at runs:/{logger.run_id}/model", flush=True)
