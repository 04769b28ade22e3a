"""What the training loop's values are called in MLflow, and where a run keeps its files.

The loop's metric dict (what Ray Tune, the console, the checkpoints and ``we-dist compare``'s
Tune fallback read) keeps its own names. Only rank 0's MLflow record renames them, here, so
that MLflow 3's run page, which draws one chart per metric in sections named by the key's
prefix (everything before its last ``/``) sorted alphabetically, opens on the training and
validation curves::

    loop key                         MLflow metric
    val/top1, val/loss, ...          val/top1, val/loss, ...            (unchanged)
    train/loss, train/top1           train/loss, train/top1             (unchanged)
    lr, phase                        train/lr, train/phase (phase: only a run of several phases)
    epoch, step                      not logged: the MLflow step is the epoch
    time/*, throughput/*, replicas/* workload/time/*, workload/throughput/*, workload/replicas/*
    <method>/* (we/*, slim/*, ...)   unchanged (the method's own names, docs/methods.md)

``train`` < ``val`` < ``we`` < ``workload``: a WE run's page shows train, val, WE, then the
timings. A method whose name sorts before ``train`` (every one but ``we``) has its section
above the curves.

The network's accounting at the start and at the end of training (``model/*`` in
:mod:`we_dist.accounting`) is a handful of one-off numbers, logged as tags
(:func:`network_tags`), not as metrics: a metric is a chart, and ``model`` sorts first.

A run logged by an older we_dist (epoch metrics ``epoch``, ``lr`` ...) keeps its names when it
is resumed (:func:`legacy_run`), so its series stay continuous; readers take either name
(:func:`loop_key`).
"""

from __future__ import annotations

from typing import Any, Mapping

# --- metrics ---------------------------------------------------------------------------------

DROPPED = ("epoch", "step")                        # the MLflow step says it
RENAMED = {"lr": "train/lr", "phase": "train/phase"}
WORKLOAD = "workload/"
WORKLOAD_PREFIXES = ("time/", "throughput/", "replicas/")
# Epoch metrics only a run logged by an older we_dist has (unprefixed keys the loop wrote as is).
LEGACY_KEYS = ("epoch", "step", "lr", "phase")


def mlflow_key(key: str) -> str | None:
    """The MLflow name of the loop's metric ``key`` (None: not logged)."""
    if key in DROPPED:
        return None
    if key in RENAMED:
        return RENAMED[key]
    if key.startswith(WORKLOAD_PREFIXES):
        return WORKLOAD + key
    return key


def loop_key(key: str) -> str:
    """The loop's name of MLflow metric ``key``: the inverse of :func:`mlflow_key` (an old
    run's names are the loop's already)."""
    for loop, mlflow in RENAMED.items():
        if key == mlflow:
            return loop
    if key.startswith(WORKLOAD) and key[len(WORKLOAD):].startswith(WORKLOAD_PREFIXES):
        return key[len(WORKLOAD):]
    return key


def mlflow_metrics(metrics: Mapping[str, Any], legacy: bool = False, phased: bool = True) -> dict[str, Any]:
    """One epoch's metrics under their MLflow names (as they are for a ``legacy`` run). Without
    ``phased`` (a run of one phase, whose index is always 0) the phase is left out: a flat chart
    in the first row of the run page."""
    if legacy:
        return dict(metrics)
    out = {}
    for key, value in metrics.items():
        name = mlflow_key(str(key))
        if name is not None and (phased or key != "phase"):
            out[name] = value
    return out


def legacy_run(metric_keys: Any) -> bool:
    """Whether a run with these metric keys was logged by a we_dist that used the loop's names."""
    return any(k in LEGACY_KEYS for k in metric_keys)


# --- tags ------------------------------------------------------------------------------------

#: What a fresh run started from, checksums of the initial weights and of the first batch (every
#: rank's, summed): tags, set by rank 0 at the first step. ``we-dist compare`` reads them.
START_TAGS = ("we_dist.start.param_checksum", "we_dist.start.first_batch_checksum")
#: Where runs logged by an older we_dist have them: as params.
START_PARAMS = ("init/param_checksum", "data/first_batch_checksum")

NETWORK_TAG = "we_dist.network.{stage}.{name}"     # stage: start or end; name: params, macs, ...
NETWORK_STAGES = ("start", "end")


def network_tags(stage: str, stats: Mapping[str, float]) -> dict[str, str]:
    """``{"model/params": 61770.0, ...}`` -> ``{"we_dist.network.start.params": "61770", ...}``."""
    if stage not in NETWORK_STAGES:
        raise ValueError(f"stage must be one of {NETWORK_STAGES}, got {stage!r}")
    out = {}
    for key, value in stats.items():
        name = str(key).removeprefix("model/")
        number = float(value)
        out[NETWORK_TAG.format(stage=stage, name=name)] = (str(int(number)) if number.is_integer()
                                                           else f"{number:.6g}")
    return out


def network_from_tags(tags: Mapping[str, str], stage: str) -> dict[str, float]:
    """The accounting :func:`network_tags` recorded for ``stage``, as ``{"model/params": ...}``."""
    prefix = NETWORK_TAG.format(stage=stage, name="")
    out = {}
    for key, value in tags.items():
        if key.startswith(prefix):
            try:
                out["model/" + key[len(prefix):]] = float(value)
            except ValueError:
                continue
    return out


# --- artifacts -------------------------------------------------------------------------------

MODEL_DIR = "model"    # the run's MLflow model: a LoggedModel of that name (runs:/<id>/model)
FINAL_DIR = "final"    # the last epoch's files: final_weights.pt, architecture.json, exported.*
# Runs logged by an older we_dist kept the last epoch's files in their own ``model/`` folder,
# beside the MLflow model's files.
LEGACY_FINAL_DIR = MODEL_DIR
