"""The quickstart pipeline, shortened (a few steps per stage): it completes, writes the table, the plots and
results.json, and a second call skips the finished stages."""
import json

from conftest import PY, run


def test_quickstart_fast_runs_end_to_end_and_skips_finished_stages(tmp_path):
    out = tmp_path / "qs"
    p = run([PY, "scripts/quickstart.py", "--fast", "--out_dir", out], timeout=1500)
    assert "top-1" in p.stdout and "ReFT" in p.stdout
    results = json.loads((out / "results.json").read_text())
    for name in ("SFT", "ReFT"):
        row = results["table"][name]
        assert 0.0 <= row["greedy"] <= 1.0 and row["n"] == 64 and row["k"] == 2
        assert row["pass@k"] >= row["vote"] and row["pass@k"] >= row["rerank"]
    lo, hi = results["reft_minus_sft_top1_ci95"]
    assert lo <= results["reft_minus_sft_top1"] <= hi
    assert "| SFT" in (out / "results.md").read_text()
    for png in ("sft.png", "reft.png", "table.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    again = run([PY, "scripts/quickstart.py", "--fast", "--out_dir", out], timeout=600)
    assert again.stdout.count("skipping") == 7  # data, sft, reft, 2 verifiers, 2 evaluations
