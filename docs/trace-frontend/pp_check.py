"""2-rank (gloo, CPU) check of the trace frontend against the single-process model.

python pp_check.py FAMILY SCHEDULE [--seqs 8,12] [--dtype float32|float64] [--vanilla] [--no-share]
  SCHEDULE: 1f1b (2 stages, 1 per rank) | interleaved (4 stages, 2 per rank, ScheduleInterleaved1F1B)
            | interleavedzb (ScheduleInterleavedZeroBubble) | zbv (ScheduleZBVZeroBubble, V placement)
  --dtype float64  run both sides in double precision (separates pipeline errors from fp32 rounding)
  --only-kwargs-fix  torch's pipe plus accept_root_kwargs only (no skip-connection pass, no sharing)
  --vanilla      torch's pipe as pipeline() returns it (no pass, no sharing): shows torch's own failure
  --no-share     skip share_params (tied copies stay torch's deep copies)

For each sequence length in turn: retrace on one microbatch of that length, build this rank's stages, run one
schedule step (scale_grads=False, loss = sum / label count of the whole batch, labels as `target`), all-reduce the
gradients of tied parameters held on several ranks, compare loss and every gradient with the single-process model
on the same batch, then take one SGD step on both sides (one optimizer over model.parameters(), kept across the
retrace).
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

BS, N_MB = 8, 4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _up(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float64 else x.float()


def make_loss(family: str, labels_full: torch.Tensor):
    if family == "bert":
        count = labels_full.numel()

        def loss_fn(logits, target):
            return F.cross_entropy(_up(logits), target, reduction="sum") / count
    else:
        count = int((labels_full[:, 1:] != -100).sum())

        def loss_fn(logits, target):
            v = logits.shape[-1]
            return F.cross_entropy(_up(logits[:, :-1].reshape(-1, v)), target[:, 1:].reshape(-1),
                                   ignore_index=-100, reduction="sum") / count
    return loss_fn


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def worker(rank: int, world: int, port: int, opts) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import tiny_models
    import trace_frontend as tf
    from torch.distributed.pipelining import (Schedule1F1B, ScheduleInterleaved1F1B,
                                              ScheduleInterleavedZeroBubble, ScheduleZBVZeroBubble)

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        fam = opts.family
        model, blocks = tiny_models.make(fam)
        ref, _ = tiny_models.make(fam)
        model.train(); ref.train()
        if opts.dtype == "float64":
            model.double(); ref.double()
        floor_model = None
        if rank == 0:
            import copy as _copy
            floor_model = _copy.deepcopy(ref)  # single process, microbatched: float rounding floor
            opt_floor = torch.optim.SGD(floor_model.parameters(), lr=0.5)
        n_stages = 2 if opts.schedule == "1f1b" else 4
        starts = list(range(0, 4, 4 // n_stages))
        if opts.schedule == "zbv":  # V placement: rank r holds stages r and 2*world-1-r
            stage_rank = [s if s < world else 2 * world - 1 - s for s in range(n_stages)]
        else:
            stage_rank = [s % world for s in range(n_stages)]
        mine = [s for s in range(n_stages) if stage_rank[s] == rank]
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        opt_ref = torch.optim.SGD(ref.parameters(), lr=0.5)
        first_stage_params = None
        for step, seq in enumerate(opts.seqs):
            ids, am, labels = tiny_models.batch(fam, BS, seq, seed=step + 1)
            mb = BS // N_MB
            if opts.vanilla or opts.only_kwargs_fix:
                pipe = tf.trace(model, tf.split_spec(blocks, starts), (ids[:mb],), {"attention_mask": am[:mb]})
                if opts.only_kwargs_fix:
                    tf.accept_root_kwargs(pipe)
            else:
                pipe = tf.trace(model, tf.split_spec(blocks, starts), (ids[:mb],), {"attention_mask": am[:mb]})
                tf.drop_dead_attrs(pipe)
                if not opts.no_share:
                    tf.share_params(pipe, model)
                tf.forward_skip_connections(pipe)
                if not opts.no_kwargs_fix:
                    tf.accept_root_kwargs(pipe)
                problems = tf.check_adjacent(pipe)
                assert not problems, problems
            fqns = tf.param_fqns(pipe, model)
            stages = [pipe.build_stage(s, torch.device("cpu"), None) for s in mine]
            if opts.schedule == "zbv" and not opts.vanilla:
                for st in stages:
                    tf.skip_self_warmup(st)
            loss_fn = make_loss(fam, labels)
            if opts.schedule == "1f1b":
                sched = Schedule1F1B(stages[0], N_MB, loss_fn=loss_fn, scale_grads=False)
            else:
                cls = {"interleaved": ScheduleInterleaved1F1B, "interleavedzb": ScheduleInterleavedZeroBubble,
                       "zbv": ScheduleZBVZeroBubble}[opts.schedule]
                sched = cls(stages, N_MB, loss_fn=loss_fn, scale_grads=False)
            opt.zero_grad(set_to_none=True)
            losses: list = []
            try:
                sched.step(ids, attention_mask=am, target=labels, losses=losses)
            except Exception as e:  # noqa: BLE001
                msg = f"{type(e).__name__}: {e}"
                if e.__cause__ is not None:
                    msg += f"\n   caused by {type(e.__cause__).__name__}: {e.__cause__}"
                print(f"[rank {rank}] seq {seq}: schedule step FAILED: {msg}", flush=True)
                if os.environ.get("PP_TRACEBACK"):
                    traceback.print_exc()
                raise SystemExit(3)

            # tied parameters held by stages on several ranks: sum their gradients
            owners: dict[str, set[int]] = {}
            for s in range(n_stages):
                for canon in set(fqns[s].values()):
                    owners.setdefault(canon, set()).add(stage_rank[s])
            tied_synced = []
            for canon in sorted(owners):
                if len(owners[canon]) > 1:
                    local = {id(p): p for s in mine for n, p in pipe.get_stage_module(s).named_parameters()
                             if fqns[s][n] == canon}  # one object when shared, torch's copies otherwise
                    g = torch.zeros_like(model.get_parameter(canon))
                    for p in local.values():
                        if p.grad is not None:
                            g += p.grad
                    dist.all_reduce(g)
                    for p in local.values():
                        p.grad = g.clone()
                    tied_synced.append(canon)

            # reference
            opt_ref.zero_grad(set_to_none=True)
            if opts.dtype == "float64":  # HF's causal-LM loss casts logits to float32; use the same math in fp64
                out = ref(ids, attention_mask=am)
                out.loss = loss_fn(out.logits, labels)
            else:
                out = ref(ids, attention_mask=am, labels=labels)
            out.loss.backward()
            floor_txt = ""
            if floor_model is not None:
                opt_floor.zero_grad(set_to_none=True)
                for k in range(N_MB):
                    sl = slice(k * mb, (k + 1) * mb)
                    loss_fn(floor_model(ids[sl], attention_mask=am[sl]).logits, labels[sl]).backward()
                big = max(p.grad.abs().max().item() for p in ref.parameters() if p.grad is not None)
                fl = max((((fp.grad - rp.grad).abs().max() / rp.grad.abs().max()).item(), n)
                         for (n, rp), fp in zip(ref.named_parameters(), floor_model.parameters())
                         if rp.grad is not None and rp.grad.abs().max().item() >= 1e-6 * big)
                floor_txt = f" [single-process microbatched vs full batch: max_grad_rel={fl[0]:.2e} at {fl[1]}]"

            # compare
            rows, compared, not_shared = [], [], []
            for s in mine:
                sm = pipe.get_stage_module(s)
                for local, p in sm.named_parameters(remove_duplicate=False):
                    canon = fqns[s][local]
                    if p is not model.get_parameter(canon):
                        not_shared.append(f"stage{s}:{local}")
                    gr = ref.get_parameter(canon).grad
                    g = p.grad if p.grad is not None else torch.zeros_like(gr)
                    rows.append((f"{canon} (stage {s})", (g - gr).abs().max().item(), gr.abs().max().item()))
                    compared.append(canon)
            loss_t = torch.tensor([sum(float(x.detach()) for x in losses) if losses else 0.0], dtype=torch.float64)
            dist.all_reduce(loss_t)
            loss_rel = abs(loss_t.item() - out.loss.item()) / abs(out.loss.item())
            gathered = [None] * world
            dist.all_gather_object(gathered, (rows, compared, not_shared))
            if rank == 0:
                rows = [r for t in gathered for r in t[0]]
                big = max(r[2] for r in rows)
                # per-tensor relative difference max|g-g_ref| / max|g_ref|; tensors whose reference gradient is
                # at rounding-noise level (max|g_ref| < 1e-6 * largest gradient, e.g. BERT's key biases, whose
                # exact gradient is 0 because softmax ignores a per-query constant) are reported separately.
                real = [(n, d / m) for n, d, m in rows if m >= 1e-6 * big]
                noise = [(n, d, m) for n, d, m in rows if m < 1e-6 * big]
                worst = max(real, key=lambda t: t[1])
                covered = set().union(*[set(t[1]) for t in gathered])
                need = {n for n, p in ref.named_parameters() if p.grad is not None}
                ns = [x for t in gathered for x in t[2]]
                noise_txt = (f" noise-level refs: {len(noise)} tensors, max|diff|={max(d for _, d, _ in noise):.1e} "
                             f"(max|ref| {max(m for *_, m in noise):.1e})") if noise else ""
                print(f"RESULT {fam} {opts.schedule} seq={seq} loss_ref={out.loss.item():.6f} "
                      f"loss_pp={loss_t.item():.6f} loss_rel={loss_rel:.2e} max_grad_rel={worst[1]:.2e} "
                      f"at {worst[0]} over {len(real)} tensors;{noise_txt} | params compared "
                      f"{len(covered)}/{len(need)} missing={sorted(need - covered)} tied_synced={tied_synced} "
                      f"stage params not the model's: {ns if ns else 'none'}{floor_txt}", flush=True)
            # parameter identity across retraces
            this = {(s, n): p for s in mine for n, p in pipe.get_stage_module(s).named_parameters()}
            if first_stage_params is not None:
                diff = [k for k, p in this.items() if k in first_stage_params and first_stage_params[k] is not p]
                print(f"[rank {rank}] retrace seq={seq}: {len(this)} stage params, "
                      f"{len(this) - len(diff)} identical objects to the first trace's, different: {diff}",
                      flush=True)
            else:
                first_stage_params = this
            opt.step()
            opt_ref.step()
            if floor_model is not None:
                opt_floor.step()
            dist.barrier()
    finally:
        dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("family")
    ap.add_argument("schedule", choices=["1f1b", "interleaved", "interleavedzb", "zbv"])
    ap.add_argument("--seqs", default="8,12")
    ap.add_argument("--vanilla", action="store_true")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--no-share", action="store_true")
    ap.add_argument("--no-kwargs-fix", action="store_true")
    ap.add_argument("--only-kwargs-fix", action="store_true", help="torch's pipe + accept_root_kwargs only")
    opts = ap.parse_args()
    opts.seqs = [int(x) for x in opts.seqs.split(",")]
    mp.spawn(worker, args=(2, free_port(), opts), nprocs=2, join=True)


if __name__ == "__main__":
    main()
