"""GRPO step time, split into generation, old / reference log-probs and training: PipeGRPOTrainer on 2 ranks against
trl.GRPOTrainer on one process, same model, prompts and seed (so the same completions).

    python benchmarks/grpo.py            # several minutes on 2 cores
    python benchmarks/grpo.py --smoke    # a tiny model, checks the harness only

Each run trains with a reference (beta > 0: a frozen second set of stages read from the checkpoint, a second whole
model for GRPOTrainer) and `num_iterations=2` (so the old policy's log-probs are computed too, by a forward-only pass),
generating every other step. Printed per trainer: the mean step time after warm-up and its parts — generation (TRL's
`_generate_single_turn`: sampling the completions, through the pipeline for PipeGRPOTrainer), log-probs (the rest of
`_generate_and_score_completions`: old-policy and reference forward passes, and the rule-based reward) and training
(the rest of the step: the policy's forward and backward, optimizer) — and each rank's peak anonymous resident memory.
One thread per rank, one thread for the single process.
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

from benchmarks._common import rss_anon_mib, run_ranks, save_llama  # noqa: E402

FULL = dict(layers=8, hidden=256, inner=688, vocab=2048, words=32, rows=8, completion=32, microbatches=4, steps=6,
            warmup=2)  # fmt: skip
SMOKE = dict(layers=4, hidden=64, inner=128, vocab=256, words=8, rows=8, completion=8, microbatches=2, steps=3,
             warmup=1)  # fmt: skip


def _dataset(cfg: dict):
    import datasets
    import torch

    g = torch.Generator().manual_seed(0)
    rows = [{"prompt": " ".join(f"w{int(i)}" for i in torch.randint(2, cfg["vocab"], (cfg["words"],), generator=g))}
            for _ in range(cfg["rows"] * cfg["steps"])]  # fmt: skip
    return datasets.Dataset.from_list(rows)


def even_words(completions: list[str], **kwargs) -> list[float]:
    """A rule-based reward: the share of a completion's words with an even number."""
    out = []
    for text in completions:
        words = [w for w in text.split() if w[1:].isdigit()]
        out.append(sum(int(w[1:]) % 2 == 0 for w in words) / len(words) if words else 0.0)
    return out


def _worker(cfg: dict, root: str, pipeline: bool, out: str) -> None:
    import torch
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    torch.set_num_threads(1)
    path = os.path.join(root, "model")
    settings = dict(
        output_dir=os.path.join(root, "out"), per_device_train_batch_size=cfg["rows"], num_generations=4,
        max_completion_length=cfg["completion"], beta=0.1, num_iterations=2, max_steps=cfg["steps"],
        learning_rate=1e-4, logging_steps=1, save_strategy="no", report_to=[], seed=0, use_cpu=True, bf16=False,
        disable_tqdm=True,
    )  # fmt: skip
    if pipeline:
        from hf_pipe.trl import PipeGRPOConfig, PipeGRPOTrainer

        config = PipeGRPOConfig(**settings, pipeline_schedule="1f1b", pipeline_microbatches=cfg["microbatches"])
        cls = PipeGRPOTrainer
    else:
        config, cls = GRPOConfig(**settings), GRPOTrainer
    tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
    trainer = cls(model=path, reward_funcs=even_words, args=config, train_dataset=_dataset(cfg),
                  processing_class=tokenizer)  # fmt: skip
    spent = {"generation": 0.0, "scoring": 0.0}

    def timed(name, fn):
        def run(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[name] += time.perf_counter() - start

        return run

    trainer._generate_single_turn = timed("generation", trainer._generate_single_turn)
    trainer._generate_and_score_completions = timed("scoring", trainer._generate_and_score_completions)

    class Clock(TrainerCallback):
        def __init__(self):
            self.steps, self.peak = [], 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()
            spent["generation"] = spent["scoring"] = 0.0

        def on_step_end(self, args, state, control, **kwargs):
            total = time.perf_counter() - self.start
            self.steps.append((total, spent["generation"], spent["scoring"] - spent["generation"]))
            self.peak = max(self.peak, rss_anon_mib())

    clock = Clock()
    trainer.add_callback(clock)
    trainer.train()
    steps = clock.steps[cfg["warmup"] :]
    mean = lambda i: statistics.fmean(s[i] for s in steps)  # noqa: E731
    step, generation, logps = mean(0), mean(1), mean(2)
    result = {"step_s": step, "generation_s": generation, "logps_s": logps, "train_s": step - generation - logps,
              "peak_rss_anon_mib": clock.peak}  # fmt: skip
    with open(f"{out}.{int(os.environ.get('RANK', 0))}", "w") as f:
        json.dump(result, f)


def _launch(root: str, pipeline: bool, smoke: bool) -> list[dict]:
    out = os.path.join(root, f"grpo-{int(pipeline)}")
    args = ["--worker", "--root", root, "--result", out] + (["--smoke"] if smoke else [])
    return run_ranks(__file__, args + (["--pipeline"] if pipeline else []), out, 2 if pipeline else 1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--worker", action="store_true")
    parser.add_argument("--root")
    parser.add_argument("--result")
    parser.add_argument("--pipeline", action="store_true")
    args = parser.parse_args()
    cfg = SMOKE if args.smoke else FULL
    if args.worker:
        _worker(cfg, args.root, args.pipeline, args.result)
        return
    with tempfile.TemporaryDirectory() as root:
        save_llama(cfg, root)
        print(
            f"model: Llama {cfg['layers']} layers, hidden {cfg['hidden']}, vocab {cfg['vocab']}; {cfg['rows']} rows "
            f"a step (4 completions a prompt), prompts of {cfg['words']} tokens, completions up to "
            f"{cfg['completion']}; beta 0.1, num_iterations 2; mean of steps {cfg['warmup'] + 1}-{cfg['steps']}"
        )
        print(
            f"{'trainer':<28} {'step s':>8} {'generation':>11} {'log-probs':>10} {'training':>9}  "
            "peak RssAnon MiB per rank"
        )
        for pipeline in (False, True):
            results = _launch(root, pipeline, args.smoke)
            r = results[-1]
            name = "PipeGRPOTrainer, 2 ranks" if pipeline else "GRPOTrainer, 1 process"
            peaks = ", ".join(f"{x['peak_rss_anon_mib']:.0f}" for x in results)
            print(
                f"{name:<28} {r['step_s']:>8.3f} {r['generation_s']:>11.3f} {r['logps_s']:>10.3f} "
                f"{r['train_s']:>9.3f}  {peaks}"
            )


if __name__ == "__main__":
    main()
