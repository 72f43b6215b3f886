"""Resume on another layout, and across Trainer and PipeTrainer: the optimizer state is saved by parameter name, so a
checkpoint continues to the weights of the uninterrupted run whatever pipeline size, split or schedule resumes it —
plain Trainer's checkpoints included, and PipeTrainer's under plain Trainer. No optimizer state is an error."""

from __future__ import annotations

import os
import shutil

import torch

from tests._data import PadCollator, lm_dataset
from tests._dist import run_distributed
from tests._models import tiny_model
from tests.test_trainer_equivalence import _common_args

# Cross-layout runs reorder fp32 sums (microbatches, tied-gradient all-reduce); AdamW amplifies that a little.
LAYOUT_TOL = 1e-6


def _run(output_dir: str, pipeline: dict | None, resume: str | None = None, save: bool = True) -> dict:
    """6 AdamW steps of the tiny untied Llama (checkpoint every 2 steps); `pipeline` None: plain Trainer."""
    from transformers import Trainer, TrainingArguments

    from hf_pipe import PipeTrainer, PipeTrainingArguments

    common = _common_args(output_dir, save_strategy="steps" if save else "no", save_steps=2)
    common.update({k: pipeline.pop(k) for k in ["per_device_train_batch_size"] if pipeline and k in pipeline})
    if pipeline is None:
        args, cls = TrainingArguments(**common), Trainer
    else:
        args, cls = PipeTrainingArguments(**common, **pipeline), PipeTrainer
    trainer = cls(
        model=tiny_model("llama"),
        args=args,
        train_dataset=lm_dataset(48, seed=0),
        data_collator=PadCollator("causal_lm"),
    )
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(os.path.join(output_dir, "final"))
    return {"losses": [e["loss"] for e in trainer.state.log_history if "loss" in e and "train_loss" not in e]}


def _resume_errors(checkpoint: str) -> str:
    """The error a resume from `checkpoint` (no optimizer state) raises on every rank."""
    from hf_pipe import PipelineConfigError

    try:
        _run(checkpoint + "-out", {"pipeline_schedule": "1f1b"}, resume=checkpoint, save=False)
    except PipelineConfigError as error:
        return str(error)
    return "no error"


def _weights(path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).state_dict()


def _diff(a, b) -> float:
    a, b = _weights(a), _weights(b)
    return max((a[k] - b[k]).abs().max().item() for k in a)


def _copy(src, dst) -> str:
    shutil.copytree(src, dst)
    return str(dst)


def test_trainer_checkpoint_resumes_under_pipetrainer_and_back(tmp_path):
    from hf_pipe.optimizer_state import write_trainer_optimizer

    trainer_run = tmp_path / "trainer"
    (ref,) = run_distributed(_run, 1, str(trainer_run), None, launcher_env=True)
    # Trainer's checkpoint-2 (optimizer.pt, scheduler.pt, one model.safetensors) resumed on 2 pipeline ranks
    start = _copy(trainer_run / "checkpoint-2", tmp_path / "from-trainer")
    pipe = run_distributed(_run, 2, str(tmp_path / "pipe"), {"pipeline_schedule": "1f1b"}, start, launcher_env=True)[0]
    trainer_to_pipe = _diff(trainer_run / "final", tmp_path / "pipe" / "final")
    losses = max(abs(a - b) / abs(b) for a, b in zip(pipe["losses"][2:], ref["losses"][2:]))
    # the PipeTrainer run's own checkpoint-4, converted once, resumed under plain Trainer
    back = _copy(tmp_path / "pipe" / "checkpoint-4", tmp_path / "from-pipe")
    write_trainer_optimizer(back)
    run_distributed(_run, 1, str(tmp_path / "back"), None, back, launcher_env=True)
    pipe_to_trainer = _diff(trainer_run / "final", tmp_path / "back" / "final")
    moved = _diff(trainer_run / "checkpoint-2", trainer_run / "final")
    print(
        f"Trainer -> PipeTrainer (2 ranks): final weights {trainer_to_pipe:.2e} from uninterrupted Trainer, losses "
        f"{losses:.1e} relative; PipeTrainer -> Trainer: {pipe_to_trainer:.2e}; the run moved them {moved:.2e}"
    )
    assert losses < 1e-5 and trainer_to_pipe < LAYOUT_TOL and pipe_to_trainer < LAYOUT_TOL and moved > 1e-2


def _layouts(root: str) -> dict:
    """On 4 ranks: resume the 2-rank run's checkpoint-2 on 4 stages and on 2 ranks × 2 stages (interleaved), from the
    layout-free state; the same layout from old per-rank files; no optimizer state (an error on every rank)."""
    import torch.distributed as dist

    out = {}
    checkpoint = os.path.join(root, "pp2", "checkpoint-2")
    _run(os.path.join(root, "pp4"), {"pipeline_schedule": "1f1b", "pipeline_split": "0,1,2,3"}, checkpoint, False)
    # PP=2 × DP=2, stages sharded by FSDP2: the same 8 rows a step, 4 per replica; it also saves (gathering shards)
    fsdp = {"pipeline_parallel_size": 2, "pipeline_data_parallel": "fsdp", "per_device_train_batch_size": 4}
    _run(os.path.join(root, "fsdp"), fsdp, checkpoint)
    bare = os.path.join(root, "bare")
    if dist.get_rank() == 0:
        shutil.copytree(checkpoint, bare)
        for name in os.listdir(bare):
            if name.startswith("optimizer"):
                os.remove(os.path.join(bare, name))
    dist.barrier()
    out["error"] = _resume_errors(bare)
    return out


def test_resume_on_other_layouts_reaches_the_uninterrupted_weights(tmp_path):
    run_distributed(_run, 2, str(tmp_path / "pp2"), {"pipeline_schedule": "1f1b"}, launcher_env=True)
    (out, *_) = run_distributed(_layouts, 4, str(tmp_path), launcher_env=True)
    run_distributed(_two_ranks, 2, str(tmp_path), launcher_env=True)
    final = tmp_path / "pp2" / "final"
    four, fsdp, other, old = (_diff(final, tmp_path / n / "final") for n in ("pp4", "fsdp", "inter", "from-old"))
    print(
        f"2-rank 1F1B checkpoint-2 resumed: on 4 ranks {four:.2e} from the uninterrupted run's final weights, on "
        f"PP=2 x DP=2 FSDP2 {fsdp:.2e}, on 2 ranks x 2 stages (interleaved 1F1B) {other:.2e}, from the old per-rank "
        f"files {old:.2e}"
    )
    assert four < LAYOUT_TOL and fsdp < LAYOUT_TOL and other < LAYOUT_TOL and old == 0.0
    assert "holds no optimizer state" in out["error"] and "fresh AdamW moments" in out["error"], out["error"]


def _two_ranks(root: str) -> None:
    checkpoint = os.path.join(root, "pp2", "checkpoint-2")
    interleaved = {"pipeline_schedule": "interleaved1f1b", "pipeline_microbatches": 4}
    _run(os.path.join(root, "inter"), interleaved, checkpoint, False)
    _old_files(root)


def _old_files(root: str) -> None:
    """Rewrite checkpoint-2's optimizer state as the per-rank files hf_pipe wrote before (same layout), resume."""
    import torch.distributed as dist

    from hf_pipe import PipeTrainer, PipeTrainingArguments

    checkpoint = os.path.join(root, "pp2", "checkpoint-2")
    old = os.path.join(root, "old")
    args = PipeTrainingArguments(**_common_args(os.path.join(root, "probe")), pipeline_schedule="1f1b")
    trainer = PipeTrainer(
        model=tiny_model("llama"),
        args=args,
        train_dataset=lm_dataset(48, seed=0),
        data_collator=PadCollator("causal_lm"),
    )
    trainer.create_optimizer_and_scheduler(num_training_steps=6)
    trainer._load_optimizer_and_scheduler(checkpoint)
    if dist.get_rank() == 0:
        shutil.copytree(checkpoint, old)
        for name in os.listdir(old):
            if name.startswith("optimizer"):
                os.remove(os.path.join(old, name))
    dist.barrier()
    torch.save(trainer.optimizer.state_dict(), os.path.join(old, f"optimizer-pp{dist.get_rank():05d}.pt"))
    dist.barrier()
    _run(os.path.join(root, "from-old"), {"pipeline_schedule": "1f1b"}, old, False)
