"""MS-COCO captions: ``captions_*.json`` plus the folder of images it names."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from dalle.data.images import (
    DEFAULT_MAX_BAD_FRACTION,
    DEFAULT_MAX_PIXELS,
    BadImageError,
    DataError,
    MapDataset,
    PathLike,
    Sample,
    load_image,
)


class CocoDataset(MapDataset):
    """MS-COCO captions: ``captions_*.json`` (``images`` and ``annotations``) and the image folder.

    All captions of an image are grouped into one :class:`Sample` (COCO has about
    five).  Images without any caption are left out (not counted as bad: test
    splits have none); if no image has a caption, opening fails.  Items follow
    the order of the JSON's ``images`` list; ``key`` is the file name without
    extension.  Missing image files are found when loaded (counted as skipped).
    """

    def __init__(
        self,
        captions_json: PathLike,
        image_dir: PathLike,
        *,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        max_bad_fraction: float | None = DEFAULT_MAX_BAD_FRACTION,
        max_bad: int | None = None,
    ):
        super().__init__(max_pixels, max_bad_fraction, max_bad)
        self.captions_json = Path(captions_json)
        self.image_dir = Path(image_dir)
        if not self.image_dir.is_dir():
            raise DataError(f"COCO image folder {self.image_dir} does not exist")
        try:
            data = json.loads(self.captions_json.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise DataError(f"COCO captions file {self.captions_json} does not exist") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{self.captions_json} is not valid JSON: {e}") from None
        if not isinstance(data, dict) or not isinstance(data.get("images"), list) or not isinstance(
            data.get("annotations"), list
        ):
            raise DataError(
                f"{self.captions_json}: expected a COCO captions object with lists 'images' "
                "([{id, file_name}]) and 'annotations' ([{image_id, caption}])"
            )
        files: dict[Any, str] = {}
        order: list[Any] = []
        for n, entry in enumerate(data["images"]):
            try:
                image_id, file_name = entry["id"], entry["file_name"]
            except (TypeError, KeyError):
                raise DataError(f"{self.captions_json}: images[{n}] lacks 'id' or 'file_name'") from None
            if image_id not in files:
                order.append(image_id)
            files[image_id] = str(file_name)
        captions: dict[Any, list[str]] = {}
        self.orphan_captions = 0  # annotations naming an image id absent from 'images'
        for n, ann in enumerate(data["annotations"]):
            try:
                image_id, caption = ann["image_id"], ann["caption"]
            except (TypeError, KeyError):
                raise DataError(f"{self.captions_json}: annotations[{n}] lacks 'image_id' or 'caption'") from None
            if image_id not in files:
                self.orphan_captions += 1
                continue
            if isinstance(caption, str) and caption.strip():
                captions.setdefault(image_id, []).append(caption.strip())
        self._items = [(files[i], captions[i]) for i in order if i in captions]
        if not self._items:
            raise DataError(f"{self.captions_json}: no image has a caption (is this a test split without annotations?)")

    def __len__(self) -> int:
        return len(self._items)

    def image_files(self) -> list[Path]:
        """The image file of every item, in item order (read by :func:`dalle.data.survey.survey_images`)."""
        return [self.image_dir / name for name, _ in self._items]

    def key(self, index: int) -> str:
        return os.path.splitext(self._items[index][0])[0]

    def load(self, index: int) -> Sample:
        file_name, captions = self._items[self._check_index(index)]
        try:
            image = load_image(self.image_dir / file_name, self.max_pixels)
        except BadImageError as e:
            raise BadImageError(e.reason, key=file_name) from None
        return Sample(image=image, captions=list(captions), key=os.path.splitext(file_name)[0])


def coco_image_dir(captions_json: Path) -> Path:
    """Guess the image folder of ``.../annotations/captions_train2017.json`` (-> ``.../train2017``)."""
    split = captions_json.stem[len("captions_") :] if captions_json.stem.startswith("captions_") else ""
    here, up = captions_json.parent, captions_json.parent.parent
    candidates = [up / split, here / split, up / "images" / split, here / "images" / split, up / "images", here / "images"]
    candidates = [c for c in candidates if c.name]  # drop the split-less ones when split is empty
    for c in candidates:
        if c.is_dir():
            return c
    raise DataError(
        f"cannot find the image folder for {captions_json}: tried {', '.join(str(c) for c in candidates)}; "
        "use CocoDataset(captions_json, image_dir) to name it"
    )


__all__ = ["CocoDataset", "coco_image_dir"]
