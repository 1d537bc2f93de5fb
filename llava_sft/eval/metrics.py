"""The benchmark metrics under their historical names: each lives in its benchmark's module
(llava_sft/eval/tasks/<benchmark>.py, with its answer parsing, file I/O and the reference it reproduces);
the VQA answer normalisation shared by VQAv2, VizWiz and TextVQA is in llava_sft/eval/common.py."""
from __future__ import annotations

from llava_sft.eval.common import (  # noqa: F401
    vqa_accuracy,
    vqa_annotations,
    vqa_eval_gt_answers,
    vqa_eval_result_answer,
    vqa_normalize_answer,
    vqa_result,
    vqa_scores,
    vqa_table,
)
from llava_sft.eval.tasks.gqa import (  # noqa: F401
    gqa_correct,
    gqa_prediction,
    gqa_predictions,
    gqa_scores,
)
from llava_sft.eval.tasks.llava_bench import (  # noqa: F401
    llava_bench_mean_over_runs,
    llava_bench_parse_score,
    llava_bench_summary,
    review_run_name,
)
from llava_sft.eval.tasks.mm_vet import (  # noqa: F401
    mm_vet_results_from_answers,
    mm_vet_scores,
)
from llava_sft.eval.tasks.mmbench import (  # noqa: F401
    CIRCULAR_STRIDE,
    LETTERS,
    MMBENCH_DROP_COLUMNS,
    mmbench_circular,
    mmbench_options,
    mmbench_parse,
    mmbench_submission,
    mmbench_variants,
)
from llava_sft.eval.tasks.mme import (  # noqa: F401
    MME_INSTRUCTION,
    MME_SUFFIX,
    MME_TASKS,
    mme_ground_truth,
    mme_parse,
    mme_question_key,
    mme_rows_from_answers,
    mme_rows_from_eval_tool,
    mme_scores,
    mme_task_score,
)
from llava_sft.eval.tasks.pope import (  # noqa: F401
    pope_label_files,
    pope_metrics,
    pope_parse,
    pope_scores,
)
from llava_sft.eval.tasks.scienceqa import (  # noqa: F401
    SQA_OPTIONS,
    scienceqa_parse,
    scienceqa_parse_letter,
    scienceqa_scores,
)
from llava_sft.eval.tasks.seed import (  # noqa: F401
    seed_scores,
    seed_submission,
)
from llava_sft.eval.tasks.textvqa import (  # noqa: F401
    TextVQAAnswerCountError,
    textvqa_accuracy,
    textvqa_prompt_question,
)
from llava_sft.eval.tasks.vizwiz import (  # noqa: F401
    vizwiz_submission,
)
from llava_sft.eval.tasks.vqav2 import (  # noqa: F401
    vqav2_submission,
)
