"""The exported network loads in a fresh interpreter where we_dist cannot be imported, takes
any batch size, and gives the trained network's outputs."""

import subprocess
import sys
import textwrap

import torch

from we_dist.export import export_model
from we_dist.models import create_model


def test_exported_model_reloads_without_we_dist(tmp_path):
    torch.manual_seed(0)
    model = create_model("small_cnn", 10).eval()
    path = export_model(model, (3, 32, 32), tmp_path)
    x = torch.randn(5, 3, 32, 32)
    torch.save({"x": x, "y": model(x).detach()}, tmp_path / "io.pt")
    script = textwrap.dedent(f"""
        import sys
        sys.modules["we_dist"] = None            # the project's code is not importable here
        try:
            import we_dist
            raise SystemExit("we_dist was importable")
        except ImportError:
            pass
        import torch
        io = torch.load({str(tmp_path / 'io.pt')!r}, weights_only=True)
        net = torch.export.load({str(path)!r}).module()
        assert torch.allclose(net(io["x"]), io["y"], atol=1e-5), "outputs differ"
        assert net(io["x"][:1]).shape == (1, 10) and net(torch.randn(64, 3, 32, 32)).shape == (64, 10)
        print("reloaded ok")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "reloaded ok" in done.stdout


def test_exported_json_says_which_network_it_is(tmp_path):
    """exported.json names the network in exported.pt2 as its caller describes it (the loop: the
    last epoch, its params and MACs; the .pt2 was the last epoch's while the MLflow model was the
    best's, and nothing said so). The loop's own description is checked in tests/methods."""
    import json

    model = create_model("small_cnn", 10).eval()
    network = {"epoch": 11, "selected": "last", "params": 177642, "nonzero_params": 177642, "macs": 17286400}
    export_model(model, (3, 32, 32), tmp_path, network=network)
    note = json.loads((tmp_path / "exported.json").read_text())
    assert note["network"] == network and note["input_shape"] == ["batch", 3, 32, 32]
    export_model(model, (3, 32, 32), tmp_path / "plain")
    assert "network" not in json.loads((tmp_path / "plain" / "exported.json").read_text())
