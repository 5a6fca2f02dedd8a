"""Two nodes, simulated on this machine: two torchrun launchers (--nnodes 2, one process each) that meet through a
c10d rendezvous on 127.0.0.1, as launchers on two nodes meet at HOST:29500. Their run must take the same steps as
one plain process, as 2 processes of one launcher do (test_sft.py, test_reft.py)."""
import os
import signal
import socket
import subprocess
import time
import uuid

from conftest import PY, ROOT, read_metrics, run


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_nodes(logs, *args, timeout=300):
    """Run `args` (a script and its options) under two launchers of one process each; the first hosts the
    rendezvous store, as the node named in --rdzv_endpoint would. Returns the launchers' output (in `logs`)."""
    endpoint, rdzv_id = f"127.0.0.1:{free_port()}", uuid.uuid4().hex
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    procs = []
    for node, is_host in enumerate((1, 0)):
        with open(logs / f"node{node}.log", "w") as out:
            procs.append(subprocess.Popen(
                [PY, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1", "--rdzv_backend", "c10d",
                 "--rdzv_endpoint", endpoint, "--rdzv_id", rdzv_id, "--rdzv_conf", f"is_host={is_host}",
                 "--local_addr", "127.0.0.1", *map(str, args)],
                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True))
    deadline = time.monotonic() + timeout
    try:
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    texts = [(logs / f"node{node}.log").read_text() for node in (0, 1)]
    for p, text in zip(procs, texts):
        assert p.returncode == 0, f"a launcher exited {p.returncode}\n{text[-5000:]}"
    return "".join(texts)


def test_sft_on_two_nodes_matches_one_process(minigsm, tmp_path):
    common = ["sft.py", "--data", minigsm, "--max_steps", 6, "--batch_size", 16, "--micro_batch_size", 8,
              "--save_epochs", "none", "--seed", 3]
    run([PY, *common, "--output_dir", tmp_path / "one"])
    out = two_nodes(tmp_path, *common, "--output_dir", tmp_path / "two")
    assert "world 2" in out  # one 2-rank run, not two 1-rank runs sharing an output folder
    one, two = read_metrics(tmp_path / "one/metrics.jsonl"), read_metrics(tmp_path / "two/metrics.jsonl")
    assert [m["step"] for m in one] == [m["step"] for m in two] == list(range(1, 7))
    for a, b in zip(one, two):
        assert abs(a["loss"] - b["loss"]) < 1e-4, (a, b)


def test_reft_on_two_nodes_matches_one_process(minigsm, warmup, tmp_path):
    common = ["reft.py", "--model", warmup, "--data", minigsm, "--max_steps", 3, "--batch_size", 16,
              "--max_length", 120, "--eval_every", 0, "--save_steps", 1000, "--seed", 5]
    run([PY, *common, "--micro_batch_size", 4, "--output_dir", tmp_path / "one"])
    two_nodes(tmp_path, *common, "--output_dir", tmp_path / "two")
    one, two = read_metrics(tmp_path / "one/metrics.jsonl"), read_metrics(tmp_path / "two/metrics.jsonl")
    assert len(one) == len(two) == 3
    for a, b in zip(one, two):
        assert a["response_length"] == b["response_length"]  # the same rollouts
        for k in ("score", "kl", "pg_loss", "vf_loss"):
            assert abs(a[k] - b[k]) < 1e-4, (k, a[k], b[k])
