"""GPU check, one prepared script for one GPU (about 5 minutes on an H200; `--device cpu --quick` is its dry run).

    bash scripts/gpu_check.sh                        # one GPU: the table below; with 2+ GPUs also NCCL equivalence
    python scripts/gpu_check.py --device cpu --quick # the same script on the CPU with tiny models (the test suite)

Everything runs in one process (PipeTrainer sets up a one-rank group; no launcher start-up per run) and prints:

(a) equivalence on the device, fp32 and bf16 autocast, module and trace frontends: PipeTrainer with one rank
    holding 2 stages (interleaved 1F1B) against Trainer on the same batches — worst relative difference of the
    logged loss and grad norm, and of the final weights;
(b) PipeTrainer's overhead on one device: 2 stages on one rank with 8 microbatches against Trainer with 8
    gradient-accumulation steps on the same microbatches, bf16, for SmolLM2-135M's architecture and a 1.1B-parameter
    Llama (TinyLlama's shape), random weights: median step time, ratio, tokens/s, and the CPU time of a step next to
    its wall time (a CPU-bound step — Python launching kernels — shows CPU ≈ wall);
(c) peak device memory of that rank against `hf-pipe plan`'s estimate for its stages (weights, gradients, AdamW
    moments, activations in flight).

Weights are random (nothing can be fetched on the GPU machine); the numbers that matter are ratios and differences.
With more than one GPU, `--multi` adds the NCCL runs of the earlier check (2 and 4 ranks, PP × DP).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# (name, LlamaConfig overrides, microbatch rows, sequence length); --quick shrinks them
MODELS = {
    "smollm2-135m": (dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                          num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True), 8, 512),
    "llama-1.1b": (dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                        num_key_value_heads=4, vocab_size=32000, tie_word_embeddings=False), 4, 512),
}  # fmt: skip
QUICK = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=256)  # fmt: skip
MICROBATCHES = 8


def _llama(overrides: dict, seed: int = 0):
    import torch
    import transformers

    config = transformers.LlamaConfig(max_position_embeddings=1024, **overrides)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config)


def _gpt2(overrides: dict, seed: int = 0):
    import torch
    import transformers

    h, layers = overrides["hidden_size"], overrides["num_hidden_layers"]
    config = transformers.GPT2Config(n_embd=h, n_layer=layers, n_head=4, n_positions=1024,
                                     vocab_size=overrides["vocab_size"], resid_pdrop=0.0, embd_pdrop=0.0,
                                     attn_pdrop=0.0)  # fmt: skip
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(config)


def _rows(n: int, seq: int, vocab: int, seed: int, ragged: bool) -> list[dict]:
    """Token rows as a plain list (the GPU machine has no `datasets`; Trainer takes any sized dataset)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(seq // 4, seq + 1, (n,), generator=g).tolist() if ragged else [seq] * n
    return [{"input_ids": torch.randint(1, vocab, (length,), generator=g).tolist()} for length in lengths]


class _Collator:
    """Right-padded batches, labels -100 on padding (as DataCollatorForLanguageModeling(mlm=False) with pad 0)."""

    def __call__(self, features):
        import torch

        longest = max(len(f["input_ids"]) for f in features)
        ids = torch.zeros(len(features), longest, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, f in enumerate(features):
            ids[i, : len(f["input_ids"])] = torch.tensor(f["input_ids"])
            mask[i, : len(f["input_ids"])] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def _train(model, device: str, *, pipeline: dict | None, batch: int, accumulate: int, steps: int, bf16: bool,
           data, timed: bool = False) -> dict:  # fmt: skip
    """One run, Trainer (`pipeline` None) or PipeTrainer; logs, final weights (CPU), step times, peak memory."""
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from hf_pipe import PipeTrainer, PipeTrainingArguments

    cuda = device == "cuda"
    times: list[tuple[float, float]] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if cuda:
                torch.cuda.synchronize()
            self.wall, self.cpu = time.perf_counter(), time.thread_time()

        def on_step_end(self, args, state, control, **kwargs):
            if cuda:
                torch.cuda.synchronize()
            times.append((time.perf_counter() - self.wall, time.thread_time() - self.cpu))

    common = dict(
        output_dir=os.path.join("/tmp", "hf_pipe-gpu-check"), per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulate, max_steps=steps, learning_rate=1e-3, max_grad_norm=1.0,
        logging_steps=1, save_strategy="no", report_to=[], seed=7, disable_tqdm=True, use_cpu=not cuda, bf16=bf16,
        train_sampling_strategy="sequential", dataloader_drop_last=True,
    )  # fmt: skip
    if pipeline is None:
        args, cls = TrainingArguments(**common), Trainer
    else:
        args, cls = PipeTrainingArguments(**common, **pipeline), PipeTrainer
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    trainer = cls(model=model, args=args, train_dataset=data, data_collator=_Collator(), callbacks=[Timer()])
    trainer.train()
    logs = [(e["loss"], e["grad_norm"]) for e in trainer.state.log_history if "loss" in e and "grad_norm" in e]
    result = {"logs": logs, "peak": torch.cuda.max_memory_allocated() if cuda else None}
    if timed:
        steady = times[2:] or times
        result["step_s"] = statistics.median(w for w, _ in steady)
        result["cpu_s"] = statistics.median(c for _, c in steady)
    if pipeline is None:
        result["weights"] = {k: v.detach().float().cpu() for k, v in trainer.model.state_dict().items()}
    else:
        result["weights"] = {k: v.detach().float().cpu() for k, v in trainer.engine.local_state().items()}
        result["engine"] = trainer.engine
    del trainer
    gc.collect()
    return result


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def equivalence(device: str, quick: bool) -> list[dict]:
    """(a): Trainer against PipeTrainer (2 stages on one rank), fp32 and bf16, module and trace frontends."""
    from hf_pipe.versions import torch_at_least

    overrides = QUICK if quick else dict(QUICK, hidden_size=256, intermediate_size=688, num_hidden_layers=8)
    overrides = dict(overrides, tie_word_embeddings=True)
    steps = 3 if quick else 6
    data = _rows(16 * steps, 32 if quick else 64, overrides["vocab_size"], 0, ragged=not quick)  # one trace per shape
    # torch 2.11 cannot split a rotary model's traced graph (its autocast-off region): GPT-2 is traced there
    cases = [("llama", _llama, "module"), ("gpt2", _gpt2, "trace")]
    if torch_at_least(2, 13):
        cases.append(("llama", _llama, "trace"))
    rows = []
    for bf16 in (False, True):
        refs = {}
        for model_name, build, frontend in cases:
            if model_name not in refs:
                refs[model_name] = _train(build(overrides), device, pipeline=None, batch=16, accumulate=1, steps=steps,
                                          bf16=bf16, data=data)  # fmt: skip
            ref = refs[model_name]
            pipeline = {"pipeline_schedule": "interleaved1f1b", "pipeline_microbatches": 4,
                        "pipeline_frontend": frontend}  # fmt: skip
            run = _train(build(overrides), device, pipeline=pipeline, batch=16, accumulate=1, steps=steps, bf16=bf16,
                         data=data)  # fmt: skip
            loss = max(_rel(x[0], y[0]) for x, y in zip(run["logs"], ref["logs"]))
            norm = max(_rel(x[1], y[1]) for x, y in zip(run["logs"], ref["logs"]))
            weights = max((run["weights"][k] - ref["weights"][k]).abs().max().item() for k in run["weights"])
            # bf16 autocast: matmuls round to 8 bits of mantissa, in another order with microbatches
            limits = (3e-2, 5e-2, 2e-2) if bf16 else (2e-4, 2e-4, 5e-4)
            ok = loss < limits[0] and norm < limits[1] and weights < limits[2]
            rows.append({"check": f"{'bf16' if bf16 else 'fp32'} {model_name} {frontend}", "loss": loss, "grad_norm": norm,
                         "weights": weights, "ok": ok})  # fmt: skip
            del run
        del refs
    return rows


def overhead(device: str, quick: bool) -> list[dict]:
    """(b) and (c): PipeTrainer (2 stages on one rank, 8 microbatches) against Trainer (8 accumulation steps)."""
    from hf_pipe.estimate import stage_memory

    rows = []
    for name, (overrides, rows_per_mb, seq) in MODELS.items():
        if quick:
            overrides, rows_per_mb, seq = dict(QUICK, tie_word_embeddings=overrides["tie_word_embeddings"]), 2, 32
        steps = 4 if quick else 10
        data = _rows(rows_per_mb * MICROBATCHES * (steps + 1), seq, overrides["vocab_size"], 1, ragged=False)
        tokens = rows_per_mb * MICROBATCHES * seq
        ref = _train(_llama(overrides), device, pipeline=None, batch=rows_per_mb, accumulate=MICROBATCHES,
                     steps=steps, bf16=True, data=data, timed=True)  # fmt: skip
        pipeline = {"pipeline_schedule": "interleaved1f1b", "pipeline_microbatches": MICROBATCHES,
                    "pipeline_stages_per_rank": 2}  # fmt: skip
        run = _train(_llama(overrides), device, pipeline=pipeline, batch=rows_per_mb * MICROBATCHES, accumulate=1,
                     steps=steps, bf16=True, data=data, timed=True)  # fmt: skip
        engine = run.pop("engine")
        estimate = stage_memory(engine.plan, engine.config, schedule="interleaved1f1b", pp_size=1,
                                microbatches=MICROBATCHES, batch_size=rows_per_mb * MICROBATCHES, seq_len=seq)  # fmt: skip
        # weights, gradients and AdamW moments in fp32; activations under bf16 autocast in 2 bytes
        acts = stage_memory(engine.plan, engine.config, schedule="interleaved1f1b", pp_size=1,
                            microbatches=MICROBATCHES, batch_size=rows_per_mb * MICROBATCHES, seq_len=seq,
                            dtype_bytes=2)  # fmt: skip
        estimated = sum(m.weights_bytes + m.grads_bytes + m.adamw_bytes + a.activation_bytes
                        for m, a in zip(estimate, acts))  # fmt: skip
        per_stage = [round((m.weights_bytes + m.grads_bytes + m.adamw_bytes + a.activation_bytes) / 2**30, 2)
                     for m, a in zip(estimate, acts)]  # fmt: skip
        params = sum(s.params for s in engine.plan.stages)
        del engine
        rows.append({
            "model": name, "params_M": round(params / 1e6, 1), "tokens_per_step": tokens,
            "trainer_step_s": ref["step_s"], "pipe_step_s": run["step_s"], "ratio": run["step_s"] / ref["step_s"],
            "trainer_tok_s": tokens / ref["step_s"], "pipe_tok_s": tokens / run["step_s"],
            "trainer_cpu_s": ref["cpu_s"], "pipe_cpu_s": run["cpu_s"],
            "peak_GiB": run["peak"] / 2**30 if run["peak"] is not None else None,
            "trainer_peak_GiB": ref["peak"] / 2**30 if ref["peak"] is not None else None,
            "estimate_GiB": estimated / 2**30, "estimate_per_stage_GiB": per_stage,
        })  # fmt: skip
        del ref, run
        gc.collect()
    return rows


def print_table(equiv: list[dict], perf: list[dict]) -> None:
    print(
        "\n(a) equivalence, PipeTrainer (2 stages on one rank) vs Trainer: worst relative loss / grad norm, abs weights"
    )
    for r in equiv:
        print(f"  {'OK ' if r['ok'] else 'BAD'} {r['check']:18} loss {r['loss']:.2e}  grad_norm {r['grad_norm']:.2e}  "
              f"weights {r['weights']:.2e}")  # fmt: skip
    print("\n(b) overhead, bf16: 2 stages x 8 microbatches on one rank vs Trainer with 8 accumulation steps")
    print(f"  {'model':14} {'params':>7} {'Trainer s':>9} {'Pipe s':>8} {'ratio':>6} {'Trainer tok/s':>13} "
          f"{'Pipe tok/s':>10} {'CPU s/step (T / P)':>19}")  # fmt: skip
    for r in perf:
        print(f"  {r['model']:14} {r['params_M']:6.0f}M {r['trainer_step_s']:9.3f} {r['pipe_step_s']:8.3f} "
              f"{r['ratio']:6.3f} {r['trainer_tok_s']:13.0f} {r['pipe_tok_s']:10.0f} "
              f"{r['trainer_cpu_s']:9.3f} / {r['pipe_cpu_s']:.3f}")  # fmt: skip
    print("\n(c) peak device memory of the rank (both stages) vs hf-pipe plan's estimate")
    for r in perf:
        if r["peak_GiB"] is None:
            print(f"  {r['model']:14} (no device memory counter on the CPU) estimate {r['estimate_GiB']:.2f} GiB")
            continue
        print(f"  {r['model']:14} measured {r['peak_GiB']:.2f} GiB (Trainer {r['trainer_peak_GiB']:.2f}), estimate "
              f"{r['estimate_GiB']:.2f} GiB = stages {r['estimate_per_stage_GiB']}, measured/estimate "
              f"{r['peak_GiB'] / r['estimate_GiB']:.2f}")  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--quick", action="store_true", help="Tiny models, few steps: the CPU dry run.")
    parser.add_argument("--out", default=os.path.join(ROOT, "out", "gpu_check"))
    parser.add_argument("--multi", action="store_true", help="Also the NCCL runs on 2+ GPUs (scripts/gpu_multi.py).")
    opts = parser.parse_args()
    import torch
    import transformers

    if opts.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device visible")
        return 1
    if opts.device == "cpu":
        torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    name = torch.cuda.get_device_name() if opts.device == "cuda" else "CPU"
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {name}")
    start = time.time()
    equiv = equivalence(opts.device, opts.quick)
    print(f"(a) done in {time.time() - start:.0f} s", flush=True)
    perf = overhead(opts.device, opts.quick)
    print(f"(b, c) done in {time.time() - start:.0f} s", flush=True)
    print_table(equiv, perf)
    os.makedirs(opts.out, exist_ok=True)
    with open(os.path.join(opts.out, "gpu_check.json"), "w") as f:
        json.dump({"torch": torch.__version__, "device": name, "equivalence": equiv, "overhead": perf}, f, indent=1)
    failed = not all(r["ok"] for r in equiv)
    if opts.multi and opts.device == "cuda" and torch.cuda.device_count() > 1:
        failed |= (
            subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "gpu_multi.py")], cwd=ROOT).returncode != 0
        )
    print(f"total {time.time() - start:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
