"""DPO step time and memory: PipeDPOTrainer on 2 ranks against trl.DPOTrainer on one process, same model and batch.

    python benchmarks/dpo.py            # about 3 minutes on 2 cores
    python benchmarks/dpo.py --smoke    # a tiny model, checks the harness only

For each reference strategy — full fine-tuning (the reference a frozen second set of stages read from the policy's
checkpoint; DPOTrainer loads a second whole model) and LoRA (the reference: the adapters off) — prints the median
step time after warm-up, the reference pass's share of the step (its forward-only pass, timed around it), and each
rank's peak anonymous resident memory (RssAnon, sampled at every step end: the model, optimizer state, activations;
not the shared libraries). One thread per rank, one thread for the single process.
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

FULL = dict(layers=8, hidden=256, inner=688, vocab=2048, words=48, pairs=8, microbatches=4, steps=8, warmup=2)
SMOKE = dict(layers=4, hidden=64, inner=128, vocab=256, words=12, pairs=4, microbatches=2, steps=3, warmup=1)


def _dataset(cfg: dict):
    import datasets
    import torch

    g = torch.Generator().manual_seed(0)
    n, words = cfg["pairs"] * (cfg["steps"] + 1), cfg["words"]

    def text(length: int) -> str:
        return " ".join(f"w{int(i)}" for i in torch.randint(2, cfg["vocab"], (length,), generator=g))

    rows = [{"prompt": text(words), "chosen": " " + text(words) + " [EOS]", "rejected": " " + text(words) + " [EOS]"}
            for _ in range(n)]  # fmt: skip
    return datasets.Dataset.from_list(rows)


def _worker(cfg: dict, root: str, strategy: str, pipeline: bool, out: str) -> None:
    import torch
    from peft import LoraConfig
    from transformers import AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    torch.set_num_threads(1)
    path = os.path.join(root, "model")
    settings = dict(
        output_dir=os.path.join(root, "out"), per_device_train_batch_size=cfg["pairs"], max_steps=cfg["steps"],
        learning_rate=1e-4, logging_steps=1, save_strategy="no", report_to=[], seed=0, use_cpu=True, bf16=False,
        disable_tqdm=True, max_length=4 * cfg["words"],
    )  # fmt: skip
    if pipeline:
        from hf_pipe.trl import PipeDPOConfig, PipeDPOTrainer

        config = PipeDPOConfig(**settings, pipeline_schedule="1f1b", pipeline_microbatches=cfg["microbatches"])
        cls = PipeDPOTrainer
    else:
        config, cls = DPOConfig(**settings), DPOTrainer
    peft = strategy == "lora"
    trainer = cls(
        model=path, args=config, train_dataset=_dataset(cfg), processing_class=AutoTokenizer.from_pretrained(path),
        peft_config=LoraConfig(r=8, target_modules=["q_proj", "v_proj"]) if peft else None,
    )  # fmt: skip
    reference = []  # seconds of reference forward per step

    def timed(fn):
        def run(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                reference.append(time.perf_counter() - start)

        return run

    if pipeline:
        trainer._reference_logps = timed(trainer._reference_logps)
    elif trainer.ref_model is not None:
        trainer.ref_model.forward = timed(trainer.ref_model.forward)

    class Clock(TrainerCallback):
        def __init__(self):
            self.steps, self.refs, self.peak = [], [], 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            self.start, reference[:] = time.perf_counter(), []

        def on_step_end(self, args, state, control, **kwargs):
            self.steps.append(time.perf_counter() - self.start)
            self.refs.append(sum(reference))
            self.peak = max(self.peak, rss_anon_mib())

    clock = Clock()
    trainer.add_callback(clock)
    trainer.train()
    steps, refs = clock.steps[cfg["warmup"] :], clock.refs[cfg["warmup"] :]
    rank = int(os.environ.get("RANK", 0))
    result = {
        "step_s": statistics.median(steps),
        "reference_share": (sum(refs) / sum(steps)) if any(refs) else None,
        "peak_rss_anon_mib": clock.peak,
    }
    with open(f"{out}.{rank}", "w") as f:
        json.dump(result, f)


def _launch(root: str, strategy: str, pipeline: bool, smoke: bool) -> list[dict]:
    out = os.path.join(root, f"{strategy}-{int(pipeline)}")
    args = ["--worker", strategy, "--root", root, "--result", out] + (["--smoke"] if smoke else [])
    return run_ranks(__file__, args + (["--pipeline"] if pipeline else []), out, 2 if pipeline else 1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--worker")
    parser.add_argument("--root")
    parser.add_argument("--result")
    parser.add_argument("--pipeline", action="store_true")
    args = parser.parse_args()
    cfg = SMOKE if args.smoke else FULL
    if args.worker:
        _worker(cfg, args.root, args.worker, args.pipeline, args.result)
        return
    with tempfile.TemporaryDirectory() as root:
        save_llama(cfg, root)
        print(f"model: Llama {cfg['layers']} layers, hidden {cfg['hidden']}, vocab {cfg['vocab']}; batch "
              f"{cfg['pairs']} pairs (~{4 * cfg['words']} tokens a row); median of steps {cfg['warmup'] + 1}-"
              f"{cfg['steps']}")  # fmt: skip
        print(f"{'strategy':<10} {'trainer':<28} {'step s':>8} {'ref share':>10}  peak RssAnon MiB per rank")
        for strategy in ("full", "lora"):
            for pipeline in (False, True):
                results = _launch(root, strategy, pipeline, args.smoke)
                name = "PipeDPOTrainer, 2 ranks" if pipeline else "DPOTrainer, 1 process"
                share = results[-1]["reference_share"]
                share = f"{share:.0%}" if share is not None else "-"
                peaks = ", ".join(f"{r['peak_rss_anon_mib']:.0f}" for r in results)
                print(f"{strategy:<10} {name:<28} {results[-1]['step_s']:>8.3f} {share:>10}  {peaks}")


if __name__ == "__main__":
    main()
