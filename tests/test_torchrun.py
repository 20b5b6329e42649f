"""``dalle train all`` under a real ``torchrun`` with two CPU processes (Gloo), end to end.

The loops' own distributed tests (tests/training/test_distributed*.py) compare a
two-rank run with a one-process run numerically; this one checks the command line a
user types: every stage runs on both ranks, one rank writes the files, and the
folder it leaves is a model that generates.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

from dalle.train import stage_complete

pytestmark = pytest.mark.skipif(not dist.is_available() or sys.platform == "win32",
                                reason="needs torch.distributed with Gloo")

STEPS = 4


@pytest.fixture(scope="module")
def torchrun_model(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("torchrun") / "model"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "dalle.cli", "train", "all", "--data", "shapes", "--out", str(out), "--preset", "tiny",
               "--steps", str(STEPS), "--device", "cpu"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    if done.returncode and "address already in use" in (done.stdout + done.stderr).lower():
        # --standalone picks a free port, which another process on a busy machine may take first.
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"torchrun failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return out, done


def test_every_stage_is_exported(torchrun_model):
    out, _ = torchrun_model
    for stage in ("tokenizer", "dvae", "transformer", "clip"):
        assert stage_complete(out / stage), f"{stage} was not exported"


@pytest.mark.parametrize("log", ["dvae", "transformer", "clip"])
def test_one_rank_writes_each_log(torchrun_model, log):
    out, _ = torchrun_model
    with open(out / "logs" / f"{log}.csv", newline="") as f:
        steps = [int(row["step"]) for row in csv.DictReader(f)]
    assert steps, f"logs/{log}.csv is empty"
    assert len(steps) == len(set(steps)), f"logs/{log}.csv has repeated steps {steps}: more than one rank wrote it"
    assert max(steps) == STEPS


def test_the_folder_generates(torchrun_model):
    from dalle.pipeline import DallePipeline

    out, _ = torchrun_model
    pipe = DallePipeline.from_pretrained(out, device="cpu")
    result = pipe("a red circle", candidates=2, keep=1, seed=0)
    assert len(result.images) == 1
    assert result.images[0].size == (pipe.image_size, pipe.image_size)
