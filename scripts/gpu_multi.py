"""Multi-GPU part of the GPU check: PipeTrainer on CUDA (NCCL, one GPU per rank) against Trainer on one GPU.

    python scripts/gpu_multi.py                 # all visible GPUs, at most 4 ranks (gpu_check.py --multi runs it)
    python scripts/gpu_multi.py --device cpu    # the same check on CPU ranks (gloo)

Runs a small Llama (tied embeddings) for a few AdamW steps with clipping: Trainer on one device, then PipeTrainer on
2..N ranks with 1f1b and interleaved1f1b (and PP=2 × DP=2 with 4 GPUs), and prints the largest differences in
logged loss, grad norm, eval loss and saved weights, with the median step time of each run. (One GPU:
`scripts/gpu_check.py`.)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _model():
    import torch
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=2048, hidden_size=256, intermediate_size=688, num_hidden_layers=8, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config)


def _data(n: int, seed: int):
    import datasets
    import torch

    g = torch.Generator().manual_seed(seed)
    rows = [{"input_ids": torch.randint(1, 2048, (int(torch.randint(32, 129, (1,), generator=g)),), generator=g).tolist()}
            for _ in range(n)]  # fmt: skip
    return datasets.Dataset.from_list(rows)


def worker(out_dir: str, device: str, pipeline: dict | None) -> None:
    """One run; the Trainer reference when `pipeline` is None. Writes logs and the checkpoint to out_dir."""
    import torch
    from tokenizers import Tokenizer, models
    from transformers import (
        DataCollatorForLanguageModeling,
        PreTrainedTokenizerFast,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    from hf_pipe import PipeTrainer, PipeTrainingArguments

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times, self.start = [], 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            if device == "cuda":
                torch.cuda.synchronize()
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if device == "cuda":
                torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self.start)

    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<pad>": 0}, "<pad>")))
    tokenizer.pad_token = "<pad>"
    common = dict(
        output_dir=out_dir, per_device_train_batch_size=16, per_device_eval_batch_size=16, learning_rate=1e-3,
        max_grad_norm=0.5, max_steps=8, logging_steps=1, save_strategy="no", report_to=[], seed=7,
        disable_tqdm=True, use_cpu=device == "cpu",
    )  # fmt: skip
    if pipeline is None:
        args, cls = TrainingArguments(**common), Trainer
    else:
        args, cls = PipeTrainingArguments(**common, **pipeline), PipeTrainer
    timer = StepTimer()
    trainer = cls(
        model=_model(), args=args, train_dataset=_data(256, 0), eval_dataset=_data(32, 1),
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False), callbacks=[timer],
    )  # fmt: skip
    trainer.train()
    metrics = trainer.evaluate()
    trainer.save_model(os.path.join(out_dir, "final"))
    if trainer.is_world_process_zero():
        logs = [e for e in trainer.state.log_history if "loss" in e and "grad_norm" in e]
        with open(os.path.join(out_dir, "result.json"), "w") as f:
            json.dump(
                {"logs": logs, "eval_loss": metrics["eval_loss"], "step_s": statistics.median(timer.times[2:])}, f
            )


def compare(ref_dir: str, run_dir: str) -> dict:
    from transformers import AutoModelForCausalLM

    with open(os.path.join(ref_dir, "result.json")) as f:
        ref = json.load(f)
    with open(os.path.join(run_dir, "result.json")) as f:
        run = json.load(f)
    rel = lambda a, b: abs(a - b) / abs(b)  # noqa: E731
    a = AutoModelForCausalLM.from_pretrained(os.path.join(ref_dir, "final")).state_dict()
    b = AutoModelForCausalLM.from_pretrained(os.path.join(run_dir, "final")).state_dict()
    return {
        "loss": max(rel(x["loss"], y["loss"]) for x, y in zip(run["logs"], ref["logs"])),
        "grad_norm": max(rel(x["grad_norm"], y["grad_norm"]) for x, y in zip(run["logs"], ref["logs"])),
        "eval_loss": rel(run["eval_loss"], ref["eval_loss"]),
        "weights_abs": max((a[k] - b[k]).abs().max().item() for k in a),
        "step_s": run["step_s"],
        "ref_step_s": ref["step_s"],
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--out", default=os.path.join(ROOT, "out", "gpu_check"))
    parser.add_argument("--ranks", type=int, default=0, help="Ranks to use (default: every GPU, at most 4; 2 on CPU).")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--pipeline", default="{}", help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.worker:
        worker(opts.worker, opts.device, json.loads(opts.pipeline) if opts.pipeline != "null" else None)
        return 0

    import torch

    ranks = opts.ranks or (min(torch.cuda.device_count(), 4) if opts.device == "cuda" else 2)
    if opts.device == "cuda" and ranks == 0:
        print("no CUDA device visible")
        return 1
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    me = [sys.executable, os.path.abspath(__file__), "--device", opts.device]
    ref_dir = os.path.join(opts.out, "trainer")
    subprocess.run(
        [os.path.join(os.path.dirname(sys.executable), "torchrun"), "--nproc_per_node", "1", *me[1:],
         "--worker", ref_dir, "--pipeline", "null"], check=True, env=env, cwd=ROOT,
    )  # fmt: skip
    # one GPU: every stage on one rank (NCCL takes one rank per GPU) — the device paths of both frontends
    single = [
        {"pipeline_schedule": "1f1b"},
        {"pipeline_schedule": "interleaved1f1b", "pipeline_microbatches": 4},
        {"pipeline_schedule": "zbvzerobubble", "pipeline_microbatches": 4},
        {"pipeline_schedule": "interleaved1f1b", "pipeline_microbatches": 4, "pipeline_split": "measured"},
        {"pipeline_schedule": "1f1b", "pipeline_frontend": "trace"},
        {"pipeline_schedule": "interleaved1f1b", "pipeline_microbatches": 4, "pipeline_frontend": "trace"},
    ]
    if tuple(int(v) for v in torch.__version__.split(".")[:2]) < (2, 13):
        # torch < 2.13 asks for gradients of the boolean masks traced stages pass on (hf_pipe needs 2.13)
        single = [
            p
            for p in single
            if not (p.get("pipeline_frontend") == "trace" and "interleaved" in p["pipeline_schedule"])
        ]
    runs = [(1, p) for p in single] if ranks == 1 else [
        (2, {"pipeline_schedule": "1f1b", "pipeline_microbatches": 4}),
        (2, {"pipeline_schedule": "interleaved1f1b", "pipeline_microbatches": 4}),
    ]  # fmt: skip
    if ranks >= 4:
        runs += [(4, {"pipeline_schedule": "1f1b", "pipeline_microbatches": 4}),
                 (4, {"pipeline_parallel_size": 2, "pipeline_schedule": "1f1b", "pipeline_microbatches": 4})]  # fmt: skip
    failed = False
    for n, pipeline in runs:
        run_dir = os.path.join(opts.out, f"pp-{n}-" + "-".join(f"{v}" for v in pipeline.values()))
        subprocess.run(
            [os.path.join(os.path.dirname(sys.executable), "torchrun"), "--nproc_per_node", str(n), *me[1:],
             "--worker", run_dir, "--pipeline", json.dumps(pipeline)], check=True, env=env, cwd=ROOT,
        )  # fmt: skip
        result = compare(ref_dir, run_dir)
        ok = max(result["loss"], result["grad_norm"], result["eval_loss"]) < 2e-4 and result["weights_abs"] < 5e-4
        failed |= not ok
        print(
            f"{'OK ' if ok else 'BAD'} {n} ranks {pipeline}: " + ", ".join(f"{k} {v:.3g}" for k, v in result.items())
        )
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
