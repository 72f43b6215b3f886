"""Step time, throughput, bubble and memory of PipeTrainer against the alternatives, on the same model and data.

    python benchmarks/bench.py                 # the full table, 3 rounds (about 12 minutes on 2 cores)
    python benchmarks/bench.py --smoke --rounds 1   # a tiny model, 5 steps per run: checks the harness only

Runs, each in fresh processes, one thread per rank: Trainer on one process (1 thread; 1 thread on the same
microbatches, accumulated, which is what microbatching alone costs; all threads); PipeTrainer on 2 ranks with every
schedule (2 or 4 stages); a hand-written torch.distributed.pipelining loop on the same stages (the overhead
baseline); Trainer + FSDP on the same number of ranks. With 4 CPUs or more, the same on 4 ranks (4 stages, 8 for
interleaved and ZBV); with fewer, the 4-rank rows run only when named in --runs, on shared cores. Every one-thread
process runs on a core of its own (PipeTrainer with `pipeline_cpu_affinity=True`, the others bound the same way); one
PipeTrainer row runs unbound. Prints a table and writes `bench.json` and `bench.png` to --out.

The machine is noisy: the same row moves by several percent from one minute to the next. So every row runs once per
round, rounds interleaved (`--rounds`, default 3); a speed-up is taken within each round, against that round's
baseline, and the table shows the median over rounds and the range.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

FULL = dict(layers=8, hidden=256, inner=688, vocab=2048, seq=128, batch=16, microbatches=8, steps=12, warmup=3)
# warmup covers steps 2-3, which PipeTrainer records for the timeline and then draws (pipeline_trace_steps=2)
SMOKE = dict(layers=8, hidden=64, inner=128, vocab=256, seq=32, batch=8, microbatches=4, steps=5, warmup=3)


def _model(cfg):
    import torch
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=cfg["vocab"], hidden_size=cfg["hidden"], intermediate_size=cfg["inner"],
        num_hidden_layers=cfg["layers"], num_attention_heads=4, num_key_value_heads=4,
        max_position_embeddings=cfg["seq"], tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config)


def _dataset(cfg, n):
    import datasets
    import torch

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, cfg["vocab"], (n, cfg["seq"]), generator=g)
    return datasets.Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})


def _tensor_bytes(params, optimizer) -> int:
    import torch

    total = sum(p.numel() * p.element_size() * (2 if p.grad is not None else 1) for p in params)
    for state in optimizer.state.values():
        total += sum(t.numel() * t.element_size() for t in state.values() if torch.is_tensor(t) and t.dim() > 0)
    return total


def _result(times, cfg, tensor_bytes, extra=None) -> dict:
    steady = times[cfg["warmup"] :]
    return {
        "step_s": statistics.median(steady),
        "tokens_per_s": cfg["batch"] * cfg["seq"] / statistics.median(steady),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "tensor_mib": tensor_bytes / 2**20,
        **(extra or {}),
    }


def _split(cfg, spec):
    """`auto`, or for the "whole" runs the best split at whole blocks (what `auto` did before half-block stages)."""
    if spec.get("split") != "whole":
        return spec.get("split", "auto")
    from hf_pipe import plan_split

    return plan_split(_model(cfg), spec["ranks"], sub_blocks=False).layer_starts


def _bind(spec) -> None:
    """Every one-thread process on a core of its own, as `pipeline_cpu_affinity` binds PipeTrainer's ranks: the
    one-process baseline, the hand-written loop and FSDP get the same binding (PipeTrainer binds itself)."""
    from hf_pipe.cpu_affinity import allowed_cpus, bind_local_rank

    if spec["kind"] in ("handwritten", "fsdp") and spec.get("bind", True):
        bind_local_rank()
    elif spec["kind"] == "trainer" and spec.get("threads", 1) == 1:
        os.sched_setaffinity(0, allowed_cpus()[:1])


def run_trainer(cfg, spec) -> dict:
    """Trainer or PipeTrainer; step times from a callback around each optimizer step."""
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments, default_data_collator

    from hf_pipe import PipeTrainer, PipeTrainingArguments

    torch.set_num_threads(spec.get("threads", 1))
    _bind(spec)
    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            times.append(time.perf_counter() - self.t)

    common = dict(
        output_dir=os.path.join(spec["out"], spec["name"]), per_device_train_batch_size=cfg["batch"],
        max_steps=cfg["steps"], logging_steps=10**6, save_strategy="no", report_to=[], disable_tqdm=True,
        use_cpu=True, learning_rate=1e-4,
    )  # fmt: skip
    if spec.get("accumulate"):  # the pipeline's microbatches, one after another on one thread
        common.update(per_device_train_batch_size=cfg["batch"] // cfg["microbatches"],
                      gradient_accumulation_steps=cfg["microbatches"])  # fmt: skip
    if spec["kind"] == "pipe":
        args = PipeTrainingArguments(**common, pipeline_schedule=spec["schedule"],
                                     pipeline_microbatches=cfg["microbatches"],
                                     pipeline_frontend=spec.get("frontend", "auto"),
                                     pipeline_split=_split(cfg, spec),
                                     pipeline_trace_dir=os.path.join(spec["out"], spec["name"], "trace"),
                                     pipeline_trace_steps=2,
                                     pipeline_cpu_affinity=spec.get("bind", True))  # fmt: skip
        cls = PipeTrainer
    else:
        if spec["kind"] == "fsdp":
            os.environ["ACCELERATE_USE_CPU"] = "true"
            common.update(fsdp="full_shard", fsdp_config={"transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]})
        args, cls = TrainingArguments(**common), Trainer
    trainer = cls(model=_model(cfg), args=args, train_dataset=_dataset(cfg, cfg["batch"] * cfg["steps"] * 2),
                  data_collator=default_data_collator, callbacks=[Timer()])  # fmt: skip
    trainer.train()
    extra = {}
    bubble = [e for e in trainer.state.log_history if "pipeline_bubble_measured" in e]
    if bubble:
        extra = {"bubble_measured": bubble[0]["pipeline_bubble_measured"]}
    if spec["kind"] == "pipe":
        extra["layer_starts"] = trainer.engine.plan.layer_starts
    params = list(trainer.model_wrapped.parameters())
    return _result(times, cfg, _tensor_bytes(params, trainer.optimizer), extra)


def run_handwritten(cfg, spec) -> dict:
    """torch.distributed.pipelining by hand on the same stages: Schedule1F1B, AdamW, no Trainer."""
    import torch
    import torch.distributed as dist
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B

    from hf_pipe.families import get_family
    from hf_pipe.split import plan_split
    from hf_pipe.stage import build_stage_modules

    torch.set_num_threads(1)
    _bind(spec)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = _model(cfg)
    plan = plan_split(model, world)
    (module,) = build_stage_modules(model, get_family("llama"), plan, [rank])
    stage = PipelineStage(module, rank, world, torch.device("cpu"))

    def loss_fn(logits, labels):
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1)[:-1], labels.flatten()[1:], reduction="sum")

    schedule = Schedule1F1B(stage, n_microbatches=cfg["microbatches"], loss_fn=loss_fn, scale_grads=True)
    opt = torch.optim.AdamW(module.parameters(), lr=1e-4)
    data = torch.tensor(_dataset(cfg, cfg["batch"])["input_ids"])
    times = []
    for _ in range(cfg["steps"]):
        start = time.perf_counter()
        opt.zero_grad()
        if rank == 0:
            schedule.step(data)
        else:
            schedule.step(target=data)
        opt.step()
        times.append(time.perf_counter() - start)
    result = _result(times, cfg, _tensor_bytes(list(module.parameters()), opt))
    dist.destroy_process_group()
    return result


RUNS = [
    {"name": "trainer-1proc-1thread", "kind": "trainer", "ranks": 0, "threads": 1},
    # what one thread pays for the microbatches alone: the same batch as 8 accumulated microbatches, no pipeline
    {"name": "trainer-1proc-1thread-microbatched", "kind": "trainer", "ranks": 0, "threads": 1, "accumulate": True},
    {"name": "trainer-1proc-all-threads", "kind": "trainer", "ranks": 0, "threads": os.cpu_count() or 1},
    *[{"name": f"pipe-2ranks-{s}", "kind": "pipe", "ranks": 2, "schedule": s}
      for s in ("gpipe", "1f1b", "interleaved1f1b", "interleavedzerobubble", "zbvzerobubble", "dualpipev")],
    # the same 1F1B with its ranks left unbound (pipeline_cpu_affinity=False)
    {"name": "pipe-2ranks-1f1b-unbound", "kind": "pipe", "ranks": 2, "schedule": "1f1b", "bind": False},
    # the same 1F1B with stages at whole blocks (the head makes the last stage 8% costlier), and traced stages
    {"name": "pipe-2ranks-1f1b-whole-blocks", "kind": "pipe", "ranks": 2, "schedule": "1f1b", "split": "whole"},
    {"name": "pipe-2ranks-1f1b-traced", "kind": "pipe", "ranks": 2, "schedule": "1f1b", "frontend": "trace"},
    # stages balanced by the pieces' times measured at start-up instead of FLOPs
    {"name": "pipe-2ranks-1f1b-measured", "kind": "pipe", "ranks": 2, "schedule": "1f1b", "split": "measured"},
    {"name": "handwritten-torch-1f1b-2ranks", "kind": "handwritten", "ranks": 2},
    {"name": "trainer-fsdp-2ranks", "kind": "fsdp", "ranks": 2},
    # 4 stages on 4 ranks: in the default set where every rank has a core of its own, else only when named in --runs
    *[{"name": f"pipe-4ranks-{s}", "kind": "pipe", "ranks": 4, "schedule": s}
      for s in ("gpipe", "1f1b", "interleaved1f1b", "zbvzerobubble")],
    {"name": "handwritten-torch-1f1b-4ranks", "kind": "handwritten", "ranks": 4},
    {"name": "trainer-fsdp-4ranks", "kind": "fsdp", "ranks": 4},
]  # fmt: skip


def _ideal(spec, cfg) -> float | None:
    if spec["kind"] != "pipe":
        return None
    from hf_pipe.estimate import ideal_speedup
    from hf_pipe.schedule import default_stages_per_rank

    return ideal_speedup(
        spec["schedule"], spec["ranks"], default_stages_per_rank(spec["schedule"]), cfg["microbatches"]
    )


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", default=os.path.join(ROOT, "out", "bench"))
    parser.add_argument("--runs", default="", help="Comma-separated run names to keep (default: all).")
    parser.add_argument("--rounds", type=int, default=3, help="Runs of every row, interleaved; medians reported.")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    opts = parser.parse_args()
    cfg = SMOKE if opts.smoke else FULL
    if opts.worker:
        spec = json.loads(opts.worker)
        result = (run_handwritten if spec["kind"] == "handwritten" else run_trainer)(cfg, spec)
        rank = int(os.environ.get("RANK", 0))
        with open(os.path.join(opts.out, f"{spec['name']}.rank{rank}.json"), "w") as f:
            json.dump(result, f)
        import torch.distributed as dist

        if dist.is_initialized():  # leave together: a rank that exits while its peer still talks gets SIGABRT
            dist.barrier()
            dist.destroy_process_group()
        return 0

    os.makedirs(opts.out, exist_ok=True)
    wanted = {r for r in opts.runs.split(",") if r} | {"trainer-1proc-1thread"}  # the baseline every ratio needs
    cpus = len(os.sched_getaffinity(0))
    specs = [
        {**spec, "out": opts.out}
        for spec in RUNS
        if spec["name"] in wanted or (not opts.runs and spec["ranks"] <= cpus)
    ]
    for spec in specs:
        if spec["ranks"] > cpus:  # unbound: binding refuses more local ranks than CPUs
            spec["bind"] = False
            print(f"{spec['name']}: {spec['ranks']} ranks on {cpus} CPUs share cores, its times say nothing of speed")
    rounds: dict[str, list[dict]] = {spec["name"]: [] for spec in specs}
    for _ in range(opts.rounds):  # every row once per round: a row's ratios pair it with the baseline of its round
        for spec in specs:
            rounds[spec["name"]].append(_run(spec, cfg, opts))
    rows = [_row(spec, rounds[spec["name"]], rounds, cfg) for spec in specs if all(rounds[spec["name"]])]
    print(f"Llama {cfg['layers']} blocks, hidden {cfg['hidden']}, seq {cfg['seq']}, batch {cfg['batch']}, "
          f"{cfg['microbatches']} microbatches; median of steps {cfg['warmup'] + 1}-{cfg['steps']}; "
          f"{opts.rounds} round(s), medians over rounds; speed-up range: lowest-highest round")  # fmt: skip
    print(f"{'run':34} {'step s':>7} {'tok/s':>7} {'speedup':>8} {'range':>10} {'ideal':>6} {'of ideal':>8} "
          f"{'bubble':>7} {'RSS MiB':>8} {'tensor MiB':>10}")  # fmt: skip
    for r in rows:
        bubble = r["bubble_measured"]
        print(f"{r['name']:34} {r['step_s']:7.3f} {cfg['batch'] * cfg['seq'] / r['step_s']:7.0f} {r['speedup']:8.2f} "
              f"{min(r['round_speedups']):5.2f}-{max(r['round_speedups']):4.2f} {r['ideal_speedup'] or 0:6.2f} "
              f"{100 * (r['of_ideal'] or 0):7.0f}% {'' if bubble is None else f'{100 * bubble:6.1f}%':>7} "
              f"{r['peak_rss_mib']:8.0f} {r['tensor_mib']:10.1f}")  # fmt: skip
    for pipe in (r for r in rows if r["vs_handwritten"]):
        print(f"{pipe['name']} vs hand-written torch 1F1B: {100 * (pipe['vs_handwritten'] - 1):+.1f}% step time")
    with open(os.path.join(opts.out, "bench.json"), "w") as f:
        json.dump({"config": cfg, "rounds": opts.rounds, "rows": rows}, f, indent=2)
    _chart(rows, os.path.join(opts.out, "bench.png"))
    return 0


def _run(spec, cfg, opts) -> dict | None:
    """One run of `spec` in fresh processes: its step time (the slowest rank's median) and every rank's numbers."""
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    me = [os.path.abspath(__file__), "--out", opts.out, "--worker", json.dumps(spec)] + (["--smoke"] * opts.smoke)
    cmd = [torchrun, "--nproc_per_node", str(spec["ranks"])] + me if spec["ranks"] else [sys.executable] + me
    env = {**os.environ, "OMP_NUM_THREADS": str(spec.get("threads", 1))}
    files = [os.path.join(opts.out, f"{spec['name']}.rank{r}.json") for r in range(max(1, spec["ranks"]))]
    for path in files:
        if os.path.exists(path):
            os.remove(path)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    if not all(os.path.exists(path) for path in files):
        print(f"{spec['name']}: FAILED\n{(proc.stdout + proc.stderr)[-2000:]}")
        return None
    if proc.returncode:  # every rank finished and wrote its numbers; the failure came while leaving
        print(f"{spec['name']}: exit status {proc.returncode} after the run (results kept)")
    ranks = [json.load(open(path)) for path in files]
    return {"step_s": max(r["step_s"] for r in ranks), "per_rank": ranks}


def _row(spec, runs: list[dict], rounds: dict[str, list[dict]], cfg) -> dict:
    """A table row from a spec's runs: medians over the rounds, ratios taken within each round."""
    median = statistics.median
    base, hand = rounds["trainer-1proc-1thread"], rounds.get(f"handwritten-torch-1f1b-{spec['ranks']}ranks")
    speedups = [b["step_s"] / r["step_s"] for b, r in zip(base, runs) if b]
    speedup, ideal = median(speedups), _ideal(spec, cfg)
    bubbles = [r["per_rank"][0]["bubble_measured"] for r in runs if "bubble_measured" in r["per_rank"][0]]
    vs_hand = None
    if spec["name"] == f"pipe-{spec['ranks']}ranks-1f1b" and hand and all(hand):
        vs_hand = median(r["step_s"] / h["step_s"] for r, h in zip(runs, hand))
    return {
        "name": spec["name"], "ideal_speedup": ideal, "step_s": median(r["step_s"] for r in runs),
        "speedup": speedup, "round_speedups": speedups,
        "of_ideal": speedup / ideal if ideal else None, "vs_handwritten": vs_hand,
        "bubble_measured": median(bubbles) if bubbles else None,
        "peak_rss_mib": max(p["peak_rss_mib"] for r in runs for p in r["per_rank"]),
        "tensor_mib": max(p["tensor_mib"] for r in runs for p in r["per_rank"]),
        "layer_starts": runs[0]["per_rank"][0].get("layer_starts"), "rounds": runs,
    }  # fmt: skip


def _chart(rows, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4))
    names = [r["name"] for r in rows]
    ax.barh(names, [r["speedup"] for r in rows], color="tab:blue", label="measured speed-up")
    piped = [r for r in rows if r["ideal_speedup"]]
    ax.scatter(
        [r["ideal_speedup"] for r in piped], [r["name"] for r in piped], color="tab:red", zorder=3, label="ideal"
    )
    ax.set_xlabel("speed-up over Trainer, one process, one thread")
    ax.invert_yaxis()
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
