"""Generate LLaVA visual instructions from COCO-style annotations with a text-only LLM.

    # an OpenAI-compatible endpoint (any server speaking /v1/chat/completions)
    python -m data_prep.gen_instruct --captions captions_train2017.json --instances instances_train2017.json \\
        --out data/instruct --image-prefix coco/train2017/ --total 158000 \\
        --mix conversation=58000,detail=23000,complex_reasoning=77000 \\
        --backend openai --base-url http://localhost:8000/v1 --model MODEL --concurrency 8 --rpm 600 \\
        --price-input 0.15 --price-output 0.60
    # a local causal LM directory, offline
    python -m data_prep.gen_instruct --captions ... --out ... --backend transformers --model /models/my-llm
    # any other collection: --contexts images.jsonl (format in data_prep/symbolic.py) instead of --captions

Each image is shown to the LLM as symbols only -- its captions and its objects as
`category: [x1, y1, x2, y2]` (normalised, 3 decimals) -- with one of three prompt sets
(`data_prep/prompts/*.yaml`: system message + hand-written few-shot pairs): multi-turn
`conversation`, `detail`ed description (the question drawn from a list), `complex_reasoning`.

Plan: `--total` requests (default: one per image) are split over the kinds of `--mix` in proportion
to its weights (default: the LLaVA-Instruct-158K reference 58K / 23K / 77K); each kind takes the first
images of its own seeded permutation of the image ids, so an image gets at most one request per kind
and a larger --total extends the same plan.

Resumable: every reply is appended to the cache (`--cache`, default OUT/cache.jsonl) as soon as it
arrives, keyed by (image id, kind, prompt-set version); a re-run (or a run after a crash) sends only
the requests not in the cache. A prompt file edited without bumping its `version` is refused.

Then every reply is parsed (malformed ones are rejected with a reason, `rejected.jsonl`), exact and
near duplicates of the same image are dropped (`data_prep/dedup.py`), and the records are written:

    OUT/instruct.json      all kinds, shuffled (seeded); --strict-mix trims them to the --mix proportions
    OUT/<kind>.json        the accepted records of each kind
    OUT/rejected.jsonl     {"id", "kind", "reason", "reply"} per rejected reply or duplicate
    OUT/report.json        counts per kind (requested, cached, new, accepted, rejected by reason,
                           duplicates, in output), tokens and cost (--price-input/--price-output: USD per
                           1M prompt/completion tokens); also printed as a table

Records: {"id": "<image id>-<kind>", "image": PREFIX + file name, "kind", "conversations"} with
`<image>` opening the first human turn. `--dry-run` prints the plan and the first request, sends nothing.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import threading
import time
from collections import Counter, defaultdict
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

from data_prep.dedup import find_duplicates
from data_prep.instruct_prompts import (
    KINDS,
    PROMPTS_DIR,
    PromptSet,
    Rejected,
    load_prompt_sets,
    parse_reply,
    prompt_preview,
    to_record,
)
from data_prep.llm_backends import add_backend_args, make_backend
from data_prep.symbolic import Contexts, ImageContext, load_coco, load_simple

REFERENCE_MIX = {"conversation": 58000, "detail": 23000, "complex_reasoning": 77000}


@dataclass(frozen=True)
class Job:
    image: ImageContext
    kind: str
    key: str


def parse_mix(text: str) -> dict[str, float]:
    """'conversation=58,detail=23' -> {"conversation": 58.0, "detail": 23.0} (kinds checked, weights > 0)."""
    mix = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        kind, _, weight = item.partition("=")
        if kind not in KINDS:
            raise ValueError(f"--mix: unknown kind {kind!r} (known: {', '.join(KINDS)})")
        try:
            mix[kind] = float(weight)
        except ValueError:
            raise ValueError(f"--mix: {item!r} is not KIND=WEIGHT") from None
        if mix[kind] <= 0:
            raise ValueError(f"--mix: weight of {kind!r} must be > 0")
    if not mix:
        raise ValueError("--mix names no kind")
    return mix


def split_total(total: int, weights: dict[str, float]) -> dict[str, int]:
    """Integer counts proportional to the weights, summing to `total` (largest remainders)."""
    norm = sum(weights.values())
    exact = {k: total * w / norm for k, w in weights.items()}
    counts = {k: int(v) for k, v in exact.items()}
    for k in sorted(exact, key=lambda k: (-(exact[k] - counts[k]), list(weights).index(k)))[:total - sum(counts.values())]:
        counts[k] += 1
    return counts


def cache_key(image_id: str, ps: PromptSet) -> str:
    return f"{image_id}|{ps.kind}|v{ps.version}"


def plan_jobs(images: list[ImageContext], prompt_sets: dict[str, PromptSet], mix: dict[str, float],
              total: int, seed: int) -> list[Job]:
    counts = split_total(total, mix)
    by_id = sorted(images, key=lambda c: c.image_id)
    jobs = []
    for kind, n in counts.items():
        if n > len(by_id):
            raise ValueError(f"{n} {kind} requests but only {len(by_id)} images: an image gets at most one "
                             f"request per kind (lower --total or change --mix)")
        order = list(by_id)
        random.Random(f"{seed}:{kind}").shuffle(order)
        jobs += [Job(c, kind, cache_key(c.image_id, prompt_sets[kind])) for c in order[:n]]
    return jobs


class ReplyCache:
    """Append-only JSONL of replies; a truncated last line (crash mid-write) is cut off on load."""

    def __init__(self, path: Path):
        self.path, self.entries, self._lock = Path(path), {}, threading.Lock()
        self.truncated = 0
        if self.path.is_file():
            data = self.path.read_bytes()
            lines = data.split(b"\n")
            good = len(data)
            if lines[-1].strip():  # no final newline: the last write was interrupted
                good = len(data) - len(lines[-1])
                self.truncated = 1
                lines = lines[:-1]
            for n, line in enumerate(lines, 1):
                if line.strip():
                    try:
                        entry = json.loads(line)
                    except json.JSONDecodeError:
                        raise ValueError(f"{self.path}:{n}: corrupt cache line (not JSON)") from None
                    self.entries[entry["key"]] = entry
            if self.truncated:
                with self.path.open("r+b") as f:
                    f.truncate(good)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def check_versions(self, prompt_sets: dict[str, PromptSet]) -> None:
        for entry in self.entries.values():
            ps = prompt_sets.get(entry["kind"])
            if ps and entry["version"] == ps.version and entry["prompt_sha"] != ps.sha:
                raise ValueError(f"prompt set {ps.kind!r} changed but its version is still {ps.version}: cached "
                                 f"replies in {self.path} were made with another text -- bump `version`")

    def put(self, entry: dict) -> None:
        with self._lock:
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(entry, ensure_ascii=False) + "\n")
            self.entries[entry["key"]] = entry


def run_requests(jobs: list[Job], prompt_sets: dict[str, PromptSet], backend, cache: ReplyCache,
                 concurrency: int) -> int:
    """Send every job not in the cache; returns the number of new replies. Stops at the first error
    (replies received so far stay cached)."""
    pending = [j for j in jobs if j.key not in cache.entries]
    done, lock, stop = 0, threading.Lock(), threading.Event()

    def one(job: Job) -> None:
        nonlocal done
        if stop.is_set():  # another request failed: send nothing more
            return
        ps = prompt_sets[job.kind]
        try:
            reply = backend.complete(ps.messages(job.image.text()), ps.temperature, ps.max_tokens)
        except BaseException:
            stop.set()
            raise
        cache.put({"key": job.key, "image_id": job.image.image_id, "kind": job.kind, "version": ps.version,
                   "prompt_sha": ps.sha, "model": reply.model, "reply": reply.text,
                   "prompt_tokens": reply.prompt_tokens, "completion_tokens": reply.completion_tokens,
                   "time": round(time.time(), 3)})
        with lock:
            done += 1
            if done % 50 == 0 or done == len(pending):
                print(f"generate: {done}/{len(pending)} replies", file=sys.stderr)

    if not pending:
        return 0
    pool = ThreadPoolExecutor(max_workers=max(1, concurrency))
    try:
        futures = [pool.submit(one, j) for j in pending]
        finished, _ = wait(futures, return_when=FIRST_EXCEPTION)
        errors = [f.exception() for f in finished if f.exception() is not None]
        if errors:
            raise errors[0]
    finally:  # on an error or Ctrl-C: no new request starts; those in flight finish and are cached
        stop.set()
        pool.shutdown(wait=True, cancel_futures=True)
    return done


def build_records(jobs: list[Job], prompt_sets: dict[str, PromptSet], cache: ReplyCache, seed: int,
                  image_prefix: str) -> tuple[list[dict], list[dict]]:
    """(accepted records in plan order, rejections)."""
    records, rejected = [], []
    for job in jobs:
        ps, reply = prompt_sets[job.kind], cache.entries[job.key]["reply"]
        record_id = f"{job.image.image_id}-{job.kind}"
        try:
            pairs = parse_reply(ps, reply)
        except Rejected as e:
            rejected.append({"id": record_id, "kind": job.kind, "reason": e.reason, "reply": reply})
            continue
        records.append(to_record(record_id, image_prefix + job.image.file_name, job.kind, pairs,
                                 ps.instruction(job.image.image_id, seed)))
    return records, rejected


def select_mix(records: list[dict], mix: dict[str, float], strict: bool) -> list[dict]:
    """All records, or (strict) the largest subset in the --mix proportions (first ones of each kind)."""
    if not strict:
        return list(records)
    have = Counter(r["kind"] for r in records)
    scale = min(have[k] / w for k, w in mix.items())
    keep = {k: min(have[k], int(scale * w + 1e-9)) for k, w in mix.items()}
    taken: Counter = Counter()
    out = []
    for r in records:
        if taken[r["kind"]] < keep[r["kind"]]:
            taken[r["kind"]] += 1
            out.append(r)
    return out


def _tokens(entries: list[dict]) -> dict:
    return {"prompt": sum(e.get("prompt_tokens") or 0 for e in entries),
            "completion": sum(e.get("completion_tokens") or 0 for e in entries),
            "unreported": sum(e.get("prompt_tokens") is None or e.get("completion_tokens") is None for e in entries)}


def _cost(tokens: dict, price_in: float, price_out: float) -> float:
    return round((tokens["prompt"] * price_in + tokens["completion"] * price_out) / 1e6, 6)


def format_report(report: dict) -> str:
    rows = [("kind", "requested", "cached", "new", "accepted", "rejected", "dup exact", "dup near", "in output")]
    for kind, k in report["kinds"].items():
        rows.append((kind, k["requested"], k["cached_before"], k["new_requests"], k["accepted"],
                     sum(k["rejected"].values()), k["duplicates"]["exact"], k["duplicates"]["near"], k["in_output"]))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(str(v).ljust(w) if i == 0 else str(v).rjust(w) for i, (v, w) in enumerate(zip(r, widths, strict=True)))
             for r in rows]
    reasons = Counter()
    for k in report["kinds"].values():
        reasons.update(k["rejected"])
    if reasons:
        lines.append("rejection reasons: " + ", ".join(f"{r} {n}" for r, n in reasons.most_common()))
    if report["inputs"]["skipped"]:
        lines.append("input skipped: " + ", ".join(f"{r} {n}" for r, n in report["inputs"]["skipped"].items()))
    t, c = report["tokens"], report["cost_usd"]
    lines.append(f"tokens this run: {t['this_run']['prompt']} prompt + {t['this_run']['completion']} completion "
                 f"(${c['this_run']:.4f}); all replies used: {t['all']['prompt']} + {t['all']['completion']} "
                 f"(${c['all']:.4f})" + (f"; {t['all']['unreported']} replies without usage" if t['all']['unreported']
                                         else ""))
    out = report["output"]
    lines.append(f"-> {out['path']}: {out['samples']} samples, share "
                 + ", ".join(f"{k} {v:.3f} (target {out['target_share'][k]:.3f})" for k, v in out["share"].items()))
    return "\n".join(lines)


def load_contexts(args) -> Contexts:
    if bool(args.captions) == bool(args.contexts):
        raise SystemExit("give either --captions (COCO, with optional --instances) or --contexts (simple JSONL)")
    return load_coco(args.captions, args.instances) if args.captions else load_simple(args.contexts)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m data_prep.gen_instruct", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--captions", help="COCO captions_*.json")
    ap.add_argument("--instances", help="COCO instances_*.json (object boxes; optional)")
    ap.add_argument("--contexts", help="simple JSONL: one image per line with captions and boxes")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--mix", default=",".join(f"{k}={v}" for k, v in REFERENCE_MIX.items()),
                    help="KIND=WEIGHT,... (default: the reference 58K/23K/77K)")
    ap.add_argument("--total", type=int, help="requests over all kinds (default: one per image)")
    ap.add_argument("--max-images", type=int, help="use only the first N images (sorted by id)")
    ap.add_argument("--strict-mix", action="store_true", help="trim the output to the exact --mix proportions")
    ap.add_argument("--image-prefix", default="", help="prepended to each file name in 'image'")
    ap.add_argument("--prompts-dir", type=Path, default=PROMPTS_DIR)
    ap.add_argument("--cache", type=Path, help="reply cache (default OUT/cache.jsonl)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--near-dup", type=float, default=0.8, help="Jaccard threshold of near duplicates (>1: off)")
    ap.add_argument("--price-input", type=float, default=0.0, help="USD per 1M prompt tokens")
    ap.add_argument("--price-output", type=float, default=0.0, help="USD per 1M completion tokens")
    ap.add_argument("--dry-run", action="store_true", help="print the plan and the first request; send nothing")
    add_backend_args(ap)
    args = ap.parse_args(argv)

    try:
        mix = parse_mix(args.mix)
        prompt_sets = load_prompt_sets(list(mix), args.prompts_dir)
        contexts = load_contexts(args)
        images = sorted(contexts.images, key=lambda c: c.image_id)[:args.max_images]
        if not images:
            raise ValueError("no usable image (every image lacked captions?)")
        jobs = plan_jobs(images, prompt_sets, mix, args.total or len(images), args.seed)
        cache = ReplyCache(args.cache or args.out / "cache.jsonl")
        cache.check_versions(prompt_sets)
    except ValueError as e:
        raise SystemExit(f"gen_instruct: {e}") from None
    planned = Counter(j.kind for j in jobs)
    cached_before = Counter(j.kind for j in jobs if j.key in cache.entries)
    if cache.truncated:
        print(f"gen_instruct: cut off an interrupted last line of {cache.path}", file=sys.stderr)
    if args.dry_run:
        print(f"{len(images)} images; plan: " + ", ".join(f"{k} {n} ({cached_before[k]} cached)"
                                                          for k, n in planned.items()))
        print(prompt_preview(prompt_sets[jobs[0].kind], jobs[0].image.text()))
        return {}

    backend = make_backend(args, args.seed)
    new_before = set(cache.entries)
    try:
        run_requests(jobs, prompt_sets, backend, cache, min(args.concurrency, backend.max_concurrency))
    except (Exception, KeyboardInterrupt) as e:
        n_new = len(set(cache.entries) - new_before)
        raise SystemExit(f"gen_instruct: stopped ({type(e).__name__}: {e}); {n_new} new replies are cached in "
                         f"{cache.path}: run the same command again to continue") from None

    records, rejected = build_records(jobs, prompt_sets, cache, args.seed, args.image_prefix)
    duplicates = find_duplicates(records, args.near_dup)
    dup_counts: dict[str, Counter] = defaultdict(Counter)
    for i, (how, j) in sorted(duplicates.items()):
        dup_counts[records[i]["kind"]][how] += 1
        rejected.append({"id": records[i]["id"], "kind": records[i]["kind"],
                         "reason": f"{how} duplicate of {records[j]['id']}", "reply": None})
    records = [r for i, r in enumerate(records) if i not in duplicates]
    mixture = select_mix(records, mix, args.strict_mix)
    random.Random(args.seed).shuffle(mixture)

    args.out.mkdir(parents=True, exist_ok=True)
    for kind in mix:
        (args.out / f"{kind}.json").write_text(json.dumps([r for r in records if r["kind"] == kind], indent=1,
                                                          ensure_ascii=False), encoding="utf-8")
    (args.out / "instruct.json").write_text(json.dumps(mixture, indent=1, ensure_ascii=False), encoding="utf-8")
    with (args.out / "rejected.jsonl").open("w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rejected)

    used = [cache.entries[j.key] for j in jobs]
    new = [cache.entries[j.key] for j in jobs if j.key not in new_before]
    tokens = {"this_run": _tokens(new), "all": _tokens(used)}
    accepted, in_output = Counter(r["kind"] for r in records), Counter(r["kind"] for r in mixture)
    reasons: dict[str, Counter] = defaultdict(Counter)
    for r in rejected:
        if r["reply"] is not None:
            reasons[r["kind"]][r["reason"]] += 1
    norm = sum(mix.values())
    report = {
        "inputs": {"images": len(images), "skipped": dict(contexts.skipped), "clipped_boxes": contexts.clipped_boxes},
        "models": dict(Counter(e["model"] for e in used)),
        "prompt_sets": {k: ps.tag for k, ps in prompt_sets.items()},
        "kinds": {k: {"requested": planned[k], "cached_before": cached_before[k],
                      "new_requests": planned[k] - cached_before[k], "accepted": accepted[k] + sum(dup_counts[k].values()),
                      "rejected": dict(reasons[k]), "duplicates": {"exact": dup_counts[k]["exact"],
                                                                   "near": dup_counts[k]["near"]},
                      "in_output": in_output[k]} for k in mix},
        "tokens": tokens,
        "cost_usd": {key: _cost(t, args.price_input, args.price_output) for key, t in tokens.items()},
        "output": {"path": str(args.out / "instruct.json"), "samples": len(mixture),
                   "share": {k: round(in_output[k] / max(1, len(mixture)), 4) for k in mix},
                   "target_share": {k: round(w / norm, 4) for k, w in mix.items()}},
    }
    (args.out / "report.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    print(format_report(report))
    return report


if __name__ == "__main__":
    main()
