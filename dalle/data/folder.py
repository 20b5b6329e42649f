"""Folder data sets: image files with a same-named ``.txt`` of captions beside each.

The layout ``dalle data shapes`` writes.
"""

from __future__ import annotations

import os
from pathlib import Path

from dalle.data.images import (
    DEFAULT_MAX_BAD_FRACTION,
    DEFAULT_MAX_PIXELS,
    IMAGE_EXTENSIONS,
    BadImageError,
    DataError,
    MapDataset,
    PathLike,
    Sample,
    load_image,
    read_captions_file,
)


class FolderDataset(MapDataset):
    """Images with a same-named ``.txt`` caption file beside each, found recursively.

    ``root/a.png`` + ``root/a.txt``, ``root/sub/b.jpg`` + ``root/sub/b.txt``, ...
    Sub-folders are searched (users' data is often sharded into folders); hidden
    files and folders (names starting with ``.``) are ignored.  Items are in
    sorted path order; ``key`` is the path relative to ``root`` without the
    extension.  An image without its ``.txt`` is counted as skipped when the
    data set is opened (and the threshold checked over all images found).
    Caption files are read when their item is, so opening a large folder is fast.
    """

    def __init__(
        self,
        root: PathLike,
        *,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        max_bad_fraction: float | None = DEFAULT_MAX_BAD_FRACTION,
        max_bad: int | None = None,
    ):
        super().__init__(max_pixels, max_bad_fraction, max_bad)
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"{self.root} is not a directory; FolderDataset needs a folder of images with .txt captions")
        images = _find_images(self.root)
        self._items: list[tuple[str, str]] = []  # (image path, caption path), relative to root
        for rel in images:
            txt = os.path.splitext(rel)[0] + ".txt"
            if (self.root / txt).is_file():
                self._items.append((rel, txt))
            else:
                self.skipped.skip(rel, f"no captions file {txt}", check=False)
        if not self._items:
            what = f"{len(images)} image(s) but none has a same-named .txt" if images else "no image files"
            raise DataError(
                f"{self.root}: found {what}; a folder data set needs image files "
                f"({', '.join(IMAGE_EXTENSIONS)}) each with a .txt of the same name holding one caption a line"
            )
        if self.skipped.skipped:
            self.skipped.ok(len(self._items))
            self.skipped.check(final=True)

    def __len__(self) -> int:
        return len(self._items)

    def image_files(self) -> list[Path]:
        """The image file of every item, in item order (read by :func:`dalle.data.survey.survey_images`)."""
        return [self.root / rel for rel, _ in self._items]

    def key(self, index: int) -> str:
        return os.path.splitext(self._items[index][0])[0]

    def load(self, index: int) -> Sample:
        rel_image, rel_txt = self._items[self._check_index(index)]
        try:
            captions = read_captions_file(self.root / rel_txt)
            image = load_image(self.root / rel_image, self.max_pixels)
        except BadImageError as e:
            raise BadImageError(e.reason, key=rel_image) from None
        return Sample(image=image, captions=captions, key=os.path.splitext(rel_image)[0])


def _find_images(root: Path) -> list[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel_dir = os.path.relpath(dirpath, root)
        for name in filenames:
            if not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS):
                found.append(name if rel_dir == "." else Path(rel_dir, name).as_posix())
    return sorted(found)



def has_image(root: Path) -> bool:
    """True when the folder (or a sub-folder) holds an image file, captioned or not."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        if any(not n.startswith(".") and n.lower().endswith(IMAGE_EXTENSIONS) for n in filenames):
            return True
    return False


def has_captioned_image(root: Path) -> bool:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        names = set(filenames)
        for name in filenames:
            if name.lower().endswith(IMAGE_EXTENSIONS) and os.path.splitext(name)[0] + ".txt" in names:
                return True
    return False


__all__ = ["FolderDataset", "has_captioned_image", "has_image"]
