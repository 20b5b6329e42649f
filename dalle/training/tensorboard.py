"""TensorBoard event files beside the CSV logs, when ``tensorboard`` is installed.

Each stage writes ``OUT/logs/<stage>/events.out.tfevents.*`` next to ``OUT/logs/<stage>.csv``:
every numeric column of the CSV as a scalar (``<stage>/<column>``), the reconstruction and
sample grids the loops save as PNG, and the fit report as text.  ``tensorboard --logdir
OUT/logs`` shows the stages as runs side by side.

TensorBoard is optional (``pip install 'dalle[tensorboard]'``): without it, or with
``DALLE_TENSORBOARD=0``, nothing here writes and the CSV logs are the whole record.  Only
the process that writes the CSV log (rank 0) writes events.  A resumed run drops the events
after its resumed step (``purge_step``), as the CSV log drops its rows.
"""

from __future__ import annotations

import atexit
import os
from pathlib import Path
from typing import Any

import numpy as np

_writers: dict[Path, Any] = {}


def tensorboard_available() -> bool:
    """True when TensorBoard event files can be written (installed and not turned off)."""
    if os.environ.get("DALLE_TENSORBOARD", "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401  (needs the tensorboard package)
    except ImportError:
        return False
    return True


def writer_for(logs_dir: str | Path, stage: str, purge_step: int | None = None) -> Any | None:
    """The event writer of ``stage`` in ``logs_dir`` (``OUT/logs``), or None without TensorBoard.

    The first call of a process opens it; ``purge_step`` (a resumed run's step) then drops the
    earlier events after that step.
    """
    folder = Path(logs_dir) / stage
    if folder in _writers:
        return _writers[folder]
    if not tensorboard_available():
        return None
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(folder), purge_step=purge_step, flush_secs=30)
    _writers[folder] = writer
    return writer


def open_writer(logs_dir: str | Path, stage: str, purge_step: int | None = None) -> Any | None:
    """A fresh writer for ``stage`` (a new run or a resume in this process), closing an older one."""
    folder = Path(logs_dir) / stage
    old = _writers.pop(folder, None)
    if old is not None:
        old.close()
    return writer_for(logs_dir, stage, purge_step)


def log_scalars(logs_dir: str | Path, stage: str, row: dict[str, Any], purge_step: int | None = None) -> None:
    """Every numeric value of a CSV row (its ``step`` the x axis) as a scalar ``<stage>/<key>``."""
    step = row.get("step")
    if step in (None, ""):
        return
    writer = writer_for(logs_dir, stage, purge_step)
    if writer is None:
        return
    for key, value in row.items():
        if key == "step" or value in (None, ""):
            continue
        try:
            number = float(value)
        except (TypeError, ValueError):
            continue
        writer.add_scalar(f"{stage}/{key}", number, int(step))


def log_image(logs_dir: str | Path, stage: str, tag: str, image: Any, step: int) -> None:
    """A PIL image or a PNG file (a reconstruction or sample grid) under ``<stage>/<tag>``."""
    writer = writer_for(logs_dir, stage)
    if writer is None:
        return
    from PIL import Image

    if isinstance(image, (str, Path)):
        with Image.open(image) as opened:
            image = opened.convert("RGB")
    writer.add_image(f"{stage}/{tag}", np.asarray(image.convert("RGB")), int(step), dataformats="HWC")
    writer.flush()


def log_text(logs_dir: str | Path, stage: str, tag: str, text: str, step: int) -> None:
    writer = writer_for(logs_dir, stage)
    if writer is None:
        return
    writer.add_text(f"{stage}/{tag}", text, int(step))
    writer.flush()


def close_all() -> None:
    """Flush and close every open writer (also run at exit)."""
    for writer in _writers.values():
        writer.close()
    _writers.clear()


atexit.register(close_all)


def where_to_look(out: str | Path) -> str:
    """The line ``dalle train`` prints: where the logs are and how to view them."""
    logs = Path(out) / "logs"
    if tensorboard_available():
        return f"logs: {logs}/<stage>.csv and TensorBoard events in {logs}/<stage>/; view with: tensorboard --logdir {logs}"
    return (f"logs: {logs}/<stage>.csv (for TensorBoard event files too: pip install 'dalle[tensorboard]', "
            "or pip install tensorboard)")
