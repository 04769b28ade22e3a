"""Bad input is refused before anything starts: one clear line, exit status 2."""

import subprocess
import time
import sys
from pathlib import Path

import pytest

from we_dist.ports import free_port

ROOT = Path(__file__).resolve().parents[1]
WE_DIST = str(Path(sys.executable).with_name("we-dist"))
DEMO = str(ROOT / "recipes" / "demo.yaml")


def we_dist(*args, cwd=None, timeout=120):
    return subprocess.run([WE_DIST, *args], capture_output=True, text=True, timeout=timeout, cwd=cwd)


def we_dist_here(*args, cwd=None, timeout=120, env=None):
    """`we-dist ARGS` run from this checkout's code (``python -m we_dist.cli``): the console
    script imports the checkout it was installed from, which need not be this one."""
    import os

    env = {**os.environ, **(env or {}), "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "we_dist.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env=env)


def test_help_lists_every_command():
    out = we_dist("--help")
    assert out.returncode == 0
    for command in ("convert", "train", "tune", "submit", "jobs", "cluster", "config"):
        assert command in out.stdout


def test_every_command_help_shows_examples_that_parse():
    """Each `we-dist COMMAND --help` ends with examples and where the keys are documented, and every
    example is accepted by that command's own argument parser (so the examples cannot rot)."""
    import argparse
    import importlib
    import shlex

    from we_dist.cli import COMMANDS, EXAMPLES, epilog

    assert not set(COMMANDS) - set(EXAMPLES), "commands without examples"
    for command in ("train", "compare", "convert"):
        out = we_dist(command, "--help")
        assert out.returncode == 0
        assert "examples:" in out.stdout and "Overriding config keys" in out.stdout, command
    for command, text in EXAMPLES.items():
        module = importlib.import_module(COMMANDS[command][0])
        parser = argparse.ArgumentParser(prog=f"we-dist {command}", epilog=epilog(command), exit_on_error=False)
        module.add_arguments(parser)
        for line in text.splitlines():
            words = shlex.split(line.replace("$HOME", "/home/u"))
            assert words[:2] == ["we-dist", command], line
            parser.parse_args(words[2:])   # raises (exit 2) on an example that no longer parses


def test_help_and_version_import_nothing_heavy():
    """`we-dist --help` and `--version` answer without importing torch, Ray or FFCV."""
    code = ("import sys; from we_dist.cli import main; main(['--help']); main(['--version']); "
            "heavy = [m for m in ('torch', 'ray', 'ffcv', 'mlflow') if m in sys.modules]; "
            "print('HEAVY', heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "HEAVY []" in out.stdout, out.stdout + out.stderr
    from we_dist import __version__
    assert f"we-dist {__version__}" in out.stdout


def test_config_validates_every_recipe_and_method_section_without_importing_torch():
    """`we-dist config` needs only the torch-free settings modules (benchmarks/cli_startup.py times it)."""
    recipes = sorted(str(p) for p in (ROOT / "recipes").glob("*.yaml"))
    code = ("import sys; from we_dist.cli import main\n"
            f"recipes = {recipes!r}\n"
            "for recipe in recipes:\n"
            "    assert main(['config', recipe]) == 0, recipe\n"
            "assert main(['config', recipes[0], 'method.name=repr', 'method.repr.s1=3', "
            "'method.we.lab=0.5', 'method.l1.ratios=[0.2, 0.3]']) == 0\n"
            "assert main(['config', recipes[0], 'method.name=none']) == 0\n"
            "assert main(['config', recipes[0], 'method.repr.s1=0']) == 2\n"
            "heavy = [m for m in ('torch', 'numpy', 'ray', 'ffcv', 'mlflow') if m in sys.modules]\n"
            "print('HEAVY', heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "HEAVY []" in out.stdout, out.stdout[-2000:] + out.stderr[-2000:]
    assert "s1: 3" in out.stdout and "method.repr.s1" in out.stderr   # the override shown; the bad one named


def test_config_prints_the_active_methods_settings_and_loads_back(tmp_path):
    """`we-dist config` shows the settings of the method in use (not all fourteen methods'), says
    where the others are, and what it prints is a recipe that loads as the same config; a change
    to another method's settings is kept, so nothing is lost."""
    from we_dist.config import load_config

    for overrides in ([], ["method.name=l1", "method.we.lab=0.5"], ["method.name=none"]):
        out = we_dist_here("config", DEMO, *overrides, cwd=tmp_path)
        assert out.returncode == 0, out.stderr[-2000:]
        recipe = tmp_path / "printed.yaml"
        recipe.write_text(out.stdout)
        assert load_config(recipe) == load_config(DEMO, overrides)
        method = load_config(DEMO, overrides).method.name
        assert "`we-dist methods NAME`" in out.stdout
        sections = {line.strip(" :") for line in out.stdout.split("\nmethod:\n")[1].splitlines()
                    if line.startswith("  ") and not line.startswith("   ") and line.endswith(":")}
        assert sections == ({method} - {"none"}) | ({"we"} if method != "we" else set()), sections
    assert len(we_dist_here("config", DEMO, cwd=tmp_path).stdout.splitlines()) < 120     # was 199 lines


@pytest.mark.parametrize("args, message", [
    (["train", DEMO, "method.we.ratio_conv=2"], "method.we.ratio_conv must be in [0, 1)"),
    (["train", DEMO, "model.nam=x"], "unknown key model.nam"),
    (["train", "nope.yaml"], "recipe not found"),
    (["train", DEMO, "model.name=resnet9000"], "model.name must be one of"),
    (["config", DEMO, "scaling.num_workers=zero"], "scaling.num_workers expects an integer"),
])
def test_bad_config_exits_2_naming_the_key(args, message, tmp_path):
    out = we_dist(*args, "data.train_path=x.beton", "data.val_path=y.beton", cwd=tmp_path) \
        if args[0] == "train" and "nope" not in args[1] else we_dist(*args, cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    assert message in out.stderr
    assert "Traceback" not in out.stderr


def test_missing_and_corrupt_datasets_are_refused(tmp_path, digits_betons):
    train_path, val_path = digits_betons
    missing = we_dist("train", DEMO, f"data.train_path={tmp_path / 'none.beton'}", f"data.val_path={val_path}",
                      "tracking.enabled=false", cwd=tmp_path)
    assert missing.returncode == 2 and "data.train_path" in missing.stderr and "none.beton" in missing.stderr
    truncated = tmp_path / "truncated.beton"
    truncated.write_bytes(Path(train_path).read_bytes()[:5000])
    bad = we_dist("train", DEMO, f"data.train_path={train_path}", f"data.val_path={truncated}",
                  "tracking.enabled=false", cwd=tmp_path)
    assert bad.returncode == 2 and "data.val_path" in bad.stderr and "truncated.beton" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_unreachable_tracking_server_is_reported_before_training(tmp_path, digits_betons):
    train_path, val_path = digits_betons
    port = free_port()   # nobody listens there
    start = time.monotonic()
    out = we_dist("train", DEMO, f"data.train_path={train_path}", f"data.val_path={val_path}",
                  f"tracking.uri=http://127.0.0.1:{port}", cwd=tmp_path)
    assert out.returncode == 2
    assert f"127.0.0.1:{port}" in out.stderr and "tracking" in out.stderr
    assert time.monotonic() - start < 60   # refused promptly, no minutes of retries
    assert not (tmp_path / "mlflow.db").exists()


def test_resume_must_without_checkpoint_is_refused(tmp_path, digits_betons):
    train_path, val_path = digits_betons
    out = we_dist("train", DEMO, f"data.train_path={train_path}", f"data.val_path={val_path}",
                  "tracking.enabled=false", "checkpoint.resume=must", f"checkpoint.storage_path={tmp_path}",
                  cwd=tmp_path)
    assert out.returncode == 2 and "checkpoint.resume=must" in out.stderr


def test_mlflow_telemetry_is_off_for_the_cli_and_every_worker():
    """MLflow 3's telemetry thread sets and unsets an environment variable while numba (FFCV's
    loader threads) iterates os.environ: a KeyError there killed a loader and hung a trial. The
    CLI turns telemetry off before MLflow loads, and the workers' environment says so too."""
    from we_dist.train.driver import worker_env

    assert worker_env()["MLFLOW_DISABLE_TELEMETRY"] == "true"
    code = ("import os; os.environ.pop('MLFLOW_DISABLE_TELEMETRY', None); from we_dist.cli import main; "
            "main(['methods', 'none']); from mlflow.telemetry.utils import is_telemetry_disabled; "
            "print('disabled', is_telemetry_disabled())")
    # MLflow keeps telemetry off by itself under pytest and CI: take those markers away, as on a
    # user's machine, so the test sees what the CLI does.
    markers = {"MLFLOW_DISABLE_TELEMETRY", "DO_NOT_TRACK", "PYTEST_CURRENT_TEST", "CI", "GITHUB_ACTIONS", "GITLAB_CI",
               "JENKINS_URL", "BUILDKITE", "TF_BUILD", "CIRCLECI", "TRAVIS", "BITBUCKET_BUILD_NUMBER",
               "CODEBUILD_BUILD_ARN", "TEAMCITY_VERSION", "CLOUD_RUN_EXECUTION", "RUNBOT_HOST_URL",
               "RUNBOT_BUILD_NAME", "RUNBOT_WORKER_ID"}
    env = {k: v for k, v in __import__("os").environ.items() if k not in markers}
    probe = ("from mlflow.telemetry.utils import is_telemetry_disabled; print('disabled', is_telemetry_disabled())")
    without_cli = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, env=env)
    assert "disabled False" in without_cli.stdout, without_cli.stderr[-2000:]   # on by default, as for users
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "disabled True" in out.stdout


BOMB = "".join(f"{k}: &{k} [{', '.join([f'*{p}'] * 9) if p else ', '.join(['lol'] * 9)}]\n"
               for k, p in zip("abcdefghi", [""] + list("abcdefgh")))     # 342 bytes, 9**9 values expanded


@pytest.mark.parametrize("args, message", [
    (["train", "{bomb}"], "YAML aliases expand to more than 100,000 values"),
    (["config", "{bomb}"], "YAML aliases expand to more than 100,000 values"),
    (["train", DEMO, "name=" + "n" * 300], "name must be at most 100 characters"),
    (["train", DEMO, "name=.."], "name '..' would write into checkpoint.storage_path's own folder or its parent"),
    (["train", DEMO, "optim.lr=" + "[" * 2000 + "]" * 2000], "optim.lr"),
])
def test_hostile_input_is_one_line_exit_2_and_leaves_nothing(args, message, tmp_path):
    """A YAML anchor bomb, a 300-character name, a name that points outside the storage and a
    value nested 2,000 deep: refused by the config, before Ray, MLflow or a checkpoint folder."""
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(BOMB)
    work = tmp_path / "work"
    work.mkdir()
    storage = work / "runs"
    out = we_dist(*[a.format(bomb=bomb) for a in args], f"checkpoint.storage_path={storage}", cwd=work)
    assert out.returncode == 2, out.stderr[-2000:]
    assert message in out.stderr and "Traceback" not in out.stderr
    assert len(out.stderr) < 1000 and len(out.stderr.strip().splitlines()) == 1
    assert list(work.iterdir()) == []            # no mlflow.db, no runs/, no lock


def _small_cnn_checkpoint(directory: Path) -> Path:
    """A real checkpoint of the demo's small CNN (10 classes), with its config in the manifest."""
    import torch

    from we_dist.config import load_config
    from we_dist.models import architecture, create_model
    from we_dist.train.checkpoint import save_state

    cfg = load_config(DEMO)
    net = create_model("small_cnn", 10)
    save_state(directory, {"model": net.state_dict(), "architecture": architecture.describe(net), "epoch": 0,
                           "step": 1, "metrics": {}, "history": []},
               epoch=0, step=1, run="base", method="none", config=cfg.to_dict())
    return directory


@pytest.mark.parametrize("override, message", [
    ("model.name=cifar_resnet20", "holds a network with model.name='small_cnn', but this run has "
                                  "model.name='cifar_resnet20'"),
    ("model.num_classes=12", "holds a network with model.num_classes=10, but this run has model.num_classes=12"),
    ("data.batch_size=5000", "data.batch_size=5000 is more than each of the 2 workers' 719 training samples"),
])
def test_a_run_that_cannot_train_is_refused_before_ray_and_mlflow(override, message, tmp_path, digits_betons):
    """An init_from network of another model or class count (the latter used to train the
    checkpoint's 10-class network while the config said 12), and a batch larger than a worker's
    share of the data: exit 2, one line, no Ray session, no MLflow store, no checkpoint folder."""
    train_path, val_path = digits_betons
    base = _small_cnn_checkpoint(tmp_path / "base" / "epoch_0000")
    work = tmp_path / "work"
    work.mkdir()
    out = we_dist("train", DEMO, f"data.train_path={train_path}", f"data.val_path={val_path}",
                  f"model.init_from={base}", f"checkpoint.storage_path={work / 'runs'}", override, cwd=work)
    assert out.returncode == 2, out.stderr[-2000:]
    assert message in out.stderr and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert list(work.iterdir()) == []           # no mlflow.db (tracking is on by default), no runs/


def test_train_takes_overrides_after_its_options_too(tmp_path):
    """`we-dist train R --address local key=value` reads key=value as an override (as compare and
    sensitivity do): here an unsafe name, refused by the config before anything starts."""
    out = we_dist("train", DEMO, "--address", "local", "name=..", f"checkpoint.storage_path={tmp_path / 'runs'}",
                  cwd=tmp_path)
    assert out.returncode == 2 and "name '..'" in out.stderr, out.stderr[-2000:]
    assert "unrecognized arguments" not in out.stderr
