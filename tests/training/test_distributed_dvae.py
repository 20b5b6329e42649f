"""Data-parallel dVAE training on the CPU: two Gloo processes against one process with the same global batch.

One spawn of two ranks (``torch.multiprocessing``, a free local port) runs the real
training loop with the environment ``torchrun`` would give them, in fp32, so the
comparison with the one-process run is a matter of float rounding only.  The VQ
codebook is not trained by gradients: it follows the one-process run only if the ranks
pool their assignment statistics and restart dead codes on the same encoder outputs.
"""

from __future__ import annotations

import csv
import os
import shutil
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image, ImageDraw
from safetensors.torch import load_file, save_file

import dalle.dvae
from dalle.config import get_preset
from dalle.dvae import GumbelQuantizer, VectorQuantizer
from dalle.training import distributed as dd
from dalle.training.dvae import batch_for_step, train_dvae

pytestmark = pytest.mark.skipif(not dist.is_available() or sys.platform == "win32",
                                reason="needs torch.distributed with Gloo")

STEPS = 5
# Restarted codes start with an EMA count of 0.5, dead below 0.1 -- about 160 unused steps.
# With this threshold a code restarted at step 1 and unused since is dead again at step 4,
# so the short runs exercise partial restarts (some codes alive), not only the first step's
# restart of the whole codebook.
DEAD_THRESHOLD = 0.49


class Item:
    def __init__(self, image: Image.Image):
        self.image = image


def toy_data(n: int = 12) -> list[Item]:
    """Coloured boxes on a noisy background; every third image is 80x72, so it gets a random crop.

    Textured, not flat black: identical encoder outputs (a flat background) make codes that
    tie up to float rounding, and which of two such codes a position picks would then
    depend on the order of float additions, which data parallelism changes.
    """
    rng = np.random.default_rng(0)
    items = []
    for i in range(n):
        width, height = (80, 72) if i % 3 == 2 else (64, 64)
        image = Image.fromarray(rng.integers(0, 60, (height, width, 3), dtype=np.uint8))
        x, y = rng.integers(0, 40, 2)
        w, h = rng.integers(10, 24, 2)
        ImageDraw.Draw(image).rectangle((x, y, x + w, y + h), fill=tuple(int(c) for c in rng.integers(60, 255, 3)))
        items.append(Item(image))
    return items


def toy_config(quantizer: str = "vq"):
    config = get_preset("tiny")
    config.dvae.hidden_width = 8
    config.dvae.quantizer = quantizer
    config.train.dvae_batch = 8  # global: 4 images a rank on two ranks
    return config


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def quantizer_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    """Encoder outputs of a batch ``[64, 8]`` and a codebook state with dead, weak and live codes."""
    g = torch.Generator().manual_seed(5)
    z = torch.randn(64, 8, generator=g)
    counts = torch.rand(32, generator=g) * 2
    counts[::3] = 0.0  # dead
    return z, counts


def quantizer_step(z: torch.Tensor, counts: torch.Tensor, data_parallel: bool = False) -> VectorQuantizer:
    """One codebook update on ``z`` (with ``data_parallel``: this process's slice of the batch), from a fixed state."""
    torch.manual_seed(0)
    q = VectorQuantizer(32, 8)
    q.data_parallel = data_parallel
    q.ema_count.copy_(counts)
    q.ema_sum.mul_(counts[:, None])
    q.embed.copy_(q.ema_sum / q.ema_count.clamp_min(1e-5)[:, None])
    q.update_codebook(z, q.nearest(z))
    return q


def _rank_main(rank: int, world: int, port: int, root: str, runs: list[tuple[str, str, dict]]) -> None:
    """One rank: the environment torchrun sets, then the unchanged training loop, once per run."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dalle.dvae.VQ_DEAD_CODE_COUNT = DEAD_THRESHOLD  # a fresh process: set again (see the constant)
    try:
        dd.init_distributed("cpu")
        # The quantiser alone: each rank updates the codebook from its half of one batch.
        z, counts = quantizer_inputs()
        q = quantizer_step(z[rank * 32 : (rank + 1) * 32], counts, data_parallel=True)
        save_file({k: v.contiguous() for k, v in q.state_dict().items()}, f"{root}/quantizer_rank{rank}.safetensors")

        for out, quantizer, kwargs in runs:
            config = toy_config(quantizer)
            if kwargs.pop("odd_batch", False):  # 7 images cannot be split over two ranks
                config.train.dvae_batch = 7
                try:
                    train_dvae(toy_data(), out, config, device="cpu", progress=False, **kwargs)
                except ValueError as e:
                    Path(f"{out}.rank{rank}.error").write_text(str(e))
                continue
            train_dvae(toy_data(), out, config, device="cpu", progress=False, log_every=1, sample_every=1000,
                       **kwargs)
        dist.barrier()  # leave together: tearing the group down while a rank is still in a collective can abort
    finally:
        dd.shutdown_distributed()


def single_process(out: Path, quantizer: str, **kwargs) -> Path:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks: the same kernels, so the same rounding
    try:
        return train_dvae(toy_data(), out, toy_config(quantizer), progress=False, log_every=1, sample_every=1000,
                          **kwargs)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """VQ on two ranks (whole, and stopped after 3 steps), Gumbel on two ranks, and the one-process references."""
    root = tmp_path_factory.mktemp("dist_dvae")
    two_rank = [
        (str(root / "vq"), "vq", {"steps": STEPS}),
        (str(root / "vq_cut"), "vq", {"steps": STEPS, "stop_after": 3}),
        (str(root / "gumbel"), "gumbel", {"steps": 2}),
        (str(root / "odd"), "vq", {"steps": 1, "odd_batch": True}),
    ]
    mp.spawn(_rank_main, args=(2, free_port(), str(root), two_rank), nprocs=2, join=True)
    before = dalle.dvae.VQ_DEAD_CODE_COUNT
    dalle.dvae.VQ_DEAD_CODE_COUNT = DEAD_THRESHOLD
    try:
        single_process(root / "single_vq", "vq", steps=STEPS)
        single_process(root / "single_gumbel", "gumbel", steps=2)
        shutil.copytree(root / "vq_cut", root / "vq_resumed")
        single_process(root / "vq_resumed", "vq", steps=STEPS, resume=True)  # 2 ranks -> 1 process
    finally:
        dalle.dvae.VQ_DEAD_CODE_COUNT = before
    return root


def log(out: Path) -> list[dict[str, str]]:
    with open(out / "logs" / "dvae.csv", newline="") as f:
        return list(csv.DictReader(f))


def column(out: Path, name: str) -> list[float]:
    return [float(r[name]) for r in log(out)]


def training_state(out: Path, step: int) -> dict[str, torch.Tensor]:
    """The training weights and codebook (not the average) of a checkpoint."""
    state = load_file(str(out / "checkpoints" / "dvae" / f"step_{step:08d}" / "state.safetensors"))
    return {k: v for k, v in state.items() if k.startswith("module.model.")}


def assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float) -> None:
    assert a.keys() == b.keys()
    worst = max((float((a[k].float() - b[k].float()).abs().max()), k) for k in a)
    assert worst[0] < atol, worst


def test_shards_of_the_global_batch_make_the_one_process_batch():
    """Including the random crops of the odd-sized images, which share one random stream."""
    data = toy_data()
    for step in range(4):
        whole = batch_for_step(data, 0, step, 8, 64)
        for world in (2, 4):
            parts = [batch_for_step(data, 0, step, 8, 64, dd.DistInfo(rank=r, world_size=world)) for r in range(world)]
            assert torch.equal(torch.cat(parts), whole), (step, world)
    with pytest.raises(ValueError, match="divisible by 3"):
        batch_for_step(data, 0, 0, 8, 64, dd.DistInfo(rank=0, world_size=3))


def test_codebook_update_on_slices_equals_the_whole_batch(runs):
    """Pooled counts and sums, dead codes restarted on the same encoder outputs as one process."""
    before = dalle.dvae.VQ_DEAD_CODE_COUNT
    dalle.dvae.VQ_DEAD_CODE_COUNT = DEAD_THRESHOLD
    try:
        z, counts = quantizer_inputs()
        whole = quantizer_step(z, counts)
    finally:
        dalle.dvae.VQ_DEAD_CODE_COUNT = before
    assert int((counts < DEAD_THRESHOLD).sum()) > 0  # restarts happen in this update
    ranks = [load_file(str(runs / f"quantizer_rank{r}.safetensors")) for r in range(2)]
    for name in ("embed", "ema_sum", "ema_count"):
        assert torch.equal(ranks[0][name], ranks[1][name]), name
        torch.testing.assert_close(ranks[0][name], getattr(whole, name), rtol=1e-5, atol=1e-6, msg=name)
    assert torch.equal(ranks[0]["ema_count"], whole.ema_count)  # sums of whole counts: exact


def test_vq_on_two_processes_follows_the_one_process_run(runs):
    """Loss curve and logged metrics (of the whole batch), training weights, codebook and export.
    The ranks' replicas and codebooks agree exactly: the loop checks that itself at the end and
    raises if not, which would fail the spawn."""
    for name in ("loss", "nll", "commitment", "mse", "psnr", "perplexity", "usage"):
        assert column(runs / "vq", name) == pytest.approx(column(runs / "single_vq", name), rel=1e-4, abs=1e-5), name
    assert_close(training_state(runs / "vq", STEPS), training_state(runs / "single_vq", STEPS), atol=1e-4)
    export, reference = runs / "vq" / "dvae" / "model.safetensors", runs / "single_vq" / "dvae" / "model.safetensors"
    assert_close(load_file(str(export)), load_file(str(reference)), atol=1e-4)


def test_a_two_process_checkpoint_resumes_on_one_process(runs):
    out = runs / "vq_cut"
    assert not (out / "dvae").exists()  # interrupted: nothing exported
    assert [int(r["step"]) for r in log(out)] == [1, 2, 3]
    resumed = runs / "vq_resumed"
    assert column(resumed, "loss") == pytest.approx(column(runs / "single_vq", "loss"), rel=1e-4, abs=1e-5)
    assert_close(training_state(resumed, STEPS), training_state(runs / "single_vq", STEPS), atol=1e-4)


def test_gumbel_on_two_processes(runs):
    """The noise differs per rank (and from one process), so only the noise-free metrics of the
    first step (same weights) must match; the replicas' equality is checked by the loop."""
    two, one = log(runs / "gumbel"), log(runs / "single_gumbel")
    assert [r["step"] for r in two] == ["1", "2"] and (runs / "gumbel" / "dvae" / "model.safetensors").is_file()
    for name in ("kl", "perplexity", "usage"):
        assert float(two[0][name]) == pytest.approx(float(one[0][name]), rel=1e-4, abs=1e-5), name
    assert float(two[0]["loss"]) == pytest.approx(float(one[0]["loss"]), rel=0.05)


def test_a_global_batch_that_does_not_split_is_refused(runs):
    for rank in range(2):
        assert "divisible by the 2 processes" in (runs / f"odd.rank{rank}.error").read_text()


def test_gumbel_noise_from_a_generator_leaves_the_global_stream_alone():
    """What each rank of a data-parallel Gumbel run samples with: its own seeded generator."""
    q = GumbelQuantizer(16, straight_through=True).train()
    logits = torch.randn(2, 16, 3, 3, generator=torch.Generator().manual_seed(0), requires_grad=True)
    q.generator = torch.Generator().manual_seed(1)
    state = torch.get_rng_state()
    codes, _, _ = q(logits, temperature=0.5)
    assert torch.equal(torch.get_rng_state(), state)
    hard = codes.detach()
    assert torch.allclose(hard, hard.round(), atol=1e-6) and torch.allclose(hard.sum(1), torch.ones(2, 3, 3))
    codes[:, 0].sum().backward()  # straight-through: the relaxation's gradient reaches the logits
    assert logits.grad.abs().sum() > 0
    q.generator.manual_seed(1)
    assert torch.equal(q(logits, temperature=0.5)[0], codes)
    q.generator.manual_seed(2)
    assert not torch.equal(q(logits, temperature=0.5)[0], codes)
