#!/usr/bin/env python3
"""Build "registry art": a captioned folder set of pictures drawn by people, from package registries.

Every picture comes from a package fetched by name with its registry's ordinary client
(``apt-get download`` for Debian, ``npm pack`` for npm) into a temporary folder; nothing
else is downloaded.  The output is the folder layout ``dalle train --data DIR`` reads: an
RGB PNG and a same-named ``.txt`` (one caption a line) for every picture.

Sources (``--sources``, all by default):

==================  ==========================================  ======  ==========================================
name                package                                      images  caption built from
==================  ==========================================  ======  ==========================================
tuxpaint            Debian ``tuxpaint-stamps-default``           ~800    the stamp's English description sentence
flags               npm ``flag-icons``                           ~270    the country's name (``country.json``)
flat-color          npm ``@iconify-json/flat-color-icons``       ~330    the icon's name
fluent-color        npm ``@iconify-json/fluent-color``           ~300    the icon's name (largest size of each)
freehand-color      npm ``@iconify-json/streamline-freehand-color``  ~1000  the icon's name
ultimate-color      npm ``@iconify-json/streamline-ultimate-color``  ~1000  the icon's name
game-icons          npm ``@iconify-json/game-icons``             ~4100   the icon's name (black silhouettes)
==================  ==========================================  ======  ==========================================

Each ``.txt`` holds two captions: a sentence naming the style and the subject ("a flat
colour icon of a shopping cart"), and the subject alone ("shopping cart").  Captions are
lower-case.  Transparency is composited on white; each picture is centred in a square
(padded with white, aspect kept) and resized to ``--size`` pixels (64 by default).

Files are named ``NNNNN_<source>_<name>.png`` in an order shuffled with ``--seed``, so the
held-out tail that training takes (the last items in name order) mixes every source.

SVGs are rasterised with CairoSVG (``pip install cairosvg``; it needs the system cairo
library, Debian's ``libcairo2``).

Usage::

    python scripts/make_registry_art.py --out /work/realdata            # 64 px, every source
    python scripts/make_registry_art.py --out data/art128 --size 128 --sources tuxpaint,flags
    python scripts/make_registry_art.py --out data/art --downloads DIR  # reuse fetched archives
"""

from __future__ import annotations

import argparse
import glob
import io
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Callable, Iterator

from PIL import Image

# source name -> (registry, package, caption prefix)
SOURCES: dict[str, tuple[str, str, str]] = {
    "tuxpaint": ("debian", "tuxpaint-stamps-default", ""),
    "flags": ("npm", "flag-icons", "the flag of "),
    "flat-color": ("npm", "@iconify-json/flat-color-icons", "a flat colour icon of "),
    "fluent-color": ("npm", "@iconify-json/fluent-color", "a glossy colour icon of "),
    "freehand-color": ("npm", "@iconify-json/streamline-freehand-color", "a hand-drawn blue icon of "),
    "ultimate-color": ("npm", "@iconify-json/streamline-ultimate-color", "a pastel colour icon of "),
    "game-icons": ("npm", "@iconify-json/game-icons", "a black silhouette of "),
}

# (name, caption lines, render(size) -> RGB image)
Item = tuple[str, list[str], Callable[[int], Image.Image]]


class FetchError(RuntimeError):
    pass


# --- Fetching by package name -----------------------------------------------------------

def fetch(registry: str, package: str, dest: Path) -> Path:
    """Download ``package`` into ``dest`` with the registry's own client; returns the archive."""
    dest.mkdir(parents=True, exist_ok=True)
    existing = _archive_in(registry, package, dest)
    if existing:
        return existing
    cmd = ["apt-get", "download", package] if registry == "debian" else ["npm", "pack", "--silent", package]
    print(f"fetching {package} ({' '.join(cmd[:2])})", file=sys.stderr)
    try:
        subprocess.run(cmd, cwd=dest, check=True, stdout=subprocess.DEVNULL)
    except (OSError, subprocess.CalledProcessError) as e:
        raise FetchError(f"could not fetch {package} with {cmd[0]}: {e}") from None
    found = _archive_in(registry, package, dest)
    if not found:
        raise FetchError(f"{cmd[0]} ran but left no archive of {package} in {dest}")
    return found


def _archive_in(registry: str, package: str, folder: Path) -> Path | None:
    if registry == "debian":
        pattern = f"{package}_*.deb"
    else:  # npm pack names @scope/name-1.2.3 as scope-name-1.2.3.tgz
        pattern = package.lstrip("@").replace("/", "-") + "-[0-9]*.tgz"
    found = sorted(folder.glob(pattern))
    return found[-1] if found else None


def unpack(archive: Path, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    if archive.suffix == ".deb":
        subprocess.run(["dpkg-deb", "-x", str(archive), str(dest)], check=True)
    else:
        with tarfile.open(archive) as tar:
            tar.extractall(dest, filter="data")
    return dest


# --- Pictures ---------------------------------------------------------------------------

def square_on_white(im: Image.Image, size: int) -> Image.Image:
    """Composite transparency on white, pad to a centred square, resize to ``size``."""
    im = im.convert("RGBA")
    side = max(im.size)
    canvas = Image.new("RGBA", (side, side), (255, 255, 255, 255))
    canvas.alpha_composite(im, ((side - im.width) // 2, (side - im.height) // 2))
    return canvas.convert("RGB").resize((size, size), Image.LANCZOS)


def render_svg(svg: bytes, size: int) -> Image.Image:
    import cairosvg  # imported here so --help works without it

    # Render at 4x then downsample: cleaner anti-aliasing of thin strokes than cairo at 64 px.
    png = cairosvg.svg2png(bytestring=svg, output_width=size * 4, output_height=size * 4)
    return square_on_white(Image.open(io.BytesIO(png)), size)


def words(name: str) -> str:
    """``"accounting-calculator-1"`` -> ``"accounting calculator"``."""
    name = re.sub(r"[-_]+", " ", name)
    name = re.sub(r"(\s\d+)+$", "", name)  # numbered variants
    return re.sub(r"\s+", " ", name).strip().lower()


def clean_sentence(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().lower()


def tuxpaint_items(root: Path) -> Iterator[Item]:
    """Each stamp: its English description (the first line of its .txt) over its PNG or SVG."""
    stamps = root / "usr/share/tuxpaint/stamps"
    for txt in sorted(stamps.rglob("*.txt")):
        stem = txt.with_suffix("")
        picture = next((p for p in (stem.with_suffix(".png"), stem.with_suffix(".svg")) if p.exists()), None)
        if picture is None:
            continue
        first = txt.read_text(encoding="utf-8", errors="replace").splitlines()
        sentence = clean_sentence(first[0]) if first else ""
        if not sentence or "=" in sentence.split(" ")[0]:
            continue
        sentence = sentence.rstrip(".")
        name = stem.relative_to(stamps).as_posix().replace("/", "-")
        if picture.suffix == ".svg":
            render = lambda size, p=picture: render_svg(p.read_bytes(), size)
        else:
            render = lambda size, p=picture: square_on_white(Image.open(p), size)
        yield name, [sentence, words(stem.name)], render


def flag_items(root: Path, prefix: str) -> Iterator[Item]:
    pkg = root / "package"
    for country in json.loads((pkg / "country.json").read_text(encoding="utf-8")):
        svg = pkg / country["flag_1x1"]
        if not svg.exists():
            continue
        name = clean_sentence(country["name"])
        yield country["code"], [prefix + name, name], lambda size, p=svg: render_svg(p.read_bytes(), size)


def iconify_items(root: Path, prefix: str, largest_only: bool = False) -> Iterator[Item]:
    """Icons of an Iconify JSON set (``icons.json``: an SVG body per icon, sizes per set or icon)."""
    data = json.loads((root / "package/icons.json").read_text(encoding="utf-8"))
    width, height = data.get("width", 16), data.get("height", 16)
    icons = data["icons"]
    names = sorted(icons)
    if largest_only:  # fluent-color: add-circle-16, -20, -24 ... keep the largest of each
        best: dict[str, tuple[int, str]] = {}
        for n in names:
            m = re.fullmatch(r"(.*)-(\d+)", n)
            base, px = (m.group(1), int(m.group(2))) if m else (n, 0)
            if base not in best or px > best[base][0]:
                best[base] = (px, n)
        names = sorted(n for _, n in best.values())
    for n in names:
        icon = icons[n]
        if icon.get("hidden"):
            continue
        w, h = icon.get("width", width), icon.get("height", height)
        left, top = icon.get("left", 0), icon.get("top", 0)
        svg = (f'<svg xmlns="http://www.w3.org/2000/svg" xmlns:xlink="http://www.w3.org/1999/xlink" '
               f'viewBox="{left} {top} {w} {h}" color="#000">{icon["body"]}</svg>').encode()
        subject = words(re.sub(r"-\d+$", "", n) if largest_only else n)
        if not subject:
            continue
        article = "an " if subject[0] in "aeiou" else "a "
        yield n, [prefix + article + subject if prefix.endswith("of ") else prefix + subject, subject], \
            lambda size, s=svg: render_svg(s, size)


def items_of(source: str, root: Path) -> Iterator[Item]:
    prefix = SOURCES[source][2]
    if source == "tuxpaint":
        return tuxpaint_items(root)
    if source == "flags":
        return flag_items(root, prefix)
    return iconify_items(root, prefix, largest_only=source == "fluent-color")


# --- Main -------------------------------------------------------------------------------

def build(out: Path, sources: list[str], size: int, seed: int, downloads: Path | None) -> int:
    tmp = Path(tempfile.mkdtemp(prefix="registry-art-"))
    try:
        archives_dir = downloads or tmp / "archives"
        items: list[tuple[str, Item]] = []
        for source in sources:
            registry, package, _ = SOURCES[source]
            root = unpack(fetch(registry, package, archives_dir), tmp / "unpacked" / source)
            found = list(items_of(source, root))
            print(f"{source}: {len(found)} pictures from {package}", file=sys.stderr)
            items.extend((source, it) for it in found)
        random.Random(seed).shuffle(items)
        out.mkdir(parents=True, exist_ok=True)
        for old in glob.glob(str(out / "*_*.png")) + glob.glob(str(out / "*_*.txt")):
            os.remove(old)
        written = 0
        for source, (name, captions, render) in items:
            try:
                image = render(size)
            except Exception as e:  # a malformed SVG or PNG: skip it, say so
                print(f"skipped {source}/{name}: {type(e).__name__}: {e}", file=sys.stderr)
                continue
            stem = f"{written:05d}_{source}_{re.sub(r'[^a-z0-9]+', '-', name.lower()).strip('-')[:60]}"
            image.save(out / f"{stem}.png", optimize=True)
            (out / f"{stem}.txt").write_text("\n".join(captions) + "\n", encoding="utf-8")
            written += 1
        return written
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="folder to write (PNG + .txt pairs)")
    p.add_argument("--size", type=int, default=64, help="square image side in pixels (default 64)")
    p.add_argument("--sources", default=",".join(SOURCES),
                   help=f"comma-separated subset of: {', '.join(SOURCES)} (default: all)")
    p.add_argument("--seed", type=int, default=0, help="shuffle seed of the file order (default 0)")
    p.add_argument("--downloads", type=Path, default=None,
                   help="keep (and reuse) the fetched .deb/.tgz archives here instead of a temporary folder")
    args = p.parse_args(argv)
    sources = [s.strip() for s in args.sources.split(",") if s.strip()]
    unknown = [s for s in sources if s not in SOURCES]
    if unknown or not sources:
        p.error(f"unknown source(s) {', '.join(unknown) or '(none given)'}; pick from {', '.join(SOURCES)}")
    if args.size < 8:
        p.error(f"--size must be at least 8, got {args.size}")
    try:
        n = build(args.out, sources, args.size, args.seed, args.downloads)
    except FetchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {n} pictures ({args.size}x{args.size} RGB PNG + .txt captions) to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
