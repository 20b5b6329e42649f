"""TensorBoard events beside the CSV logs: scalars, grids and fit reports; the CSV alone without it."""

import sys

import pytest

from dalle.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


def train_dvae(out, capsys):
    assert main(["train", "dvae", "--data", "shapes", "--out", str(out), "--preset", "tiny", "--steps", "2",
                 "--device", "cpu"]) == 0
    return capsys.readouterr().out


def test_events_hold_scalars_grids_and_the_fit_report(tmp_path, capsys):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    printed = train_dvae(tmp_path / "m", capsys)
    logs = tmp_path / "m" / "logs"
    assert f"tensorboard --logdir {logs}" in printed
    from dalle.training.tensorboard import close_all

    close_all()
    events = EventAccumulator(str(logs / "dvae"), size_guidance={"images": 0, "tensors": 0}).Reload()
    tags = events.Tags()
    assert {"dvae/loss", "dvae/psnr", "dvae/val_psnr"} <= set(tags["scalars"])
    assert [e.step for e in events.Scalars("dvae/loss")] == [1, 2]  # a row at step 1, as the CSV log
    assert "dvae/reconstructions" in tags["images"]
    assert "dvae/fit_report/text_summary" in tags["tensors"]
    assert (logs / "dvae.csv").is_file()


def test_without_tensorboard_the_csv_logs_alone(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if not installed
    printed = train_dvae(tmp_path / "m", capsys)
    logs = tmp_path / "m" / "logs"
    assert "pip install 'dalle[tensorboard]'" in printed and "--logdir" not in printed
    assert (logs / "dvae.csv").is_file() and (logs / "dvae_fit.json").is_file()
    assert not (logs / "dvae").exists()
