"""Survey: which HuggingFace model families train through hf_pipe's trace frontend, and do they match one process?

    .venv/bin/python scripts/trace_survey.py                # every family; writes docs/trace-survey.md
    .venv/bin/python scripts/trace_survey.py bloom t5       # some families; prints the table only
    .venv/bin/python scripts/trace_survey.py --timeout 300  # seconds per run of a family (default 120)

For each family a tiny model is built from its config only (hidden 64, 4 blocks, 4 heads, vocab 97, 64 positions,
every dropout 0; a ForCausalLM head unless noted) and trained on 2 gloo CPU ranks with
`PipelineEngine(model, frontend="trace", device="cpu", microbatches=4)` on two schedules: "1f1b" (one stage per rank)
and "interleaved1f1b" (two per rank). Each schedule runs two steps in a row, at sequence lengths 16 then 11 (a
retrace per batch shape), with an SGD step between, so the second step also shows that the per-shape stages train
the model's own weights. After each step the loss and every gradient (`engine.named_parameters()`, after
`reduce_tied_gradients`) are compared with the same model trained in one process (`model(**batch).loss.backward()`):
the check of tests/test_trace_frontend.py. Gradients are compared as in the tests (tests/_models.rel_err:
max|a-b| / max|b| per tensor, the denominator at least 1e-3 × the largest reference gradient); a family passes when
loss and gradients agree within 1e-5 relative on both schedules and every gradient the reference has is on a rank.

Also reported: seconds per trace (`trace_stages`, mean over a run's traces, the probe trace included), and the fp32
noise floor: the one-process model run in the pipeline's 4 microbatches (loss summed over microbatches as hf_pipe's
PipelineLoss does) against the whole batch. A pipeline difference of that size is fp32 rounding, not the pipeline.

Each family runs in its own group of processes (tests/_dist.run_distributed) with a timeout. Errors are caught per
schedule on each rank; if a rank fails alone (its peer then waits forever), each schedule is run again on its own so
the failing rank's traceback is relayed. One family's failure never stops the survey.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import transformers  # noqa: E402

from tests._dist import run_distributed  # noqa: E402
from tests._models import VOCAB, reference_step, rel_err, uneven_batch  # noqa: E402

WORLD_SIZE = 2
BATCH_SIZE = 8
MICROBATCHES = 4
SEQ_LENS = (16, 11)
SCHEDULES = (("1f1b", 1), ("interleaved1f1b", 2))
TOL = 1e-5
DOC = os.path.join(ROOT, "docs", "trace-survey.md")

# Token ids inside the tiny vocabulary; padding is token 0 in every batch here.
_TOKENS = dict(pad_token_id=0, bos_token_id=0, eos_token_id=0)
# Llama-style names (hidden_size, num_hidden_layers, ...), shared by most decoder configs.
_LLAMA_LIKE = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, max_position_embeddings=64
)
_BERT_LIKE = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, max_position_embeddings=64
)


@dataclass(frozen=True)
class Family:
    """A tiny model: transformers config and model class names, config overrides, and a note for the table."""

    config: str
    model: str
    kwargs: dict = field(default_factory=dict)
    note: str = ""
    token_type_ids: bool = False  # the batch also carries two-segment token_type_ids (BERT)


FAMILIES: dict[str, Family] = {
    "gpt2": Family("GPT2Config", "GPT2LMHeadModel", dict(n_embd=64, n_layer=4, n_head=4, n_positions=64)),
    "llama": Family(
        "LlamaConfig", "LlamaForCausalLM", dict(_LLAMA_LIKE, num_key_value_heads=2, tie_word_embeddings=False)
    ),
    "bert": Family(
        "BertConfig", "BertForSequenceClassification", dict(_BERT_LIKE, num_labels=3), "3 labels", token_type_ids=True
    ),
    "gpt_neox": Family("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(_LLAMA_LIKE)),
    "opt": Family(
        "OPTConfig",
        "OPTForCausalLM",
        dict(
            hidden_size=64,
            ffn_dim=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            word_embed_proj_dim=64,
            max_position_embeddings=64,
        ),
    ),
    "phi": Family("PhiConfig", "PhiForCausalLM", dict(_LLAMA_LIKE)),
    "falcon": Family(
        "FalconConfig", "FalconForCausalLM", dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4)
    ),
    "mistral": Family(
        "MistralConfig", "MistralForCausalLM", dict(_LLAMA_LIKE, num_key_value_heads=2, sliding_window=8)
    ),
    "qwen2": Family(
        "Qwen2Config", "Qwen2ForCausalLM", dict(_LLAMA_LIKE, num_key_value_heads=2, tie_word_embeddings=True)
    ),
    "qwen3": Family("Qwen3Config", "Qwen3ForCausalLM", dict(_LLAMA_LIKE, num_key_value_heads=2, head_dim=16)),
    "gemma": Family("GemmaConfig", "GemmaForCausalLM", dict(_LLAMA_LIKE, num_key_value_heads=2, head_dim=16)),
    "gemma2": Family(
        "Gemma2Config",
        "Gemma2ForCausalLM",
        dict(_LLAMA_LIKE, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16, sliding_window=8),
        "sliding window 8, soft-capping",
    ),
    "bloom": Family("BloomConfig", "BloomForCausalLM", dict(hidden_size=64, n_layer=4, n_head=4), "ALiBi"),
    "gptj": Family(
        "GPTJConfig", "GPTJForCausalLM", dict(n_embd=64, n_layer=4, n_head=4, n_positions=64, rotary_dim=8)
    ),
    "stablelm": Family("StableLmConfig", "StableLmForCausalLM", dict(_LLAMA_LIKE, num_key_value_heads=4)),
    "starcoder2": Family("Starcoder2Config", "Starcoder2ForCausalLM", dict(_LLAMA_LIKE, num_key_value_heads=2)),
    "olmo": Family("OlmoConfig", "OlmoForCausalLM", dict(_LLAMA_LIKE)),
    "roberta": Family("RobertaConfig", "RobertaForMaskedLM", dict(_BERT_LIKE)),
    "distilbert": Family(
        "DistilBertConfig",
        "DistilBertForMaskedLM",
        dict(dim=64, hidden_dim=128, n_layers=4, n_heads=4, max_position_embeddings=64),
    ),
    "electra": Family("ElectraConfig", "ElectraForMaskedLM", dict(_BERT_LIKE, embedding_size=64)),
    "albert": Family(
        "AlbertConfig", "AlbertForMaskedLM", dict(_BERT_LIKE, embedding_size=64), "one block shared by all 4 layers"
    ),
    "t5": Family(
        "T5Config",
        "T5ForConditionalGeneration",
        dict(d_model=64, d_kv=16, d_ff=128, num_layers=4, num_heads=4, decoder_start_token_id=0),
        "encoder-decoder",
    ),
    # beyond the first list: newer variants, a mixture of experts, ALBERT without weight sharing
    "gemma3": Family(
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        dict(_LLAMA_LIKE, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16, sliding_window=8),
        "text only, sliding window 8",
    ),
    "phi3": Family("Phi3Config", "Phi3ForCausalLM", dict(_LLAMA_LIKE, num_key_value_heads=2)),
    "olmo2": Family("Olmo2Config", "Olmo2ForCausalLM", dict(_LLAMA_LIKE)),
    "gpt_bigcode": Family(
        "GPTBigCodeConfig", "GPTBigCodeForCausalLM", dict(n_embd=64, n_layer=4, n_head=4, n_positions=64), "MQA"
    ),
    "mixtral": Family(
        "MixtralConfig",
        "MixtralForCausalLM",
        dict(_LLAMA_LIKE, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2),
        "4 experts, top-2",
    ),
    "albert_unshared": Family(
        "AlbertConfig",
        "AlbertForMaskedLM",
        dict(_BERT_LIKE, embedding_size=64, num_hidden_groups=4),
        "num_hidden_groups=4: a block per layer",
    ),
}


# -- models and batches (built the same way on every rank and in the reference) ------------------------------------
def missing_class(family: Family) -> str | None:
    absent = [name for name in (family.config, family.model) if not hasattr(transformers, name)]
    return f"{', '.join(absent)} not in transformers {transformers.__version__}" if absent else None


def build(name: str, seed: int = 0) -> torch.nn.Module:
    """The family's tiny model in train mode, every dropout probability of its config set to 0."""
    family = FAMILIES[name]
    config = getattr(transformers, family.config)(**{"vocab_size": VOCAB, **_TOKENS, **family.kwargs})
    for key, value in config.to_dict().items():
        if ("dropout" in key or "pdrop" in key or key == "layerdrop") and isinstance(value, float):
            setattr(config, key, 0.0)
    torch.manual_seed(seed)
    return getattr(transformers, family.model)(config).train()


def task_of(name: str) -> str | None:
    from hf_pipe.families.base import task_of as hf_pipe_task_of

    return hf_pipe_task_of(FAMILIES[name].model)


def make_batch(name: str, seq_len: int, seed: int) -> dict[str, torch.Tensor]:
    """The tests' right-padded batch with uneven lengths, labels for the family's head."""
    return uneven_batch(task_of(name), BATCH_SIZE, seq_len, seed, token_type_ids=FAMILIES[name].token_type_ids)


def _optimizer(params):
    return torch.optim.SGD(params, lr=0.5, momentum=0.9)  # as tests/test_engine_equivalence.py


# -- errors ------------------------------------------------------------------------------------------------------
def _exception_line(tb: str) -> str:
    """`Type: first line of the message` of the last exception in a formatted traceback."""
    lines = tb.rstrip().splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("Traceback (most recent call last)")]
    for line in lines[starts[-1] + 1 if starts else 0 :]:
        if line and not line.startswith(" "):
            return line.strip()
    return lines[-1].strip() if lines else ""


def _key_line(tb: str) -> str:
    """The most telling line: for hf_pipe's TraceError, the first line of what torch.export said."""
    lines = tb.rstrip().splitlines()
    for i, line in enumerate(lines):
        if line.rstrip().endswith("torch.export said:") and i + 1 < len(lines):
            return lines[i + 1].strip()
    return _exception_line(tb)


def error_record(tb: str, where: str) -> dict[str, str]:
    lines = tb.rstrip().splitlines()[-14:]
    while len(lines) > 1 and not lines[0].startswith(("  File", "Traceback")):
        lines.pop(0)  # start the tail at a frame
    return {"where": where, "first_line": _exception_line(tb), "key_line": _key_line(tb), "tail": "\n".join(lines)}


# what a rank reports when its peer died first: a consequence, not the cause
_PEER_GONE = ("Connection reset by peer", "Connection closed by peer", "gloo/transport")


def relayed_error(error: Exception) -> dict[str, str]:
    """The cause among the ranks' tracebacks that run_distributed relays (a rank whose peer died reports only that)."""
    text = str(error)
    if "--- rank " not in text:  # a hang (TimeoutError) with no traceback, or a process that died
        return error_record(f"{type(error).__name__}: {text}", "(schedule run alone)")
    blocks = [block.split(" ---\n", 1) for block in text.split("\n--- rank ")[1:]]
    rank, tb = next(((r, t) for r, t in blocks if not any(m in _exception_line(t) for m in _PEER_GONE)), blocks[0])
    where = "train_step" if "in train_step" in tb else "engine"
    return error_record(tb, f"{where} (rank {rank}, schedule run alone)")


# -- the pipeline, on every rank -----------------------------------------------------------------------------------
def pipeline_worker(name: str, cases: list[tuple[str, int]], catch: bool) -> list[dict[str, Any]]:
    """Each case (schedule, stages per rank): engine, two steps at SEQ_LENS, loss and gradients after each.

    With `catch`, an error ends only its case and is returned; otherwise it propagates (run_distributed relays it).
    """
    import hf_pipe.trace
    from hf_pipe.engine import PipelineEngine

    trace_times: list[float] = []
    trace_stages = hf_pipe.trace.trace_stages

    def timed_trace(*args, **kwargs):
        start = time.perf_counter()
        try:
            return trace_stages(*args, **kwargs)
        finally:
            trace_times.append(time.perf_counter() - start)

    hf_pipe.trace.trace_stages = timed_trace  # the engine's own tracing (TracedStages), timed
    export = hf_pipe.trace._trace
    exported: list[bool] = []

    def noted_export(*args, **kwargs):
        pipe = export(*args, **kwargs)  # torch.export and the split: raises TraceError if export fails
        exported.append(True)
        return pipe

    hf_pipe.trace._trace = noted_export
    out = []
    for schedule, stages_per_rank in cases:
        trace_times.clear()
        exported.clear()
        record: dict[str, Any] = {"losses": [], "grads": [], "error": None, "where": "engine"}
        try:
            engine = PipelineEngine(
                build(name),
                schedule=schedule,
                microbatches=MICROBATCHES,
                stages_per_rank=stages_per_rank,
                device="cpu",
                frontend="trace",
            )
            opt = _optimizer(list(engine.parameters()))
            for step, seq_len in enumerate(SEQ_LENS):
                record["where"] = f"train_step {step + 1} (seq {seq_len})"
                opt.zero_grad(set_to_none=True)
                loss = engine.train_step(make_batch(name, seq_len, seed=step))
                engine.reduce_tied_gradients()
                record["losses"].append(loss.item())
                record["grads"].append({n: p.grad.clone() for n, p in engine.named_parameters() if p.grad is not None})
                opt.step()
        except Exception:
            if not catch:
                raise
            record["error"] = error_record(traceback.format_exc(), record["where"])
        record["trace_s"] = list(trace_times)
        record["exported"] = bool(exported)
        out.append(record)
    return out


# -- one process -------------------------------------------------------------------------------------------------
def reference(name: str, microbatched: bool = False) -> dict[str, list]:
    """Losses and gradients of the same two steps in one process: HF's forward and loss on the whole batch, or (with
    `microbatched`) the pipeline's arithmetic: MICROBATCHES chunks, each `sum of loss terms / whole-batch count`."""
    from hf_pipe.loss import PipelineLoss

    model = build(name)
    opt = _optimizer(model.parameters())
    out: dict[str, list] = {"losses": [], "grads": []}
    for step, seq_len in enumerate(SEQ_LENS):
        batch = make_batch(name, seq_len, seed=step)
        if not microbatched:
            loss, grads = reference_step(model, batch)
        else:
            model.zero_grad(set_to_none=True)
            labels = batch.pop("labels")
            loss_fn = PipelineLoss(task_of(name), model.config)
            loss_fn.normalizer = float(loss_fn.count(labels))
            loss = torch.zeros(())
            chunks = {k: v.tensor_split(MICROBATCHES) for k, v in batch.items()}
            for i, target in enumerate(labels.tensor_split(MICROBATCHES)):
                part = loss_fn(model(**{k: v[i] for k, v in chunks.items()}).logits, target)
                part.backward()
                loss = loss + part.detach()
            grads = {
                n: p.grad.clone() for n, p in model.named_parameters(remove_duplicate=False) if p.grad is not None
            }
        out["losses"].append(loss.item())
        out["grads"].append(grads)
        opt.step()
    return out


def compare(ranks: list[dict], ref: dict[str, list]) -> dict[str, Any]:
    """Worst relative loss and gradient differences over both steps and all ranks, where, and gradients no rank has."""
    worst = {"loss": 0.0, "grads": 0.0, "where": "", "missing": []}
    for step, seq_len in enumerate(SEQ_LENS):
        ref_grads = ref["grads"][step]
        floor = 1e-3 * max(g.abs().max().item() for g in ref_grads.values())
        for rank in ranks:
            loss_err = abs(rank["losses"][step] - ref["losses"][step]) / abs(ref["losses"][step])
            worst["loss"] = max(worst["loss"], loss_err)
            for fqn, g in rank["grads"][step].items():
                err = rel_err(g, ref_grads.get(fqn, torch.zeros_like(g)), floor)
                if err > worst["grads"]:
                    worst["grads"], worst["where"] = err, f"{fqn} (seq {seq_len})"
        seen = {fqn for rank in ranks for fqn in rank["grads"][step]}
        # a tied weight is reported under one FQN only
        missing = [
            n
            for n in ref_grads
            if n not in seen and not any(torch.equal(ref_grads[n], ref_grads[m]) for m in seen if m in ref_grads)
        ]
        worst["missing"] = sorted(set(worst["missing"]) | set(missing))
    worst["passed"] = worst["loss"] < TOL and worst["grads"] < TOL and not worst["missing"]
    return worst


# -- one family --------------------------------------------------------------------------------------------------
def run_cases_alone(name: str, timeout: float) -> list[list[dict] | dict]:
    """Each schedule in its own process group, errors propagating: the failing rank's traceback comes back."""
    results: list[list[dict] | dict] = []
    for case in SCHEDULES:
        try:
            results.append(
                [r[0] for r in run_distributed(pipeline_worker, WORLD_SIZE, name, [case], False, timeout=timeout)]
            )
        except Exception as error:  # RuntimeError with the ranks' tracebacks, or TimeoutError (a hang)
            results.append(relayed_error(error))
    return results


def survey(name: str, timeout: float) -> dict[str, Any]:
    family = FAMILIES[name]
    row: dict[str, Any] = {"name": name, "model": family.model, "note": family.note, "cases": {}}
    absent = missing_class(family)
    if absent:
        row["skipped"] = absent
        return row
    start = time.perf_counter()
    try:
        per_case = list(
            zip(*run_distributed(pipeline_worker, WORLD_SIZE, name, list(SCHEDULES), True, timeout=timeout))
        )
        per_case = [list(ranks) for ranks in per_case]
    except Exception:  # one rank failed alone and its peer hung, or a process died: isolate the schedules
        per_case = run_cases_alone(name, timeout)
    ref = noise = None
    for (schedule, _), ranks in zip(SCHEDULES, per_case):
        errors = [ranks] if isinstance(ranks, dict) else [r["error"] for r in ranks if r["error"]]
        if errors:
            row["cases"][schedule] = {"error": errors[0]}
            if not isinstance(ranks, dict):
                row["cases"][schedule]["exported"] = any(r["exported"] for r in ranks)
            elif errors[0]["where"].startswith("train_step"):  # the engine's probe trace had exported
                row["cases"][schedule]["exported"] = True
            continue
        if ref is None:
            ref = reference(name)
            noise = compare([reference(name, microbatched=True)], ref)
        result = compare(ranks, ref)
        times = [t for r in ranks for t in r["trace_s"]]
        result["trace_s"] = sum(times) / len(times) if times else None
        result["exported"] = True
        row["cases"][schedule] = result
    row["noise"] = noise
    row["wall_s"] = time.perf_counter() - start
    return row


# -- the report --------------------------------------------------------------------------------------------------
def _short(text: str, width: int = 90) -> str:
    text = text.replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= width else text[: width - 1] + "…"


def _exported(row: dict) -> str:
    cases = row["cases"].values()
    if any(c.get("exported") for c in cases):
        return "yes"
    errors = [c["error"] for c in cases if "error" in c]
    if any("TraceError" in e["first_line"] for e in errors):
        return "no: " + _short(next(e["key_line"] for e in errors if "TraceError" in e["first_line"]), 70)
    if any("exported" in c for c in cases):
        return "not reached"  # hf_pipe stopped before torch.export ran
    return "?"  # only errors relayed from schedules run alone, none an export error


def _case_cell(case: dict | None) -> str:
    if case is None:
        return ""
    if "error" in case:
        return "error"
    mark = "" if case["passed"] else " ✗"
    missing = f", {len(case['missing'])} grads missing" if case["missing"] else ""
    return f"{case['loss']:.1e} / {case['grads']:.1e}{missing}{mark}"


def _result(row: dict) -> str:
    if "skipped" in row:
        return "skipped: " + row["skipped"]
    cases = row["cases"].values()
    errors = [c["error"] for c in cases if "error" in c]
    if errors:
        return "error: " + _short(errors[0]["key_line"], 70)
    return "pass" if all(c["passed"] for c in cases) else "mismatch"


def table(rows: list[dict]) -> str:
    head = ["family", "model class", "exported", "s / trace"]
    head += [f"{s}: loss / grads" for s, _ in SCHEDULES] + ["fp32 noise (grads)", "result"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        if "skipped" in row:
            cells = [row["name"], row["model"], "", "", *([""] * len(SCHEDULES)), "", _result(row)]
        else:
            cases = [row["cases"].get(s) for s, _ in SCHEDULES]
            times = [c["trace_s"] for c in cases if c and c.get("trace_s")]
            noise = row.get("noise")
            cells = [
                row["name"] + (f" ({row['note']})" if row["note"] else ""),
                f"`{row['model']}`",
                _exported(row),
                f"{sum(times) / len(times):.2f}" if times else "",
                *(_case_cell(c) for c in cases),
                f"{noise['grads']:.1e}" if noise else "",
                _result(row),
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def details(rows: list[dict]) -> str:
    """Every error (its first line and traceback tail) and every mismatch (where the worst gradient is)."""
    out = []
    for row in rows:
        shown: dict[str, list[str]] = {}  # first line -> schedules: an error both schedules hit is shown once
        for schedule, case in row["cases"].items():
            if "error" in case:
                shown.setdefault(case["error"]["first_line"], []).append(schedule)
        for schedule, case in row["cases"].items():
            if "error" in case:
                e = case["error"]
                schedules = shown.get(e["first_line"])
                if schedules is None or schedules[0] != schedule:
                    continue
                out.append(
                    f"### {row['name']} — {', '.join(schedules)}: error in {e['where']}\n\n"
                    f"`{_short(e['first_line'], 300)}`\n\n```\n{e['tail']}\n```\n"
                )
            elif not case["passed"]:
                missing = f"; no rank holds gradients for {case['missing']}" if case["missing"] else ""
                out.append(
                    f"### {row['name']} — {schedule}: mismatch\n\nloss {case['loss']:.2e}, worst gradient "
                    f"{case['grads']:.2e} at `{case['where']}`{missing}; the one-process microbatched run differs "
                    f"from the whole batch by {row['noise']['grads']:.2e} (fp32 noise).\n"
                )
    return "\n".join(out)


def header(elapsed: float) -> str:
    return (
        "# Trace frontend survey\n\n"
        f"Generated by `scripts/trace_survey.py` on {datetime.date.today().isoformat()} "
        f"(torch {torch.__version__}, transformers {transformers.__version__}, {elapsed / 60:.1f} min on "
        f"{os.cpu_count()} CPU cores).\n\n"
        "Each family: a tiny model from its config (hidden 64, 4 blocks, 4 heads, vocab 97, 64 positions, dropout 0), "
        f'`PipelineEngine(frontend="trace")` on {WORLD_SIZE} gloo CPU ranks, {MICROBATCHES} microbatches of a '
        f"batch of {BATCH_SIZE}, two training steps at sequence lengths {SEQ_LENS[0]} then {SEQ_LENS[1]} (SGD step "
        "between), loss and every gradient compared with the model trained in one process. "
        f"Schedules: {', '.join(f'{s} ({spr} stage(s) per rank)' for s, spr in SCHEDULES)}. The configs are "
        "`FAMILIES` in the script; a family whose classes this transformers lacks is listed as skipped.\n\n"
        "- *exported*: torch.export captured the model (`no`: what it rejected; `not reached`: hf_pipe stopped "
        "before tracing).\n"
        "- *s / trace*: mean seconds of one `trace_stages` call (probe and per-shape traces).\n"
        "- *loss / grads*: worst relative difference from one process over both steps and both ranks (gradients: "
        "max|a-b| / max|b| per tensor, denominator at least 1e-3 × the largest gradient); ✗ marks ≥ 1e-5.\n"
        "- *fp32 noise*: the same comparison for one process run in the pipeline's microbatches, the size of fp32 "
        "rounding here.\n"
        f"- *result*: pass when loss and gradients agree within {TOL:g} on every schedule.\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("families", nargs="*", metavar="FAMILY", help=f"default: all of {', '.join(FAMILIES)}")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per run of a family (default 120)")
    args = parser.parse_args()
    unknown = [n for n in args.families if n not in FAMILIES]
    if unknown:
        parser.error(f"unknown families {unknown}; known: {', '.join(FAMILIES)}")
    names = args.families or list(FAMILIES)
    start = time.perf_counter()
    rows = []
    for name in names:
        print(f"-- {name}", flush=True)
        row = survey(name, args.timeout)
        print(f"   {_result(row)}" + (f" ({row['wall_s']:.0f} s)" if "wall_s" in row else ""), flush=True)
        rows.append(row)
    text = f"## Results\n\n{table(rows)}\n"
    failures = details(rows)
    if failures:
        text += f"\n## Errors and mismatches\n\n{failures}"
    print("\n" + text)
    if not args.families:
        with open(DOC, "w") as f:
            f.write(header(time.perf_counter() - start) + "\n" + text)
        print(f"written to {os.path.relpath(DOC, ROOT)}")


if __name__ == "__main__":
    main()
