"""What a user's images look like before training: sizes and modes that will be converted.

Real collections mix sizes (icons at 48 and 512 px, photos in landscape) and modes (RGBA
with transparency, palette, grayscale).  Training accepts them all: every image is decoded
to RGB (:func:`dalle.data.images.load_image`: transparency composited over black, the
background the models are trained on) and cut to a square and resized to the model's size
(a random crop for the dVAE, the centre for CLIP and the token cache).  A user should know
that this happens, so ``dalle train`` prints a note made here from the image headers alone
(no pixel is decoded): what differs from the model's size and RGB, how many, and what is
done about it.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any, Sequence

from PIL import Image

SURVEY_LIMIT = 5000  # headers read at most (spread over the set); a header is ~0.1 ms


def survey_images(files: Sequence[Path], image_size: int, limit: int = SURVEY_LIMIT) -> dict[str, Any]:
    """Sizes and modes of (up to ``limit`` of) ``files``, read from their headers.

    Returns ``{"checked", "other_size", "not_square", "smaller", "sizes", "modes", "other_mode"}``:
    counts among the checked files, ``sizes`` and ``modes`` as Counters.
    """
    step = max(1, len(files) // limit) if limit else 1
    chosen = list(files)[::step][:limit] if limit else list(files)
    sizes: Counter = Counter()
    modes: Counter = Counter()
    for path in chosen:
        try:
            with Image.open(path) as im:
                sizes[im.size] += 1
                transparent = im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info
                modes[f"{im.mode}{' with transparency' if transparent and im.mode not in ('RGBA', 'LA', 'PA') else ''}"] += 1
        except Exception:  # noqa: BLE001 - unreadable files are the readers' to report, item by item
            continue
    checked = sum(sizes.values())
    return {
        "checked": checked,
        "other_size": sum(n for s, n in sizes.items() if s != (image_size, image_size)),
        "not_square": sum(n for (w, h), n in sizes.items() if w != h),
        "smaller": sum(n for (w, h), n in sizes.items() if min(w, h) < image_size),
        "sizes": sizes,
        "modes": modes,
        "other_mode": sum(n for m, n in modes.items() if m != "RGB"),
    }


def survey_note(survey: dict[str, Any], image_size: int, total: int) -> str | None:
    """One line for the user, or None when every checked image is already RGB at the model's size."""
    checked = survey["checked"]
    if not checked or (not survey["other_size"] and not survey["other_mode"]):
        return None
    of = f"of {checked} images checked" + (f" (of {total})" if checked < total else "")
    parts = []
    if survey["other_size"]:
        sizes = survey["sizes"]
        common = ", ".join(f"{w}x{h}" for (w, h), _ in sizes.most_common(3)) + (", ..." if len(sizes) > 3 else "")
        details = [common]
        if survey["not_square"]:
            details.append(f"{survey['not_square']} not square: their edges are cropped")
        if survey["smaller"]:
            details.append(f"{survey['smaller']} smaller: enlarged, so softer")
        parts.append(f"{survey['other_size']} are not {image_size}x{image_size} ({'; '.join(details)}): "
                     f"each is cut to a square and resized to {image_size}x{image_size}")
    if survey["other_mode"]:
        modes = ", ".join(f"{m} {n}" for m, n in survey["modes"].most_common() if m != "RGB")
        parts.append(f"{survey['other_mode']} are not RGB ({modes}): converted to RGB, transparent areas over black")
    return f"note: {of}, " + "; ".join(parts)
