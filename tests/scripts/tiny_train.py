"""A tiny PipeTrainer run for the launcher tests, with optional fault injection (test code, not library code).

torchrun --nproc_per_node 2 tests/scripts/tiny_train.py OUTPUT_DIR [--fail raise|kill|stop|stop_in_step|stop_before_tied|kill_in_save|stop_in_save|enospc_in_save|...]
    [--fail_rank R] [--fail_step S] [--resume] [--ddp_timeout SECONDS] [--model gpt2|llama|t5] [--generate]
    [--fail kill_in_generation|stop_in_generation]
"""

from __future__ import annotations

import argparse
import errno
import os
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from transformers import TrainerCallback  # noqa: E402

from hf_pipe import PipeTrainer, PipeTrainingArguments  # noqa: E402
from tests._data import PadCollator, lm_dataset  # noqa: E402
from tests._models import tiny_model  # noqa: E402


def _mark(output_dir: str) -> None:
    with open(os.path.join(output_dir, "failed_at"), "w") as f:
        f.write(str(time.time()))


def _mark_and_fail(output_dir: str, how: str) -> None:
    _mark(output_dir)
    if how == "raise":
        raise RuntimeError(f"injected failure on rank {os.environ['RANK']}")
    os.kill(os.getpid(), signal.SIGSTOP if how == "stop" else signal.SIGKILL)


class FailAt(TrainerCallback):
    def __init__(self, output_dir: str, how: str, rank: int, step: int):
        self.output_dir, self.how, self.rank, self.step = output_dir, how, rank, step

    def on_step_end(self, args, state, control, **kwargs):
        if (
            self.how in ("raise", "kill", "stop")
            and state.global_step == self.step
            and args.process_index == self.rank
        ):
            _mark_and_fail(self.output_dir, self.how)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("output_dir")
    parser.add_argument(
        "--fail",
        choices=[
            "raise",
            "kill",
            "stop",
            "stop_in_step",
            "stop_before_tied",
            "kill_in_save",
            "stop_in_save",
            "enospc_in_save",
            "kill_in_generation",
            "stop_in_generation",
        ],
    )
    parser.add_argument("--fail_rank", type=int, default=1)
    parser.add_argument("--fail_step", type=int, default=3)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--ddp_timeout", type=int, default=60)
    parser.add_argument("--model", default="gpt2", help="a tests._models name: gpt2 (tied), llama (untied), t5")
    parser.add_argument("--generate", action="store_true", help="generate through the pipeline instead of training")
    opts = parser.parse_args()
    args = PipeTrainingArguments(
        output_dir=opts.output_dir,
        per_device_train_batch_size=8,
        learning_rate=1e-2,
        max_grad_norm=0.5,
        num_train_epochs=1,
        logging_steps=1,
        save_strategy="steps",
        save_steps=2,
        report_to=[],
        seed=7,
        disable_tqdm=True,
        pipeline_schedule="1f1b",
        pipeline_microbatches=4,
        ddp_timeout=opts.ddp_timeout,
    )
    failing = opts.fail and int(os.environ["RANK"]) == opts.fail_rank
    if failing and opts.fail.endswith("_in_save"):
        # kill: die after writing this rank's optimizer state into the checkpoint being saved at fail_step;
        # stop: stop there without dying; enospc: fail to write it, as on a full disk
        original = PipeTrainer._save_optimizer_and_scheduler

        def failing_save(self, output_dir):
            if self.state.global_step == opts.fail_step and opts.fail == "enospc_in_save":
                _mark(opts.output_dir)
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), output_dir)
            original(self, output_dir)
            if self.state.global_step == opts.fail_step:
                _mark_and_fail(opts.output_dir, opts.fail.split("_")[0])

        PipeTrainer._save_optimizer_and_scheduler = failing_save
    if failing and opts.fail == "stop_in_step":  # stopped in the middle of a pipeline step, before its stage runs
        original_step = PipeTrainer.training_step

        def stopping_step(self, *args, **kwargs):
            if self.state.global_step + 1 == opts.fail_step:
                _mark_and_fail(opts.output_dir, "stop")
            return original_step(self, *args, **kwargs)

        PipeTrainer.training_step = stopping_step
    if failing and opts.fail == "stop_before_tied":  # stopped after its backward, before the tied-weight all-reduce
        from hf_pipe.engine import PipelineEngine

        original_reduce, calls = PipelineEngine.reduce_tied_gradients, []

        def stopping_reduce(self):
            calls.append(1)
            if len(calls) == opts.fail_step:
                _mark_and_fail(opts.output_dir, "stop")
            return original_reduce(self)

        PipelineEngine.reduce_tied_gradients = stopping_reduce
    if failing and opts.fail.endswith("_in_generation"):  # killed or stopped after its stages ran a group's step
        from hf_pipe.generation import pipeline

        original_progress, runs = pipeline.progress, []

        def failing_progress():
            runs.append(1)
            if len(runs) == opts.fail_step:
                _mark_and_fail(opts.output_dir, opts.fail.split("_")[0])
            original_progress()

        pipeline.progress = failing_progress
    callbacks = [FailAt(opts.output_dir, opts.fail, opts.fail_rank, opts.fail_step)] if opts.fail else None
    trainer = PipeTrainer(
        model=tiny_model(opts.model),
        args=args,
        train_dataset=lm_dataset(48, seed=0),
        data_collator=PadCollator("seq2seq_lm" if opts.model == "t5" else "causal_lm"),
        callbacks=callbacks,
    )
    if opts.generate:  # 6 rows, 3 groups in flight, 16 new tokens each
        from hf_pipe.generation import PipelineGenerator

        generator = PipelineGenerator(trainer.engine, trainer.model, groups=3)
        batch = PadCollator("causal_lm")(lm_dataset(6, seed=1))
        kwargs = dict(max_new_tokens=16, min_new_tokens=16, pad_token_id=0)
        print("sequences:", generator.generate(batch["input_ids"], attention_mask=batch["attention_mask"], **kwargs))
        return
    trainer.train(resume_from_checkpoint=True if opts.resume else None)
    trainer.save_model(os.path.join(opts.output_dir, "final"))


if __name__ == "__main__":
    main()
