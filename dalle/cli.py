"""The ``dalle`` command line: a thin layer over the Python API (shared/INTERFACE.md).

Every subcommand imports what it needs lazily, so ``dalle --help`` is instant.  Bad
input ends with one line on stderr and a non-zero status, never a traceback
(set ``DALLE_DEBUG=1`` to see one).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import warnings
from pathlib import Path
from typing import Callable, Sequence

from dalle.errors import UsageError, user_errors

EXIT_USAGE = 2
EXIT_INTERNAL = 1


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (the interface promises one line on stderr)."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# --- argument types ----------------------------------------------------------------


def _bounded(kind: type, low: float | None = None, high: float | None = None, name: str = "value") -> Callable[[str], object]:
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a valid {kind.__name__}") from None
        if isinstance(value, float) and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{name} must be a finite number, got {text}")
        if (low is not None and value < low) or (high is not None and value > high):
            span = f"[{low if low is not None else '-inf'}, {high if high is not None else 'inf'}]"
            raise argparse.ArgumentTypeError(f"{name} must be in {span}, got {text}")
        return value

    return parse


SEED_MAX = 2**63 - 1  # torch's generators take 64-bit seeds; the page uses the same range


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seed takes a whole number, got {text!r}") from None
    if not 0 <= value <= SEED_MAX:
        raise argparse.ArgumentTypeError(f"--seed must be between 0 and {SEED_MAX} (2**63 - 1), got {text}")
    return value


def _device(text: str) -> str:
    """A torch device name that exists on this machine (checked here, not after the model is loaded)."""
    import torch

    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"--device {text!r} is not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"--device {text}: no CUDA GPU is available on this machine; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"--device {text}: this machine has {torch.cuda.device_count()} GPU(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError(f"--device {text}: MPS is not available on this machine; use --device cpu")
    if device.type not in ("cpu", "cuda", "mps"):
        raise argparse.ArgumentTypeError(f"--device {text}: use cpu, cuda or cuda:N")
    return text


def _region(text: str) -> tuple[int, int]:
    try:
        row, col = (int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--region takes ROW,COL (two integers), got {text!r}") from None
    if row < 0 or col < 0:
        raise argparse.ArgumentTypeError(f"--region ROW,COL must be non-negative, got {text!r}")
    return row, col


def _add_sampling_options(p: argparse.ArgumentParser, with_sampling: bool = True) -> None:
    p.add_argument("--model", type=Path, default=None, help="model folder (default: the bundled model)")
    p.add_argument("--candidates", type=_bounded(int, 1, 4096, "--candidates"), default=32,
                   help="images sampled per prompt before reranking (default 32)")
    p.add_argument("--keep", type=_bounded(int, 1, 4096, "--keep"), default=4, help="best images kept per prompt (default 4)")
    p.add_argument("--seed", type=_seed, default=0, help="random seed (default 0)")
    p.add_argument("--out", type=Path, default=Path("out"), help="output folder (default ./out)")
    p.add_argument("--batch-size", type=_bounded(int, 1, 4096, "--batch-size"), default=None,
                   help="candidates sampled at once (default: all)")
    p.add_argument("--device", type=_device, default=None, help="cpu, cuda, ... (default: cuda if available)")
    if with_sampling:
        p.add_argument("--temperature", type=_bounded(float, 1e-3, 10.0, "--temperature"), default=1.0)
        p.add_argument("--top-k", type=_bounded(int, 1, None, "--top-k"), default=None)
        p.add_argument("--top-p", type=_bounded(float, 1e-6, 1.0, "--top-p"), default=None)
        p.add_argument("--guidance", type=_bounded(float, 0.0, 100.0, "--guidance"), default=1.0,
                       help="classifier-free guidance scale S: 1 = none (default), above 1 follows the prompt more "
                            "closely, 0 ignores it; needs a model trained with null captions; samples 2 rows a candidate")


def build_parser() -> argparse.ArgumentParser:
    from dalle.config import PRESETS  # no torch: the help stays instant

    parser = _Parser(prog="dalle", description="DALL-E: text-to-image generation, training and evaluation.")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    g = sub.add_parser("generate", help="generate images from prompts with a trained model")
    g.add_argument("prompt", nargs="*", help="one or more prompts")
    g.add_argument("--prompts", type=Path, default=None, help="a file with one prompt a line")
    _add_sampling_options(g)
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("complete", help="regenerate part of an image, consistent with a caption")
    c.add_argument("image", type=Path)
    c.add_argument("prompt")
    which = c.add_mutually_exclusive_group(required=True)
    which.add_argument("--keep-rows", type=_bounded(int, 0, None, "--keep-rows"), help="keep the top R token rows")
    which.add_argument("--region", type=_region, help="regenerate from token (ROW,COL) to the bottom-right corner")
    _add_sampling_options(c)
    c.set_defaults(func=cmd_complete)

    d = sub.add_parser("data", help="make data sets")
    dsub = d.add_subparsers(dest="data_command", metavar="DATASET", required=True, parser_class=_Parser)
    s = dsub.add_parser("shapes", help="write the shapes set (shared/SHAPES.md) as PNG + TXT pairs")
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--count", type=_bounded(int, 1, None, "--count"), required=True)
    s.add_argument("--split", choices=["train", "val", "test"], default="train")
    s.add_argument("--seed", type=_seed, default=0)
    s.add_argument("--workers", type=_bounded(int, 1, 64, "--workers"), default=None)
    s.set_defaults(func=cmd_data_shapes)

    t = sub.add_parser("train", help="train a component, or all of them in order")
    t.add_argument("component", choices=["tokenizer", "dvae", "transformer", "clip", "all"])
    t.add_argument("--data", required=True, help="data folder (image+txt pairs, COCO, WebDataset shards) or 'shapes'")
    t.add_argument("--out", type=Path, required=True, help="model folder to write (and resume from)")
    t.add_argument("--preset", default=None,
                   help=f"config preset of a new model folder: {', '.join(PRESETS)} (default: shapes for "
                        "--data shapes, small-64 for your own images; dalle info --presets describes them)")
    budget = t.add_mutually_exclusive_group()
    budget.add_argument("--steps", type=_bounded(int, 1, None, "--steps"), default=None)
    budget.add_argument("--minutes", type=_bounded(float, 0.01, None, "--minutes"), default=None)
    t.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    t.add_argument("--overwrite", action="store_true",
                   help="start afresh in an --out that holds another run (moved to OUT/replaced/)")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one field of the config (repeatable), e.g. --set dvae.codebook_size=1024; "
                        "stored in OUT/dalle.json. With --resume only fields that do not change a trained "
                        "component (train.*, dropout, loss weights, ...) are accepted")
    t.add_argument("--device", type=_device, default=None)
    t.add_argument("--seed", type=_seed, default=None)
    t.add_argument("--strategy", choices=["ddp", "fsdp"], default="ddp",
                   help="under torchrun: replicate (ddp) or fully shard (fsdp) the transformer (default ddp)")
    t.add_argument("--compile", action="store_true", help="torch.compile the transformer's blocks (GPU)")
    t.add_argument("--dvae", type=Path, default=None,
                   help="a dVAE folder to use as it is, not trained (e.g. from dalle convert openai-dvae)")
    t.add_argument("--clip", type=Path, default=None,
                   help="a CLIP folder to rerank with, not trained (e.g. from dalle convert openai-clip)")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="evaluate a model folder and write JSON")
    e.add_argument("--model", type=Path, default=None)
    e.add_argument("--data", default=None,
                   help="evaluate on the held-out split of your data (folder, COCO captions file or local shards) "
                        "instead of the shapes set")
    e.add_argument("--out", type=Path, default=None, help="JSON file to write")
    e.add_argument("--prompts-per-category", type=_bounded(int, 1, None, "--prompts-per-category"), default=20)
    e.add_argument("--candidates", type=_bounded(int, 1, 4096, "--candidates"), default=None,
                   help="images sampled per caption before reranking (default 32; 8 with --data)")
    e.add_argument("--captions", type=_bounded(int, 1, None, "--captions"), default=32,
                   help="with --data: held-out captions to generate images for (default 32)")
    e.add_argument("--train-images", type=_bounded(int, 1, None, "--train-images"), default=None,
                   help="with --data: training images the copying check compares with (default all)")
    e.add_argument("--held-out", type=_bounded(int, 100, None, "--held-out"), default=512,
                   help="held-out images for the dVAE, transformer and CLIP figures (default 512)")
    e.add_argument("--device", type=_device, default=None)
    e.add_argument("--seed", type=_seed, default=0)
    e.add_argument("--guidance", type=_bounded(float, 0.0, 100.0, "--guidance"), default=1.0,
                   help="classifier-free guidance scale of the generated candidates (1 = none)")
    e.set_defaults(func=cmd_eval)

    v = sub.add_parser("convert", help="convert other projects' released weights into a model folder")
    vsub = v.add_subparsers(dest="convert_command", metavar="FORMAT", required=True, parser_class=_Parser)
    od = vsub.add_parser("openai-dvae", help="OpenAI's released dVAE (encoder.pkl, decoder.pkl) -> a dVAE folder")
    od.add_argument("encoder", type=Path, help="encoder.pkl")
    od.add_argument("decoder", type=Path, help="decoder.pkl")
    od.add_argument("--out", type=Path, required=True, help="dVAE folder to write")
    od.add_argument("--image-size", type=_bounded(int, 8, None, "--image-size"), default=256,
                    help="image size the folder is used at (default 256, the released model's)")
    od.set_defaults(func=cmd_convert)
    oc = vsub.add_parser("openai-clip", help="OpenAI's released CLIP (a TorchScript .pt) -> a CLIP folder (the reranker)")
    oc.add_argument("model", type=Path, help="e.g. ViT-B-32.pt")
    oc.add_argument("--out", type=Path, required=True, help="CLIP folder to write")
    oc.add_argument("--vocab", type=Path, default=None,
                    help="CLIP's bpe_simple_vocab_16e6.txt.gz (default: from an installed open_clip_torch or clip-anytorch)")
    oc.set_defaults(func=cmd_convert)
    vq = vsub.add_parser("vqgan", help="a taming-transformers VQGAN (last.ckpt, model.yaml) -> an image tokenizer folder")
    vq.add_argument("checkpoint", type=Path, help="the Lightning checkpoint, e.g. last.ckpt")
    vq.add_argument("config", type=Path, help="its YAML config, e.g. model.yaml")
    vq.add_argument("--out", type=Path, required=True, help="image tokenizer folder to write (use it as --dvae)")
    vq.add_argument("--image-size", type=_bounded(int, 8, None, "--image-size"), default=None,
                    help="image size the folder is used at (default: the config's resolution)")
    vq.set_defaults(func=cmd_convert)

    i = sub.add_parser("info", help="describe a model folder or a preset")
    which = i.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", type=Path)
    which.add_argument("--preset")
    which.add_argument("--presets", action="store_true", help="list every preset, one a line")
    i.set_defaults(func=cmd_info)

    w = sub.add_parser("serve", help="start the local web page")
    w.add_argument("--model", type=Path, default=None)
    w.add_argument("--host", default="127.0.0.1")
    w.add_argument("--port", type=_bounded(int, 1, 65535, "--port"), default=7860)
    w.add_argument("--device", type=_device, default=None)
    w.set_defaults(func=cmd_serve)
    return parser


# --- commands ----------------------------------------------------------------------


def _read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = [p for p in args.prompt]
    if args.prompts is not None:
        if args.prompts.is_dir():
            raise UsageError(f"--prompts {args.prompts} is a folder; give a text file with one prompt a line")
        if not args.prompts.is_file():
            raise UsageError(f"--prompts file {args.prompts} does not exist")
        try:
            text = args.prompts.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise UsageError(f"--prompts file {args.prompts} is not UTF-8 text (byte {e.start}: {e.reason}); "
                             "save it as UTF-8") from None
        from_file = [line.strip() for line in text.splitlines() if line.strip()]
        if not from_file:
            raise UsageError(f"--prompts file {args.prompts} holds no prompt; write one prompt a line")
        prompts += from_file
    if not prompts:
        raise UsageError("give at least one prompt, e.g. dalle generate \"a red circle\"")
    if any(not p.strip() for p in prompts):
        raise UsageError("a prompt is empty; write what the image should show")
    return prompts


def _check_keep(args: argparse.Namespace) -> None:
    if args.keep > args.candidates:
        raise UsageError(f"--keep {args.keep} is more than --candidates {args.candidates}")


def _load_pipeline(args: argparse.Namespace):
    from dalle.pipeline import DallePipeline, check_output_folder

    check_output_folder(args.out)  # before the model loads and samples: a bad --out fails fast

    return DallePipeline.from_pretrained(args.model, device=args.device)


def _sampling_kwargs(args: argparse.Namespace) -> dict:
    return dict(candidates=args.candidates, keep=args.keep, seed=args.seed, temperature=args.temperature,
                top_k=args.top_k, top_p=args.top_p, batch_size=args.batch_size, guidance=args.guidance)


def cmd_generate(args: argparse.Namespace) -> int:
    from dalle.pipeline import write_results

    prompts = _read_prompts(args)
    _check_keep(args)
    pipe = _load_pipeline(args)
    results = [pipe(prompt, progress=True, **_sampling_kwargs(args)) for prompt in prompts]
    manifest = write_results(results, args.out)
    print(f"wrote {sum(len(r.images) for r in results)} images for {len(prompts)} prompt(s) to {args.out} ({manifest.name})")
    return 0


def cmd_complete(args: argparse.Namespace) -> int:
    from dalle.pipeline import load_user_image, write_results

    if not args.prompt.strip():
        raise UsageError("the prompt is empty; write what the image should show")
    _check_keep(args)
    image = load_user_image(args.image)
    pipe = _load_pipeline(args)
    result = pipe.complete(image, args.prompt, keep_rows=args.keep_rows, region=args.region, progress=True,
                           **_sampling_kwargs(args))
    manifest = write_results([result], args.out)
    print(f"wrote {len(result.images)} completions to {args.out} ({manifest.name})")
    return 0


def cmd_data_shapes(args: argparse.Namespace) -> int:
    from dalle.data.shapes import write_shapes

    kwargs = {} if args.workers is None else {"workers": args.workers}
    write_shapes(args.out, args.count, split=args.split, seed=args.seed, **kwargs)
    print(f"wrote {args.count} {args.split} images to {args.out}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from dalle.train import train_component

    for flag in ("dvae", "clip"):
        folder = getattr(args, flag)
        if folder is not None and not folder.is_dir():
            raise UsageError(f"--{flag} {folder} is not a folder (make one with dalle convert)")

    preset = args.preset or ("shapes" if args.data == "shapes" or args.data.startswith("shapes:") else "small-64")
    out = train_component(args.component, data=args.data, out=args.out, preset=preset, steps=args.steps,
                          minutes=args.minutes, resume=args.resume, device=args.device, seed=args.seed,
                          strategy=args.strategy, compile=args.compile, dvae=args.dvae, clip=args.clip,
                          overrides=args.overrides, overwrite=args.overwrite)
    print(f"trained {args.component}: {out}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    if args.data is not None:
        from dalle.evaluation.user_data import evaluate_user_data, format_user_report

        report = evaluate_user_data(args.model, args.data, captions=args.captions,
                                    candidates=args.candidates or 8, device=args.device, seed=args.seed,
                                    train_images=args.train_images, guidance=args.guidance)
        print(format_user_report(report))
    else:
        from dalle.evaluation.suite import evaluate_model, format_report

        report = evaluate_model(args.model, prompts_per_category=args.prompts_per_category,
                                candidates=args.candidates or 32, device=args.device, seed=args.seed, progress=True,
                                held_out_size=args.held_out, guidance=args.guidance)
        print(format_report(report))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    for path in (p for p in vars(args).values() if isinstance(p, Path) and p is not args.out):  # the inputs
        if not path.is_file():
            raise UsageError(f"{path} does not exist")
    if args.convert_command == "openai-dvae":
        from dalle.convert.openai_dvae import convert_openai_dvae

        folder = convert_openai_dvae(args.encoder, args.decoder, args.out, image_size=args.image_size)
    elif args.convert_command == "openai-clip":
        from dalle.convert.openai_clip import convert_openai_clip

        folder = convert_openai_clip(args.model, args.out, vocab=args.vocab)
    elif args.convert_command == "vqgan":
        from dalle.convert.vqgan import convert_vqgan

        folder = convert_vqgan(args.checkpoint, args.config, args.out, image_size=args.image_size)
    else:  # argparse only offers the formats above
        raise UsageError(f"unknown format {args.convert_command}")
    print(f"converted {args.convert_command} -> {folder}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from dalle.info import describe_model, describe_preset, describe_presets

    problems: list[str] = []
    if args.presets:
        lines = describe_presets()
    else:
        lines = describe_preset(args.preset) if args.preset else describe_model(args.model, problems)
    print("\n".join(lines))
    if problems:
        raise UsageError(f"{args.model} would not load: " + "; ".join(problems))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from dalle.serve import serve

    serve(model=args.model, host=args.host, port=args.port, device=args.device)
    return 0


# --- entry point -------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse has printed its one line (or the help)
        return int(e.code or 0)
    if args.version:
        from dalle import __version__

        print(__version__)
        return 0
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    debug = bool(os.environ.get("DALLE_DEBUG"))
    if not debug:  # warnings as one plain line each, not the library line that raised them
        warnings.formatwarning = lambda message, category, *rest, **kw: f"dalle {args.command}: warning: {message}\n"
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the CLI's one place that turns errors into a line
        if debug:
            raise
        if isinstance(e, user_errors()) or isinstance(e, ValueError):
            print(f"dalle {args.command}: error: {e}", file=sys.stderr)
            return EXIT_USAGE
        print(f"dalle {args.command}: internal error: {type(e).__name__}: {e} (set DALLE_DEBUG=1 for the traceback)",
              file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
