"""MoE under the pipeline: module-split against traced stages, side by side, on one Qwen3-MoE with its aux loss on.

    python benchmarks/moe.py            # a few minutes on 2 cores
    python benchmarks/moe.py --smoke    # a tiny model, checks the harness only

Prints the split `hf-pipe plan` makes (per stage: parameters, every expert counted; FLOPs per token, the top-k
experts a token runs), then, each in fresh processes, one thread per rank: Trainer on one process accumulating over
the pipeline's microbatches (the reference of the aux-loss semantics), and PipeTrainer on 2 ranks with 1F1B, once
with module-split stages (router statistics: 2·experts + 1 floats sent per microbatch) and once with traced stages
(every layer's router logits threaded to the last stage). For each: the median step time after warm-up, tokens per
second, the last step's loss and logged `aux_loss`, and each rank's peak anonymous resident memory.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks._common import rss_anon_mib, run_ranks  # noqa: E402

FULL = dict(layers=8, hidden=256, experts=8, top_k=2, expert_inner=256, vocab=2048, seq=128, batch=8,
            microbatches=4, steps=10, warmup=3)  # fmt: skip
SMOKE = dict(layers=4, hidden=32, experts=4, top_k=2, expert_inner=32, vocab=128, seq=16, batch=8, microbatches=4,
             steps=4, warmup=1)  # fmt: skip
RUNS = {
    "trainer": "Trainer, 1 process (accumulating 4 microbatches)",
    "module": "PipeTrainer 1f1b x2, module split",
    "trace": "PipeTrainer 1f1b x2, traced stages",
}


def _config(cfg: dict):
    import transformers

    return transformers.Qwen3MoeConfig(
        vocab_size=cfg["vocab"], hidden_size=cfg["hidden"], intermediate_size=4 * cfg["hidden"],
        moe_intermediate_size=cfg["expert_inner"], num_hidden_layers=cfg["layers"], num_attention_heads=4,
        num_key_value_heads=2, head_dim=cfg["hidden"] // 4, num_experts=cfg["experts"],
        num_experts_per_tok=cfg["top_k"], max_position_embeddings=cfg["seq"], output_router_logits=True,
        router_aux_loss_coef=0.01, tie_word_embeddings=False,
    )  # fmt: skip


def _worker(cfg: dict, run: str, out: str) -> None:
    import datasets
    import torch
    import transformers
    from transformers import Trainer, TrainerCallback, TrainingArguments

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = transformers.Qwen3MoeForCausalLM(_config(cfg))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, cfg["vocab"], (cfg["batch"] * cfg["steps"], cfg["seq"]), generator=g)
    data = datasets.Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    settings = dict(
        output_dir=os.path.join(os.path.dirname(out), run), max_steps=cfg["steps"], learning_rate=1e-4,
        logging_steps=1, save_strategy="no", report_to=[], seed=0, use_cpu=True, disable_tqdm=True,
    )  # fmt: skip
    if run == "trainer":
        args = TrainingArguments(
            **settings, per_device_train_batch_size=cfg["batch"] // cfg["microbatches"],
            gradient_accumulation_steps=cfg["microbatches"],
        )  # fmt: skip
        cls = Trainer
    else:
        from hf_pipe import PipeTrainer, PipeTrainingArguments

        args = PipeTrainingArguments(
            **settings, per_device_train_batch_size=cfg["batch"], pipeline_schedule="1f1b",
            pipeline_microbatches=cfg["microbatches"], pipeline_frontend=run, pipeline_cpu_affinity=True,
        )  # fmt: skip
        cls = PipeTrainer

    class Clock(TrainerCallback):
        def __init__(self):
            self.steps, self.peak = [], 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.steps.append(time.perf_counter() - self.start)
            self.peak = max(self.peak, rss_anon_mib())

    clock = Clock()
    trainer = cls(model=model, args=args, train_dataset=data, callbacks=[clock])
    trainer.train()
    logs = [e for e in trainer.state.log_history if "loss" in e]
    steps = clock.steps[cfg["warmup"] :]
    result = {
        "step_s": statistics.median(steps),
        "tokens_per_s": cfg["batch"] * cfg["seq"] / statistics.median(steps),
        "loss": logs[-1]["loss"],
        "aux_loss": logs[-1].get("aux_loss"),
        "peak_rss_anon_mib": clock.peak,
    }
    with open(f"{out}.{int(os.environ.get('RANK', 0))}", "w") as f:
        json.dump(result, f)


def _launch(root: str, run: str, smoke: bool) -> list[dict]:
    out = os.path.join(root, run)
    args = ["--worker", run, "--result", out] + (["--smoke"] if smoke else [])
    return run_ranks(__file__, args, out, 1 if run == "trainer" else 2)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--worker")
    parser.add_argument("--result")
    args = parser.parse_args()
    cfg = SMOKE if args.smoke else FULL
    if args.worker:
        _worker(cfg, args.worker, args.result)
        return
    from hf_pipe.split import plan_split

    print(
        f"Qwen3-MoE: {cfg['layers']} layers, hidden {cfg['hidden']}, {cfg['experts']} experts (top-{cfg['top_k']}, "
        f"{cfg['expert_inner']} wide), vocab {cfg['vocab']}; batch {cfg['batch']} x {cfg['seq']} tokens in "
        f"{cfg['microbatches']} microbatches, aux loss on; median of steps {cfg['warmup'] + 1}-{cfg['steps']}"
    )
    print(plan_split(_config(cfg), 2, seq_len=cfg["seq"]))
    print(f"{'run':<52} {'step s':>7} {'tok/s':>7} {'loss':>8} {'aux_loss':>9}  peak RssAnon MiB per rank")
    with tempfile.TemporaryDirectory() as root:
        for run, name in RUNS.items():
            results = _launch(root, run, args.smoke)
            last = results[-1]
            aux = f"{last['aux_loss']:.4f}" if last["aux_loss"] is not None else "-"
            peaks = ", ".join(f"{r['peak_rss_anon_mib']:.0f}" for r in results)
            print(
                f"{name:<52} {last['step_s']:>7.3f} {last['tokens_per_s']:>7.0f} {last['loss']:>8.4f} {aux:>9}  {peaks}"
            )


if __name__ == "__main__":
    main()
