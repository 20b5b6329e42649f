"""Data-parallel training on the CPU: two Gloo processes against one process with the same global batch.

One spawn of two ranks (``torch.multiprocessing``, a free local port) runs the real
training loop with the environment ``torchrun`` would give them, in fp32 without
autocast, so the comparison with the one-process run is a matter of float rounding only.
"""

from __future__ import annotations

import csv
import os
import shutil
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from dalle.config import get_preset
from dalle.tokenizer import TextTokenizer
from dalle.training import distributed as dd
from dalle.training.transformer import batch_for_step, train_transformer

pytestmark = pytest.mark.skipif(not dist.is_available() or sys.platform == "win32",
                                reason="needs torch.distributed with Gloo")

STEPS = 4
SCENES = ["a red circle", "a blue square", "a green triangle"]


def toy_data(n: int = 12) -> list[tuple[torch.Tensor, list[str]]]:
    items = []
    for i in range(n):
        tokens = torch.full((8, 8), 3 + 4 * (i % 3), dtype=torch.long)
        tokens[i % 8] = 100 + i
        items.append((tokens, [SCENES[i % 3], SCENES[i % 3].replace("a ", "one ")]))
    return items


def toy_config(grad_accum: int = 1):
    config = get_preset("tiny")
    config.train.transformer_lr = 3e-3
    config.train.transformer_batch = 8
    config.train.grad_accum = grad_accum
    return config


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, tokenizer_dir: str, runs: list[tuple[str, int, dict]]) -> None:
    """One rank: the environment torchrun sets, then the unchanged training loop, once per run.

    The runs share one process group, as the stages of ``dalle train all`` do.
    """
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    tokenizer = TextTokenizer.from_pretrained(tokenizer_dir)
    try:
        for out, grad_accum, kwargs in runs:
            source = kwargs.pop("copy_of", None)
            if source is not None:  # resume a copy of an earlier run's folder
                if rank == 0:
                    shutil.copytree(source, out)
                dist.barrier()
            train_transformer(toy_data(), tokenizer, out, toy_config(grad_accum), device="cpu", autocast=False,
                              progress=False, log_every=1, sample_every=1000, **kwargs)
        dist.barrier()  # leave together: tearing the group down while a rank is still in a collective can abort
    finally:
        dd.shutdown_distributed()


def losses(out: Path, column: str = "loss") -> list[float]:
    with open(out / "logs" / "transformer.csv", newline="") as f:
        return [float(r[column]) for r in csv.DictReader(f)]


def assert_same_curves(out: Path, reference: Path, steps: int = STEPS) -> None:
    """Loss parts and gradient norms (which would show a wrongly scaled gradient) of every step."""
    for column in ("loss", "text_loss", "image_loss", "grad_norm"):
        assert losses(out, column)[:steps] == pytest.approx(losses(reference, column)[:steps], rel=1e-4, abs=1e-5), column


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A one-process run of STEPS steps, and the same on two ranks: DDP, and FSDP stopped half-way.

    The two-rank runs split each rank's share into two micro-batches (gradient sync skipped on
    the first), and share one spawn (starting processes is most of the cost).
    """
    root = tmp_path_factory.mktemp("dist")
    tokenizer = TextTokenizer.train([c for _, caps in toy_data() for c in caps], toy_config().tokenizer)
    tokenizer.save_pretrained(root / "tokenizer")
    two_rank = [
        (str(root / "ddp"), 2, {"steps": STEPS, "strategy": "ddp"}),
        # FSDP with two micro-batches a rank, interrupted (checkpointed) half-way.
        (str(root / "fsdp"), 2, {"steps": STEPS, "strategy": "fsdp", "stop_after": STEPS // 2}),
        # ... and resumed, still sharded, from its full-tensor checkpoint.
        (str(root / "fsdp_resumed"), 2, {"steps": STEPS, "strategy": "fsdp", "resume": True,
                                         "copy_of": str(root / "fsdp")}),
    ]
    mp.spawn(_rank_main, args=(2, free_port(), str(root / "tokenizer"), two_rank), nprocs=2, join=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks: the same kernels, so the same rounding
    try:
        train_transformer(toy_data(), tokenizer, root / "single", toy_config(), steps=STEPS, autocast=False,
                          progress=False, log_every=1, sample_every=1000)
    finally:
        torch.set_num_threads(threads)
    return root, tokenizer


def assert_close_weights(a: Path, b: Path, atol: float) -> None:
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    worst = max(float((wa[k].float() - wb[k].float()).abs().max()) for k in wa)
    assert worst < atol, worst


def test_shards_of_the_global_batch_make_the_one_process_batch(runs):
    _, tokenizer = runs
    data = toy_data()
    whole = batch_for_step(data, tokenizer, 0, 3, 8)
    parts = [batch_for_step(data, tokenizer, 0, 3, 8, dd.DistInfo(rank=r, world_size=2)) for r in range(2)]
    assert torch.equal(torch.cat([p[0] for p in parts]), whole[0])
    assert torch.equal(torch.cat([p[1] for p in parts]), whole[1])
    assert list(dd.shard_batch_indices(list(range(8)), dd.DistInfo(rank=1, world_size=4))) == [2, 3]
    with pytest.raises(ValueError, match="divisible by 3"):
        dd.shard_batch_indices(list(range(8)), dd.DistInfo(rank=0, world_size=3))


def test_not_under_torchrun_everything_is_a_no_op(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    info = dd.init_distributed("cpu")
    assert (info.rank, info.world_size, info.is_main, info.distributed) == (0, 1, True, False)
    model = torch.nn.Linear(2, 2)
    assert dd.wrap_model(model, info, "fsdp") is model
    with pytest.raises(ValueError, match="strategy"):
        dd.wrap_model(model, info, "zero3")


def test_ddp_on_two_processes_follows_the_one_process_run(runs):
    """Same loss curve, gradient norms and weights as one process (with the same global batch).
    The ranks' replicas and weight averages agree exactly: the loop checks that itself at the
    end and raises if not, which would fail the spawn."""
    root, _ = runs
    assert_same_curves(root / "ddp", root / "single")
    assert_close_weights(root / "ddp" / "transformer", root / "single" / "transformer", atol=1e-4)


def test_fsdp_resumes_sharded_from_its_checkpoint(runs):
    root, _ = runs
    assert_same_curves(root / "fsdp_resumed", root / "single")
    assert_close_weights(root / "fsdp_resumed" / "transformer", root / "single" / "transformer", atol=1e-4)


def test_fsdp_checkpoint_resumes_on_one_process(runs):
    """FSDP on two ranks (two micro-batches each) for half the run, checkpointed as full tensors,
    then resumed by one process: the result matches the one-process run."""
    root, tokenizer = runs
    out = root / "fsdp"
    assert not (out / "transformer").exists()  # interrupted: nothing exported
    assert len(losses(out)) == STEPS // 2
    assert_same_curves(out, root / "single", STEPS // 2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        resumed = train_transformer(toy_data(), tokenizer, out, toy_config(), steps=STEPS, resume=True,
                                    autocast=False, progress=False, log_every=1, sample_every=1000)
    finally:
        torch.set_num_threads(threads)
    assert_same_curves(out, root / "single")
    assert_close_weights(resumed, root / "single" / "transformer", atol=1e-4)


def test_replica_fingerprints_tell_any_changed_weight():
    torch.manual_seed(0)
    a, b = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)
    b.load_state_dict(a.state_dict())
    assert torch.equal(dd.fingerprint(a), dd.fingerprint(b))
    with torch.no_grad():
        b.weight[3, 5] = torch.nextafter(b.weight[3, 5], torch.tensor(1.0))  # one ulp
    assert not torch.equal(dd.fingerprint(a), dd.fingerprint(b))


def test_state_holder_and_full_state_round_trip_on_one_process():
    model = torch.nn.Linear(3, 2)
    state = dd.full_state_dict(model)
    other = torch.nn.Linear(3, 2)
    dd.load_full_state_dict(other, state)
    assert all(torch.equal(other.state_dict()[k], v) for k, v in state.items())
    holder = dd.StateHolder()
    with pytest.raises(RuntimeError, match="empty"):
        holder.state_dict()
    holder.load_state_dict(state)
    assert holder.state_dict() is state
    with dd.main_process_first(dd.DistInfo()):  # one process: just runs the body
        pass
