"""Exact and near duplicates among LLaVA records (used by the generator and the data card).

Two records are compared only when they show the same image(s) (all text-only records form one
group): the same question asked about different images is not a duplicate. A record's text is its
whole conversation with `<image>` removed, lower-cased, punctuation dropped, whitespace collapsed.

* exact duplicate: the same normalised text as an earlier record of its group;
* near duplicate: not exact, but the Jaccard similarity of its word-3-gram sets with an earlier
  record of its group is >= `threshold` (0.8 by default; texts under 3 words use the whole text;
  a threshold above 1 turns the near-duplicate search off).

Near duplicates are found without comparing all pairs: shingles are ordered by global frequency
(rarest first) and two sets can only reach Jaccard >= t if they share one of the first
|s| - ceil(t |s|) + 1 shingles of either set (prefix filtering), so only records sharing such a
shingle are compared -- an exact method, no false negatives.
"""
from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from typing import Iterable

from llava_sft.constants import IMAGE_PLACEHOLDER

_WORD = re.compile(r"[^\W_]+", re.UNICODE)


def normalise(text: str) -> str:
    return " ".join(_WORD.findall(text.replace(IMAGE_PLACEHOLDER, " ").lower()))


def record_text(record: dict) -> str:
    return normalise(" ".join(str(t.get("value", "")) for t in record.get("conversations") or []
                              if isinstance(t, dict)))


def image_key(record: dict) -> str:
    image = record.get("image")
    if image is None:
        return ""
    return "\0".join(image) if isinstance(image, list) else str(image)


def shingles(text: str, n: int = 3) -> frozenset:
    words = text.split()
    if len(words) < n:
        return frozenset([text])
    return frozenset(" ".join(words[i:i + n]) for i in range(len(words) - n + 1))


def jaccard(a: frozenset, b: frozenset) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def find_duplicates(records: Iterable[dict], threshold: float = 0.8) -> dict[int, tuple[str, int]]:
    """{index: ("exact" | "near", index of the earlier record it duplicates)} for every duplicate."""
    records = list(records)
    texts = [record_text(r) for r in records]
    groups = [image_key(r) for r in records]
    out: dict[int, tuple[str, int]] = {}
    first: dict[tuple[str, str], int] = {}
    unique = []
    for i, (g, t) in enumerate(zip(groups, texts, strict=True)):
        if (g, t) in first:
            out[i] = ("exact", first[(g, t)])
        else:
            first[(g, t)] = i
            unique.append(i)
    if threshold > 1:  # near duplicates not wanted
        return out
    sets = {i: shingles(texts[i]) for i in unique}
    freq = Counter(s for i in unique for s in sets[i])
    index: dict[tuple[str, str], list[int]] = defaultdict(list)
    for i in unique:
        ordered = sorted(sets[i], key=lambda s: (freq[s], s))
        prefix = ordered[:len(ordered) - math.ceil(threshold * len(ordered)) + 1]
        candidates = {j for s in prefix for j in index[(groups[i], s)]}
        best = next((j for j in sorted(candidates) if jaccard(sets[i], sets[j]) >= threshold), None)
        if best is not None:
            out[i] = ("near", best)
            continue  # a near duplicate is not indexed: later records are compared with the kept one
        for s in prefix:
            index[(groups[i], s)].append(i)
    return out
