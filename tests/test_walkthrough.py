"""scripts/walkthrough.py prints one PPO step of reft.py's functions with real numbers (docs/walkthrough.md is its
output): every printed quantity is recomputed here from the others, with plain Python loops."""
import re

import pytest

from conftest import PY, ROOT, run

TOL = 1e-4  # the tables print 6 decimals; a GAE recursion over ~40 tokens adds up their rounding


def parse(text):
    """(constants, samples): β, γ, λ, ε from the header; per sample its score and its table as a list of dicts."""
    constants = {name: float(re.search(rf"{sym} = ([0-9.e-]+)", text).group(1))
                 for name, sym in (("beta", "β"), ("gamma", "γ"), ("lam", "λ"), ("eps", "ε"))}
    samples = []
    for part in text.split("\n## ")[1:]:
        score = float(re.search(r"^score: (\S+)", part, re.M).group(1))
        lines = [line for line in part.splitlines() if line.startswith("|")]
        names = [c.strip() for c in lines[0].strip("|").split(" | ")]
        rows = []
        for line in lines[2:]:
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))]
            rows.append({n: (c if n == "token" else float(c)) for n, c in zip(names, cells)})
        samples.append((score, rows))
    return constants, samples


@pytest.fixture(scope="module")
def walkthrough(warmup, minigsm, tmp_path_factory):
    out = tmp_path_factory.mktemp("walkthrough") / "walkthrough.md"
    run([PY, "scripts/walkthrough.py", "--model", warmup, "--data", minigsm, "--out", out])
    return out.read_text()


def test_every_printed_quantity_follows_from_the_others(walkthrough):
    c, samples = parse(walkthrough)
    assert len(samples) == 4
    valid = [r for _, rows in samples for r in rows if r["mask"] == 1]
    mean = sum(r["A"] for r in valid) / len(valid)
    std = (sum((r["A"] - mean) ** 2 for r in valid) / len(valid) + 1e-8) ** 0.5
    for score, rows in samples:
        n = sum(r["mask"] for r in rows)
        assert n >= 1 and all(r["mask"] == 1 for r in rows[:int(n)]) and all(r["mask"] == 0 for r in rows[int(n):])
        next_value, next_adv = 0.0, 0.0
        for t in reversed(range(int(n))):
            r = rows[t]
            assert r["kl"] == pytest.approx(r["logp_old"] - r["logp_ref"], abs=TOL)
            expected_reward = -c["beta"] * r["kl"] + (score if t == n - 1 else 0.0)
            assert r["r"] == pytest.approx(expected_reward, abs=TOL)
            assert r["delta"] == pytest.approx(r["r"] + c["gamma"] * next_value - r["V"], abs=TOL)
            next_adv = r["delta"] + c["gamma"] * c["lam"] * next_adv
            assert r["A"] == pytest.approx(next_adv, abs=TOL)
            assert r["R"] == pytest.approx(r["A"] + r["V"], abs=TOL)
            assert r["A_white"] == pytest.approx((r["A"] - mean) / std, abs=TOL)
            clipped = min(max(r["ratio"], 1 - c["eps"]), 1 + c["eps"])
            assert r["loss_pg"] == pytest.approx(max(-r["A_white"] * r["ratio"], -r["A_white"] * clipped), abs=TOL)
            next_value, next_adv = r["V"], r["A"]
        for r in rows[int(n):]:  # padding after EOS: no reward, no advantage, no return
            assert (r["r"], r["A"], r["R"], r["A_white"]) == (0.0, 0.0, 0.0, 0.0)
    assert any(r["ratio"] != 1.0 for r in valid)  # the optimizer step moved the policy


def test_the_committed_walkthrough_is_the_scripts_output():
    """docs/walkthrough.md holds the same sections and columns the script prints, and its numbers are consistent."""
    text = (ROOT / "docs" / "walkthrough.md").read_text()
    assert text.startswith("# One PPO step of ReFT, with real numbers")
    test_every_printed_quantity_follows_from_the_others(text)
