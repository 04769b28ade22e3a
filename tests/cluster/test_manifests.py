"""The cluster definitions in cluster/: launcher YAML, KubeRay manifests, Dockerfile.

Checked against what can be checked offline: Ray's own JSON schema for the launcher,
the RayCluster/RayJob fields KubeRay requires, and that the job's entrypoint is a real
`we-dist` command whose recipe exists and whose overrides validate.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

from we_dist import cli
from we_dist.cluster.client import check_resources
from we_dist.config import load_config

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
FFCV_APT = ("libopencv-dev", "libturbojpeg0-dev", "pkg-config")
IMAGE = "YOUR-REGISTRY/we-dist:0.1.0"


def _docs(path: Path) -> dict[str, dict]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    return {d["kind"]: d for d in docs}


def _check_entrypoint(command: str) -> tuple[str, list[str]]:
    """A `we-dist` command with an existing subcommand, recipe and valid overrides."""
    argv = shlex.split(command)
    assert argv[0] == "we-dist", command
    assert argv[1] in cli.COMMANDS, f"unknown subcommand {argv[1]!r}"
    recipe, overrides = argv[2], argv[3:]
    assert recipe.startswith("recipes/") and (REPO / recipe).is_file(), f"recipe {recipe} not in recipes/"
    load_config(REPO / recipe, overrides)           # raises ConfigError on a bad key or value
    return recipe, overrides


# --- Ray cluster launcher --------------------------------------------------------------------


@pytest.fixture(scope="module")
def launcher():
    return yaml.safe_load((CLUSTER / "aws-gpu.yaml").read_text())


def test_launcher_yaml_passes_rays_schema(launcher):
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(launcher, schema)
    assert launcher["head_node_type"] in launcher["available_node_types"]
    for name, node in launcher["available_node_types"].items():
        assert node["node_config"]["InstanceType"], name


def test_launcher_installs_ffcv_deps_and_the_package(launcher):
    setup = "\n".join(launcher["setup_commands"])
    assert all(pkg in setup for pkg in FFCV_APT)
    apt = setup.index("apt-get install")
    pip = setup.index("pip install /home/ubuntu/we_dist")
    assert apt < pip                                  # FFCV builds against the apt packages
    assert f"ray[default,train,tune]=={ray.__version__}" in setup
    assert launcher["file_mounts"]["/home/ubuntu/we_dist"] == "."


def test_launcher_passes_token_and_tracking_uri_to_every_node(launcher):
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = " ".join(launcher[key])
        assert "RAY_AUTH_MODE=token" in start and "RAY_AUTH_TOKEN_PATH=/home/ubuntu/.ray/auth_token" in start
        assert "MLFLOW_TRACKING_URI=" in start
    assert "/home/ubuntu/.ray/auth_token" in launcher["file_mounts"]


def test_launcher_usage_submits_a_real_command_with_shared_storage():
    text = (CLUSTER / "aws-gpu.yaml").read_text()
    usage = re.search(r"#\s+(we-dist submit .*?)(?=\n#\s+ray down)", text, re.S).group(1)
    command = " ".join(line.lstrip("# ").rstrip("\\ ") for line in usage.splitlines())
    argv = [a for a in shlex.split(command) if not a.startswith("--") and not a.startswith("http")]
    recipe, overrides = _check_entrypoint(shlex.join(["we-dist", "train", *argv[2:]]))
    assert any(o.startswith("checkpoint.storage_path=s3://") for o in overrides)


def test_gpu_node_fits_the_imagenet_recipe(launcher):
    cfg = load_config(REPO / "recipes" / "imagenet_rn50.yaml")
    gpu = launcher["available_node_types"]["gpu_worker"]
    assert gpu["node_config"]["InstanceType"] == "p4d.24xlarge"     # 96 vCPU, 8 x A100
    nodes = [{"resources_total": {"CPU": 96, "GPU": 8}}] * gpu["max_workers"]
    check_resources(nodes, num_workers=cfg.scaling.num_workers, cpus_per_worker=cfg.scaling.cpus_per_worker,
                    use_gpu=cfg.scaling.use_gpu)


# --- KubeRay --------------------------------------------------------------------------------


def _check_cluster_spec(spec: dict) -> None:
    """Fields KubeRay needs, and this project's conventions (image, token, shared volume)."""
    assert spec["rayVersion"] == ray.__version__
    assert spec["authOptions"]["mode"] == "token"
    groups = [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec["workerGroupSpecs"]]
    for name, group in groups:
        assert isinstance(group["rayStartParams"], dict), name
        pod = group["template"]["spec"]
        container = pod["containers"][0]
        assert container["image"] == IMAGE, name
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert claims.get(mounts.get("/mnt/shared")) == "we-dist-shared", f"{name}: /mnt/shared is not the shared PVC"
    for group in spec["workerGroupSpecs"]:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert int(limits["nvidia.com/gpu"]) > 0
    head_ports = {p["name"]: p["containerPort"] for p in spec["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"]}
    assert head_ports["dashboard"] == 8265 and head_ports["gcs-server"] == 6379


def _check_pvc(docs: dict) -> None:
    pvc = docs["PersistentVolumeClaim"]
    assert pvc["metadata"]["name"] == "we-dist-shared"
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]


def test_raycluster_manifest():
    docs = _docs(CLUSTER / "kuberay" / "raycluster.yaml")
    rc = docs["RayCluster"]
    assert rc["apiVersion"] == "ray.io/v1" and rc["metadata"]["name"]
    _check_cluster_spec(rc["spec"])
    _check_pvc(docs)
    for group in [rc["spec"]["headGroupSpec"], *rc["spec"]["workerGroupSpecs"]]:
        env = {e["name"]: e["value"] for e in group["template"]["spec"]["containers"][0]["env"]}
        assert env["MLFLOW_TRACKING_URI"].startswith("http")


def test_rayjob_manifest_runs_a_real_we_dist_training():
    docs = _docs(CLUSTER / "kuberay" / "rayjob.yaml")
    job = docs["RayJob"]
    assert job["apiVersion"] == "ray.io/v1" and job["metadata"]["name"]
    spec = job["spec"]
    _check_cluster_spec(spec["rayClusterSpec"])
    _check_pvc(docs)
    recipe, overrides = _check_entrypoint(spec["entrypoint"])
    assert shlex.split(spec["entrypoint"])[1] == "train"
    settings = dict(o.split("=", 1) for o in overrides)
    assert settings["checkpoint.storage_path"].startswith("/mnt/shared/")     # on the shared volume
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert runtime_env["env_vars"]["MLFLOW_TRACKING_URI"].startswith("http")
    assert runtime_env["working_dir"] == "/home/ray/we_dist"
    assert spec["shutdownAfterJobFinishes"] is True
    # The GPU group fits the recipe's workers.
    cfg = load_config(REPO / recipe, overrides)
    nodes = []
    for g in spec["rayClusterSpec"]["workerGroupSpecs"]:
        limits = g["template"]["spec"]["containers"][0]["resources"]["limits"]
        nodes += [{"resources_total": {"CPU": float(limits["cpu"]), "GPU": float(limits["nvidia.com/gpu"])}}] * g["maxReplicas"]
    check_resources(nodes, num_workers=cfg.scaling.num_workers, cpus_per_worker=cfg.scaling.cpus_per_worker,
                    use_gpu=cfg.scaling.use_gpu)


def test_dockerfile_installs_ffcv_deps_then_the_package():
    text = (CLUSTER / "kuberay" / "Dockerfile").read_text()
    assert re.search(rf"^FROM rayproject/ray:{re.escape(ray.__version__)}-py311-gpu$", text, re.M)
    apt = text.index("apt-get install")
    assert all(pkg in text[apt:] for pkg in FFCV_APT)
    assert apt < text.index("pip install --no-cache-dir /home/ray/we_dist")
    assert re.search(r"^WORKDIR /home/ray/we_dist$", text, re.M)
    assert "COPY --chown=ray:users recipes" in text


def test_local_sh_is_valid_bash_and_stops_by_pid():
    import subprocess

    script = CLUSTER / "local.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    assert "127.0.0.1" in text and "--num-cpus" in text and ".pid" in text
    assert "pkill" not in text and "killall" not in text and "ray stop" not in text
