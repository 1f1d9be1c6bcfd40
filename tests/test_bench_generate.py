"""The generation benchmark (integration/bench_generate.py) runs end to end on the real 4-bit SmolLM2.

No timing is asserted (the machine is shared); the test checks that the three timed ways ran, generated the same tokens
(the benchmark itself raises otherwise) and produced finite figures in the JSON.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys

import pytest

from .conftest import REPO


@pytest.mark.smollm2
def test_bench_generate_runs_and_reports(tmp_path):
    output = tmp_path / "bench.json"
    completed = subprocess.run(
        [sys.executable, "integration/bench_generate.py", "--new-tokens", "3", "--repeats", "1", "--batch-sizes", "1",
         "2", "--output", str(output)],
        capture_output=True, text=True, timeout=600, cwd=REPO,
        env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_DISABLE_PROGRESS_BARS": "1"},
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    result = json.loads(output.read_text())
    assert [row["batch_size"] for row in result["rows"]] == [1, 2]
    for row in result["rows"]:
        for key in ("base_tokens_per_s", "qst_tokens_per_s", "qst_general_path_tokens_per_s"):
            assert math.isfinite(row[key]) and row[key] > 0
        assert set(row["timings_s"]) == {"base", "qst", "qst_general"}
        # the published figures follow from the medians of the timed runs: tokens/s = generated tokens / median time,
        # the overhead = QST's median time over the base model's, minus one
        median = {name: statistics.median(times) for name, times in row["timings_s"].items()}
        tokens = row["batch_size"] * row["new_tokens"]
        assert row["base_tokens_per_s"] == pytest.approx(tokens / median["base"], abs=0.051)
        assert row["qst_tokens_per_s"] == pytest.approx(tokens / median["qst"], abs=0.051)
        assert row["qst_overhead_percent"] == pytest.approx(100 * (median["qst"] / median["base"] - 1), abs=0.051)
        assert row["qst_general_path_overhead_percent"] == pytest.approx(
            100 * (median["qst_general"] / median["base"] - 1), abs=0.051)
    assert "| batch | base tokens/s | QST tokens/s |" in completed.stdout
