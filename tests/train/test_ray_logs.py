"""What Ray's own processes do for a run's console (``we_dist.train.ray_logs``), in a real local Ray."""

from __future__ import annotations

import subprocess
import sys

# A local Ray as `we-dist train` starts it (its runtime env, with the setup hook), and a task
# that reports what the state API would be pointed at in a process of the job.
SCRIPT = """
import os, ray
from we_dist.train.driver import start_local_ray
start_local_ray(num_cpus=1)

@ray.remote
def state_api_address():
    return os.environ.get("RAY_ADDRESS")

print("gcs", ray.get_runtime_context().gcs_address)
print("task", ray.get(state_api_address.remote()))
ray.shutdown()
"""


def test_every_process_of_a_run_names_its_own_ray_for_the_state_api(cli):
    """Ray Train's placement-group cleaner queries the state API with no address; with a second
    Ray on the machine Ray could not tell which was meant and the cleaner's thread died with a
    traceback on the console (seen when the suite ran a cluster beside the demo run)."""
    env = cli.env()
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    said = dict(line.split(" ", 1) for line in out.stdout.splitlines() if line.startswith(("gcs ", "task ")))
    assert said["gcs"].startswith("127.0.0.1:")
    assert said["task"] == said["gcs"]
