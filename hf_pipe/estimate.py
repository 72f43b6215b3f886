"""Predictions for a plan, without ranks or weights: memory per stage and the schedule's bubble.

Estimates, not measurements (the schedule timeline measures): they say which stage runs out of memory first and
what the microbatch count buys, before anything is launched.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from .families import CAUSAL_LM, MASKED_LM, MULTIPLE_CHOICE, QUESTION_ANSWERING, SEQ_CLS, TOKEN_CLS, get_family
from .schedule import V_SCHEDULES, is_multi_stage, placement
from .split import SplitPlan

_ZERO_BUBBLE = ("interleavedzerobubble", "zbvzerobubble", "dualpipev")


@dataclass(frozen=True)
class StageMemory:
    stage: int
    rank: int
    params: int
    weights_bytes: int
    grads_bytes: int
    adamw_bytes: int
    activation_bytes: int
    microbatches_in_flight: int
    #: the head's share of `activation_bytes` (the last stage: its logits and what its loss keeps for backward)
    head_activation_bytes: int = 0

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.grads_bytes + self.adamw_bytes + self.activation_bytes


def bubble_fraction(schedule: str, pp_size: int, stages_per_rank: int, microbatches: int) -> float:
    """Idle share of a step under the classic model: (p-1)/(v·m+p-1), v the stages per rank.

    Zero-bubble schedules split backward into input and weight gradients and run the weight half in the bubble;
    with W about a third of the work they are modelled at a third of the interleaved bubble.
    """
    v = stages_per_rank if is_multi_stage(schedule) else 1
    if schedule.lower() == "loopedbfs":
        v = 1  # breadth-first: all of a stage's microbatches before the next stage, so no interleaving gain
    bubble = (pp_size - 1) / (v * microbatches + pp_size - 1)
    return bubble / 3 if schedule.lower() in _ZERO_BUBBLE else bubble


def ideal_speedup(schedule: str, pp_size: int, stages_per_rank: int, microbatches: int) -> float:
    """Speed-up over one device the bubble model allows: p·(1 - bubble)."""
    return pp_size * (1 - bubble_fraction(schedule, pp_size, stages_per_rank, microbatches))


def _in_flight(schedule: str, stage: int, num_stages: int, microbatches: int) -> int:
    """Microbatches whose activations a stage holds at its peak."""
    name = schedule.lower()
    if name in ("gpipe", "loopedbfs"):
        return microbatches  # all forwards before any backward
    return min(microbatches, num_stages - stage)  # 1F1B family: warm-up depth


def _text_config(config: Any) -> Any:
    """The language model's config (a vision-language model's `text_config`): what its blocks and head are sized by."""
    if getattr(config, "vision_config", None) is not None and hasattr(config, "get_text_config"):
        return config.get_text_config()
    return config


def _activation_bytes_per_token_per_block(config: Any, dtype_bytes: int, seq_len: int, tp: int = 1) -> float:
    """Korthikanti et al. (2022): s·b·h·(34 + 5·a·s/h) bytes at 16 bits for one block, here per token and dtype;
    with tensor parallelism (no sequence parallelism) s·b·h·(10 + 24/t + 5·a·s/(h·t)) per TP rank."""
    config = _text_config(config)
    h = getattr(config, "hidden_size", None) or config.n_embd
    heads = getattr(config, "num_attention_heads", None) or config.n_head
    return h * (10 + 24 / tp + 5 * heads * seq_len / (h * tp)) * dtype_bytes / 2


def head_activation_bytes_per_token(plan: SplitPlan, config: Any, dtype_bytes: int, seq_len: int) -> float:
    """What a head keeps for backward, per token: its logits (in the compute dtype) and the float32 log-softmax its
    loss saves — over the vocabulary for causal and masked LM, over the labels for token classification and for a
    decoder's sequence classifier (HF scores every token before pooling), over two logits for question answering;
    a pooled classifier (BERT's sequence classification and multiple choice) keeps one hidden vector and its logits
    per sequence."""
    task = plan.task
    config = _text_config(config)
    labels = getattr(config, "num_labels", 2)
    per_logit = dtype_bytes + 4
    adapter = get_family(plan.model_type)
    if task in (CAUSAL_LM, MASKED_LM):
        return config.vocab_size * per_logit
    if task in (SEQ_CLS, MULTIPLE_CHOICE) and adapter is not None and task not in adapter.pools_last_token:
        hidden = getattr(config, "hidden_size", None) or config.n_embd
        return (hidden + (labels if task == SEQ_CLS else 1)) * per_logit / seq_len
    if task in (SEQ_CLS, TOKEN_CLS):
        return labels * per_logit
    if task == QUESTION_ANSWERING:
        return 2 * per_logit
    return 0.0


def stage_memory(
    plan: SplitPlan,
    config: Any,
    *,
    schedule: str,
    pp_size: int,
    microbatches: int,
    batch_size: int,
    seq_len: int,
    dtype_bytes: int = 4,
    num_choices: int = 4,
    tp_size: int = 1,
    tp_sharded: list[int] | None = None,
    fsdp_shards: int = 1,
) -> list[StageMemory]:
    """Per stage and per rank: weights, gradients, AdamW moments (fp32) and the activations the schedule keeps alive,
    the last stage's head included. A multiple-choice batch holds `num_choices` sequences per example.

    With tensor parallelism (`tp_size`), `tp_sharded[i]` of stage i's parameters are split over the TP ranks (the
    rest, norms and tied weights, held whole by each) and a block's activations shrink as Korthikanti et al. give;
    with FSDP2 replicas, weights, gradients and moments are split over `fsdp_shards` ranks. `params` stays the
    stage's whole count."""
    from torch.distributed.pipelining._utils import generate_stage_to_rank_mapping

    ranks = generate_stage_to_rank_mapping(pp_size, plan.num_stages, placement(schedule))
    sequences = num_choices if plan.task == MULTIPLE_CHOICE else 1
    tokens_per_microbatch = batch_size // microbatches * seq_len * sequences
    per_block = _activation_bytes_per_token_per_block(config, dtype_bytes, seq_len, tp_size)
    per_head = head_activation_bytes_per_token(plan, config, dtype_bytes, seq_len)
    out = []
    for s in plan.stages:
        sharded = tp_sharded[s.index] if tp_sharded is not None else 0
        held = (s.params - sharded + sharded // tp_size) // fsdp_shards  # this rank's parameters
        in_flight = _in_flight(schedule, s.index, plan.num_stages, microbatches)
        last = s.index == plan.num_stages - 1
        head = int(per_head * tokens_per_microbatch * in_flight) if last else 0
        activations = int(per_block * len(s.layers) * tokens_per_microbatch * in_flight) + head
        out.append(
            StageMemory(
                stage=s.index,
                rank=ranks[s.index],
                params=s.params,
                weights_bytes=held * dtype_bytes,
                grads_bytes=held * dtype_bytes,
                adamw_bytes=held * 8,
                activation_bytes=activations,
                microbatches_in_flight=in_flight,
                head_activation_bytes=head,
            )
        )
    return out


def plan_summary(
    plan: SplitPlan,
    config: Any,
    *,
    schedule: str,
    pp_size: int,
    stages_per_rank: int,
    microbatches: int,
    batch_size: int,
    seq_len: int,
    dtype_bytes: int = 4,
    model_params: int | None = None,
    num_choices: int = 4,
    tp_size: int = 1,
    tp_sharded: list[int] | None = None,
    dp_size: int = 1,
    data_parallel: str = "ddp",
) -> dict[str, Any]:
    """Everything `hf-pipe plan` reports, as plain data. `model_params` (the whole model's, each weight once) adds
    the start-up memory of a fully built model next to that of a path or meta model (each rank its stages only)."""
    memory = stage_memory(
        plan,
        config,
        schedule=schedule,
        pp_size=pp_size,
        microbatches=microbatches,
        batch_size=batch_size,
        seq_len=seq_len,
        dtype_bytes=dtype_bytes,
        num_choices=num_choices,
        tp_size=tp_size,
        tp_sharded=tp_sharded,
        fsdp_shards=dp_size if data_parallel == "fsdp" else 1,
    )
    startup: dict[int, int] = {}
    for m in memory:
        startup[m.rank] = startup.get(m.rank, 0) + m.weights_bytes
    lengths = {"target_len": plan.target_len} if getattr(plan, "target_len", None) else {}  # an encoder-decoder's
    return {
        **lengths,
        "model_type": plan.model_type,
        "task": plan.task,
        "policy": plan.policy,
        "schedule": schedule.lower(),
        "pipeline_parallel_size": pp_size,
        "tensor_parallel_size": tp_size,
        "data_parallel_size": dp_size,
        "data_parallel": data_parallel if dp_size > 1 else None,
        "world_size": pp_size * tp_size * dp_size,
        "stages_per_rank": stages_per_rank,
        "placement": "v" if schedule.lower() in V_SCHEDULES else "loop",
        "microbatches": microbatches,
        "batch_size": batch_size,
        "seq_len": seq_len,
        "num_choices": num_choices if plan.task == MULTIPLE_CHOICE else None,
        "head_flops_per_token": _head_flops(plan, config, seq_len),
        "vision_flops_per_token": _vision_flops(plan, config, seq_len),
        "experts": _experts(config),
        "layer_starts": plan.layer_starts,
        "max_over_mean_cost": plan.imbalance,
        "bubble_fraction": bubble_fraction(schedule, pp_size, stages_per_rank, microbatches),
        "ideal_speedup": ideal_speedup(schedule, pp_size, stages_per_rank, microbatches),
        "stages": [
            {
                **asdict(m),
                "layers": list(s.layers),
                "blocks": plan.stage_blocks(s),
                "extra_modules": plan.extra_modules(s),
                "modules": list(s.modules),
                "flops_per_token": s.flops_per_token,
                "total_bytes": m.total_bytes,
            }
            for s, m in zip(plan.stages, memory)
        ],
        # weights a rank holds once started: its stages' from a path or a meta model, the whole model built whole
        "startup_bytes_per_rank": startup,
        "startup_bytes_whole_model": model_params * dtype_bytes if model_params is not None else None,
    }


def _experts(config: Any) -> tuple[int, int] | None:
    """(routed experts per MoE block, experts a token runs) of a mixture-of-experts config, else None."""
    from .families.moe import num_experts

    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    experts, top_k = num_experts(text), getattr(text, "num_experts_per_tok", None)
    return (experts, int(top_k)) if experts and top_k else None


def _head_flops(plan: SplitPlan, config: Any, seq_len: int) -> float | None:
    """The head's forward FLOPs per token as the split balanced them (None for a model without an adapter, whose
    plan counts the output embedding only)."""
    adapter = get_family(plan.model_type)
    if adapter is None or plan.task not in adapter.heads:
        return None
    return adapter.flops_per_token(config, plan.task, seq_len).head


def _vision_flops(plan: SplitPlan, config: Any, seq_len: int) -> float | None:
    """A vision-language model's vision tower and projector, per text token as the split counts them on the first
    stage (None for a text model)."""
    adapter = get_family(plan.model_type)
    if adapter is None or plan.task not in adapter.heads:
        return None
    return adapter.flops_per_token(config, plan.task, seq_len).vision or None


def format_summary(summary: dict[str, Any]) -> str:
    """The summary as a table a person reads."""

    def gib(n: float) -> str:
        return f"{n / 2**30:.2f}"

    total_flops = sum(s["flops_per_token"] for s in summary["stages"])
    tokens = f"{summary['seq_len']} tokens"
    if summary.get("target_len"):  # an encoder-decoder: the encoder runs over the source, the decoder the target
        tokens = f"(source {summary['seq_len']} + target {summary['target_len']}) tokens"
    width = max(9, *(len(s["blocks"]) for s in summary["stages"]))
    tp, dp = summary.get("tensor_parallel_size", 1), summary.get("data_parallel_size", 1)
    mesh = f" × TP {tp}" if tp > 1 else ""
    mesh += f" × DP {dp} ({summary['data_parallel']})" if dp > 1 else ""
    mesh = f" (PP {summary['pipeline_parallel_size']}{mesh} = {summary['world_size']} processes)" if mesh else ""
    lines = [
        f"{summary['model_type']} ({summary['task']}): {len(summary['stages'])} stages on "
        f"{summary['pipeline_parallel_size']} ranks{mesh} ({summary['placement']} placement), {summary['schedule']}, "
        f"{summary['microbatches']} microbatches of {summary['batch_size'] // summary['microbatches']} × "
        f"{tokens}, split {summary['policy']}",
        "",
        f"{'stage':>5} {'rank':>4} {'layers':>{width}} {'params':>9} {'MFLOP/tok':>9} {'FLOPs':>6} {'weights':>8} "
        f"{'grads':>8} {'AdamW':>8} {'activ.':>8} {'total':>8}  (GiB{' per TP rank' if tp > 1 else ''})  extra modules",
    ]
    for s in summary["stages"]:
        extra = s["extra_modules"]
        lines.append(
            f"{s['stage']:>5} {s['rank']:>4} {s['blocks']:>{width}} {s['params'] / 1e6:>8.1f}M "
            f"{s['flops_per_token'] / 1e6:>9.2f} "
            f"{100 * s['flops_per_token'] / total_flops:>5.1f}% {gib(s['weights_bytes']):>8} "
            f"{gib(s['grads_bytes']):>8} {gib(s['adamw_bytes']):>8} {gib(s['activation_bytes']):>8} "
            f"{gib(s['total_bytes']):>8}         {', '.join(extra)}"
        )
    per_rank: dict[int, int] = {}
    for s in summary["stages"]:
        per_rank[s["rank"]] = per_rank.get(s["rank"], 0) + s["total_bytes"]
    last = summary["stages"][-1]
    head = f"head ({summary['task']}): {last['head_activation_bytes'] / 2**20:.2f} MiB of the last stage's activations"
    if summary.get("head_flops_per_token") is not None:
        share = 100 * summary["head_flops_per_token"] / total_flops
        head += f", {summary['head_flops_per_token']:.3g} FLOPs per token ({share:.1f}% of the model's)"
    if summary.get("vision_flops_per_token"):
        from .families.vision import IMAGES_PER_SEQUENCE

        vision = summary["vision_flops_per_token"]
        head += (
            f"\nvision tower and projector (stage 0): {vision * summary['seq_len'] / IMAGES_PER_SEQUENCE:.3g} FLOPs "
            f"per image, counted as {IMAGES_PER_SEQUENCE} image per sequence: {vision:.3g} FLOPs per token "
            f"({100 * vision / total_flops:.1f}% of the model's); move it with pipeline_split"
        )
    if summary.get("num_choices"):
        head += f"; {summary['num_choices']} choices per example (--num_choices)"
    lines += ["", head]
    if summary.get("experts"):  # a mixture of experts: what a token runs is not what a stage holds
        experts, top_k = summary["experts"]
        lines.append(
            f"mixture of experts: params count all {experts} experts of each MoE block (what a stage holds); FLOPs "
            f"count the {top_k} a token is routed to (what it runs)"
        )
    lines += [
        "per rank (GiB): " + ", ".join(f"rank {r}: {gib(b)}" for r, b in sorted(per_rank.items())),
        "start-up weights per rank (GiB), from a path or a meta model: "
        + ", ".join(f"rank {r}: {gib(b)}" for r, b in sorted(summary["startup_bytes_per_rank"].items()))
        + (
            f"; a fully built model: {gib(summary['startup_bytes_whole_model'])} on every rank"
            if summary.get("startup_bytes_whole_model") is not None
            else ""
        ),
        f"max/mean stage cost {summary['max_over_mean_cost']:.3f}; predicted bubble "
        f"{100 * summary['bubble_fraction']:.1f}% (ideal speed-up {summary['ideal_speedup']:.2f}x over one device)",
    ]
    return "\n".join(lines)
