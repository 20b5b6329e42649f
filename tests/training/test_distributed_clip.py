"""Data-parallel CLIP training on the CPU: two Gloo processes against one process with the same global batch.

The contrastive loss needs every negative of the batch, so each rank's embeddings are
gathered (with gradients) and every rank computes the whole batch's loss.  One spawn of
two ranks (``torch.multiprocessing``, a free local port, the environment ``torchrun``
sets) checks the gradients of one step against one process, then runs the real loop
(shapes set with hard-negative twins, BPE dropout on), fresh and resumed.  fp32 on one
thread per process, so the comparisons are a matter of float rounding only.
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
from safetensors.torch import load_file, save_file

from dalle.clip import CLIP
from dalle.config import get_preset
from dalle.data.preprocess import derive_seed
from dalle.data.shapes import ShapesDataset
from dalle.tokenizer import TextTokenizer
from dalle.training import distributed as dd
from dalle.training.clip import (SPEED_PROBE_STEPS, EmbedForward, caption_positives, draw_batch, gather_rows, global_batch_loss,
                                 image_to_tensor, slice_bounds, train_clip)

pytestmark = pytest.mark.skipif(not dist.is_available() or sys.platform == "win32",
                                reason="needs torch.distributed with Gloo")

STEPS = 4
WORLD = 2


def dataset() -> ShapesDataset:
    return ShapesDataset("train", 64, seed=0)


def toy_config():
    config = get_preset("tiny")  # a one-layer CLIP on 64x64 images, BPE dropout 0.1
    config.train.clip_batch = 4  # + 4 twins: 8 rows, 4 a rank
    config.train.clip_steps = STEPS
    config.train.clip_lr = 1e-3
    config.train.seed = 0
    return config


def odd_batch(tokenizer: TextTokenizer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Step 0's batch as the loop builds it, less its last row: 7 rows, shares of 3 and 4."""
    config = toy_config()
    items, captions = draw_batch(dataset(), config.train.clip_batch, 0, 0)
    twins, twin_captions = dataset().hard_negatives(items, captions, np.random.default_rng(derive_seed(0, 0, 2)))
    items, captions = (items + twins)[:-1], (captions + twin_captions)[:-1]
    images = torch.stack([image_to_tensor(item.image, config.clip.image_size) for item in items])
    text = tokenizer.encode_batch(captions, training=True, seed=derive_seed(0, 0, 1))
    return text, images, caption_positives(captions, items)


def step_gradients(tokenizer: TextTokenizer, info: dd.DistInfo, ddp: bool) -> dict[str, torch.Tensor]:
    """The loss and every parameter's gradient after one backward of :func:`global_batch_loss`
    on this rank's share of :func:`odd_batch`, with or without DDP's averaging."""
    text, images, positives = odd_batch(tokenizer)
    torch.manual_seed(0)
    model = CLIP(toy_config().clip)
    forward = dd.wrap_model(EmbedForward(model), info) if ddp else EmbedForward(model)
    lo, hi = slice_bounds(len(positives), info)
    loss = global_batch_loss(forward, text[lo:hi], images[lo:hi], positives, info)
    loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters()}
    grads["loss"] = loss.detach().reshape(1)
    return grads


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, root: str, runs: list[tuple[str, dict]]) -> None:
    """One rank: the environment torchrun sets, the gradient check, then the training loop once per run."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    tokenizer = TextTokenizer.from_pretrained(Path(root) / "tokenizer")
    try:
        info = dd.init_distributed("cpu")
        for ddp in (False, True):
            save_file(step_gradients(tokenizer, info, ddp), str(Path(root) / f"grads_{'ddp' if ddp else 'raw'}{rank}.st"))
        # Uneven shares (3 and 4 rows) gather in rank order.
        total = 7
        lo, hi = slice_bounds(total, info)
        gathered = gather_rows(torch.arange(lo, hi, dtype=torch.float32)[:, None], total, info)
        assert torch.equal(gathered[:, 0], torch.arange(total, dtype=torch.float32)), gathered

        for out, kwargs in runs:
            source = kwargs.pop("copy_of", None)
            if source is not None:  # resume a copy of an earlier run's folder, from its step-2 checkpoint
                if rank == 0:
                    copy_at_step_2(Path(source), Path(out))
                dist.barrier()
            config = toy_config()
            config.train.clip_steps = kwargs.pop("clip_steps", STEPS)
            train_clip(dataset(), tokenizer, out, config, device="cpu", log_every=1, **kwargs)
        dist.barrier()  # leave together: tearing the group down while a rank is still in a collective can abort
    finally:
        dd.shutdown_distributed()


def copy_at_step_2(source: Path, out: Path) -> None:
    """``source`` as a run interrupted after its step-2 checkpoint: later checkpoints and the export gone
    (the log keeps its later rows: a resumed run must drop them itself)."""
    shutil.copytree(source, out)
    shutil.rmtree(out / "clip")
    for step_dir in (out / "checkpoints" / "clip").iterdir():
        if step_dir.name != "step_00000002":
            shutil.rmtree(step_dir)


def one_process(fn, *args, **kwargs):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks: the same kernels, so the same rounding
    try:
        return fn(*args, **kwargs)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One process: the step's gradients and a STEPS-step run (checkpoint at step 2).
    Two ranks (one spawn): the gradients, a fresh run, a minutes-bounded run, and a
    resume of the one-process run's step-2 checkpoint."""
    root = tmp_path_factory.mktemp("dist_clip")
    config = toy_config()
    tokenizer = TextTokenizer.train((c for item in dataset() for c in item.captions), config.tokenizer)
    tokenizer.save_pretrained(root / "tokenizer")
    tokenizer = TextTokenizer.from_pretrained(root / "tokenizer")
    one_process(train_clip, dataset(), tokenizer, root / "single", config, log_every=1, checkpoint_every=2)
    two_rank = [
        (str(root / "ddp"), {"checkpoint_every": 2}),
        (str(root / "ddp_resumed"), {"resume": True, "copy_of": str(root / "single")}),
        # The schedule is re-fitted to the clock every few steps: rank 0 decides for all.
        (str(root / "ddp_minutes"), {"minutes": 0.05, "clip_steps": 10**6}),
    ]
    mp.spawn(_rank_main, args=(WORLD, free_port(), str(root), two_rank), nprocs=WORLD, join=True)
    return root, tokenizer


def log(out: Path, column: str) -> list[float]:
    with open(out / "logs" / "clip.csv", newline="") as f:
        return [float(r[column]) for r in csv.DictReader(f)]


def assert_same_run(out: Path, reference: Path) -> None:
    for column in ("loss", "logit_scale", "lr"):
        assert log(out, column) == pytest.approx(log(reference, column), rel=1e-4, abs=1e-5), column
    wa, wb = load_file(out / "clip" / "model.safetensors"), load_file(reference / "clip" / "model.safetensors")
    assert wa.keys() == wb.keys()
    worst = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
    assert worst < 1e-5, worst


def test_dropout_is_on_so_the_ids_comparison_means_something(runs):
    _, tokenizer = runs
    items, captions = draw_batch(dataset(), 32, 0, 0)
    assert not torch.equal(tokenizer.encode_batch(captions, training=True, seed=1),
                           tokenizer.encode_batch(captions, training=False))


def assert_grad_close(got: torch.Tensor, want: torch.Tensor, name: str) -> None:
    """Within float rounding of the tensor's scale (sums over the batch run in another order)."""
    worst, scale = float((got - want).abs().max()), float(want.abs().max())
    assert worst <= 1e-4 * scale + 1e-9, f"{name}: off by {worst:.3g} in a gradient of scale {scale:.3g}"


def test_gradients_of_the_global_batch_loss_match_one_process(runs):
    """Each rank's own backward gives W times its slice's share of the gradient (the gather's
    backward sums over ranks) and the full gradient of the temperature; DDP's average of those
    is the one-process gradient, on every rank, also with uneven shares (3 and 4 rows)."""
    root, tokenizer = runs
    full = one_process(step_gradients, tokenizer, dd.DistInfo(), False)
    raw = [load_file(root / f"grads_raw{r}.st") for r in range(WORLD)]
    ddp = [load_file(root / f"grads_ddp{r}.st") for r in range(WORLD)]
    for r in range(WORLD):
        assert_grad_close(raw[r]["loss"], full["loss"], "loss")  # every negative on every rank
        assert_grad_close(raw[r]["logit_scale"], full["logit_scale"], "logit_scale")
        assert torch.equal(ddp[r]["loss"], raw[r]["loss"])
        for name in full:
            assert_grad_close(ddp[r][name], full[name], name)
    for name in full:
        if name not in ("loss", "logit_scale"):
            assert_grad_close((raw[0][name] + raw[1][name]) / WORLD, full[name], name)
    # A rank alone holds only its slice's part: the split is real.
    image_weight = "image.patch_embedding.weight"
    assert not torch.allclose(raw[0][image_weight], full[image_weight], rtol=1e-2, atol=0)
    assert not torch.allclose(raw[0][image_weight], raw[1][image_weight], rtol=1e-2, atol=0)


def test_two_ranks_follow_the_one_process_run(runs):
    """Same losses, temperatures and final weights.  The ranks' replicas agree exactly:
    the loop checks that itself at the end and raises if not, which would fail the spawn."""
    root, _ = runs
    assert [int(v) for v in log(root / "ddp", "step")] == list(range(1, STEPS + 1))
    assert_same_run(root / "ddp", root / "single")
    assert (root / "ddp" / "checkpoints" / "clip" / "step_00000002").is_dir()


def test_two_ranks_resume_a_one_process_checkpoint(runs):
    root, _ = runs
    assert_same_run(root / "ddp_resumed", root / "single")


def test_one_process_resumes_a_two_rank_checkpoint(runs):
    root, tokenizer = runs
    out = root / "ddp_then_single"
    copy_at_step_2(root / "ddp", out)
    one_process(train_clip, dataset(), tokenizer, out, toy_config(), resume=True, log_every=1)
    assert_same_run(out, root / "single")


def test_minutes_budget_under_two_ranks_stops_together(runs):
    """Re-fitted on rank 0's clock and shared: the ranks keep one schedule and stop at one step
    (else their collectives would part ways, or the replica check at the end would fail)."""
    root, _ = runs
    model = CLIP.from_pretrained(root / "ddp_minutes" / "clip")
    steps = [int(v) for v in log(root / "ddp_minutes", "step")]
    assert steps == list(range(1, len(steps) + 1))
    assert len(steps) > SPEED_PROBE_STEPS, "the schedule was re-fitted at least once"
    lr = log(root / "ddp_minutes", "lr")
    assert lr[-1] < max(lr), "the re-fitted (short) schedule decays before the budget ends"
    assert model.config == toy_config().clip


def test_a_global_batch_that_does_not_split_is_refused(tmp_path, monkeypatch):
    config = toy_config()
    config.train.clip_batch = 3
    # A one-process "job" of two ranks, enough for the check (it runs before any collective).
    monkeypatch.setattr(dd, "init_distributed", lambda device=None: dd.DistInfo(rank=0, world_size=2))
    with pytest.raises(ValueError, match="divisible by 2"):
        train_clip(dataset(), None, tmp_path, config)  # type: ignore[arg-type]  (refused before it is used)
