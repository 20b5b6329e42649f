"""What a hostile but fair user did to the command line, model folders and data (issue 18).

Each test reproduces one way the package broke (a finished run overwritten by a new one,
a truncated export trusted, a huge config built until the machine ran out of memory,
...) and checks the fix: a clear one-line error, a warning, or the right behaviour.
The web page's share of the corpus is in tests/test_serve.py.  Everything runs on the
``tiny`` preset and a 64-image shapes folder, a few steps a stage.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dalle.cli import main

sys.path.insert(0, str(Path(__file__).resolve().parent))  # for helpers/, whatever pytest's import mode
from helpers.cli_errors import fails_with_one_line  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data_folder(tmp_path_factory) -> Path:
    """``dalle data shapes --out D --count 64``, as in the issue."""
    out = tmp_path_factory.mktemp("data") / "D"
    assert main(["data", "shapes", "--out", str(out), "--count", "64", "--workers", "1"]) == 0
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_folder) -> Path:
    """``dalle train all --data D --out M --preset tiny --steps 3``: a finished run with its checkpoints."""
    out = tmp_path_factory.mktemp("run") / "M"
    assert main(["train", "all", "--data", str(data_folder), "--out", str(out), "--preset", "tiny", "--steps", "3",
                 "--device", "cpu"]) == 0
    return out


@pytest.fixture
def run_copy(trained, tmp_path) -> Path:
    """A throw-away copy of the whole run folder (checkpoints, cache and logs too)."""
    copy = tmp_path / "M"
    shutil.copytree(trained, copy)
    return copy


def train(component: str, data: Path, out: Path, *extra) -> list:
    return ["train", component, "--data", data, "--out", out, "--preset", "tiny", "--device", "cpu", *extra]


# --- 1. a fresh run into a folder that holds another run ------------------------------------


def test_a_fresh_run_into_a_finished_run_is_refused(run_copy, data_folder, capsys):
    before = (run_copy / "transformer" / "model.safetensors").read_bytes()
    fails_with_one_line(train("transformer", data_folder, run_copy, "--steps", "200"), capsys,
                        "already holds another run", "checkpoints up to step 3", "--resume", "--overwrite")
    assert (run_copy / "transformer" / "model.safetensors").read_bytes() == before
    assert json.loads((run_copy / "checkpoints" / "transformer" / "step_00000003" / "state.json").read_text())


def test_a_killed_overwriting_run_resumes_itself_not_the_old_one(run_copy, data_folder, monkeypatch, capsys):
    """The issue's steps: a new run killed before its first checkpoint, then ``--resume``."""
    import dalle.training.transformer as loop

    old = (run_copy / "transformer" / "model.safetensors").read_bytes()

    def killed(*args, **kwargs):  # the process dies before the loop writes anything
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "train_transformer", killed)
    assert main([str(a) for a in train("transformer", data_folder, run_copy, "--steps", "6", "--overwrite")]) == 130
    monkeypatch.undo()
    [aside] = (run_copy / "replaced").iterdir()
    assert (aside / "transformer" / "model.safetensors").read_bytes() == old  # set aside, not lost
    assert (aside / "checkpoints" / "transformer" / "step_00000003").is_dir()
    assert not (run_copy / "transformer").exists()

    assert main([str(a) for a in train("transformer", data_folder, run_copy, "--resume")]) == 0
    # The resumed run is the 6-step one that was started, not the old 3-step one.
    assert sorted(p.name for p in (run_copy / "checkpoints" / "transformer").glob("step_*")) == ["step_00000006"]
    assert (run_copy / "transformer" / "model.safetensors").read_bytes() != old


def test_train_out_naming_a_file(tmp_path, data_folder, capsys):
    path = tmp_path / "model.txt"
    path.write_text("not a folder")
    fails_with_one_line(train("dvae", data_folder, path, "--steps", "1"), capsys, "model.txt", "is a file")


# --- 3. a config too big for the machine ------------------------------------------------------


def _edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    for key, value in changes.items():
        section, _, name = key.partition("__")
        (data[section] if name else data)[name or key] = value
    path.write_text(json.dumps(data))


def test_a_model_config_too_big_to_load_is_refused_before_it_is_built(run_copy, tmp_path, capsys):
    _edit_json(run_copy / "transformer" / "config.json", n_layers=100_000, head_dim=1024)
    fails_with_one_line(["generate", "a red circle", "--model", run_copy, "--out", tmp_path / "g", "--device", "cpu"],
                        capsys, "transformer/config.json", "parameters", "free", "check the sizes")


def test_a_training_config_too_big_to_train_is_refused_before_the_first_stage(tmp_path, data_folder, capsys):
    out = tmp_path / "big"
    out.mkdir()
    from dalle.config import get_preset, save_config

    config = get_preset("tiny")
    config.dvae.hidden_width = 1_000_000
    save_config(config, out / "dalle.json")
    fails_with_one_line(train("all", data_folder, out, "--steps", "1"), capsys, "dalle.json (dvae section)", "to train")
    assert not (out / "tokenizer").exists()  # refused before the first stage


def test_estimate_matches_the_built_model():
    from dalle.config import get_preset
    from dalle.io import estimate_size
    from dalle.transformer import DalleTransformer

    config = get_preset("tiny").transformer
    config.n_layers = 5
    params, size = estimate_size(DalleTransformer, config)
    model = DalleTransformer(config)
    assert params == sum(p.numel() for p in model.parameters())
    assert size == sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


# --- 4 and 5. damaged exports: checksums, info, resume ----------------------------------------


def _flip_middle(path: Path, n: int = 64) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + n] = bytes(b ^ 0x5A for b in data[middle:middle + n])
    path.write_bytes(bytes(data))


def test_flipped_bytes_in_exported_weights_are_refused(run_copy, tmp_path, capsys):
    _flip_middle(run_copy / "transformer" / "model.safetensors")
    fails_with_one_line(["generate", "a red circle", "--model", run_copy, "--out", tmp_path / "g", "--device", "cpu"],
                        capsys, "transformer/model.safetensors", "fails its checksum")


def test_an_edited_tokenizer_file_is_refused(run_copy, tmp_path, capsys):
    path = run_copy / "tokenizer" / "tokenizer.json"
    path.write_text(path.read_text() + " ")  # still a readable tokenizer, not the exported one
    fails_with_one_line(["generate", "a red circle", "--model", run_copy, "--out", tmp_path / "g", "--device", "cpu"],
                        capsys, "tokenizer.json", "fails its checksum")


def test_info_reports_checksums(trained, capsys):
    assert main(["info", "--model", str(trained)]) == 0
    out = capsys.readouterr().out
    assert all(f"{part}, " in out for part in ("tokenizer", "dvae", "transformer", "clip"))
    assert out.count(" verified: ") == 4


@pytest.mark.parametrize("damage", ["truncate", "pickle", "flip"])
def test_info_names_a_damaged_weights_file(run_copy, capsys, damage):
    path = run_copy / "dvae" / "model.safetensors"
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif damage == "pickle":
        path.write_bytes(b"\x80\x04\x95" + bytes(200))
    else:
        _flip_middle(path)
    fails_with_one_line(["info", "--model", run_copy], capsys, "would not load", "dvae/model.safetensors",
                        "checksum" if damage == "flip" else "not a readable safetensors")


def test_an_export_without_checksums_still_loads(run_copy, tmp_path, capsys):
    """Folders exported before checksums existed (like the bundled model) load; info says so."""
    for part in ("tokenizer", "dvae", "transformer", "clip"):
        path = run_copy / part / "config.json"
        config = json.loads(path.read_text())
        del config["checksums"]
        path.write_text(json.dumps(config))
    assert main(["info", "--model", str(run_copy)]) == 0
    assert capsys.readouterr().out.count("no checksum") == 4
    assert main(["generate", "a red circle", "--model", str(run_copy), "--candidates", "1", "--keep", "1",
                 "--out", str(tmp_path / "g"), "--device", "cpu"]) == 0
    capsys.readouterr()
    # Without a checksum a damaged file is still caught when it is not whole safetensors.
    path = run_copy / "transformer" / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    fails_with_one_line(["info", "--model", run_copy], capsys, "transformer/model.safetensors", "not a readable")


def test_info_with_a_broken_config_names_the_file(run_copy, capsys):
    (run_copy / "clip" / "config.json").write_text("{broken")
    fails_with_one_line(["info", "--model", run_copy], capsys, "clip/config.json", "not valid JSON")


def test_resume_retrains_a_stage_whose_export_is_truncated(run_copy, data_folder, capsys):
    path = run_copy / "transformer" / "model.safetensors"
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) // 2])
    assert main([str(a) for a in train("all", data_folder, run_copy, "--resume")]) == 0
    out = capsys.readouterr().out
    assert "[dvae] already trained" in out and "[transformer] the export" in out and "is broken" in out
    assert path.read_bytes() == whole  # re-exported from the run's last checkpoint: the same weights


# --- 9, 12, 13. options and paths: one clear line, before any sampling -----------------------


def generate(model: Path, out: Path, *extra) -> list:
    return ["generate", "a red circle", "--model", model, "--candidates", "1", "--keep", "1", "--out", out,
            "--device", "cpu", *extra]


@pytest.mark.parametrize("option, value, words", [
    ("--temperature", "nan", "finite"),
    ("--temperature", "inf", "finite"),
    ("--top-p", "nan", "finite"),
    ("--seed", "1180591620717411303424", "--seed must be between 0 and"),
    ("--seed", "-1", "--seed must be between 0 and"),
    ("--seed", "lucky", "whole number"),
    ("--device", "nonsense", "is not a device"),
])
def test_bad_numbers_and_devices_are_refused(trained, tmp_path, capsys, option, value, words):
    fails_with_one_line(generate(trained, tmp_path / "g", f"{option}={value}"), capsys, words)


def test_minutes_nan_is_refused(data_folder, tmp_path, capsys):
    fails_with_one_line(train("dvae", data_folder, tmp_path / "m", "--minutes", "nan"), capsys, "finite")


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="the machine has a GPU")
@pytest.mark.parametrize("command", ["generate", "train"])
def test_cuda_without_a_gpu(trained, data_folder, tmp_path, capsys, command):
    argv = (generate(trained, tmp_path / "g") if command == "generate"
            else train("dvae", data_folder, tmp_path / "m", "--steps", "1"))
    fails_with_one_line([*argv, "--device", "cuda"], capsys, "no CUDA GPU", "--device cpu")


def test_out_naming_an_existing_file(trained, tmp_path, capsys):
    path = tmp_path / "out.png"
    path.write_bytes(b"x")
    fails_with_one_line(generate(trained, path), capsys, "out.png", "is a file")


def test_out_that_cannot_be_written_is_refused_before_sampling(trained, tmp_path, capsys, monkeypatch):
    import dalle.pipeline

    sampled = []
    monkeypatch.setattr(dalle.pipeline.DallePipeline, "_sample", lambda *a, **k: sampled.append(1))
    readonly = tmp_path / "ro"
    readonly.mkdir()
    readonly.chmod(0o555)
    # As root, permissions do not stop a write: /proc refuses new folders to everyone.
    out = Path("/proc/dalle-out") if __import__("os").access(readonly, __import__("os").W_OK) else readonly / "g"
    fails_with_one_line(generate(trained, out), capsys, "cannot write to --out")
    assert not sampled


def test_prompts_file_with_invalid_utf8_is_named(trained, tmp_path, capsys):
    path = tmp_path / "prompts.txt"
    path.write_bytes(b"a red circle\n\xff\xfe a blue square\n")
    fails_with_one_line(["generate", "--prompts", path, "--model", trained, "--out", tmp_path / "g", "--device", "cpu"],
                        capsys, "prompts.txt", "UTF-8")


def test_complete_given_a_folder(trained, tmp_path, capsys):
    fails_with_one_line(["complete", tmp_path, "a red circle", "--keep-rows", "2", "--model", trained,
                         "--out", tmp_path / "g", "--device", "cpu"], capsys, "is a folder", "image file")


@pytest.mark.parametrize("host, words", [("10.255.255.1", "--host must be an address of this machine"),
                                          ("no-such-host.invalid", "--host")])
def test_serve_on_a_host_that_is_not_this_machine(trained, capsys, host, words):
    line = fails_with_one_line(["serve", "--model", trained, "--host", host, "--port", "7861", "--device", "cpu"],
                               capsys, words)
    assert "--port" not in line


# --- 10. prompts the tokenizer cannot read ----------------------------------------------------


@pytest.mark.parametrize("prompt", ["一个红色的圆圈", "دائرة حمراء"])
def test_a_prompt_in_an_unknown_script_is_refused(trained, tmp_path, capsys, prompt):
    argv = generate(trained, tmp_path / "g")
    argv[1] = prompt
    fails_with_one_line(argv, capsys, "cannot read", "e.g.")


def test_a_prompt_with_one_unknown_word_warns(trained, tmp_path):
    # A process of its own: in-process, pytest records warnings instead of printing them.
    argv = generate(trained, tmp_path / "g")
    argv[1] = "a red 圆圈 circle"
    done = subprocess.run([sys.executable, "-m", "dalle.cli", *map(str, argv)], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "dalle generate: warning: the model cannot read '圆圈'" in done.stderr
    assert "Traceback" not in done.stderr


# --- 11. a second generate into the same --out -------------------------------------------------


def test_a_second_generate_appends_to_the_manifest(trained, tmp_path):
    out = tmp_path / "g"
    for seed in ("0", "0", "5"):  # the same seed twice: same names, which must not overwrite
        assert main([str(a) for a in generate(trained, out, "--seed", seed)]) == 0
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and len({r["file"] for r in rows}) == 3
    images = {p.name for p in out.glob("*.png") if not p.name.endswith(tuple(f"grid{s}.png" for s in ("", "_2", "_3")))}
    assert images == {r["file"] for r in rows}  # every image listed, every listed image there


def test_a_foreign_manifest_is_not_appended_to(trained, tmp_path, capsys):
    out = tmp_path / "g"
    out.mkdir()
    (out / "manifest.jsonl").write_text("this is my own file\n")
    fails_with_one_line(generate(trained, out), capsys, "manifest.jsonl", "another --out")


def test_non_finite_config_values_are_refused(data_folder, tmp_path, capsys):
    fails_with_one_line(train("dvae", data_folder, tmp_path / "m", "--set", "train.dvae_lr=nan"), capsys, "finite")
    out = tmp_path / "m2"
    out.mkdir()
    (out / "dalle.json").write_text('{"train": {"dvae_lr": NaN}}')
    fails_with_one_line(train("dvae", data_folder, out), capsys, "dvae_lr", "finite")


# --- 6. a damaged token cache ----------------------------------------------------------------


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_a_damaged_token_cache_is_rebuilt(run_copy, data_folder, capsys, damage):
    from dalle.data.token_cache import TokenCache

    path = run_copy / "cache" / "tokens" / "tokens.npy"
    whole = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(whole[: len(whole) // 2])
    else:
        _flip_middle(path, 16)
    assert main([str(a) for a in train("transformer", data_folder, run_copy, "--resume")]) == 0
    assert "the token cache is broken" in capsys.readouterr().out
    assert path.read_bytes() == whole  # the same tokens, encoded again
    TokenCache(path.parent).verify()


# --- 7. a truncated or damaged WebDataset shard ------------------------------------------------


def _write_shards(folder: Path, n_shards: int, per_shard: int) -> list[Path]:
    import io
    import tarfile

    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in range(n_shards):
        path = folder / f"shard-{s:02d}.tar"
        with tarfile.open(path, "w") as tar:
            for k in range(per_shard):
                buffer = io.BytesIO()
                Image.new("RGB", (32, 32), (40 * s % 256, 6 * k % 256, 90)).save(buffer, format="PNG")
                for name, data in ((f"{s:02d}{k:03d}.png", buffer.getvalue()), (f"{s:02d}{k:03d}.txt", b"a red circle")):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        paths.append(path)
    return paths


@pytest.mark.parametrize("damage", ["truncate", "header"])
def test_samples_lost_in_a_broken_shard_are_counted_and_named(tmp_path, damage):
    from dalle.data.webdataset import IndexedShards, WebDatasetShards

    shards = _write_shards(tmp_path / "wds", 4, 40)
    broken = shards[1]
    data = bytearray(broken.read_bytes())
    cut = int(len(data) * 0.62) // 512 * 512 + 100
    if damage == "truncate":
        broken.write_bytes(bytes(data[:cut]))
    else:  # garbage over a stretch in the middle: tarfile used to stop there without a word
        data[cut:cut + 2048] = b"\x07" * 2048
        broken.write_bytes(bytes(data))
    indexed = IndexedShards([str(p) for p in shards], max_bad_fraction=None)
    lost = 160 - len(indexed)
    assert lost >= 10  # about the last third of the shard
    assert indexed.skipped.skipped == lost  # every lost sample counts toward the bad-data limit
    reason = indexed.skipped.reasons[str(broken)]
    assert f"{lost} lost" in reason and broken.name in reason

    streamed = WebDatasetShards([str(p) for p in shards], max_bad_fraction=None, shuffle_shards=False)
    assert len(list(streamed)) == len(indexed)
    reason = streamed.skipped.reasons[str(broken)]
    assert " lost" in reason and broken.name in reason
    if damage == "header":  # the headers past the damage are found (not those the garbage overwrote)
        assert lost - 1 <= streamed.skipped.skipped <= lost


# --- 8. one bad-data limit, one setting, checked before the first stage ------------------------


@pytest.fixture(scope="module")
def partly_bad_folder(tmp_path_factory, data_folder) -> Path:
    """The 64-image folder with 10 images replaced by text (15.6% bad)."""
    out = tmp_path_factory.mktemp("bad") / "D"
    shutil.copytree(data_folder, out)
    for i in range(1, 40, 4):
        (out / f"{i:06d}.png").write_text("not an image")
    return out


@pytest.mark.parametrize("component", ["all", "dvae"])
def test_too_much_bad_data_is_refused_before_the_first_stage(partly_bad_folder, tmp_path, capsys, component):
    out = tmp_path / "M"
    fails_with_one_line(train(component, partly_bad_folder, out, "--steps", "1"), capsys,
                        "10 of 64", "000001.png", "--set data.max_bad_fraction=")
    assert not (out / "tokenizer").exists() and not (out / "dvae").exists()


def test_the_bad_data_limit_is_one_setting(partly_bad_folder, tmp_path, capsys):
    out = tmp_path / "M"
    assert main([str(a) for a in train("all", partly_bad_folder, out, "--steps", "1",
                                       "--set", "data.max_bad_fraction=0.2")]) == 0
    assert json.loads((out / "dalle.json").read_text())["data"]["max_bad_fraction"] == 0.2
    capsys.readouterr()
    fails_with_one_line(train("dvae", partly_bad_folder, tmp_path / "M2", "--set", "data.max_bad_fraction=2"), capsys,
                        "data.max_bad_fraction")
