"""What every training loop shares: schedules, the weight average, checkpoints for exact resume.

Exact resume means an interrupted run, resumed, ends with the same weights as one
never interrupted (bitwise on the CPU).  The loops make that possible by drawing the
batch of step ``s`` from ``(seed, s)`` alone, so a checkpoint only needs the step,
the weights, the optimizer, the weight average and the random states.

A checkpoint is a folder ``step_00001234/`` holding ``state.safetensors`` and
``state.json`` (the step, the loop's extra values, the non-tensor optimizer state,
the Python and NumPy random states and the SHA-256 of the tensor file).  It is
written under a temporary name and renamed, so a crash mid-write leaves the last
good checkpoint in place; a corrupted one is detected by its checksum and skipped.
The temporary folder such a crash leaves behind is removed by the next run's first save.
"""

from __future__ import annotations

import copy
import csv
import json
import math
import os
import random
import shutil
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dalle.io import ModelLoadError, check_state_dict, file_sha256, load_tensors, save_tensors

# --- schedules -------------------------------------------------------------------


def cosine(step: int, total: int, start: float, end: float) -> float:
    """Cosine interpolation from ``start`` (step 0) to ``end`` (step ``total`` and after)."""
    if total <= 0:
        return end
    t = min(max(step / total, 0.0), 1.0)
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * t))


def warmup_cosine(step: int, total: int, warmup: int, peak: float, final: float = 0.0) -> float:
    """Linear warm-up to ``peak`` over ``warmup`` steps, then cosine decay to ``final``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return cosine(step - warmup, max(total - warmup, 1), peak, final)


# --- time budgets ----------------------------------------------------------------

BUDGET_SAFETY = 0.92  # fraction of a ``minutes`` budget given to training steps (rest: eval, export)


def time_per_step(
    step: Callable[[], Any],
    repeats: int = 5,
    device: torch.device | str | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> float:
    """Median seconds one ``step()`` takes: ``repeats`` timed calls after an untimed warm-up.

    The torch (CPU and ``device``'s GPU), Python and NumPy random states are put back
    afterwards, so a run that times itself draws the same numbers as one that does not.
    On a CUDA ``device`` each call is waited for (kernels run asynchronously).
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    cuda = device is not None and torch.device(device).type == "cuda"
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
    python_state, numpy_state = random.getstate(), np.random.get_state()
    # The GPU's generator too: under torchrun only rank 0 times, and a draw it consumed
    # (dropout, Gumbel noise) would set its random stream apart from the other ranks'.
    with torch.random.fork_rng(devices=[torch.device(device)] if cuda else []):
        try:
            step()  # warm-up: allocator, kernel selection, lazy initialisation
            times = []
            for _ in range(repeats):
                sync()
                t0 = clock()
                step()
                sync()
                times.append(clock() - t0)
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)
    return sorted(times)[len(times) // 2]


def steps_in_budget(minutes: float, seconds_per_step: float, safety: float = BUDGET_SAFETY) -> int:
    """Training steps that fit in ``safety`` of ``minutes`` at ``seconds_per_step`` (at least 1)."""
    if not minutes > 0:
        raise ValueError(f"minutes must be > 0, got {minutes}")
    if not seconds_per_step > 0:
        raise ValueError(f"seconds_per_step must be > 0, got {seconds_per_step}")
    return max(1, int(minutes * 60 * safety / seconds_per_step))


def budget_deadline(minutes: float | None, start: float, elapsed_before: float = 0.0,
                    safety: float = BUDGET_SAFETY) -> float:
    """The clock time (``start``'s clock) past which a loop stops early; ``inf`` without a budget.

    The budget covers the whole run, a resumed one included: ``elapsed_before`` is the
    training time earlier runs spent (stored in the checkpoint).  The deadline lies
    halfway between the share planned for steps and the whole budget, so a machine
    that slows down mid-run still leaves time to checkpoint and export.
    """
    if minutes is None:
        return math.inf
    return start + minutes * 60 * (safety + 1) / 2 - elapsed_before


# --- weight average --------------------------------------------------------------


class EMA:
    """Exponential moving average of a model's weights (used for evaluation and export).

    Buffers (e.g. VQ codebooks kept by moving averages) are copied, not averaged.
    """

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        ema_params = list(self.module.parameters())
        params = [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(ema_params, params, 1.0 - self.decay)
        for b_ema, b in zip(self.module.buffers(), model.buffers()):
            b_ema.copy_(b)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state)

    def copy_to(self, model: nn.Module) -> None:
        model.load_state_dict(self.module.state_dict())


# --- non-finite losses -----------------------------------------------------------


class NonFiniteError(RuntimeError):
    pass


class NonFiniteGuard:
    """Skip steps whose loss (or gradient norm) is NaN or infinite; stop after too many in a row."""

    def __init__(self, max_consecutive: int = 20):
        self.max_consecutive = max_consecutive
        self.consecutive = 0
        self.skipped = 0

    def check(self, value: torch.Tensor | float) -> bool:
        """True when the step may go on; False when it must be skipped."""
        finite = bool(torch.isfinite(torch.as_tensor(value)).all())
        if finite:
            self.consecutive = 0
            return True
        self.consecutive += 1
        self.skipped += 1
        if self.consecutive >= self.max_consecutive:
            raise NonFiniteError(
                f"{self.consecutive} non-finite losses or gradients in a row ({self.skipped} in all): "
                "lower the learning rate, use bf16 instead of fp16, or check the data for broken images"
            )
        return False


# --- random states ---------------------------------------------------------------


def _rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        # The current device only: under torchrun each rank owns one GPU, and touching
        # the others would open a context on every one of them.
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state()
    meta = {
        "python": [version, list(internal), gauss],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    return tensors, meta


def _set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


# --- optimizer state -------------------------------------------------------------


def _flatten_optimizer(name: str, optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, entries in state["state"].items():
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{name}.{pid}.{key}"] = value
            else:
                scalars.setdefault(str(pid), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(name: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    prefix = f"optim.{name}."
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith(prefix):
            pid, field = key[len(prefix):].split(".", 1)
            state.setdefault(int(pid), {})[field] = value
    for pid, entries in meta["scalars"].items():
        state.setdefault(int(pid), {}).update(entries)
    groups = meta["param_groups"]
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    return {"state": state, "param_groups": groups}


# --- checkpoints -----------------------------------------------------------------


class Checkpointer:
    """Atomic, checksummed training checkpoints in ``folder``; the newest ``keep`` are kept.

    Only one process writes a folder (rank 0 under ``torchrun``), so on its first save
    any temporary folder already there was left by a run killed mid-write, and is removed.
    """

    TENSORS = "state.safetensors"
    META = "state.json"
    TMP_PREFIX = ".tmp_step_"

    def __init__(self, folder: str | Path, keep: int = 3):
        self.folder = Path(folder)
        self.keep = max(1, keep)
        self._swept = False  # stale temporary folders removed (done by the first save)

    def _step_dirs(self) -> list[Path]:
        if not self.folder.is_dir():
            return []
        return sorted(p for p in self.folder.iterdir() if p.is_dir() and p.name.startswith("step_"))

    def _remove_stale_temporaries(self) -> list[Path]:
        """Delete the ``.tmp_step_*`` folders a killed writer left; return them.

        Only called by the writing process before its first write of its own, so none of
        them can be in progress.  Links and files of that name are left alone: this class
        never makes them.
        """
        if not self.folder.is_dir():
            return []
        stale = sorted(p for p in self.folder.iterdir()
                       if p.name.startswith(self.TMP_PREFIX) and p.is_dir() and not p.is_symlink())
        for path in stale:
            shutil.rmtree(path, ignore_errors=True)
        return stale

    def save(
        self,
        step: int,
        modules: dict[str, nn.Module],
        optimizers: dict[str, torch.optim.Optimizer] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> Path:
        tensors, rng_meta = _rng_state()
        for name, module in modules.items():
            for key, value in module.state_dict().items():
                tensors[f"module.{name}.{key}"] = value
        optim_meta = {}
        for name, optimizer in (optimizers or {}).items():
            t, m = _flatten_optimizer(name, optimizer)
            tensors.update(t)
            optim_meta[name] = m

        if not self._swept:
            self._remove_stale_temporaries()
            self._swept = True
        final = self.folder / f"step_{step:08d}"
        tmp = self.folder / f"{self.TMP_PREFIX}{step:08d}_{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_tensors(tensors, tmp / self.TENSORS)
        meta = {
            "step": step,
            "extra": extra or {},
            "optimizers": optim_meta,
            "rng": rng_meta,
            "sha256": file_sha256(tmp / self.TENSORS),
        }
        (tmp / self.META).write_text(json.dumps(meta))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in self._step_dirs()[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def _read(self, path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        try:
            meta = json.loads((path / self.META).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ModelLoadError(f"{path / self.META} is unreadable ({e})") from None
        if file_sha256(path / self.TENSORS) != meta.get("sha256"):
            raise ModelLoadError(f"{path / self.TENSORS} fails its checksum (truncated or corrupted)")
        return load_tensors(path / self.TENSORS), meta

    def load_latest(
        self,
        modules: dict[str, nn.Module],
        optimizers: dict[str, torch.optim.Optimizer] | None = None,
    ) -> tuple[int, dict[str, Any]] | None:
        """Restore the newest good checkpoint into ``modules`` and ``optimizers``.

        Returns ``(step, extra)``, or None when the folder holds no checkpoint.  A corrupted
        checkpoint is reported and the one before it is used.
        """
        candidates = list(reversed(self._step_dirs()))
        if not candidates:
            return None
        errors = []
        for path in candidates:
            try:
                tensors, meta = self._read(path)
            except (ModelLoadError, OSError) as e:
                warnings.warn(f"skipping checkpoint {path.name}: {e}", stacklevel=2)
                errors.append(str(e))
                continue
            for name, module in modules.items():
                prefix = f"module.{name}."
                state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
                check_state_dict(module, state, f"checkpoint {path} ({name})")
                module.load_state_dict(state, strict=False)
            for name, optimizer in (optimizers or {}).items():
                if name not in meta["optimizers"]:
                    raise ModelLoadError(f"checkpoint {path} holds no optimizer state for {name!r}")
                optimizer.load_state_dict(_unflatten_optimizer(name, tensors, meta["optimizers"][name]))
            _set_rng_state(tensors, meta["rng"])
            return int(meta["step"]), meta["extra"]
        raise ModelLoadError(f"no usable checkpoint in {self.folder}: " + "; ".join(errors))


def step_generator(seed: int, step: int, stream: int = 0) -> torch.Generator:
    """A generator whose draws depend only on (seed, step, stream): the key to exact resume."""
    g = torch.Generator()
    g.manual_seed((seed * 1_000_003 + step * 7919 + stream * 104_729) % (2**63 - 1))
    return g


# --- validation split --------------------------------------------------------------
#
# Every stage holds out the same items: the *last* ones of the data set.  The tail (rather
# than a random subset) is what keeps the stages in step: the token cache lists the data
# set's items in order, so its tail is the data set's tail, even when bad images were left
# out earlier in the set (a skip shifts the indices after it, not the tail).  The batches
# of step ``s`` are drawn from the first ``n_train`` items only, still a function of
# ``(seed, s)``, so exact resume and the slicing of a batch over ranks are unchanged.

VAL_MIN_ITEMS = 4  # fewer held-out items give a figure too noisy to judge fit by: hold none out
VAL_MAX_SHARE = 0.2  # the floor (``val_min``) never takes more than a fifth of a small data set


def validation_split(n_items: int, fraction: float = 0.02, floor: int = 16, cap: int = 256) -> tuple[int, range]:
    """``(n_train, val_indices)``: the last items of an ``n_items`` data set held out for validation.

    The held-out count is ``fraction`` of the set, raised to ``floor`` items (but to no more
    than a fifth of the set) and cut to ``cap``; under :data:`VAL_MIN_ITEMS` (a data set of
    under 20 items with the defaults) nothing is held out.  Why these defaults (see
    :class:`dalle.config.TrainConfig`): 2% costs the training set little; 16 items make the
    mean of a per-image figure (bits per token, PSNR) precise to about a quarter of its
    spread between images, well inside the gaps the fit report looks for, and put a chance
    CLIP at 1 in 16; 256 items make it precise to a sixteenth, while evaluating them and as
    many training items stays a few seconds (about 8 s for the shapes transformer on 2 busy
    CPU cores) at each evaluation.  Examples: 24 items -> 4 held out; 300 -> 16; 10,000 -> 200;
    the 50,000 of the default shapes stream -> 256.
    """
    if n_items < 0:
        raise ValueError(f"n_items must be >= 0, got {n_items}")
    if not 0.0 <= fraction < 0.5:
        raise ValueError(f"val_fraction must be in [0, 0.5) (0 turns the validation split off), got {fraction}")
    if floor < 0 or cap < 0:
        raise ValueError(f"val_min and val_max must be >= 0, got {floor} and {cap}")
    if fraction == 0.0 or n_items == 0:
        return n_items, range(n_items, n_items)
    n_val = max(math.ceil(fraction * n_items), min(floor, int(VAL_MAX_SHARE * n_items)))
    n_val = min(n_val, cap, n_items - 1)
    if n_val < VAL_MIN_ITEMS:
        n_val = 0
    return n_items - n_val, range(n_items - n_val, n_items)


def holdout(n_items: int, train: Any, val_items: int | None = None, stage: str = "training",
            warn: bool = True) -> tuple[int, range]:
    """The validation split of a stage: ``val_items`` held out if given, else ``train``'s rule.

    ``train`` is a :class:`dalle.config.TrainConfig` (``val_fraction``, ``val_min``,
    ``val_max``).  When the data set is too small to spare any item, warns (with ``warn``)
    that the fit report cannot tell memorising from learning.
    """
    if val_items is not None:
        if not 0 <= val_items < n_items:
            raise ValueError(f"val_items={val_items} must be in [0, {n_items}): the {n_items}-item data set "
                             "needs at least one training item")
        return n_items - val_items, range(n_items - val_items, n_items)
    n_train, val = validation_split(n_items, train.val_fraction, train.val_min, train.val_max)
    if warn and not val and train.val_fraction > 0:
        warnings.warn(f"{stage}: {n_items} items are too few to hold any out for validation (about "
                      f"{math.ceil(VAL_MIN_ITEMS / VAL_MAX_SHARE)} are needed), so the logs and fit report show "
                      "training figures only and cannot tell memorising from learning", stacklevel=3)
    return n_train, val


def spread(n: int, k: int) -> list[int]:
    """``k`` indices spread evenly over ``range(n)`` (all of them when ``k >= n``).

    The training items a stage evaluates next to its validation items: spread rather than
    the first ``k``, so a data set stored in some order (by class, by date) is sampled
    across that order.
    """
    k = min(k, n)
    return [i * n // k for i in range(k)]


# --- resuming ---------------------------------------------------------------------


def resumed_progress(restored: tuple[int, dict[str, Any]] | None, steps: int | None, folder: Path,
                     warn: bool = True) -> tuple[int, int | None, float, tuple[float, int]]:
    """``(step, total_steps, seconds_spent, loss_window)`` of a run resumed from ``restored``.

    ``restored``: what :meth:`Checkpointer.load_latest` returned; None (no checkpoint)
    gives a fresh run's ``(0, None, 0.0, (0.0, 0))``, with a warning.  A resumed run keeps
    the schedule length it started with, so a different ``steps`` is ignored, with a
    warning.  ``warn``: False on the ranks that do not write (one warning per job).
    """
    if restored is None:
        if warn:
            warnings.warn(f"--resume: no checkpoint in {folder}; starting from scratch", stacklevel=3)
        return 0, None, 0.0, (0.0, 0)
    step, extra = restored
    total = int(extra["total_steps"])
    if steps is not None and steps != total and warn:
        warnings.warn(f"resuming a {total}-step run: steps={steps} ignored (the schedules keep their length)",
                      stacklevel=3)
    window = extra.get("window_loss", (0.0, 0))
    return step, total, float(extra.get("seconds", 0.0)), (float(window[0]), int(window[1]))


# --- CSV logs --------------------------------------------------------------------


class CsvLog:
    """A training loop's log: one CSV row per logged step, flushed as it is written.

    ``resume_step``: on a resumed run, the rows of the earlier log up to that step are kept
    (in :attr:`kept`, and rewritten first) and what came after is dropped, since the resumed
    run logs those steps again.  None starts the file afresh.  Columns a row lacks are left empty.
    """

    def __init__(self, path: Path, fields: Iterable[str], resume_step: int | None = None):
        self.path, self.fields = Path(path), list(fields)
        self.kept: list[dict[str, str]] = []
        if resume_step is not None and self.path.is_file():
            with open(self.path, newline="") as f:
                self.kept = [r for r in csv.DictReader(f)
                             if (r.get("step") or "").isdigit() and int(r["step"]) <= resume_step]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "w", newline="")
        self._writer = csv.DictWriter(self._file, fieldnames=self.fields)
        self._writer.writeheader()
        for row in self.kept:
            self._writer.writerow({k: row.get(k, "") for k in self.fields})
        self._file.flush()
        # TensorBoard events beside the CSV (dalle.training.tensorboard; nothing without it): the
        # stage is the file's name, and a resumed run hides the earlier events after its step.
        from dalle.training.tensorboard import open_writer

        self._stage = self.path.stem
        self._purge = None if resume_step is None else resume_step + 1
        open_writer(self.path.parent, self._stage, self._purge)

    def write(self, row: dict[str, Any]) -> None:
        from dalle.training.tensorboard import log_scalars

        self._writer.writerow({k: row.get(k, "") for k in self.fields})
        self._file.flush()
        log_scalars(self.path.parent, self._stage, {k: row.get(k, "") for k in self.fields}, self._purge)

    def close(self) -> None:
        from dalle.training.tensorboard import writer_for

        self._file.close()
        writer = writer_for(self.path.parent, self._stage, self._purge)
        if writer is not None:
            writer.flush()


# --- fit reports --------------------------------------------------------------------

@dataclass(frozen=True)
class Diagnosis:
    """One finding of a fit report: a stable ``code`` (for tests and tools) and a sentence for people."""

    code: str
    message: str


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(v) for v in value]
    return value


def write_fit_report(out_dir: str | Path, stage: str, summary: str, figures: dict[str, Any],
                     diagnoses: list[Diagnosis], echo: Callable[[str], Any] | None = print) -> Path:
    """Write ``out_dir/logs/<stage>_fit.json`` (figures + diagnoses) and print it in plain words.

    ``summary`` is one line of the main figures; each diagnosis gets a line of its own, and
    a run with none says so.  Non-finite figures are written as null (strict JSON).
    """
    path = Path(out_dir) / "logs" / f"{stage}_fit.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    report = {"stage": stage, "summary": summary, **figures,
              "diagnoses": [{"code": d.code, "message": d.message} for d in diagnoses]}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(_finite_or_none(report), indent=2) + "\n")
    os.replace(tmp, path)
    from dalle.training.tensorboard import log_text

    lines = [summary] + [f"- **{d.code}**: {d.message}" for d in diagnoses]
    if not diagnoses:
        lines.append("- no sign of memorising or of a failed stage")
    log_text(path.parent, stage, "fit_report", "\n\n".join(lines), int(figures.get("last_step") or figures.get("step") or 0))
    if echo is not None:
        echo(f"[{stage}] fit: {summary}")
        for d in diagnoses:
            echo(f"[{stage}]   - {d.message}")
        if not diagnoses:
            echo(f"[{stage}]   no sign of memorising or of a failed stage")
        echo(f"[{stage}]   (details in {path})")
    return path


def format_count(n: float) -> str:
    """``3712512`` -> ``"3.7M"``, ``94592`` -> ``"95k"``: parameter and token counts in messages."""
    for size, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= size:
            value = n / size
            return f"{value:.1f}{suffix}" if value < 10 else f"{value:.0f}{suffix}"
    return f"{n:g}"
