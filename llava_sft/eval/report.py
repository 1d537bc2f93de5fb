"""Our numbers beside the LLaVA-1.5 paper rows, as a Markdown table.

    python -m llava_sft.eval.report RESULTS_DIR [--out FILE]

RESULTS_DIR holds one score file per benchmark, `BENCHMARK.json`, as `python -m llava_sft.eval.score
BENCHMARK ... --out RESULTS_DIR/BENCHMARK.json` writes it; its `headline` is the number the paper reports,
on the paper's scale (percent; MME perception as a raw sum). Missing benchmarks show as "—". The table is
printed and written to FILE (default RESULTS_DIR/paper_table.md).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

# LLaVA-1.5 (arXiv 2310.03744v2, Tables 3-4): (name in the table, 7B, 13B)
PAPER: dict[str, tuple[str, float | None, float | None]] = {
    "vqav2": ("VQAv2", 78.5, 80.0),
    "gqa": ("GQA", 62.0, 63.3),
    "vizwiz": ("VizWiz", 50.0, 53.6),
    "scienceqa": ("SciQA-IMG", 66.8, 71.6),
    "textvqa": ("TextVQA", 58.2, 61.3),
    "pope": ("POPE", 85.9, 85.9),
    "mme": ("MME", 1510.7, 1531.3),
    "mmbench": ("MMBench", 64.3, 67.7),
    "mmbench_cn": ("MMBench-CN", 58.3, 63.6),
    "seed": ("SEED", 58.6, 61.6),
    "llava_bench": ("LLaVA-W", 65.4, 72.5),
    "mm_vet": ("MM-Vet", 31.1, 36.1),
}
DASH = "—"


def headline(result: dict) -> float:
    if "headline" not in result:
        raise ValueError("score file has no 'headline' (write it with python -m llava_sft.eval.score ... --out)")
    return float(result["headline"])


def collect(results_dir: Path) -> dict[str, float]:
    found = {}
    for name in list(PAPER) + ["shapes"]:
        file = results_dir / f"{name}.json"
        if file.is_file():
            found[name] = headline(json.loads(file.read_text()))
    return found


def _fmt(value: float | None, decimals: int = 1) -> str:
    return DASH if value is None else f"{value:.{decimals}f}"


def _delta(ours: float | None, paper: float | None) -> str:
    return DASH if ours is None or paper is None else f"{ours - paper:+.1f}"


def paper_table(ours: dict[str, float], model_name: str = "ours") -> str:
    lines = [f"| Benchmark | {model_name} | LLaVA-1.5-7B | Δ 7B | LLaVA-1.5-13B | Δ 13B |",
             "|---|---:|---:|---:|---:|---:|"]
    for key, (name, p7, p13) in PAPER.items():
        value = ours.get(key)
        lines.append(f"| {name} | {_fmt(value)} | {_fmt(p7)} | {_delta(value, p7)} | {_fmt(p13)} | {_delta(value, p13)} |")
    if "shapes" in ours:  # the embedded demo's benchmark: no paper row
        lines.append(f"| shapes (demo) | {_fmt(ours['shapes'])} | {DASH} | {DASH} | {DASH} | {DASH} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results_dir", type=Path)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--name", default=None, help="column name for our model (default: the results folder name)")
    args = ap.parse_args(argv)
    table = paper_table(collect(args.results_dir), args.name or args.results_dir.name)
    out = args.out or args.results_dir / "paper_table.md"
    out.write_text(table + "\n")
    print(table)
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()
