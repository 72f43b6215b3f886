"""The pipeline engine against one process: loss, every gradient, grad norm and weights after AdamW, per schedule.

Each test spawns one group of gloo ranks and runs several schedules in it (process start-up dominates on 2 cores).
Every case runs two steps with different sequence lengths (dynamic padding) and an AdamW step in between.
"""

from __future__ import annotations

import pytest
import torch

from tests._dist import run_distributed
from tests._models import SEQ2SEQ, padded_batch, reference_step, rel_err, tiny_model

TOL = 1e-5
SEQ_LENS = (16, 11)
MICROBATCHES = 4


def _optimizer(params):
    # SGD: AdamW divides by sqrt(v), so gradients equal to 1e-7 can still move a near-zero-gradient weight by a
    # whole learning rate; weights after AdamW are compared, with Trainer's tolerance, in the PipeTrainer tests.
    return torch.optim.SGD(params, lr=0.5, momentum=0.9)


def _pipeline_worker(name: str, cases: list[tuple], layers: int, microbatches: int, frontend: str) -> list[dict]:
    from hf_pipe.engine import PipelineEngine

    out = []
    for schedule, stages_per_rank, *split in cases:
        model = tiny_model(name, **_layers(name, layers))
        engine = PipelineEngine(
            model,
            schedule=schedule,
            microbatches=microbatches,
            stages_per_rank=stages_per_rank,
            split=split[0] if split else "auto",
            device="cpu",
            frontend=frontend,
            task="causal_lm" if name == "custom" else None,
        )
        opt = _optimizer(list(engine.parameters()))
        record = {"schedule": schedule, "stages_per_rank": stages_per_rank, "losses": [], "grads": [], "norms": []}
        for i, seq_len in enumerate(SEQ_LENS):
            opt.zero_grad(set_to_none=True)
            loss = engine.train_step(padded_batch(name, seq_len=seq_len, seed=i))
            engine.reduce_tied_gradients()
            record["losses"].append(loss.item())
            record["norms"].append(engine.grad_norm().item())
            record["grads"].append({n: p.grad.clone() for n, p in engine.named_parameters() if p.grad is not None})
            opt.step()
        record["weights"] = {n: p.detach().clone() for n, p in engine.named_parameters()}
        out.append(record)
    return out


def _layers(name: str, layers: int) -> dict:
    if name in SEQ2SEQ:  # encoder and decoder blocks as tiny_model builds them
        return {}
    return {"n_layer": layers} if name in ("gpt2", "gptj") else {"num_hidden_layers": layers}


def _reference(name: str, layers: int) -> dict:
    model = tiny_model(name, **_layers(name, layers))
    opt = _optimizer(model.parameters())
    ref = {"losses": [], "grads": [], "norms": []}
    for i, seq_len in enumerate(SEQ_LENS):
        loss, grads = reference_step(model, padded_batch(name, seq_len=seq_len, seed=i))
        ref["losses"].append(loss.item())
        ref["grads"].append(grads)
        norms = [p.grad.norm() for p in model.parameters() if p.grad is not None]  # BART untied: `shared` unused
        ref["norms"].append(torch.linalg.vector_norm(torch.stack(norms)).item())
        opt.step()
    ref["weights"] = {n: p.detach().clone() for n, p in model.named_parameters(remove_duplicate=False)}
    return ref


def _recorder(errs: dict[str, float]):
    def note(kind: str, value: float) -> None:
        errs[kind] = max(errs[kind], value)

    return note


def check_against_reference(
    name: str,
    world_size: int,
    cases: list[tuple[str, int]],
    layers: int = 4,
    microbatches: int = MICROBATCHES,
    frontend: str = "module",
) -> dict[str, float]:
    """Run `cases` ((schedule, stages per rank), ...) on `world_size` ranks; assert and return the worst differences."""
    ranks = run_distributed(_pipeline_worker, world_size, name, cases, layers, microbatches, frontend)
    return check_engine_runs(name, world_size, cases, ranks, layers, frontend)


def check_engine_runs(
    name: str, world_size: int, cases: list[tuple], ranks: list[list[dict]], layers: int = 4, frontend: str = "module"
) -> dict[str, float]:
    """`check_against_reference`'s checks on runs made already (`_pipeline_worker`'s records, per rank)."""
    ref = _reference(name, layers)
    worst = {}
    for c, (schedule, spr, *split) in enumerate(cases):
        label = f"{name} {frontend} {schedule} {world_size * spr} stages{f' split {split[0]}' if split else ''}"
        errs = {"loss": 0.0, "grad norm": 0.0, "grads": 0.0, "weights": 0.0}
        note = _recorder(errs)

        for step in range(len(SEQ_LENS)):
            for rank in ranks:
                note("loss", abs(rank[c]["losses"][step] - ref["losses"][step]) / abs(ref["losses"][step]))
                note("grad norm", abs(rank[c]["norms"][step] - ref["norms"][step]) / ref["norms"][step])
            seen = set()
            floor = 1e-3 * max(g.abs().max().item() for g in ref["grads"][step].values())
            for rank in ranks:
                for fqn, g in rank[c]["grads"][step].items():
                    note("grads", rel_err(g, ref["grads"][step][fqn], floor))
                    seen.add(fqn)
            missing = {n for n in ref["grads"][step] if not any(n in r[c]["grads"][step] for r in ranks)}
            # a tied weight is reported under its first FQN only
            missing = {
                n for n in missing if not any(torch.equal(ref["grads"][step][n], ref["grads"][step][m]) for m in seen)
            }
            assert not missing, f"{label}: no rank holds gradients for {sorted(missing)}"
        # copies of a tied weight on several ranks must stay one parameter: bitwise equal after every step
        for fqn in set(ranks[0][c]["weights"]).intersection(*(r[c]["weights"] for r in ranks[1:])):
            assert all(torch.equal(r[c]["weights"][fqn], ranks[0][c]["weights"][fqn]) for r in ranks), fqn
        floor = 1e-3 * max(w.abs().max().item() for w in ref["weights"].values())
        for rank in ranks:
            for fqn, w in rank[c]["weights"].items():
                note("weights", rel_err(w, ref["weights"][fqn], floor))
        worst[label] = max(errs.values())
        assert worst[label] < TOL, f"{label}: relative differences {errs} exceed {TOL}"
    return worst


ALL_SCHEDULES_2_RANKS = [
    ("gpipe", 1),
    ("1f1b", 1),
    ("interleaved1f1b", 2),
    ("loopedbfs", 2),
    ("interleavedzerobubble", 2),
    ("zbvzerobubble", 2),
    ("dualpipev", 2),
]


@pytest.mark.parametrize("name", ["gpt2", "llama", "bert-cls", "bert-mlm"])
def test_every_schedule_on_two_ranks(name):
    print(check_against_reference(name, 2, ALL_SCHEDULES_2_RANKS))


@pytest.mark.parametrize("name", ["gpt2", "llama", "bert-cls", "bert-mlm"])
def test_four_ranks(name):
    print(check_against_reference(name, 4, [("gpipe", 1), ("1f1b", 1)]))


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_eight_stages_on_four_ranks(name):
    cases = [("interleaved1f1b", 2), ("zbvzerobubble", 2)]
    print(check_against_reference(name, 4, cases, layers=8, microbatches=8))


@pytest.mark.parametrize("name", ["llama-tied", "mistral", "qwen2", "qwen3"])
def test_llama_shaped_families(name):
    """The Llama adapter serves these unchanged (tied embeddings, sliding windows, q/k norms)."""
    print(check_against_reference(name, 2, [("1f1b", 1), ("interleaved1f1b", 2), ("dualpipev", 2)]))


def test_fewer_microbatches_than_stages():
    """Schedules torch runs with fewer microbatches than stages (peers hang here) give the same gradients."""
    print(check_against_reference("gpt2", 2, [("gpipe", 1), ("zbvzerobubble", 2), ("loopedbfs", 2)], microbatches=1))
    print(check_against_reference("llama", 2, [("interleaved1f1b", 2), ("interleavedzerobubble", 2)], microbatches=2))


@pytest.mark.parametrize("name", ["gpt2", "llama", "bert-mlm", "bert-cls"])
def test_stages_that_begin_mid_block(name):
    """Half-block splits (a stage ends after a block's attention, the next runs its MLP) give the same gradients."""
    cases = [("1f1b", 1, [0, 1.5]), ("interleaved1f1b", 2, [0, 0.5, 2, 3.5]), ("zbvzerobubble", 2, [0, 1.5, 2.5, 3])]
    print(check_against_reference(name, 2, cases))


def _measured_plans() -> list:
    from hf_pipe.engine import PipelineEngine

    engine = PipelineEngine(
        tiny_model("llama"), schedule="interleaved1f1b", microbatches=4, split="measured", device="cpu"
    )
    return [engine.plan.policy, engine.plan.layer_starts]


def test_measured_split_is_one_plan_on_every_rank():
    """`split="measured"` times the pieces on each rank and averages: every rank builds the same plan."""
    from hf_pipe.measure import measure_costs
    from hf_pipe.split import resolve_family

    model = tiny_model("llama")
    costs = measure_costs(model, resolve_family("llama"), "causal_lm", model.config, microbatch=2, seq_len=16,
                          device=torch.device("cpu"))  # fmt: skip
    assert 0 < costs.first_half < costs.layer and costs.head > 0 and costs.embeddings > 0
    plans = run_distributed(_measured_plans, 2)
    assert plans[0] == plans[1] and plans[0][0] == "measured" and len(plans[0][1]) == 4
    print(plans[0], costs)
    # and trains like one process
    print(check_against_reference("gpt2", 2, [("1f1b", 1, "measured")]))
