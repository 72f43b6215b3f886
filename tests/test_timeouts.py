"""A rank that stops without dying, or fails to write its part of a checkpoint: every live rank exits non-zero soon
after, each with one error naming the operation, the peer and the step; no checkpoint becomes visible; the previous
one resumes exactly."""

from __future__ import annotations

import multiprocessing as mp
import os
import re
import sys
import time

import pytest

from tests._dist import free_port
from tests.test_reliability import _final_weights

TIMEOUT_S = 3
# ddp_timeout, plus the slack the issue grants
EXIT_LIMIT_S = TIMEOUT_S + 60


def _rank_main(rank: int, world: int, port: int, log: str, args: tuple) -> None:
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    # pytest's capture replaced sys.stdout / sys.stderr with its own files, which a forked rank inherits
    sys.stdout, sys.stderr = open(1, "w", buffering=1, closefd=False), open(2, "w", buffering=1, closefd=False)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")  # fmt: skip
    import torch

    from tests.scripts import tiny_train

    torch.set_num_threads(1)
    sys.argv = ["tiny_train.py", *args]
    tiny_train.main()


def _ranks(output_dir, *args: str, world: int = 2, limit: float = 150) -> tuple[list[int | None], list[str], list]:
    """tiny_train.py on `world` ranks, one process each as torchrun starts them, but forked from this process (no
    interpreter start-up, no agent stopping the others): each rank's exit status (None: stopped, killed here), its
    output, the time it exited."""
    ctx = mp.get_context("fork")
    port = free_port()
    logs = [os.path.join(output_dir, f"rank{rank}.log") for rank in range(world)]
    procs = [
        ctx.Process(target=_rank_main, args=(r, world, port, logs[r], (str(output_dir), *args))) for r in range(world)
    ]
    for p in procs:
        p.start()
    ended: list[float | None] = [None] * world
    deadline = time.time() + limit
    while time.time() < deadline and any(p.exitcode is None and not _stopped(p.pid) for p in procs):
        for r, p in enumerate(procs):
            if ended[r] is None and p.exitcode is not None:
                ended[r] = time.time()
        time.sleep(0.05)
    for r, p in enumerate(procs):
        if ended[r] is None and p.exitcode is not None:
            ended[r] = time.time()
    codes = [p.exitcode for p in procs]
    for p in procs:
        if p.exitcode is None:
            p.kill()  # the stopped rank, or a hang past the limit
        p.join()
    texts = []
    for log in logs:
        with open(log) as f:
            texts.append(f.read())
    return codes, texts, ended


def _stopped(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "T"
    except OSError:
        return False


def _failed_at(output_dir) -> float:
    with open(os.path.join(output_dir, "failed_at")) as f:
        return float(f.read())


def _error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("hf_pipe: rank") or "PipelineTimeoutError:" in line
            or "PipelineSaveError:" in line]  # fmt: skip


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "model, fail, operation",
    [
        ("llama", "stop_in_step", "the pipeline step"),  # untied
        # tied: wte and lm_head on both ranks, whose gradients meet in a group of their own
        ("gpt2", "stop_before_tied", "the tied-weight gradient all-reduce"),
        ("gpt2", "stop_in_save", "checkpoint-4"),
    ],
)
def test_a_stopped_rank_ends_the_job_with_one_clear_error(tmp_path, model, fail, operation):
    args = ["--fail", fail, "--fail_rank", "1", "--fail_step", "4", "--ddp_timeout", str(TIMEOUT_S), "--model", model]
    codes, texts, ended = _ranks(tmp_path, *args)
    stopped_at = _failed_at(tmp_path)
    assert codes[1] is None, texts[1][-2000:]  # rank 1 was stopped, never died
    assert codes[0] not in (None, 0), texts[0][-3000:]
    seconds = ended[0] - stopped_at
    errors = _error_lines(texts[0])
    print(f"{model} {fail}: rank 0 exited with status {codes[0]} {seconds:.1f}s after rank 1 stopped:\n{errors[0]}")
    assert seconds < EXIT_LIMIT_S
    assert len({e.split("Error: ", 1)[-1] for e in errors}) == 1, errors
    message = errors[0]
    assert operation in message and "at step 4" in message and f"ddp_timeout (now {TIMEOUT_S} s)" in message
    assert re.search(r"\branks? [0-9, -]*\b1\b", message)  # the peer it waited for (one of the ranks at a barrier)
    assert not (tmp_path / "checkpoint-4").exists() and (tmp_path / "checkpoint-2").is_dir()


@pytest.mark.timeout(120)
def test_a_rank_that_cannot_write_its_part_fails_the_save_everywhere(tmp_path):
    full, run = tmp_path / "full", tmp_path / "run"
    os.makedirs(run)
    os.makedirs(full)
    assert _ranks(full, "--model", "llama")[0] == [0, 0]
    args = [
        "--fail",
        "enospc_in_save",
        "--fail_rank",
        "1",
        "--fail_step",
        "4",
        "--ddp_timeout",
        "60",
        "--model",
        "llama",
    ]
    codes, texts, ended = _ranks(run, *args)
    failed_at = _failed_at(run)
    for rank in (0, 1):
        assert codes[rank] not in (None, 0), texts[rank][-3000:]
        seconds = ended[rank] - failed_at
        errors = _error_lines(texts[rank])
        print(f"rank {rank} exited with status {codes[rank]} {seconds:.1f}s after rank 1's write failed: {errors[-1]}")
        assert seconds < 10, texts[rank][-3000:]
        assert "rank 1 could not write its part of checkpoint-4 at step 4" in texts[rank]
        assert "No space left on device" in texts[rank]
    assert sorted(p for p in os.listdir(run) if p.startswith("checkpoint")) == ["checkpoint-2"]
    codes, texts, _ = _ranks(run, "--resume", "--model", "llama")
    assert codes == [0, 0], texts[0][-3000:]
    a, b = _final_weights(full / "final"), _final_weights(run / "final")
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    print(f"failed save at step 4, resumed from checkpoint-2: worst final-weight difference {worst}")
    assert worst == 0.0


@pytest.mark.timeout(60)
@pytest.mark.parametrize("model, fail", [("llama", "kill_in_generation"), ("t5", "stop_in_generation")])
def test_a_rank_lost_mid_generation_ends_the_others_with_one_clear_error(tmp_path, model, fail):
    """Generation through the pipeline (3 groups in flight): rank 1 killed, or stopped, after its 5th group step;
    rank 0, waiting on it for hidden states or a decision, ends with one error naming the generation and the peer:
    at once when the peer is gone (PipelineTimeoutError), within ddp_timeout when it is stopped."""
    args = ["--generate", "--fail", fail, "--fail_rank", "1", "--fail_step", "5", "--ddp_timeout", str(TIMEOUT_S),
            "--model", model]  # fmt: skip
    codes, texts, ended = _ranks(tmp_path, *args)
    lost_at = _failed_at(tmp_path)
    assert codes[1] == (-9 if fail.startswith("kill") else None), texts[1][-2000:]
    assert codes[0] not in (None, 0), texts[0][-3000:]
    seconds = ended[0] - lost_at
    errors = _error_lines(texts[0])
    print(f"{model} {fail}: rank 0 exited with status {codes[0]} {seconds:.1f}s after rank 1 was lost:\n{errors[0]}")
    assert seconds < TIMEOUT_S + 10, texts[0][-3000:]
    assert len({e.split("Error: ", 1)[-1] for e in errors}) == 1, errors
    assert "generation through the stages" in errors[0] and "rank 1" in errors[0], errors
    assert ("lost a peer" if fail.startswith("kill") else "timed out") in errors[0], errors
    assert not any(line.startswith("sequences:") for line in texts[0].splitlines())  # no rank finished
