"""Start-up memory and time of PipeTrainer per rank: a model from its checkpoint path or the meta device (each rank
its stages only) against a model built whole on every rank, and a model whose whole copies would not fit the host.

    python benchmarks/startup.py                      # the ~1 GB Llama on 4 ranks, six ways; then the ~1.9B model
    python benchmarks/startup.py --runs big --big_layers 22

Each way runs as its own `torchrun --nproc_per_node 4` job. Every rank reports the peak anonymous memory (RssAnon,
sampled every 2 ms: safetensors maps checkpoint files, so RSS would count the page cache) that building the model and
PipeTrainer's start-up add above the imported-libraries baseline, and the seconds from its process start to its
first training step (one SGD step follows). Not a test: the numbers go in docs/big-models.md and the issue notes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WAYS = {
    "path-same-dtype": "fp32 checkpoint, PipeTrainer(model=<path>)",
    "path-bf16-as-fp32": "bf16 checkpoint trained in fp32, PipeTrainer(model=<path>, dtype float32)",
    "scratch-meta": "from scratch, a model on the meta device",
    "whole-same-dtype": "today's path: from_pretrained(fp32 checkpoint) on every rank",
    "whole-bf16-as-fp32": "today's path: from_pretrained(bf16 checkpoint, dtype=float32) on every rank",
    "scratch-whole": "today's path: from_config on every rank",
}


def _rss_anon() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))


def _process_start() -> float:
    """This process's start, wall clock (from /proc: the launcher started it before Python imported anything)."""
    with open("/proc/self/stat") as f:
        ticks = int(f.read().rsplit(")", 1)[1].split()[19])
    with open("/proc/stat") as f:
        boot = next(int(line.split()[1]) for line in f if line.startswith("btime"))
    return boot + ticks / os.sysconf("SC_CLK_TCK")


def worker(way: str, folder: str, steps: int) -> None:
    import torch
    import transformers
    from transformers import TrainerCallback

    from hf_pipe import PipeTrainer, PipeTrainingArguments

    baseline, peak, done = _rss_anon(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss_anon())
            time.sleep(0.002)

    first_step: list[tuple[float, int]] = []  # (when, the start-up's peak)

    class FirstStep(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if not first_step:
                first_step.append((time.time(), max(peak[0], _rss_anon())))

    args = PipeTrainingArguments(
        output_dir=os.path.join(folder, "out"), per_device_train_batch_size=4, pipeline_microbatches=4,
        max_steps=steps, optim="sgd", learning_rate=1e-4, report_to=[], use_cpu=True, save_strategy="no",
        disable_tqdm=True, logging_steps=1, model_init_kwargs={"dtype": "float32"},
    )  # fmt: skip
    ids = torch.randint(0, 1000, (64, 64), generator=torch.Generator().manual_seed(0)).tolist()
    data = [{"input_ids": row, "labels": row} for row in ids]
    sampler = threading.Thread(target=sample)
    sampler.start()
    dtype = "bf16" if "bf16" in way else "fp32"
    checkpoint = os.path.join(folder, dtype)
    if way.startswith("path"):
        model = checkpoint
    elif way.startswith("whole"):
        model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    else:
        config = transformers.AutoConfig.from_pretrained(os.path.join(folder, "fp32"), dtype=torch.float32)
        if way == "scratch-meta":
            with torch.device("meta"):
                model = transformers.AutoModelForCausalLM.from_config(config)
        else:
            model = transformers.AutoModelForCausalLM.from_config(config)
    trainer = PipeTrainer(model=model, args=args, train_dataset=data, callbacks=[FirstStep()])
    del model
    trainer.train()
    done.set()
    sampler.join()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    record = {
        "way": way,
        "rank": args.process_index,
        "startup_anon_mib": (first_step[0][1] - baseline) / 2**20,
        "run_peak_anon_mib": peak[0] / 2**20,
        "startup_s": first_step[0][0] - _process_start(),
        "losses": losses,
    }
    with open(os.path.join(folder, f"result-{way}-{args.process_index}.json"), "w") as f:
        json.dump(record, f)


def _config(layers: int, hidden: int, intermediate: int, vocab: int = 32000):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=16, num_key_value_heads=8, max_position_embeddings=256, tie_word_embeddings=False,
    )  # fmt: skip


def _write_checkpoints(folder: str, config, dtypes: tuple[str, ...]) -> int:
    """The model built once here, saved in fp32 (and bf16); returns its fp32 bytes."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    size = sum(p.numel() * 4 for p in model.parameters())
    for dtype in dtypes:
        if dtype == "bf16":
            model = model.to(torch.bfloat16)
        model.save_pretrained(os.path.join(folder, dtype), max_shard_size="500MB")
    return size


def _launch(way: str, folder: str, ranks: int, steps: int) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    cmd = [os.path.join(os.path.dirname(sys.executable), "torchrun"), "--standalone", "--nproc_per_node", str(ranks)]
    cmd += [__file__, "--worker", way, "--folder", folder, "--steps", str(steps)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        print(proc.stdout[-3000:], proc.stderr[-3000:])
        raise SystemExit(f"{way}: the run failed")
    records = []
    for rank in range(ranks):
        with open(os.path.join(folder, f"result-{way}-{rank}.json")) as f:
            records.append(json.load(f))
    return records


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker")
    parser.add_argument("--folder")
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--runs", default="medium,big")
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--big_layers", type=int, default=22)
    opts = parser.parse_args()
    if opts.worker:
        return worker(opts.worker, opts.folder, opts.steps)
    results = {}
    if "medium" in opts.runs:
        with tempfile.TemporaryDirectory() as folder:
            size = _write_checkpoints(folder, _config(16, 1024, 2816), ("fp32", "bf16"))
            bound = 1.6 * size / opts.ranks / 2**20 + 64
            print(f"Llama of {size / 1e9:.2f} GB (fp32) on {opts.ranks} ranks; bound {bound:.0f} MiB per rank")
            print(f"{'way':<22} {'start-up MiB per rank (RssAnon)':<34} {'start-up s per rank':<26} first loss")
            for way in WAYS:
                records = _launch(way, folder, opts.ranks, 1)
                results[way] = records
                mib = " ".join(f"{r['startup_anon_mib']:7.0f}" for r in records)
                secs = " ".join(f"{r['startup_s']:5.1f}" for r in records)
                print(f"{way:<22} {mib:<34} {secs:<26} {records[0]['losses'][0]:.4f}", flush=True)
            results["medium"] = {"bytes": size, "bound_mib": bound}
    if "big" in opts.runs:
        with tempfile.TemporaryDirectory() as folder:
            config = _config(opts.big_layers, 2560, 6912)
            config.save_pretrained(os.path.join(folder, "fp32"))
            import torch
            from transformers import AutoModelForCausalLM

            with torch.device("meta"):
                params = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
            print(f"big: {params / 1e9:.2f}B parameters, {params * 4 / 2**30:.1f} GiB fp32 whole; from scratch on "
                  f"{opts.ranks} ranks, 3 SGD steps")  # fmt: skip
            records = _launch("scratch-meta", folder, opts.ranks, 3)
            for r in records:
                print(f"  rank {r['rank']}: start-up +{r['startup_anon_mib']:.0f} MiB RssAnon in {r['startup_s']:.1f} s, "
                      f"peak {r['run_peak_anon_mib']:.0f} MiB over the run; losses {[round(x, 4) for x in r['losses']]}")  # fmt: skip
            results["big"] = {"params": params, "records": records}
    with open(os.path.join(ROOT, "benchmarks", "startup.json"), "w") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
