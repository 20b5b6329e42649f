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
