"""One module per benchmark (nanochat's tasks/ are the model): each holds its metric, its answer parsing and its
file I/O, reproducing the LLaVA-1.5 reference protocol quirks included (its docstring says which code, at which
commit), plus `add_parser(sub, add_common)` for `python -m llava_sft.eval.score BENCHMARK`. What they share
(file helpers, the VQA answer normalisation) is llava_sft/eval/common.py; llava_sft/eval/metrics.py re-exports the
public metric functions under their historical names."""

BENCHMARKS = ("pope", "scienceqa", "mme", "llava_bench", "mm_vet", "vqav2", "vizwiz", "textvqa", "gqa", "mmbench",
              "seed")
