"""What a user sees on the console of a 2-worker `we-dist train` at a terminal (the session's
shared run, :func:`demo_run`, whose standard output is a pseudo-terminal): progress inside every
epoch, every line rank 0 prints exactly once, no Ray prefixes, and nothing but the lines a user
needs (checked against an allow-list: Ray's bookkeeping, token warnings, MLflow's database notes
are hidden unless `--verbose`)."""

from __future__ import annotations

import re
from collections import Counter

import pytest

pytestmark = pytest.mark.slow

# Every line the run may print, as regular expressions (a line must match one in full).
ALLOWED = [
    r"\[we_dist\] run \S+: 2 workers, method we, starting; checkpoints in \S+; MLflow run \w+ at http://127\.0\.0\.1:\d+",
    r"\[we_dist\] 2 workers on 1 node\(s\): rank 0 on \w+, rank 1 on \w+",
    r"\[we_dist\] epoch \d+ \(\d+ of \d+\) step \d+/\d+: loss [\d.]+ acc [\d.]+ \d+ img/s",        # progress
    r"\[we_dist\] epoch \d+ \(\d+ of \d+\): loss [\d.]+ val top1 [\d.]+ top5 [\d.]+ \d+ img/s [\d.]+s",
    r"\[we_dist\] summary",
    r"epoch +loss +top1 +top5 +lr +img/s +s +WE conv",                                    # the summary table
    r"-+",
    r" +\d+ +[\d.]+ +[\d.]+% +[\d.]+% +[\d.e-]+ +\d+ +[\d.]+ +\d+",
    r"\[we_dist\] the network, before and after training",
    r" +start +end +end/start",
    r"(params|nonzero params|MACs|CPU ms, batch 1|CPU ms, batch 64) +[\d.,]+ +[\d.,]+ +[\d.]+",
    r"\[we_dist\] MLflow model: the best epoch's network \(epoch \d+, val top1 [\d.]+\) at runs:/\w+/model",
    r"\[we_dist\] done: val top1 [\d.]+, top5 [\d.]+ after \d+ epochs \(epochs 0-\d+\); checkpoints: \S+",
    r"\[we_dist\] MLflow: run \w+",
    r"\[we_dist\]   run page: http://127\.0\.0\.1:\d+/#/experiments/\d+/runs/\w+\?workflowType=machine_learning",
    r"Registered model '\S+' already exists\. Creating a new version of this model\.\.\.|"
    r"Successfully registered model '\S+'\.",                                            # MLflow's registration
    r"Created version '\d+' of model '\S+'\.",
    r"\[we_dist\] registered runs:/\w+/model as '\S+' version \d+",
    r"",
]


def test_each_line_is_one_a_user_needs_printed_once_with_progress_inside_epochs(demo_run):
    text = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", demo_run.output)     # colours, if a terminal got any
    lines = text.splitlines()
    unexpected = [line for line in lines if not any(re.fullmatch(p, line) for p in ALLOWED)]
    assert not unexpected, "lines a user does not need:\n" + "\n".join(unexpected)
    ours = [line for line in lines if line.startswith("[we_dist]")]
    twice = [line for line, n in Counter(ours).items() if n > 1]
    assert not twice, f"printed more than once: {twice}"
    # Progress inside each epoch, before that epoch's line, at a terminal.
    for e in range(demo_run.epochs):
        epoch_line = next(i for i, line in enumerate(lines) if line.startswith(f"[we_dist] epoch {e} (") and "val top1" in line)
        progress = [line for line in lines[:epoch_line] if line.startswith(f"[we_dist] epoch {e} (") and " step " in line]
        assert progress, f"no progress line inside epoch {e}:\n" + "\n".join(ours)
    workers = [line for line in ours if "workers on" in line]
    epochs = [line for line in ours if re.match(r"\[we_dist\] epoch \d+ \(\d+ of \d+\):", line)]
    assert len(workers) == 1 and len(epochs) == demo_run.epochs, "\n".join(ours)
