"""Generation through the pipeline: tokens per second and per-rank memory, against `generate` on one process and
against the assembled path (every rank's stage weights gathered on the first rank, which then generates alone, as
`PipeSeq2SeqTrainer(predict_with_generate=True)` did before generation went through the pipeline).

    python benchmarks/generation.py                    # a ~45M-parameter Llama, 16 prompts, 32 new tokens, greedy
    python benchmarks/generation.py --layers 16 --hidden 768 --ranks 2 4

Each pipeline run is its own `torchrun` job over `--ranks` processes (one thread each), from the model saved once
to a folder (`PipelineGenerator.from_pretrained`: each rank reads only its stages), with 1 group of rows in flight
and with one group per stage; every rank reports the tokens per second of a timed `generate` after a warm-up, and
the peak anonymous memory (RssAnon, sampled every 2 ms) above its baseline after loading. Every run checks its tokens
against the one-process run's. Not a test: the numbers go in docs/generation.md and the issue notes.
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
sys.path.insert(0, ROOT)

from benchmarks._common import rss_anon_mib  # noqa: E402


class PeakMemory:
    """The peak RssAnon above the level at entry (MiB), sampled in a thread."""

    def __enter__(self) -> PeakMemory:
        self.base, self.peak, self._done = rss_anon_mib(), 0.0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._done.is_set():
            self.peak = max(self.peak, rss_anon_mib() - self.base)
            time.sleep(0.002)

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()


def prompts(rows: int, length: int, vocab: int):
    import torch

    g = torch.Generator().manual_seed(0)
    return torch.randint(3, vocab, (rows, length), generator=g)


def _timed(generate, ids, new_tokens: int) -> tuple[float, object]:
    generate(ids[:2], max_new_tokens=2, min_new_tokens=2)  # warm-up
    start = time.perf_counter()
    tokens = generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    return time.perf_counter() - start, tokens


def one_process(folder: str, args: argparse.Namespace) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = prompts(args.rows, args.prompt, model.config.vocab_size)
    with PeakMemory() as memory:
        seconds, tokens = _timed(model.generate, ids, args.new_tokens)
    torch.save(tokens, os.path.join(folder, "reference.pt"))
    return {"tokens_per_s": args.rows * args.new_tokens / seconds, "peak_mb": memory.peak}


def worker(folder: str, groups: int, mode: str, rows: int, prompt: int, new_tokens: int) -> None:
    """One rank of a torchrun job: `mode` "pipeline" (generation through the stages) or "assembled"."""
    import torch
    import torch.distributed as dist

    from hf_pipe import PipelineGenerator

    torch.set_num_threads(1)
    generator = PipelineGenerator.from_pretrained(folder, groups=groups)
    engine, model = generator.engine, generator.model
    ids = prompts(rows, prompt, model.config.vocab_size)
    gather_s = 0.0
    with PeakMemory() as memory:
        if mode == "pipeline":
            seconds, tokens = _timed(generator.generate, ids, new_tokens)
        else:
            start = time.perf_counter()
            state = {k: v.detach().clone() for k, v in engine.local_state().items()}
            parts = [None] * engine.pp_size if engine.pp_rank == 0 else None
            dist.gather_object(state, parts, dst=0)
            gather_s = time.perf_counter() - start
            seconds, tokens = 0.0, None
            if engine.pp_rank == 0:
                from transformers import AutoConfig, AutoModelForCausalLM

                whole = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder)).eval()
                whole.load_state_dict({k: v for p in parts for k, v in p.items()}, strict=False)
                whole.tie_weights()
                torch.set_num_threads(engine.pp_size)  # the other ranks idle: give it their cores
                seconds, tokens = _timed(whole.generate, ids, new_tokens)
            dist.barrier()
    reference = torch.load(os.path.join(folder, "reference.pt"))
    result = {
        "rank": dist.get_rank(),
        "tokens_per_s": rows * new_tokens / seconds if seconds else None,
        "gather_s": gather_s,
        "peak_mb": memory.peak,
        "exact": None if tokens is None else bool(torch.equal(tokens, reference)),
    }
    with open(os.path.join(folder, f"result-{dist.get_rank()}.json"), "w") as f:
        json.dump(result, f)


def torchrun(folder: str, ranks: int, groups: int, mode: str, args: argparse.Namespace) -> list[dict]:
    for name in os.listdir(folder):
        if name.startswith("result-"):
            os.remove(os.path.join(folder, name))
    code = (
        f"import sys; sys.path.insert(0, {ROOT!r}); from benchmarks.generation import worker; "
        f"worker({folder!r}, {groups}, {mode!r}, {args.rows}, {args.prompt}, {args.new_tokens})"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}", "--no-python",
               sys.executable, "-c", code]  # fmt: skip
    subprocess.run(command, check=True, env=env, cwd=ROOT, capture_output=True)
    return [json.load(open(os.path.join(folder, f"result-{r}.json"))) for r in range(ranks)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--new_tokens", type=int, default=32)
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=3 * args.hidden,
        num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = 0, None
    whole_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        del model
        print(f"Llama {args.layers} x {args.hidden}: {whole_mb:.0f} MB of weights; {args.rows} prompts of "
              f"{args.prompt} tokens, {args.new_tokens} new tokens each, greedy; {os.cpu_count()} CPU cores")  # fmt: skip
        single = one_process(folder, args)
        print(f"{'one process':<34} {single['tokens_per_s']:8.1f} tokens/s   peak +{single['peak_mb']:.0f} MB")
        for ranks in args.ranks:
            for groups in sorted({1, ranks}):
                results = torchrun(folder, ranks, groups, "pipeline", args)
                speed = min(r["tokens_per_s"] for r in results)
                peaks = ", ".join(f"{r['peak_mb']:.0f}" for r in results)
                exact = all(r["exact"] for r in results)
                print(f"{f'{ranks} ranks, {groups} group(s) in flight':<34} {speed:8.1f} tokens/s   "
                      f"peak +MB per rank: {peaks}   same tokens: {exact}")  # fmt: skip
            results = torchrun(folder, ranks, 1, "assembled", args)
            first = results[0]
            peaks = ", ".join(f"{r['peak_mb']:.0f}" for r in results)
            print(f"{f'{ranks} ranks, assembled on rank 0':<34} {first['tokens_per_s']:8.1f} tokens/s   "
                  f"peak +MB per rank: {peaks}   gather {first['gather_s']:.2f} s   same tokens: {first['exact']}")  # fmt: skip


if __name__ == "__main__":
    main()
