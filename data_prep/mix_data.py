"""Build a training mixture from several LLaVA-format JSON files with per-source sampling ratios.

    python -m data_prep.mix_data --spec data_prep/mixes/llava_v1_5_mix665k.yaml --root $LLAVA_DATA_ROOT \\
        --out mix.json [--seed 0] [--report mix.report.json]
    python -m data_prep.mix_data --out mix.json \\
        --source llava=llava_instruct_158k.json \\
        --source vqav2=vqav2.json,ratio=0.5,format=short_answer \\
        --source aokvqa=aokvqa.json,count=66000,format=option_letter

A spec (YAML) lists the sources; `--source NAME=PATH[,ratio=R][,count=N][,format=F]` adds one on the
command line::

    seed: 0                 # optional; --seed overrides
    shuffle: true           # shuffle the mixture (seeded); false keeps the sources in order
    sources:
      - name: vqav2
        path: vqav2.json    # relative to --root (default: the spec's folder)
        ratio: 0.5          # share of the file to take (default 1.0); above 1 repeats samples
        # count: 83000      # or an absolute number of samples (instead of ratio)
        format: short_answer

Per source, `round(ratio * len)` (or `count`) samples are drawn without replacement with a seeded RNG
per source (whole copies first when more than the file holds; repeated copies get "_rep<k>" appended to
their id). `format` appends LLaVA-1.5's response-format prompt to every human turn ("\\n" + prompt,
unless the turn already ends with it): `short_answer` = "Answer the question using a single word or
phrase." (VQAv2, GQA, OKVQA, OCR-VQA), `option_letter` = "Answer with the option's letter from the
given choices directly." (A-OKVQA), or any literal text. Every record gets `"source": NAME` (for
`data_prep.data_card`; --no-source-field to leave records unchanged), `--prefix-ids` makes ids unique
as "NAME/ID". Bad records (not a valid conversation for their images) stop the run with their ids, or
with --skip-bad are left out and counted. Ids used more than once in the mixture are reported.
The output is byte-identical for the same inputs and seed.
"""
from __future__ import annotations

import argparse
import json
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import yaml

from llava_sft.data.dataset import image_list
from llava_sft.data.templates import BadSampleError, get_template

FORMAT_PROMPTS = {
    "short_answer": "Answer the question using a single word or phrase.",
    "option_letter": "Answer with the option's letter from the given choices directly.",
}


@dataclass(frozen=True)
class Source:
    name: str
    path: Path
    ratio: float | None = 1.0
    count: int | None = None
    format: str | None = None

    @property
    def prompt(self) -> str | None:
        return FORMAT_PROMPTS.get(self.format, self.format) if self.format else None


def _source(raw: dict, root: Path, where: str) -> Source:
    unknown = sorted(set(raw) - {"name", "path", "ratio", "count", "format"})
    if unknown or "name" not in raw or "path" not in raw:
        raise ValueError(f"{where}: a source needs 'name' and 'path' (and optionally ratio, count, format); "
                         f"got {sorted(raw)}")
    if "ratio" in raw and "count" in raw:
        raise ValueError(f"{where}: source {raw['name']!r} gives both ratio and count")
    count = int(raw["count"]) if "count" in raw else None
    ratio = None if count is not None else float(raw.get("ratio", 1.0))
    if (ratio is not None and ratio < 0) or (count is not None and count < 0):
        raise ValueError(f"{where}: source {raw['name']!r}: ratio/count must be >= 0")
    path = Path(raw["path"])
    return Source(str(raw["name"]), path if path.is_absolute() else root / path, ratio, count, raw.get("format"))


def parse_source_arg(text: str) -> dict:
    """'vqav2=vqav2.json,ratio=0.5,format=short_answer' -> {"name", "path", "ratio", "format"}."""
    head, *options = text.split(",")
    name, sep, path = head.partition("=")
    if not sep or not name or not path:
        raise ValueError(f"--source {text!r}: expected NAME=PATH[,ratio=R][,count=N][,format=F]")
    raw = {"name": name, "path": path}
    for option in options:
        key, sep, value = option.partition("=")
        if not sep:
            raise ValueError(f"--source {text!r}: {option!r} is not KEY=VALUE")
        raw[key] = value
    return raw


def load_spec(path: Path, root: Path | None = None) -> tuple[list[Source], dict]:
    raw = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    if not isinstance(raw.get("sources"), list) or not raw["sources"]:
        raise ValueError(f"{path}: expected a non-empty 'sources' list")
    root = root or Path(path).parent
    return [_source(s, root, str(path)) for s in raw["sources"]], {k: v for k, v in raw.items() if k != "sources"}


def add_format(record: dict, prompt: str) -> dict:
    turns = []
    for t in record["conversations"]:
        if t.get("from") == "human" and not t["value"].rstrip().endswith(prompt):
            t = dict(t, value=t["value"].rstrip() + "\n" + prompt)
        turns.append(t)
    return dict(record, conversations=turns)


def draw(n_records: int, n: int, rng: random.Random) -> list[tuple[int, int]]:
    """(index, copy number) of the n drawn samples, in file order within each copy."""
    copies, rest = divmod(n, n_records) if n_records else (0, 0)
    out = [(i, k) for k in range(copies) for i in range(n_records)]
    return out + [(i, copies) for i in sorted(rng.sample(range(n_records), rest))]


def mix(sources: list[Source], seed: int = 0, shuffle: bool = True, source_field: bool = True,
        prefix_ids: bool = False, skip_bad: bool = False) -> tuple[list[dict], dict]:
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        raise ValueError(f"source names must be unique, got {names}")
    template = get_template("vicuna_v1")
    out, report = [], {"sources": {}, "seed": seed}
    for src in sources:
        if not src.path.is_file():
            raise ValueError(f"source {src.name!r}: {src.path} does not exist")
        records = json.loads(src.path.read_text(encoding="utf-8"))
        if not isinstance(records, list):
            raise ValueError(f"source {src.name!r}: {src.path} is not a JSON list")
        good, bad = [], []
        for i, r in enumerate(records):
            sample_id = r.get("id", f"#{i}") if isinstance(r, dict) else f"#{i}"
            try:
                if not isinstance(r, dict):
                    raise BadSampleError(sample_id, "not a record")
                template.render(r.get("conversations"), len(image_list(r, sample_id)), sample_id)
                good.append(r)
            except BadSampleError as e:
                bad.append(str(e))
        if bad and not skip_bad:
            raise ValueError(f"source {src.name!r}: {len(bad)} bad record(s) (--skip-bad to leave them out): "
                             + "; ".join(bad[:5]))
        n = src.count if src.count is not None else round(src.ratio * len(good))
        if n and not good:
            raise ValueError(f"source {src.name!r}: no usable record to draw {n} samples from")
        picked = draw(len(good), n, random.Random(f"{seed}:{src.name}"))
        for i, copy in picked:
            r = good[i]
            if src.prompt:
                r = add_format(r, src.prompt)
            r = dict(r)
            if "id" in r or prefix_ids or copy:
                rid = str(r.get("id", f"#{i}"))
                rid = f"{src.name}/{rid}" if prefix_ids else rid
                r["id"] = f"{rid}_rep{copy}" if copy else rid
            if source_field:
                r["source"] = src.name
            out.append(r)
        report["sources"][src.name] = {
            "path": str(src.path), "records": len(records), "bad_skipped": len(bad), "selected": len(picked),
            "ratio": round(len(picked) / max(1, len(good)), 4), "repeated": sum(c > 0 for _, c in picked),
            "format": src.prompt, "text_only": sum(not good[i].get("image") for i, _ in picked)}
    if shuffle:
        random.Random(seed).shuffle(out)
    ids = Counter(str(r["id"]) for r in out if "id" in r)
    report["total"] = len(out)
    report["duplicate_ids"] = {"count": sum(n > 1 for n in ids.values()),
                               "examples": [i for i, n in ids.items() if n > 1][:10]}
    return out, report


def format_report(report: dict, out: Path) -> str:
    rows = [("source", "records", "selected", "share", "ratio", "text-only", "format")]
    for name, s in report["sources"].items():
        rows.append((name, s["records"], s["selected"], f"{s['selected'] / max(1, report['total']):.1%}",
                     f"{s['ratio']:g}", s["text_only"], (s["format"] or "")[:40]))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(str(v).ljust(w) if i in (0, 6) else str(v).rjust(w) for i, (v, w) in enumerate(zip(r, widths, strict=True)))
             for r in rows]
    repeated = {n: s["repeated"] for n, s in report["sources"].items() if s["repeated"]}
    if repeated:
        lines.append("repeated samples (more asked than the file holds): "
                     + ", ".join(f"{n} {c}" for n, c in repeated.items()))
    bad = {n: s["bad_skipped"] for n, s in report["sources"].items() if s["bad_skipped"]}
    if bad:
        lines.append("bad records left out: " + ", ".join(f"{n} {c}" for n, c in bad.items()))
    if report["duplicate_ids"]["count"]:
        lines.append(f"ids used more than once: {report['duplicate_ids']['count']} (e.g. "
                     f"{', '.join(report['duplicate_ids']['examples'][:5])}; --prefix-ids makes them unique)")
    lines.append(f"-> {out}: {report['total']} samples (seed {report['seed']})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m data_prep.mix_data", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--spec", type=Path, help="YAML mixture spec")
    ap.add_argument("--source", action="append", default=[], help="NAME=PATH[,ratio=R][,count=N][,format=F]")
    ap.add_argument("--root", type=Path, help="folder of relative paths (default: the spec's folder / cwd)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seed", type=int, help="default: the spec's seed, else 0")
    ap.add_argument("--no-shuffle", action="store_true", help="keep the sources in order")
    ap.add_argument("--no-source-field", action="store_true", help="do not add 'source' to the records")
    ap.add_argument("--prefix-ids", action="store_true", help="ids become NAME/ID")
    ap.add_argument("--skip-bad", action="store_true", help="leave bad records out (counted) instead of stopping")
    ap.add_argument("--report", type=Path, help="also write the report as JSON here")
    args = ap.parse_args(argv)
    try:
        sources, options = load_spec(args.spec, args.root) if args.spec else ([], {})
        root = args.root or Path(".")
        sources += [_source(parse_source_arg(s), root, "--source") for s in args.source]
        if not sources:
            raise ValueError("no source: give --spec and/or --source")
        seed = args.seed if args.seed is not None else int(options.get("seed", 0))
        shuffle = bool(options.get("shuffle", True)) and not args.no_shuffle
        records, report = mix(sources, seed, shuffle, not args.no_source_field, args.prefix_ids, args.skip_bad)
    except ValueError as e:
        raise SystemExit(f"mix_data: {e}") from None
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(records, indent=1, ensure_ascii=False), encoding="utf-8")
    if args.report:
        args.report.write_text(json.dumps(report, indent=2), encoding="utf-8")
    print(format_report(report, args.out))
    return report


if __name__ == "__main__":
    main()
