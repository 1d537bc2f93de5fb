"""The paper-table report: our headline numbers beside the LLaVA-1.5 rows, deltas, missing as a dash."""
from __future__ import annotations

import json

import pytest

from llava_sft.eval.report import main


def test_table_has_every_paper_row_with_deltas_and_dashes(tmp_path):
    results = tmp_path / "my-model"
    results.mkdir()
    (results / "pope.json").write_text(json.dumps({"headline": 86.4, "splits": {}}))
    (results / "mme.json").write_text(json.dumps({"headline": 1500.2}))
    main([str(results)])
    table = (results / "paper_table.md").read_text().splitlines()
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in table[2:]}
    assert list(rows) == ["VQAv2", "GQA", "VizWiz", "SciQA-IMG", "TextVQA", "POPE", "MME", "MMBench",
                          "MMBench-CN", "SEED", "LLaVA-W", "MM-Vet"]
    assert rows["POPE"] == ["86.4", "85.9", "+0.5", "85.9", "+0.5"]
    assert rows["MME"] == ["1500.2", "1510.7", "-10.5", "1531.3", "-31.1"]
    assert rows["GQA"] == ["—", "62.0", "—", "63.3", "—"]
    assert rows["MM-Vet"][1:4:2] == ["31.1", "36.1"] and rows["SciQA-IMG"][1] == "66.8"
    assert "my-model" in table[0]


def test_a_score_file_without_headline_is_an_error(tmp_path):
    (tmp_path / "gqa.json").write_text(json.dumps({"accuracy": 0.6}))
    with pytest.raises(ValueError, match="headline"):
        main([str(tmp_path)])
