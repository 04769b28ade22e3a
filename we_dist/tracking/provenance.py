"""What a training run was made of, recorded on its MLflow run, and how to look at it.

Set when the driver opens (or resumes) the run of ``we-dist train``:

* **tags** (:func:`provenance_tags`): ``we_dist.method``, ``we_dist.model``,
  ``we_dist.dataset`` (the train and val file names), the versions of we_dist, torch, Ray,
  FFCV and MLflow (``we_dist.version.<package>``), the git commit of the working tree the
  ``we_dist`` code ran from (MLflow's own ``mlflow.source.git.commit``, and
  ``we_dist.git.dirty``, ``true`` when that tree has uncommitted changes; neither outside a
  git tree), the run's checkpoint directory (``we_dist.checkpoint_dir``) and, for a job
  submitted with ``we-dist submit``, the Ray job's submission id (``we_dist.ray_job_id``).
  They describe the latest launch: a resume sets them again.
* **description** (:func:`run_description`): MLflow's ``mlflow.note.content``, from
  ``description=...`` in the config, else the recipe's leading ``#`` comment block.
* **datasets** (:func:`log_datasets`): the train and val ``.beton`` files as MLflow dataset
  inputs (contexts ``training`` and ``validation``) with their size, number of samples and a
  digest; a resumed run does not log them again.

Rank 0 samples the machine with MLflow's own system-metrics monitor while it trains
(:func:`system_metrics`), and the driver ends with the address of the run in the MLflow UI
(:func:`ui_lines`).

Example::

    tags = provenance_tags(cfg, checkpoint_dir=run_dir)
    run_id = open_run(cfg.tracking, run_name=cfg.name, config_dict=cfg.to_dict(), tags=tags,
                      description=run_description(cfg, "recipes/demo.yaml"))
    log_datasets(resolve_uri(cfg.tracking), run_id, cfg.data.train_path, cfg.data.val_path)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import subprocess
import sys
import threading
import warnings
from collections.abc import Iterator, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

METHOD_TAG = "we_dist.method"
MODEL_TAG = "we_dist.model"
DATASET_TAG = "we_dist.dataset"
VERSION_TAG = "we_dist.version."          # + package name
GIT_COMMIT_TAG = "mlflow.source.git.commit"  # MLflow's own name: the UI shows it as the run's source version
GIT_DIRTY_TAG = "we_dist.git.dirty"
CHECKPOINT_DIR_TAG = "we_dist.checkpoint_dir"
RAY_JOB_TAG = "we_dist.ray_job_id"
NOTE_TAG = "mlflow.note.content"          # MLflow's run description
# MLflow 3's UI picks its GenAI or its model-training pages per experiment: from this
# experiment tag, or (in 3.17, where the workflow selector decides) from the URL's
# ``workflowType`` parameter, which :func:`run_url` sets.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"

VERSIONED = ("we_dist", "torch", "ray", "ffcv", "mlflow")
# Distribution names where they differ from the import name (FFCV is published as "ffcv").
_DISTRIBUTIONS = {"we_dist": "we-dist"}
GIT_TIMEOUT_S = 5.0
# Ray Jobs hands a job's driver its config, submission id included, in this variable
# (ray._private.runtime_env.constants.RAY_JOB_CONFIG_JSON_ENV_VAR, metadata key
# "job_submission_id" as in ray.dashboard.modules.job.common.JOB_ID_METADATA_KEY).
RAY_JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"

# The digest of a data file reads its first and last MiB and its size, not the whole file:
# an ImageNet .beton is ~100 GB, and the driver opens the run before training starts. Two
# files of equal size that differ only in the middle would share a digest; a .beton's header,
# metadata and allocation table (at both ends) change with almost any change to its content.
DIGEST_CHUNK = 1 << 20


# --- tags ----------------------------------------------------------------------------------


def package_versions(names: tuple[str, ...] = VERSIONED) -> dict[str, str]:
    """Version of each installed package, from its metadata (nothing is imported here);
    "unknown" when it is not installed. Where the module is imported and its ``__version__``
    extends that version with a build tag (torch's ``2.14.1+cu130``), the longer one is kept;
    a ``__version__`` that disagrees (FFCV 1.0.2 still says 0.0.3rc1) is ignored."""
    out = {}
    for name in names:
        version = "unknown"
        for dist in dict.fromkeys((_DISTRIBUTIONS.get(name, name), name)):
            try:
                version = metadata.version(dist)
                break
            except metadata.PackageNotFoundError:
                continue
        imported = getattr(sys.modules.get(name), "__version__", None)
        if isinstance(imported, str) and version != "unknown" and imported.startswith(version + "+"):
            version = imported
        out[name] = version
    return out


def _git(directory: Path, *args: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(directory), *args], capture_output=True, text=True,
                              timeout=GIT_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired):   # no git, or a hung file system: no tag
        return None
    return done.stdout if done.returncode == 0 else None


def git_tags(directory: str | os.PathLike[str]) -> dict[str, str]:
    """``mlflow.source.git.commit`` of the git working tree holding ``directory``, and
    ``we_dist.git.dirty``: "true" when that tree has uncommitted changes (``git status
    --porcelain`` is not empty), else "false"; empty when ``directory`` is not in a git tree
    (or git is missing or too slow)."""
    directory = Path(directory)
    commit = _git(directory, "rev-parse", "HEAD")
    if not commit or not commit.strip():
        return {}
    status = _git(directory, "status", "--porcelain")
    # "false" too (not only "true" when dirty): a resume sets the tags again, and must not
    # leave an earlier launch's "true" on a run whose tree is clean now.
    return {GIT_COMMIT_TAG: commit.strip(), GIT_DIRTY_TAG: "true" if status and status.strip() else "false"}


def code_directory() -> Path:
    """Where the ``we_dist`` code that runs lives (its git tree is the run's source version)."""
    import we_dist

    return Path(we_dist.__file__).resolve().parent


def ray_job_id(environ: Mapping[str, str] | None = None) -> str | None:
    """The submission id of the Ray job this process is the driver of (``we-dist submit``), or None."""
    raw = (os.environ if environ is None else environ).get(RAY_JOB_CONFIG_ENV)
    if not raw:
        return None
    try:
        job_id = (json.loads(raw).get("metadata") or {}).get("job_submission_id")
    except (ValueError, AttributeError):
        return None
    return str(job_id) if job_id else None


def provenance_tags(cfg: Any, checkpoint_dir: str | None = None, code_dir: str | os.PathLike[str] | None = None,
                    environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The provenance tags of a training run of ``cfg`` (see the module docstring).

    ``code_dir``: the directory whose git tree is recorded (default: the ``we_dist`` package's).
    """
    tags = {
        METHOD_TAG: cfg.method.name,
        MODEL_TAG: cfg.model.name,
        DATASET_TAG: f"train={Path(cfg.data.train_path).name}, val={Path(cfg.data.val_path).name}",
    }
    tags.update({VERSION_TAG + name: version for name, version in package_versions().items()})
    tags.update(git_tags(code_dir if code_dir is not None else code_directory()))
    if checkpoint_dir:
        tags[CHECKPOINT_DIR_TAG] = str(checkpoint_dir)
    job = ray_job_id(environ)
    if job:
        tags[RAY_JOB_TAG] = job
    return tags


# --- description ---------------------------------------------------------------------------


def recipe_description(recipe: str | os.PathLike[str] | None) -> str:
    """The recipe's leading comment block: its first lines that start with ``#`` (blank lines
    before it skipped), without the ``#`` and one following space; "" when there is none."""
    if not recipe:
        return ""
    try:
        lines = Path(recipe).read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        return ""
    block: list[str] = []
    for line in lines:
        text = line.strip()
        if not text and not block:
            continue
        if not text.startswith("#"):
            break
        block.append(text[1:].removeprefix(" "))
    return "\n".join(block).strip()


def run_description(cfg: Any, recipe: str | os.PathLike[str] | None = None) -> str:
    """The run's description: ``description`` from the config, else the recipe's header comment."""
    return (cfg.description or "").strip() or recipe_description(recipe)


# --- datasets ------------------------------------------------------------------------------


def file_digest(path: str | os.PathLike[str]) -> str:
    """SHA-256 (hex, first 16 digits) of the file's size, first MiB and last MiB (see DIGEST_CHUNK)."""
    p = Path(path)
    size = p.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with p.open("rb") as f:
        h.update(f.read(DIGEST_CHUNK))
        if size > DIGEST_CHUNK:
            f.seek(max(size - DIGEST_CHUNK, DIGEST_CHUNK))
            h.update(f.read(DIGEST_CHUNK))
    return h.hexdigest()[:16]


def beton_dataset(path: str | os.PathLike[str]) -> Any:
    """An MLflow dataset (:class:`mlflow.data.meta_dataset.MetaDataset`) describing a ``.beton``
    file: name (the file name), source (its absolute path), digest (:func:`file_digest`) and a
    profile with its size in bytes and number of samples."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    from we_dist.data.beton import check_beton

    p = Path(path).resolve()
    info = check_beton(p)
    profile = {"num_samples": info.num_samples, "size_bytes": info.size_bytes, "num_classes": info.num_classes}

    class BetonDataset(MetaDataset):
        """A MetaDataset with a profile (MetaDataset itself has none)."""

        @property
        def profile(self) -> dict[str, int]:
            return profile

        def to_dict(self) -> dict[str, str]:
            return {**super().to_dict(), "profile": json.dumps(profile)}

    with warnings.catch_warnings():
        # MLflow registers its local-file source twice (schemes "" and "file") and warns that a
        # path matches both; both are the same class.
        warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted in multiple")
        source = resolve_dataset_source(str(p))
    return BetonDataset(source, name=p.name, digest=file_digest(p))


def log_datasets(tracking_uri: str, run_id: str, train_path: str, val_path: str) -> int:
    """Log the train and val files as the run's dataset inputs (contexts ``training`` and
    ``validation``), each unless the run already has that dataset (same name and digest) in
    that context: a resumed run keeps one of each. Returns how many were logged."""
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.tracking import MlflowClient
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    client = MlflowClient(tracking_uri)
    present = set()
    for item in client.get_run(run_id).inputs.dataset_inputs:
        context = next((t.value for t in item.tags if t.key == MLFLOW_DATASET_CONTEXT), None)
        present.add((item.dataset.name, item.dataset.digest, context))
    batch = []
    for path, context in ((train_path, "training"), (val_path, "validation")):
        dataset = beton_dataset(path)
        if (dataset.name, dataset.digest, context) in present:
            continue
        batch.append(DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)]))
    if batch:
        client.log_inputs(run_id, datasets=batch)
    return len(batch)


# --- system metrics ------------------------------------------------------------------------


@contextlib.contextmanager
def system_metrics(tracking_uri: str | None, run_id: str | None, enabled: bool,
                   sampling_interval_s: float = 10.0, stop_timeout_s: float = 15.0) -> Iterator[Any]:
    """Sample this machine's CPU, memory, disk, network (and NVIDIA GPUs when ``pynvml`` is
    installed) into run ``run_id`` with MLflow's own :class:`SystemMetricsMonitor` while the
    block runs (metrics ``system/...``, one step per sample), and stop it when the block ends,
    normally or by an exception (KeyboardInterrupt included). Yields the monitor, or None when
    disabled or when it cannot start (a warning: sampling must not stop training).

    Steps continue after the run's last ``system/`` step, so a resumed run or restarted worker
    adds to the series instead of writing over it. ``MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL``
    overrides ``sampling_interval_s``. The monitor stops by itself once the run is no longer
    RUNNING (e.g. marked KILLED after a Ctrl-C whose process never reaches the end of the block).
    """
    monitor = None
    if enabled and run_id:
        # MLflow announces the monitor's start and stop at INFO on every run: console noise.
        logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
        try:
            from mlflow.system_metrics.system_metrics_monitor import (
                SystemMetricsMonitor,
            )

            monitor = SystemMetricsMonitor(run_id, sampling_interval=sampling_interval_s, resume_logging=True,
                                           tracking_uri=tracking_uri)
            monitor.start()
        except Exception as exc:   # noqa: BLE001 - e.g. psutil missing, or the store unreachable right now
            log.warning("MLflow system metrics are off for run %s: %s", run_id, exc)
            monitor = None
    try:
        yield monitor
    finally:
        if monitor is not None:
            # MLflow's finish() joins the sampler and sends its last batch with no time limit; with
            # the server down that would hold the end of training for MLflow's whole retry budget
            # (minutes), past tracking.final_flush_s. Wait a bounded time; the samples are expendable.
            stopper = threading.Thread(target=monitor.finish, name="we-dist-system-metrics-stop", daemon=True)
            stopper.start()
            stopper.join(stop_timeout_s)
            if stopper.is_alive():
                log.warning("MLflow system metrics for run %s did not stop within %.0f s (tracking server "
                            "unreachable?); their last samples are dropped", run_id, stop_timeout_s)


# --- the run in the UI ---------------------------------------------------------------------

UI_ADDRESS = "http://127.0.0.1:5000"


def run_url(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    """The run's page in the MLflow UI: on the tracking server itself for an ``http(s)`` store,
    else on ``mlflow ui``'s default address. ``workflowType=machine_learning`` opens MLflow 3's
    model-training pages rather than its GenAI ones (the UI's default)."""
    base = tracking_uri.rstrip("/") if tracking_uri.startswith(("http://", "https://")) else UI_ADDRESS
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning"


def ui_lines(tracking_uri: str, experiment_id: str, run_id: str) -> list[str]:
    """What to print at the end of a run: for a local store, the ``mlflow ui`` command that
    serves it; then the run's URL (:func:`run_url`)."""
    from we_dist.tracking.store import redact

    lines = []
    if not tracking_uri.startswith(("http://", "https://")):
        lines.append(f"view it: mlflow ui --backend-store-uri {redact(tracking_uri)} --host 127.0.0.1 --port 5000")
    lines.append(f"run page: {redact(run_url(tracking_uri, experiment_id, run_id))}")
    return lines
