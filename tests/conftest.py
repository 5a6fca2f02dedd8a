"""Shared fixtures: a small prepared minigsm folder and a tiny SFT warm-up checkpoint, built once per session."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
PY = sys.executable


def run(args, check=True, timeout=900, env=None, **kw):
    """Run a command from the repo root; on failure show its output in the assertion message."""
    e = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", **(env or {}))
    p = subprocess.run([str(a) for a in args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=e, **kw)
    if check:
        assert p.returncode == 0, f"{args} exited {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}"
    return p


def torchrun(n, script, *args, **kw):
    return run([PY, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", script, *args], **kw)


def read_metrics(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="session")
def minigsm(tmp_path_factory):
    """A prepared minigsm folder (small splits, the easy end: 1-2 steps, numbers up to 9) that every stage takes
    as --data; easy so that the short warm-up below already solves some questions and PPO has a signal."""
    out = tmp_path_factory.mktemp("minigsm")
    run([PY, "data/minigsm/prepare.py", "--out_dir", out, "--n_train", 256, "--n_validation", 64, "--n_test", 64,
         "--min_steps", 1, "--max_steps", 2, "--max_number", 9])
    return out


@pytest.fixture(scope="session")
def warmup(minigsm, tmp_path_factory):
    """A tiny warm-up checkpoint: sft.py on minigsm long enough that some greedy answers are right."""
    out = tmp_path_factory.mktemp("warmup")
    run([PY, "sft.py", "--data", minigsm, "--epochs", 12, "--batch_size", 32, "--micro_batch_size", 32,
         "--output_dir", out, "--save_epochs", "none", "--save_steps", 1000])
    return out / "final"
