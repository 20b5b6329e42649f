"""The command line end to end on the ``tiny`` preset: train, generate, complete, eval, info."""

import json

import pytest
from PIL import Image

from dalle.cli import main


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    out = tmp_path_factory.mktemp("model")
    assert main(["train", "all", "--data", "shapes", "--out", str(out), "--preset", "tiny", "--steps", "3",
                 "--device", "cpu"]) == 0
    return out


def test_train_all_writes_a_loadable_model_folder(tiny_model):
    for part in ("tokenizer", "dvae", "transformer", "clip"):
        assert (tiny_model / part / "config.json").is_file()
    assert (tiny_model / "dalle.json").is_file()


def test_train_all_holds_out_the_same_images_in_every_stage_and_reports_fit(tiny_model):
    # ``--data shapes`` streams the tiny preset's 256 training items: every stage holds out the last 16.
    for stage, figure in (("dvae", "val_psnr"), ("transformer", "val_bits_per_image_token"), ("clip", "val_r_at_1")):
        fit = json.loads((tiny_model / "logs" / f"{stage}_fit.json").read_text())
        assert (fit["train_items"], fit["val_items"]) == (240, 16), stage
        assert fit[figure] is not None and isinstance(fit["diagnoses"], list), stage
        header = (tiny_model / "logs" / f"{stage}.csv").read_text().splitlines()[0].split(",")
        assert header[0] == "step" and "mean_loss" in header and figure.replace("val_", "train_") in header


def test_generate_writes_ranked_images_and_manifest(tiny_model, tmp_path):
    out = tmp_path / "gen"
    assert main(["generate", "a red circle", "a blue square above a green triangle", "--model", str(tiny_model),
                 "--candidates", "4", "--keep", "2", "--out", str(out), "--device", "cpu"]) == 0
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert len(rows) == 4
    for prompt in ("a red circle", "a blue square above a green triangle"):
        mine = [r for r in rows if r["prompt"] == prompt]
        assert [r["rank"] for r in mine] == [0, 1]
        assert mine[0]["clip_score"] >= mine[1]["clip_score"]
        assert all(r["seed"] == 0 for r in mine)
        for r in mine:
            assert Image.open(out / r["file"]).size == (64, 64)


def test_generate_is_reproducible_with_a_seed(tiny_model, tmp_path):
    def run(name):
        out = tmp_path / name
        main(["generate", "a red circle", "--model", str(tiny_model), "--candidates", "3", "--keep", "3",
              "--seed", "7", "--out", str(out), "--device", "cpu"])
        return [Image.open(out / json.loads(l)["file"]).tobytes() for l in (out / "manifest.jsonl").read_text().splitlines()]

    assert run("a") == run("b")


def test_complete_keeps_rows(tiny_model, tmp_path):
    from dalle.data.shapes import ShapesDataset

    image_path = tmp_path / "in.png"
    ShapesDataset("val", size=1)[0].image.save(image_path)
    out = tmp_path / "done"
    assert main(["complete", str(image_path), "a red circle", "--keep-rows", "3", "--model", str(tiny_model),
                 "--candidates", "2", "--keep", "1", "--out", str(out), "--device", "cpu"]) == 0
    assert len((out / "manifest.jsonl").read_text().splitlines()) == 1


def test_eval_writes_the_interface_keys(tiny_model, tmp_path):
    out = tmp_path / "eval.json"
    assert main(["eval", "--model", str(tiny_model), "--out", str(out), "--prompts-per-category", "1",
                 "--candidates", "2", "--held-out", "100", "--device", "cpu"]) == 0
    report = json.loads(out.read_text())
    assert set(report["dvae"]) >= {"psnr", "codebook_usage", "recon_pass_rate"}
    assert "bits_per_image_token" in report["transformer"] and "r_at_1" in report["clip"]
    categories = {"single", "single_size", "single_region", "pair", "pair_relation", "zero_shot"}
    for key in ("reranked_top1", "random_pick", "real_images"):
        assert set(report["shapes"][key]) >= categories
        assert all(0.0 <= report["shapes"][key][c] <= 1.0 for c in categories)
    assert report["shapes"]["real_images"]["single"] == 1.0


def test_info_paper_counts_twelve_billion(capsys):
    assert main(["info", "--preset", "paper"]) == 0
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("transformer_parameters "))
    assert abs(int(line.split()[1]) - 12e9) / 12e9 < 0.01


@pytest.mark.parametrize(
    "argv, message",
    [
        (["generate", "", "--model", "MODEL"], "prompt is empty"),
        (["generate", "x", "--keep", "5", "--candidates", "2", "--model", "MODEL"], "--keep 5 is more than --candidates 2"),
        (["generate", "x", "--model", "/nonexistent/model"], "does not exist"),
        (["generate", "x", "--temperature", "0"], "--temperature must be in"),
        (["complete", "/nonexistent.png", "a red circle", "--keep-rows", "2"], "does not exist"),
        (["complete", "NOTIMAGE", "a red circle", "--keep-rows", "2", "--model", "MODEL"], "image"),
        (["complete", "IMAGE", "a red circle", "--keep-rows", "99", "--model", "MODEL"], "keep_rows must be in"),
        (["info", "--preset", "huge"], "unknown preset"),
        (["train", "dvae", "--data", "/nonexistent/data", "--out", "OUT"], "does not exist"),
    ],
)
def test_bad_input_gives_one_line_and_nonzero_status(argv, message, tiny_model, tmp_path, capsys):
    not_image = tmp_path / "x.png"
    not_image.write_text("not an image")
    image = tmp_path / "ok.png"
    Image.new("RGB", (64, 64)).save(image)
    subs = {"MODEL": str(tiny_model), "NOTIMAGE": str(not_image), "IMAGE": str(image), "OUT": str(tmp_path / "o")}
    code = main([subs.get(a, a) for a in argv] + ["--device", "cpu"] * (argv[0] in ("generate", "complete")))
    err = capsys.readouterr().err
    assert code != 0
    assert len(err.strip().splitlines()) == 1 and message in err and "Traceback" not in err


# --- --set and presets -------------------------------------------------------------------


def test_train_set_is_stored_and_a_resume_refuses_an_architecture_change(tmp_path, capsys):
    out = tmp_path / "m"
    common = ["--data", "shapes", "--out", str(out), "--preset", "tiny", "--device", "cpu"]
    assert main(["train", "tokenizer", *common, "--set", "tokenizer.vocab_size=300",
                 "--set", "train.dvae_lr=5e-4"]) == 0
    saved = json.loads((out / "dalle.json").read_text())
    assert saved["tokenizer"]["vocab_size"] == 300 and saved["train"]["dvae_lr"] == 5e-4
    assert saved["transformer"]["text_vocab"] == 300 + saved["tokenizer"]["text_len"]  # the copies followed
    capsys.readouterr()
    # The trained tokenizer has 300 ids: a resume cannot change that ...
    assert main(["train", "tokenizer", *common, "--resume", "--set", "tokenizer.vocab_size=400"]) != 0
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "tokenizer.vocab_size from 300 to 400" in err
    # ... nor can a run of another stage that keeps the tokenizer; retraining it afresh can.
    assert main(["train", "dvae", *common, "--steps", "1", "--set", "tokenizer.vocab_size=400"]) != 0
    assert "does not retrain the tokenizer" in capsys.readouterr().err
    assert json.loads((out / "dalle.json").read_text())["tokenizer"]["vocab_size"] == 300
    # Training-only fields go through on a resume and are stored.
    assert main(["train", "tokenizer", *common, "--resume", "--set", "train.transformer_steps=7",
                 "--set", "tokenizer.bpe_dropout=0"]) == 0
    saved = json.loads((out / "dalle.json").read_text())
    assert saved["train"]["transformer_steps"] == 7 and saved["tokenizer"]["bpe_dropout"] == 0.0
    # Retraining afresh can, once the old run is moved aside (a new run never mixes with an old one).
    assert main(["train", "tokenizer", *common, "--set", "tokenizer.vocab_size=400"]) != 0
    assert "--overwrite" in capsys.readouterr().err
    assert main(["train", "tokenizer", *common, "--overwrite", "--set", "tokenizer.vocab_size=400"]) == 0


def test_train_set_unknown_field_is_a_one_line_usage_error(tmp_path, capsys):
    code = main(["train", "tokenizer", "--data", "shapes", "--out", str(tmp_path / "m"), "--preset", "tiny",
                 "--set", "dvae.codebook=1024"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "dvae has no field 'codebook'; its fields: image_size" in err and "codebook_size" in err
    assert not (tmp_path / "m" / "dalle.json").exists()


def test_info_presets_lists_one_preset_a_line(capsys):
    from dalle.config import PRESETS

    assert main(["info", "--presets"]) == 0
    lines = [l for l in capsys.readouterr().out.splitlines() if not l.startswith("#")]
    assert [l.split()[0] for l in lines] == list(PRESETS)
    small = next(l for l in lines if l.startswith("small-64 "))
    assert "image 64px" in small and "tokens 16x16" in small and "1024 codes" in small
    assert "params dvae" in small and "transformer" in small and "clip" in small and "cpu_s_per_step" in small


def test_train_help_names_the_presets(capsys):
    assert main(["train", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    for name in ("small-64", "base-128", "base-256"):
        assert name in text


def test_train_set_refuses_to_move_the_held_out_split_under_a_trained_stage(tmp_path, capsys):
    out = tmp_path / "m"
    common = ["--data", "shapes", "--out", str(out), "--preset", "tiny", "--device", "cpu"]
    assert main(["train", "dvae", *common, "--steps", "1"]) == 0
    capsys.readouterr()
    for argv in (["dvae", "--resume"], ["tokenizer"]):
        assert main(["train", *argv, *common, "--set", "train.val_fraction=0.1"]) != 0
        err = capsys.readouterr().err
        assert "moves the held-out split" in err and "dvae" in err and len(err.strip().splitlines()) == 1
    assert main(["train", "dvae", *common, "--steps", "1", "--overwrite", "--set", "train.val_fraction=0.1"]) == 0



def test_eval_on_a_users_folder_reports_the_interface_keys(tiny_model, tmp_path, capsys):
    from dalle.data.shapes import write_shapes

    data = write_shapes(tmp_path / "data", 40, split="train", seed=5, progress=False, workers=1)
    out = tmp_path / "eval.json"
    assert main(["eval", "--model", str(tiny_model), "--data", str(data), "--captions", "3", "--candidates", "2",
                 "--out", str(out), "--device", "cpu"]) == 0
    report = json.loads(out.read_text())
    # shared/INTERFACE.md's keys, and the held-out split of the model's own rule (40 items -> the last 8).
    for section, key in (("dvae", "psnr"), ("transformer", "bits_per_image_token"), ("clip", "r_at_1"),
                         ("generated", "r_precision"), ("generated", "real_r_precision")):
        assert isinstance(report[section][key], float), (section, key)
    assert report["data"]["held_out_items"] == 8 and report["data"]["train_items"] == 32
    assert 0 < report["dvae"]["ssim"] <= 1 and 0 < report["dvae"]["codebook_usage"] <= 1
    assert report["transformer"]["train_bits_per_image_token"] > 0 and report["clip"]["pool"] == 8
    g = report["generated"]
    assert g["self_judged"] is True and g["captions"] == 3 and 0 <= g["r_precision"] <= 1
    assert g["copying"]["train_images_compared"] == 32 and g["copying"]["real_nearest_train_rms"]["mean"] > 0
    assert 0 <= g["copying"]["generated_copies"] <= 1 and g["copying"]["real_copy_ratio"]["median"] > 0
    assert "R-precision" in capsys.readouterr().out


def test_eval_data_errors_are_one_line(tiny_model, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["eval", "--model", str(tiny_model), "--data", str(empty), "--device", "cpu"]) != 0
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
