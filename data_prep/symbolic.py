"""Symbolic image contexts for text-only instruction generation: an image seen as its captions and boxes.

Two inputs:

* COCO annotation files: `captions_*.json` (required; images + captions) and optionally
  `instances_*.json` (boxes `[x, y, w, h]` in pixels + categories).
* A simple JSONL for any other collection, one image per line::

      {"image": "dir/0001.jpg", "width": 640, "height": 480, "captions": ["A dog on a sofa."],
       "objects": [{"category": "dog", "box": [12, 40, 300, 410]}], "id": "0001"}

  `box` is `[x1, y1, x2, y2]` in pixels; `objects` and `id` (default: the `image` path) are optional.

Per image the context text is its captions, one per line, a blank line, then one line per object
`category: [x1, y1, x2, y2]` with coordinates divided by the image width/height (3 decimals), in
annotation order. Boxes reaching outside the image are clipped to [0, 1] (counted); objects with an
unusable box and images without captions are left out and counted by reason (`Contexts.skipped`);
inconsistent files (unknown category id, duplicate image id, missing width) are an error.
"""
from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path


class ContextError(ValueError):
    """An annotation file that cannot be used as it is."""


@dataclass(frozen=True)
class ImageContext:
    image_id: str
    file_name: str
    captions: tuple[str, ...]
    objects: tuple[tuple[str, tuple[float, float, float, float]], ...] = ()  # (category, normalised xyxy)

    def text(self) -> str:
        lines = list(self.captions)
        if self.objects:
            lines.append("")
            lines += [f"{name}: [{', '.join(f'{v:.3f}' for v in box)}]" for name, box in self.objects]
        return "\n".join(lines)


@dataclass
class Contexts:
    images: list[ImageContext]
    skipped: Counter = field(default_factory=Counter)  # reason -> count (images or objects)
    clipped_boxes: int = 0


def normalise_box(x1: float, y1: float, x2: float, y2: float, width: float, height: float
                  ) -> tuple[tuple[float, float, float, float] | None, bool]:
    """(normalised, clipped box) or (None, _) when the box is unusable (non-finite, empty after clipping)."""
    values = (x1, y1, x2, y2)
    if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values) or x2 <= x1 or y2 <= y1:
        return None, False
    raw = (x1 / width, y1 / height, x2 / width, y2 / height)
    box = tuple(min(max(v, 0.0), 1.0) for v in raw)
    if box[2] <= box[0] or box[3] <= box[1]:
        return None, False
    return box, box != raw


def _size(image: dict, where: str) -> tuple[float, float]:
    w, h = image.get("width"), image.get("height")
    if not (isinstance(w, (int, float)) and isinstance(h, (int, float)) and w > 0 and h > 0):
        raise ContextError(f"{where}: image {image.get('id', image.get('image'))!r} has no positive width/height")
    return float(w), float(h)


def load_coco(captions_path: str | Path, instances_path: str | Path | None = None) -> Contexts:
    """Contexts for every image of a COCO captions file (objects from the instances file if given)."""
    caps = json.loads(Path(captions_path).read_text(encoding="utf-8"))
    if not isinstance(caps, dict) or "images" not in caps or "annotations" not in caps:
        raise ContextError(f"{captions_path}: not a COCO captions file (needs 'images' and 'annotations')")
    images: dict = {}
    for image in caps["images"]:
        if image["id"] in images:
            raise ContextError(f"{captions_path}: image id {image['id']!r} listed twice")
        images[image["id"]] = image
    captions: dict = defaultdict(list)
    skipped: Counter = Counter()
    for ann in sorted(caps["annotations"], key=lambda a: a.get("id", 0)):
        if ann["image_id"] not in images:
            skipped["caption of an image not in the file"] += 1
            continue
        text = " ".join(str(ann.get("caption", "")).split())
        if text:
            captions[ann["image_id"]].append(text)
        else:
            skipped["empty caption"] += 1

    objects: dict = defaultdict(list)
    clipped = 0
    if instances_path is not None:
        inst = json.loads(Path(instances_path).read_text(encoding="utf-8"))
        if not isinstance(inst, dict) or "categories" not in inst or "annotations" not in inst:
            raise ContextError(f"{instances_path}: not a COCO instances file (needs 'categories' and 'annotations')")
        names = {c["id"]: c["name"] for c in inst["categories"]}
        for ann in sorted(inst["annotations"], key=lambda a: a.get("id", 0)):
            if ann["image_id"] not in images:
                skipped["object of an image not in the captions file"] += 1
                continue
            if ann.get("category_id") not in names:
                raise ContextError(f"{instances_path}: annotation {ann.get('id')!r} has unknown category_id "
                                   f"{ann.get('category_id')!r}")
            bbox = ann.get("bbox")
            box = None
            if isinstance(bbox, list) and len(bbox) == 4:
                w, h = _size(images[ann["image_id"]], str(captions_path))
                x, y, bw, bh = bbox
                box, was_clipped = normalise_box(x, y, x + bw, y + bh, w, h) if all(
                    isinstance(v, (int, float)) for v in bbox) else (None, False)
                clipped += was_clipped
            if box is None:
                skipped["object with an unusable box"] += 1
                continue
            objects[ann["image_id"]].append((names[ann["category_id"]], box))

    out = []
    for image_id, image in images.items():
        if not captions.get(image_id):
            skipped["image without captions"] += 1
            continue
        out.append(ImageContext(str(image_id), image["file_name"], tuple(captions[image_id]),
                                tuple(objects.get(image_id, ()))))
    return Contexts(out, skipped, clipped)


def load_simple(path: str | Path) -> Contexts:
    """Contexts from the simple JSONL format (module docstring)."""
    out, seen, skipped, clipped = [], set(), Counter(), 0
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ContextError(f"{where}: not JSON ({e})") from None
        if not isinstance(row, dict) or not isinstance(row.get("image"), str):
            raise ContextError(f"{where}: expected an object with an 'image' path")
        image_id = str(row.get("id", row["image"]))
        if image_id in seen:
            raise ContextError(f"{where}: image id {image_id!r} listed twice")
        seen.add(image_id)
        caps = [" ".join(str(c).split()) for c in row.get("captions") or []]
        caps = [c for c in caps if c]
        if not caps:
            skipped["image without captions"] += 1
            continue
        objects = []
        if row.get("objects"):
            w, h = _size(row, where)
            for obj in row["objects"]:
                box = obj.get("box") if isinstance(obj, dict) else None
                name = obj.get("category") if isinstance(obj, dict) else None
                norm = None
                if isinstance(name, str) and name.strip() and isinstance(box, list) and len(box) == 4:
                    norm, was_clipped = normalise_box(*box, w, h)
                    clipped += bool(norm) and was_clipped
                if norm is None:
                    skipped["object with an unusable box"] += 1
                    continue
                objects.append((name.strip(), norm))
        out.append(ImageContext(image_id, row["image"], tuple(caps), tuple(objects)))
    return Contexts(out, skipped, clipped)
