"""Exact resume after a hard kill, through the real command line.

Each run is ``python -m dalle.cli train ...`` in a subprocess.  An interrupted run is
killed with SIGKILL (no clean-up, as a crashed or preempted machine) at a random-ish
step once a checkpoint exists, then resumed with ``--resume``; its exported weights
must equal, bit for bit, those of a run never interrupted.  ``DALLE_CHECKPOINT_EVERY``
(read by dalle/train.py) makes the loops checkpoint every few steps.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

CHECKPOINT_EVERY = 5
DVAE_STEPS = 20
TRANSFORMER_STEPS = 100  # ~40 steps/s on one core: enough room to kill it mid-run
START_TIMEOUT_S = 120.0

ENV = {
    **os.environ,
    "DALLE_CHECKPOINT_EVERY": str(CHECKPOINT_EVERY),
    # One thread in every run: bitwise equality across processes needs the same reduction
    # order, and the test machine's cores are shared.
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "PYTHONWARNINGS": "default",
}


def _argv(component: str, out: Path, steps: int | None, resume: bool = False) -> list[str]:
    argv = [sys.executable, "-m", "dalle.cli", "train", component, "--data", "shapes", "--out", str(out),
            "--preset", "tiny", "--device", "cpu"]
    if steps is not None:
        argv += ["--steps", str(steps)]
    return argv + ["--resume"] * resume


def _train(component: str, out: Path, steps: int | None, resume: bool = False) -> str:
    """Run ``dalle train`` to completion; return its stderr."""
    done = subprocess.run(_argv(component, out, steps, resume), env=ENV, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, f"dalle train {component} failed:\n{done.stderr[-3000:]}"
    return done.stderr


def _checkpoints(out: Path, component: str) -> list[Path]:
    folder = out / "checkpoints" / component
    return sorted(folder.glob("step_*")) if folder.is_dir() else []


def _newest_step(out: Path, component: str) -> int:
    found = _checkpoints(out, component)
    return int(found[-1].name.split("_")[1]) if found else 0


def _train_and_kill(component: str, out: Path, steps: int, rng: random.Random, first: int = 1) -> list[Path]:
    """Start a run and SIGKILL it at a random step past its ``first``-th checkpoint; return what is left.

    The kill comes when a randomly chosen checkpoint appears, plus a random part of the
    time the last checkpoint interval took, so it lands mid-interval at any machine speed
    and always before the run's last checkpoint.
    """
    target = CHECKPOINT_EVERY * rng.randint(first, steps // CHECKPOINT_EVERY - 2)
    log = open(out.parent / f"{out.name}_{component}.log", "w")
    proc = subprocess.Popen(_argv(component, out, steps), env=ENV, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        seen, seen_at, interval = 0, None, 0.0
        while seen < target:
            assert proc.poll() is None, f"the run ended before step {target}: see {log.name}"
            assert time.monotonic() < deadline, f"no checkpoint of step {target} after {START_TIMEOUT_S} s: see {log.name}"
            newest = _newest_step(out, component)
            if newest > seen:
                now = time.monotonic()
                interval = now - seen_at if seen_at is not None else 0.0  # unknown before the 2nd checkpoint
                seen, seen_at = newest, now
            time.sleep(0.002)
        time.sleep(rng.uniform(0.0, 0.8) * interval)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    assert proc.returncode == -signal.SIGKILL, f"the run finished before it could be killed: see {log.name}"
    # Not even the folder: ``dalle train all --resume`` takes an existing one as a finished stage.
    assert not (out / component).exists(), "a killed run must not have exported"
    left = _checkpoints(out, component)
    assert target <= _newest_step(out, component) < steps, f"killed after step {target}, left {left}"
    return left


def _assert_bitwise_equal(a: Path, b: Path) -> None:
    wa, wb = load_file(str(a)), load_file(str(b))
    assert wa.keys() == wb.keys()
    differing = [k for k in wa if wa[k].dtype != wb[k].dtype or not bool((wa[k] == wb[k]).all())]
    assert not differing, f"tensors differ after resume: {differing[:5]}"
    assert a.read_bytes() == b.read_bytes()


@pytest.fixture(scope="module")
def rng() -> random.Random:
    seed = int(os.environ.get("KILL_SEED", time.time_ns() % 10_000))
    print(f"kill-resume seed {seed} (set KILL_SEED to replay)")
    return random.Random(seed)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """Tokenizer + an uninterrupted dVAE run: the dVAE reference and the transformer's starting point."""
    out = tmp_path_factory.mktemp("kill") / "reference"
    _train("tokenizer", out, None)
    tokenizer_only = out.parent / "tokenizer_only"
    shutil.copytree(out, tokenizer_only)
    _train("dvae", out, DVAE_STEPS)
    return out


def test_dvae_killed_and_resumed_matches_uninterrupted(base, rng):
    out = base.parent / "dvae_killed"
    shutil.copytree(base.parent / "tokenizer_only", out)
    _train_and_kill("dvae", out, DVAE_STEPS, rng)
    _train("dvae", out, DVAE_STEPS, resume=True)
    _assert_bitwise_equal(out / "dvae" / "model.safetensors", base / "dvae" / "model.safetensors")


def test_corrupted_newest_checkpoint_falls_back_to_the_previous_one(base, rng):
    out = base.parent / "dvae_corrupted"
    shutil.copytree(base.parent / "tokenizer_only", out)
    left = _train_and_kill("dvae", out, DVAE_STEPS, rng, first=2)
    assert len(left) >= 2
    newest = left[-1] / "state.safetensors"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # a truncated write
    stderr = _train("dvae", out, DVAE_STEPS, resume=True)
    assert f"skipping checkpoint {left[-1].name}" in stderr and "checksum" in stderr, stderr[-2000:]
    _assert_bitwise_equal(out / "dvae" / "model.safetensors", base / "dvae" / "model.safetensors")


def test_transformer_killed_and_resumed_matches_uninterrupted(base, rng):
    reference, killed = base.parent / "transformer_reference", base.parent / "transformer_killed"
    shutil.copytree(base, reference)
    _train("transformer", reference, TRANSFORMER_STEPS)
    shutil.copytree(base, killed)
    shutil.copytree(reference / "cache", killed / "cache")  # the dVAE token cache: same dVAE, same tokens
    _train_and_kill("transformer", killed, TRANSFORMER_STEPS, rng)
    _train("transformer", killed, TRANSFORMER_STEPS, resume=True)
    _assert_bitwise_equal(killed / "transformer" / "model.safetensors",
                          reference / "transformer" / "model.safetensors")
