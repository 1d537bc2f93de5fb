"""scripts/eval/*.sh: valid bash, every python flag exists, one score file per report.py benchmark key,
and an end-to-end POPE run (sharded answers -> merge -> score) on a tiny fake eval tree."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from PIL import Image

from llava_sft.eval.report import PAPER

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts" / "eval"
BENCH_SCRIPTS = ["vqav2", "gqa", "vizwiz", "sqa", "textvqa", "pope", "mme", "mmbench", "mmbench_cn", "seed",
                 "llavabench", "mmvet"]
ALL = [SCRIPTS / f"{n}.sh" for n in BENCH_SCRIPTS] + [SCRIPTS / "all.sh", SCRIPTS / "_common.sh"]
ALIASES = {"run_answers": "llava_sft.eval.run_vqa"}  # _common.sh's wrapper around run_vqa


def logical_lines(path: Path) -> list[str]:
    return path.read_text().replace("\\\n", " ").splitlines()


def invocations(path: Path) -> list[tuple[str, str | None, set[str]]]:
    """(module, subcommand, --flags) for each `python -m MODULE ...` or alias line of a script."""
    found = []
    pattern = re.compile(r"(?:python -m ([\w.]+)|^\s*(" + "|".join(ALIASES) + r")\b)(.*)")
    for line in logical_lines(path):
        if line.lstrip().startswith("#") or (m := pattern.search(line)) is None:
            continue
        module = m.group(1) or ALIASES[m.group(2)]
        rest = m.group(3).split()
        # a subcommand follows the module (score/judge); an alias's first word is the benchmark name
        sub = rest[0] if m.group(1) and rest and re.fullmatch(r"[a-z_]+", rest[0]) else None
        found.append((module, sub, set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", m.group(3)))))
    return found


@pytest.mark.parametrize("script", ALL, ids=lambda p: p.name)
def test_script_is_valid_bash(script):
    assert script.is_file()
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_every_python_flag_exists_in_the_module_help():
    calls = [(s.name, *c) for s in ALL for c in invocations(s)]
    modules = {c[1] for c in calls}
    assert {"llava_sft.eval.run_vqa", "llava_sft.eval.score", "llava_sft.eval.judge", "llava_sft.eval.report"} <= modules
    commands = sorted({(module, sub) for _, module, sub, _ in calls}, key=str)

    def help_text(command):
        module, sub = command
        proc = subprocess.run([sys.executable, "-m", module, *([sub] if sub else []), "--help"], cwd=ROOT,
                              capture_output=True, text=True)
        assert proc.returncode == 0, f"{module} {sub}: {proc.stderr}"
        return proc.stdout

    with ThreadPoolExecutor(4) as pool:
        helps = dict(zip(commands, pool.map(help_text, commands), strict=True))
    missing = [(script, module, sub, flag) for script, module, sub, flags in calls for flag in sorted(flags)
               if not re.search(re.escape(flag) + r"\b", helps[(module, sub)])]
    assert not missing, missing


def test_one_score_file_per_report_benchmark():
    keys = set()
    for name in BENCH_SCRIPTS:
        text = (SCRIPTS / f"{name}.sh").read_text().replace("\\\n", " ")
        keys |= set(re.findall(r'--out "\$RESULTS_DIR/(\w+)\.json"', text))
        keys |= set(re.findall(r"\$\(out_json (\w+)", text))
        assert 'source "$(dirname "$0")/_common.sh"' in text
    assert keys == set(PAPER)
    assert "python -m llava_sft.eval.report" in (SCRIPTS / "all.sh").read_text()


# ------------------------------------------------------------------------------- end to end: POPE
@pytest.fixture(scope="module")
def model_dir(llama_tokenizer_dir, tmp_path_factory) -> Path:
    import torch

    from llava_sft.config import from_dict
    from llava_sft.model.llava import LlavaModel, ModelConfig, load_tokenizer
    from tests.tiny import model_dict

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("model") / "tiny-llava"
    tokenizer = load_tokenizer(str(llama_tokenizer_dir))
    cfg = model_dict(llama_tokenizer_dir)
    cfg["llm"]["config"]["vocab_size"] = len(tokenizer)
    LlavaModel(from_dict(ModelConfig, cfg)).save_pretrained(out, tokenizer, {"template": "vicuna_v1"})
    return out


def fake_pope_tree(root: Path) -> list[dict]:
    pope = root / "pope"
    (pope / "val2014").mkdir(parents=True)
    (pope / "coco").mkdir()
    questions, colors = [], ["red", "blue", "green", "yellow", "purple", "white"]
    for k, (split, base) in enumerate([("adversarial", 1), ("popular", 20000001), ("random", 10000001)]):
        labels = []
        for j in range(2):
            i = 2 * k + j
            image = f"COCO_val2014_{i:012d}.jpg"
            Image.new("RGB", (36 + 4 * i, 30), colors[i]).save(pope / "val2014" / image)
            text = f"Is there a {colors[i]} square in the image?"
            questions.append({"question_id": base + j, "image": image, "category": split,
                              "text": text + "\nAnswer the question using a single word or phrase."})
            labels.append({"question_id": j + 1, "image": image, "text": text, "label": "yes" if j == 0 else "no"})
        (pope / "coco" / f"coco_pope_{split}.json").write_text("".join(json.dumps(r) + "\n" for r in labels))
    (pope / "llava_pope_test.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
    return questions


def test_pope_script_end_to_end(model_dir, tmp_path):
    questions = fake_pope_tree(tmp_path / "eval")
    results = tmp_path / "results"
    env = {**os.environ, "LLAVA_EVAL_ROOT": str(tmp_path / "eval"), "EVAL_CHUNKS": "2",
           "RUN_VQA_ARGS": "--max-new-tokens 3 --device cpu --batch-size 3",
           "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")}
    proc = subprocess.run(["bash", str(SCRIPTS / "pope.sh"), str(model_dir), str(results)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    answers = [json.loads(line) for line in (results / "answers" / "pope.jsonl").read_text().splitlines()]
    assert [a["question_id"] for a in answers] == [q["question_id"] for q in questions]  # merged in order
    assert [len((results / "answers" / "pope_chunks" / f"2_{k}.jsonl").read_text().splitlines())
            for k in range(2)] == [3, 3]
    result = json.loads((results / "pope.json").read_text())
    assert result["benchmark"] == "pope" and isinstance(result["headline"], float)
    assert set(result["splits"]) == {"adversarial", "popular", "random"}

    # the default RESULTS_DIR, and a missing benchmark file is a clear error
    proc = subprocess.run(["bash", str(SCRIPTS / "mme.sh"), str(model_dir)], cwd=tmp_path, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 1 and "missing" in proc.stderr and "MME/llava_mme.jsonl" in proc.stderr
    [default] = (tmp_path / "checkpoints" / "eval").iterdir()  # unique per model path: NAME-HASH
    assert default.name.startswith("tiny-llava-") and len(default.name) == len("tiny-llava-") + 8
