"""``dalle train``: each component in turn, into one model folder.

Order: tokenizer -> dVAE -> token cache -> transformer -> CLIP.  ``--resume``
continues a component from its newest checkpoint and skips the ones already
finished, so ``dalle train all --resume`` picks a killed run up where it died.
The model folder keeps the whole config (``dalle.json``) from its first run, so
later steps never need the preset again.

Validation: every stage holds out the same images, the data set's last ones
(:func:`dalle.training.state.validation_split`; ``val_fraction``, ``val_min`` and
``val_max`` of the config's ``train`` section), logs its figures on them next to the
same figures on training images, and ends with a fit report in ``OUT/logs/<stage>_fit.json``
that names memorising, a collapsed codebook, a reranker near chance and the like.

One run per stage and folder: a fresh run (no ``--resume``) into a folder that already
holds a stage's checkpoints, export or run record is refused (or, with ``--overwrite``,
the old run is moved aside to ``OUT/replaced/<time>/``), so the checkpoints in a folder
always belong to the last run started there and ``--resume`` continues that run.  Each
run records what it was asked for (``OUT/checkpoints/<stage>/run.json``), so a run killed
before its first checkpoint resumes with the same ``--steps``/``--minutes``.

Environment: ``DALLE_CHECKPOINT_EVERY=N`` checkpoints the dVAE, transformer and CLIP
every N steps instead of each loop's default (used by the kill-and-resume tests;
also handy on preemptible machines).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from dalle.config import (SPLIT_FIELDS, ConfigError, DalleConfig, apply_overrides, config_changes, get_preset,
                          is_architecture_field, load_config, save_config)

CONFIG_FILE = "dalle.json"
# Share of a ``train all --minutes M`` budget each stage gets.
TIME_SHARES = {"dvae": 0.35, "transformer": 0.4, "clip": 0.25}
TOKENIZER_CAPTION_LIMIT = 50_000  # items read to learn the BPE vocabulary


def checkpoint_interval() -> int | None:
    """``DALLE_CHECKPOINT_EVERY`` as a positive step count, or None (each loop's default)."""
    text = os.environ.get("DALLE_CHECKPOINT_EVERY", "").strip()
    if not text:
        return None
    try:
        every = int(text)
    except ValueError:
        every = 0
    if every < 1:
        raise ValueError(f"DALLE_CHECKPOINT_EVERY must be a positive number of steps, got {text!r}")
    return every


class TrainingFolderError(ValueError):
    """``--out`` cannot take this run (another run's files are there, or it is not a folder)."""


RUN_RECORD = "run.json"  # OUT/checkpoints/<stage>/run.json: what the last run started there asked for
STAGE_LOGS = ("{stage}.csv", "{stage}.png", "{stage}_fit.json")  # under OUT/logs


def check_out_folder(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise TrainingFolderError(f"--out {out} is a file; give a folder to write the model into")


def previous_run(out: Path, stage: str) -> str | None:
    """What of an earlier ``stage`` run ``out`` holds (checkpoints, export, run record), or None."""
    found = []
    checkpoints = out / "checkpoints" / stage
    steps = sorted(checkpoints.glob("step_*")) if checkpoints.is_dir() else []
    if steps:
        found.append(f"checkpoints up to step {int(steps[-1].name.split('_')[-1])}")
    elif (checkpoints / RUN_RECORD).is_file():
        found.append("a started run with no checkpoint yet")
    if (out / stage).exists():
        found.append(f"an export in {out / stage}")
    return ", ".join(found) or None


def claim_out_folder(out: Path, stages: list[str], whole: bool, overwrite: bool) -> Path | None:
    """Make sure a fresh run of ``stages`` mixes with no earlier run in ``out``.

    Without ``overwrite`` an earlier run is refused with what to do; with it, the earlier
    run's files are moved to ``OUT/replaced/<time>/`` (returned).  ``whole`` (``train all``):
    the folder's config is moved too, so the new run takes the preset's.
    """
    earlier = {stage: what for stage in stages if (what := previous_run(out, stage))}
    if not earlier:
        return None
    if not overwrite:
        listing = "; ".join(f"{stage}: {what}" for stage, what in earlier.items())
        raise TrainingFolderError(
            f"--out {out} already holds another run ({listing}): add --resume to continue it, "
            f"give a new --out, or add --overwrite to move the old run aside")
    aside = out / "replaced" / time.strftime("%Y%m%d-%H%M%S")
    moves = [Path(stage) for stage in earlier] + [Path("checkpoints") / stage for stage in earlier]
    moves += [Path("logs") / name.format(stage=stage) for stage in earlier for name in STAGE_LOGS]
    if whole:
        moves += [Path(CONFIG_FILE), Path("cache")]
    for rel in moves:
        if (out / rel).exists():
            (aside / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(out / rel), str(aside / rel))
    return aside


def _given_parts(out: Path) -> set[str]:
    """Parts ``out``'s config marks as used as given (``train.pretrained_dvae``/``pretrained_clip``)."""
    try:
        train = json.loads((out / CONFIG_FILE).read_text()).get("train", {})
    except (OSError, ValueError, AttributeError):
        return set()
    return {part for part in ("dvae", "clip") if isinstance(train, dict) and train.get(f"pretrained_{part}")}


def record_run(out: Path, stage: str, steps: int | None, minutes: float | None) -> None:
    folder = out / "checkpoints" / stage
    folder.mkdir(parents=True, exist_ok=True)
    (folder / RUN_RECORD).write_text(json.dumps({"steps": steps, "minutes": minutes}) + "\n")


def recorded_run(out: Path, stage: str) -> dict[str, Any]:
    """What the last run of ``stage`` started in ``out`` asked for ({} if unknown)."""
    try:
        record = json.loads((out / "checkpoints" / stage / RUN_RECORD).read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def resolve_device(device: str | None) -> str:
    if device:
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"--device {device} asked for, but no CUDA GPU is available; use --device cpu")
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def model_config(out: Path, preset: str, overrides: list[str] | None = None, resume: bool = False,
                 stages: list[str] | tuple[str, ...] = ()) -> DalleConfig:
    """The folder's saved config, else the preset's, with ``--set`` overrides applied and saved.

    The first run of a folder writes ``OUT/dalle.json``; later runs read it back (the preset
    then no longer matters).  An override that changes a component already trained (or
    checkpointed) in ``out`` is refused unless this run trains that component afresh: with
    ``--resume``, or when the component is not among ``stages``.  Overrides that only steer
    training (the ``train`` section, any section not holding a component, and the fields of
    :data:`dalle.config.TRAINING_ONLY_FIELDS`) are always accepted: a resumed run then goes
    on with the new step count, learning rate and so on.
    """
    path = out / CONFIG_FILE
    saved = path.is_file()
    base = load_config(DalleConfig, path) if saved else get_preset(preset)
    config, applied = apply_overrides(base, list(overrides or []))
    config.check()
    if saved and applied:
        refuse_architecture_changes(base, config, out, resume, stages)
    if not saved or config != base:  # ranks after the first find it saved already
        out.mkdir(parents=True, exist_ok=True)
        save_config(config, path)
    return config


TRAIN_FACTOR = 5.0  # training holds weights, gradients, two Adam moments and a weight average


def check_stages_fit(config: DalleConfig, stages: list[str], device: str, where: Path) -> None:
    """Refuse, before any stage starts, a config whose models cannot be trained in ``device``'s memory."""
    from dalle.clip import CLIP
    from dalle.dvae import DiscreteVAE
    from dalle.io import check_fits
    from dalle.transformer import DalleTransformer

    builds = {"dvae": (DiscreteVAE, config.dvae), "transformer": (DalleTransformer, config.transformer),
              "clip": (CLIP, config.clip)}
    for stage in stages:
        if stage in builds:
            build, part = builds[stage]
            check_fits(build, part, device, f"{where} ({stage} section)", factor=TRAIN_FACTOR, doing="train")


def refuse_architecture_changes(old: DalleConfig, new: DalleConfig, out: Path, resume: bool,
                                stages: list[str] | tuple[str, ...]) -> None:
    """Raise ConfigError if ``new`` changes a component that ``out`` holds and this run keeps."""
    for section, key, before, after in config_changes(old, new):
        if f"{section}.{key}" in SPLIT_FIELDS:
            kept = [s for s in ("dvae", "transformer", "clip")
                    if ((out / s).exists() or (out / "checkpoints" / s).exists()) and (resume or s not in stages)]
            if kept:
                raise ConfigError(
                    f"--set changes {section}.{key} from {before!r} to {after!r}, which moves the held-out split, "
                    f"but the {', '.join(kept)} in {out} trained with the old one; train into a new --out")
            continue
        if not is_architecture_field(section, key):
            continue
        present = (out / section).exists() or (out / "checkpoints" / section).exists()
        fresh = not resume and section in stages
        if present and not fresh:
            how = ("--resume continues the trained weights" if resume
                   else f"this run does not retrain the {section}")
            raise ConfigError(
                f"--set changes {section}.{key} from {before!r} to {after!r}, but {out / section} was trained "
                f"with {before!r} and {how}; train into a new --out, or retrain the {section} afresh (--overwrite, without --resume)")


def open_training_data(data: str, split: str = "train", seed: int = 0, shapes_size: int = 50_000,
                       max_bad_fraction: float | None = None):
    """A data folder (any reader of dalle.data), or ``shapes`` for the generator streamed with no files.

    ``max_bad_fraction`` (the config's ``data.max_bad_fraction``) is the reader's bad-item limit.
    """
    if data in ("shapes", f"shapes:{split}"):
        from dalle.data.shapes import ShapesDataset

        return ShapesDataset(split=split, size=shapes_size, seed=seed)
    from dalle.data import open_dataset

    limits = {} if max_bad_fraction is None else {"max_bad_fraction": max_bad_fraction}
    if "://" in data or any(c in data for c in "{*?["):  # shard URLs and patterns: the reader expands them
        return open_dataset(data, **limits)
    path = Path(data)
    if not path.exists():
        raise FileNotFoundError(f"--data {data} does not exist (make one with: dalle data shapes --out {data} --count 10000)")
    return open_dataset(path, **limits)


def check_bad_data(dataset, log=print) -> None:
    """Read every item of a map-style data set once and apply its bad-item limit, before any stage trains.

    Every stage then works under one verdict: without this, the dVAE (which draws a sample
    of the items) could train on a set that the token cache (which reads them all) refuses
    afterwards.  Streams are checked as they are read, and the shapes generator has no bad items.
    """
    from dalle.data.images import BadImageError, SkipCounter

    counter = getattr(dataset, "skipped", None)
    if not isinstance(counter, SkipCounter) or not hasattr(dataset, "load") or _streamed(dataset):
        return
    log(f"checking the {len(dataset)} items of the data set (limit: data.max_bad_fraction="
        f"{counter.max_bad_fraction})")
    for i in range(len(dataset)):
        try:
            dataset.load(i)
        except BadImageError as e:
            counter.skip(e.key or dataset.key(i), e.reason, check=False)
        else:
            counter.ok()
    counter.check(final=True)
    if counter.skipped:
        log(f"data: {counter.summary()}")
    counter.seen = counter.skipped = 0  # the verdict is given; the stages count their own reads afresh
    counter.reasons.clear()


def iter_captions(dataset, limit: int):
    if hasattr(dataset, "iter_captions"):  # readers that can list captions without decoding images
        yield from dataset.iter_captions(limit)
        return
    n = len(dataset) if hasattr(dataset, "__len__") else limit
    for i in range(min(n, limit)):
        item = dataset[i]
        if item is not None:
            yield from item.captions


def train_tokenizer(dataset, out: Path, config: DalleConfig) -> Path:
    from dalle.tokenizer import TextTokenizer

    tokenizer = TextTokenizer.train(iter_captions(dataset, TOKENIZER_CAPTION_LIMIT), config.tokenizer)
    tokenizer.save_pretrained(out / "tokenizer")
    return out / "tokenizer"


def _budget(minutes: float | None, share: float, component: str, total_minutes: bool) -> float | None:
    if minutes is None:
        return None
    return minutes * share if total_minutes else minutes


def build_or_open_token_cache(dataset, out: Path, device: str):
    """Encode the data set once with the trained dVAE (rebuilt when the dVAE changes)."""
    from dalle.data.token_cache import TokenCache, TokenCacheError, build_token_cache
    from dalle.dvae import load_image_tokenizer
    from dalle.io import WEIGHTS_NAME, file_sha256

    dvae_dir = out / "dvae"
    if not dvae_dir.is_dir():
        raise FileNotFoundError(f"{dvae_dir} is missing: train the dVAE first (dalle train dvae --out {out})")
    fingerprint = file_sha256(dvae_dir / WEIGHTS_NAME)
    cache_dir = out / "cache" / "tokens"
    if cache_dir.is_dir():
        try:
            cache = TokenCache(cache_dir)
            cache.verify()
            if cache.fingerprint == fingerprint:
                return cache
        except TokenCacheError as e:  # truncated, damaged or half-deleted: rebuilt, as said
            print(f"[transformer] the token cache is broken ({e}); rebuilding it", flush=True)
            shutil.rmtree(cache_dir)
    dvae = load_image_tokenizer(dvae_dir, device=device)
    size = dvae.config.image_size

    @torch.inference_mode()
    def encode(images: torch.Tensor) -> torch.Tensor:
        return dvae.encode(images.to(device)).cpu()

    return build_token_cache(dataset, encode, cache_dir, image_size=size, fingerprint=fingerprint,
                             overwrite=True)  # here only when the cache was made with another dVAE


# --- Parts used as they are (converted from released weights, or trained elsewhere) ------------


def _same_files(src: Path, dst: Path) -> bool:
    from dalle.io import file_sha256

    files = sorted(p.name for p in src.iterdir() if p.is_file())
    return all((dst / f).is_file() and file_sha256(src / f) == file_sha256(dst / f) for f in files)


def _copy_part(src: Path, dst: Path, part: str) -> None:
    """Copy the files of the part folder ``src`` into the model folder's ``dst`` (once)."""
    import shutil

    if src.resolve() == dst.resolve():
        return
    if dst.is_dir() and any(dst.iterdir()):
        if _same_files(src, dst):
            return
        raise ConfigError(f"{dst} already holds another {part}; give a new --out (or remove {dst})")
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file():
            shutil.copy2(f, dst / f.name)


def adopt_pretrained(out: Path, config: DalleConfig, dvae_dir: Path | None, clip_dir: Path | None,
                     log=print) -> DalleConfig:
    """Put ``--dvae``/``--clip`` folders into ``out`` and fit the config to them; saved as ``dalle.json``.

    The dVAE's config replaces the ``dvae`` section and sets what depends on it (the
    transformer's image vocabulary and grid, our CLIP's image size); ``train.pretrained_*``
    records that the part is not trained here.
    """
    from dalle.convert import read_conversion

    if dvae_dir is not None:
        from dalle.config import DVAEConfig
        from dalle.dvae import DiscreteVAE, load_image_tokenizer
        from dalle.io import CONFIG_NAME

        tokenizer = load_image_tokenizer(dvae_dir)  # a loadable folder, or a clear error
        if isinstance(tokenizer, DiscreteVAE):
            dv = load_config(DVAEConfig, Path(dvae_dir) / CONFIG_NAME)
        else:
            # Another image tokenizer (a converted VQGAN) builds itself from its own folder;
            # the dvae section then only states its grid, for the config's consistency checks.
            c = tokenizer.config
            levels = len(c.ch_mult)
            dv = DVAEConfig(image_size=c.image_size, codebook_size=c.codebook_size, num_groups=levels,
                            width_multipliers=(1,) * levels, quantizer="vq", code_dim=c.embed_dim)
        if (out / "transformer" / "config.json").is_file() and (dv.codebook_size, dv.grid_size) != (
                config.transformer.image_vocab, config.transformer.image_grid):
            raise ConfigError(f"{out} already has a transformer for another dVAE; give a new --out")
        before = (config.transformer.image_vocab, config.transformer.image_grid, config.clip.image_size)
        config.dvae = dv
        config.transformer.image_vocab, config.transformer.image_grid = dv.codebook_size, dv.grid_size
        if not config.train.pretrained_clip:
            config.clip.image_size = dv.image_size
            if dv.image_size % config.clip.patch_size:
                raise ConfigError(f"the dVAE's {dv.image_size} px images do not split into the CLIP's "
                                  f"{config.clip.patch_size} px patches; pick a preset whose clip.patch_size divides it")
        after = (config.transformer.image_vocab, config.transformer.image_grid, config.clip.image_size)
        if after != before:
            log(f"[dvae] from {dvae_dir}: transformer image vocabulary {before[0]} -> {after[0]}, grid {before[1]} -> "
                f"{after[1]}, CLIP image size {before[2]} -> {after[2]}")
        record = read_conversion(dvae_dir)
        config.train.pretrained_dvae = record.get("converted_from", "folder") if record else "folder"
        _copy_part(Path(dvae_dir), out / "dvae", "dVAE")
    if clip_dir is not None:
        from dalle.clip import load_reranker

        reranker = load_reranker(clip_dir)  # a loadable CLIP folder, or a clear error
        if getattr(reranker, "tokenizer", None) is None:  # ours: it reads the model folder's text ids
            c, tok = reranker.config, config.tokenizer
            if (c.text_vocab, c.text_len) != (tok.total_vocab, tok.text_len):
                raise ConfigError(f"the CLIP in {clip_dir} reads {c.text_len} text ids over {c.text_vocab}, but this "
                                  f"model's tokenizer gives {tok.text_len} over {tok.total_vocab}; it was trained "
                                  "with another tokenizer")
            if c.image_size != config.dvae.image_size:
                raise ConfigError(f"the CLIP in {clip_dir} scores {c.image_size} px images but the dVAE makes "
                                  f"{config.dvae.image_size} px ones")
            config.clip = c
        record = read_conversion(clip_dir)
        config.train.pretrained_clip = record.get("converted_from", "folder") if record else "folder"
        _copy_part(Path(clip_dir), out / "clip", "CLIP")
    config.check()
    save_config(config, out / CONFIG_FILE)
    return config


def _pretrained_part_missing(out: Path, part: str, kind: str) -> FileNotFoundError:
    how = {"openai-dvae": "dalle convert openai-dvae encoder.pkl decoder.pkl --out D",
           "openai-clip": "dalle convert openai-clip ViT-B-32.pt --out D"}.get(kind, f"a {part} folder D")
    return FileNotFoundError(f"{out} uses a {part} that is not trained here ({kind}) and has none yet: "
                             f"make one ({how}) and pass --{part} D")


def train_component(component: str, *, data: str, out: Path, preset: str = "shapes", steps: int | None = None,
                    minutes: float | None = None, resume: bool = False, device: str | None = None,
                    seed: int | None = None, strategy: str = "ddp", compile: bool = False,
                    dvae: Path | None = None, clip: Path | None = None, overrides: list[str] | None = None,
                    overwrite: bool = False) -> Path:
    """Train ``component`` (or ``all``) on ``data`` into the model folder ``out``.

    Under ``torchrun`` every rank runs this; files shared by all ranks (the config,
    the tokenizer, the token cache) are written by rank 0 first, then read by the rest.
    ``dvae``/``clip``: folders of parts used as they are (e.g. converted from released
    weights by ``dalle convert``): copied into ``out`` and never trained.
    A fresh run (not ``resume``) into a folder holding another run of one of its stages
    is refused, unless ``overwrite`` moves that run aside (:func:`claim_out_folder`).
    """
    from dalle.training.distributed import barrier, init_distributed, main_process_first

    out = Path(out)
    check_out_folder(out)
    stages = ["tokenizer", "dvae", "transformer", "clip"] if component == "all" else [component]
    whole = component == "all"
    own = [s for s in stages if s not in _given_parts(out)]  # parts used as given are never a run of ours
    if not resume and not overwrite:  # every rank refuses alike, before anything is written
        claim_out_folder(out, own, whole, overwrite=False)
    info = init_distributed(resolve_device(device))
    device = str(info.device)
    log = print if info.is_main else (lambda *a, **k: None)
    with main_process_first(info):
        if not resume and info.is_main and (aside := claim_out_folder(out, own, whole, overwrite)):
            log(f"--overwrite: the earlier run in {out} was moved to {aside}")
        config = model_config(out, preset, overrides, resume=resume, stages=stages)
        if dvae is not None or clip is not None:
            if info.is_main:
                config = adopt_pretrained(out, config, dvae, clip, log)
            else:
                config = load_config(DalleConfig, out / CONFIG_FILE)
    pretrained = {"dvae": config.train.pretrained_dvae, "clip": config.train.pretrained_clip}
    for part, kind in pretrained.items():
        if kind and component == part:
            raise ConfigError(f"{out}'s {part} is used as it is ({kind}), not trained here; train the transformer")
        if kind and not stage_complete(out / part) and (component == "all" or (part == "dvae" and component == "transformer")):
            raise _pretrained_part_missing(out, part, kind)
    if strategy != "fsdp":  # (sharded, each rank holds a part: the estimate would be too strict)
        check_stages_fit(config, [s for s in stages if not pretrained.get(s)], device, out / CONFIG_FILE)
    dataset = open_training_data(data, "train", seed=config.train.seed if seed is None else seed,
                                 shapes_size=config.train.shapes_size,
                                 max_bad_fraction=config.data.max_bad_fraction)
    if info.is_main and hasattr(dataset, "image_files"):  # mixed sizes and modes: converted, with a note
        from dalle.data.survey import survey_images, survey_note

        note = survey_note(survey_images(dataset.image_files(), config.dvae.image_size), config.dvae.image_size,
                           len(dataset))
        if note:
            log(note)
    if any(stage in ("tokenizer", "dvae", "clip") for stage in stages):  # (the token cache checks its own pass)
        check_bad_data(dataset, log)
    common: dict[str, Any] = dict(resume=resume, device=device, seed=seed)
    every = checkpoint_interval()
    if every is not None:
        common["checkpoint_every"] = every
    started = time.time()
    if info.is_main:
        from dalle.training.tensorboard import where_to_look

        log(where_to_look(out))
    for stage in stages:
        if pretrained.get(stage):
            log(f"[{stage}] {out / stage} is used as it is ({pretrained[stage]}); not trained")
            continue
        if whole and resume:
            problem = export_problem(out / stage)
            if problem is None:
                log(f"[{stage}] already trained in {out / stage} (export verified); skipping")
                continue
            if (out / stage).exists():
                log(f"[{stage}] the export in {out / stage} is broken ({problem}); training the stage again")
        stage_steps, stage_minutes = steps, minutes
        if resume and steps is None and minutes is None:  # the last run started here says how long
            record = recorded_run(out, stage)
            stage_steps, stage_minutes = record.get("steps"), record.get("minutes")
        elif info.is_main and stage != "tokenizer":
            record_run(out, stage, steps, minutes)
        common["steps"] = stage_steps
        budget = _budget(stage_minutes, TIME_SHARES.get(stage, 0.0), stage, whole)
        log(f"[{stage}] training" + (f" for {budget:.1f} min" if budget else ""))
        if stage == "tokenizer":
            if info.is_main:
                train_tokenizer(dataset, out, config)
            barrier(info)
        elif stage == "dvae":
            from dalle.training.dvae import train_dvae

            train_dvae(dataset, out, config, minutes=budget, strategy=strategy, **common)
        elif stage == "transformer":
            from dalle.dvae import load_image_tokenizer
            from dalle.tokenizer import TextTokenizer
            from dalle.training.state import holdout
            from dalle.training.transformer import train_transformer

            tokenizer = _need_tokenizer(out)
            with main_process_first(info):
                cache = build_or_open_token_cache(dataset, out, device)
            dvae = load_image_tokenizer(out / "dvae", device=device)
            # The token cache lists the data set's items in order, so its tail holds the images the
            # dVAE and CLIP hold out; the count comes from the data set itself, because items the
            # cache left out (bad images) would otherwise shift the split's size.  None: too small
            # to split, which the loop says itself.
            n_items = len(cache) if _streamed(dataset) else len(dataset)
            _, held_out = holdout(n_items, config.train, stage="transformer", warn=False)
            val_items = min(len(held_out), len(cache) - 1) if held_out else None
            train_transformer(cache, tokenizer, out, config, minutes=budget, dvae=dvae, strategy=strategy,
                              compile=compile, val_items=val_items, **common)
        elif stage == "clip":
            from dalle.training.clip import train_clip

            train_clip(dataset, _need_tokenizer(out), out, config, minutes=budget, **common)
        else:  # pragma: no cover - argparse restricts the choices
            raise ConfigError(f"unknown component {stage}")
    barrier(info)  # leave together: tearing the group down while a rank is still in a collective can abort
    log(f"done in {(time.time() - started) / 60:.1f} min")
    return out


def _streamed(dataset) -> bool:
    """A stream (WebDataset URLs, compressed shards) has no length: the token cache is then the data set."""
    from torch.utils.data import IterableDataset

    return isinstance(dataset, IterableDataset)


def export_problem(folder: Path) -> str | None:
    """What keeps a stage's export from loading (None: it is whole and matches its checksum)."""
    from dalle.io import check_export

    if not (folder / "config.json").is_file():
        return f"no export in {folder}"
    problem, _ = check_export(folder, "tokenizer.json" if folder.name == "tokenizer" else "model.safetensors")
    return problem


def stage_complete(folder: Path) -> bool:
    """A stage is done when its export is whole: config plus weights (or tokenizer.json), verified."""
    return export_problem(folder) is None


def _need_tokenizer(out: Path):
    from dalle.tokenizer import TextTokenizer

    if not (out / "tokenizer").is_dir():
        raise FileNotFoundError(f"{out / 'tokenizer'} is missing: train it first (dalle train tokenizer --out {out})")
    return TextTokenizer.from_pretrained(out / "tokenizer")
