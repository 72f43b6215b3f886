"""`hf-pipe plan`: print the pipeline a training run would build, without ranks and without allocating weights.

    hf-pipe plan --model_name_or_path out/smollm2-135m --pipeline_parallel_size 2 --pipeline_schedule 1f1b
    hf-pipe plan --model_type llama --config num_hidden_layers=32,hidden_size=4096 --pipeline_parallel_size 8 --json
    hf-pipe plan --model_type llama --config ... --world_size 16 --pipeline_parallel_size 2 \
        --pipeline_tensor_parallel_size 8 --dtype_bytes 2

The pipeline flags are `PipeTrainingArguments`' own, so a training command's flags can be pasted as they are.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass, field
from typing import Any

from .errors import raise_if_any
from .estimate import format_summary, plan_summary
from .families import CAUSAL_LM, task_of
from .frontends import frontend_name
from .seq2seq_split import plan_seq2seq
from .split import meta_model, plan_blocks, plan_split
from .tensor_parallel import sharded_names, tensor_parallel_problems
from .training_args import PipelineArguments
from .validate import model_problems


@dataclass
class PlanArguments:
    model_name_or_path: str | None = field(default=None, metadata={"help": "A local checkpoint folder (or hub id)."})
    model_type: str | None = field(default=None, metadata={"help": "A model family, with --config overrides."})
    config: str = field(default="", metadata={"help": "Config overrides: 'num_hidden_layers=8,hidden_size=256'."})
    architecture: str | None = field(
        default=None, metadata={"help": "Head class, e.g. LlamaForCausalLM (default: the config's architectures)."}
    )
    world_size: int | None = field(
        default=None, metadata={"help": "Processes to launch (default: the pipeline size)."}
    )
    per_device_train_batch_size: int = field(default=8, metadata={"help": "Batch one pipeline consumes per step."})
    seq_len: int | None = field(default=None, metadata={"help": "Tokens per sequence (default: model positions)."})
    target_len: int | None = field(
        default=None, metadata={"help": "Target tokens of an encoder-decoder (default: the source's, --seq_len)."}
    )
    dtype_bytes: int = field(default=4, metadata={"help": "Bytes per weight and activation (4: fp32, 2: bf16)."})
    num_choices: int = field(default=4, metadata={"help": "Choices per example, for a multiple-choice head."})
    json: bool = field(default=False, metadata={"help": "Print JSON for tools instead of the table."})


def _parse_overrides(text: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        key, _, value = item.partition("=")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def load_config(plan_args: PlanArguments) -> Any:
    from transformers import AutoConfig

    overrides = _parse_overrides(plan_args.config)
    if plan_args.model_name_or_path:
        config = AutoConfig.from_pretrained(plan_args.model_name_or_path, **overrides)
    elif plan_args.model_type:
        config = AutoConfig.for_model(plan_args.model_type, **overrides)
    else:
        raise SystemExit("hf-pipe plan: give --model_name_or_path or --model_type (with --config overrides)")
    if plan_args.architecture:
        config.architectures = [plan_args.architecture]
    return config


def describe(plan_args: PlanArguments, pipeline: PipelineArguments) -> dict[str, Any]:
    """The plan `PipeTrainer` would build for these settings, with memory and bubble estimates, as plain data."""
    pipeline.normalize_pipeline_fields()
    config = load_config(plan_args)
    tp = pipeline.pipeline_tensor_parallel_size
    pp = pipeline.pipeline_parallel_size or (plan_args.world_size // tp if plan_args.world_size else 2)
    world = plan_args.world_size or pp * tp
    dp = world // (pp * tp) if pp * tp and world % (pp * tp) == 0 else 1
    batch = plan_args.per_device_train_batch_size
    stages_per_rank = pipeline.resolved_stages_per_rank()
    frontend = frontend_name(pipeline.pipeline_frontend, config)
    raise_if_any(
        pipeline.pipeline_problems(world, batch)
        + model_problems(
            config,
            pp_size=pp,
            stages_per_rank=stages_per_rank,
            explicit_split=not isinstance(pipeline.pipeline_split, str),
            frontend=frontend,
        )
        + tensor_parallel_problems(
            config, tp, frontend=frontend, data_parallel=pipeline.pipeline_data_parallel if dp > 1 else None
        )
    )
    microbatches = pipeline.resolved_microbatches(world, batch)
    seq_len = plan_args.seq_len or min(getattr(config, "max_position_embeddings", 1024) or 1024, 2048)
    if frontend == "module":
        plan = plan_split(
            config, pp * stages_per_rank, pipeline.pipeline_split, seq_len=seq_len, task=pipeline.pipeline_task
        )
        if plan.policy == "measured":  # no weights here to time: say that this plan is the FLOP estimate
            plan = dataclasses.replace(plan, policy="measured (FLOP estimate here; training times the pieces)")
    elif frontend == "seq2seq":  # encoder then decoder blocks, at the source and target lengths
        plan = plan_seq2seq(
            config, pp * stages_per_rank, pipeline.pipeline_split, source_len=plan_args.seq_len,
            target_len=plan_args.target_len,
        )  # fmt: skip
        seq_len = plan.source_len
    else:  # the trace frontend splits the model's own block list: plan it on a meta-device model
        task = task_of(config.architectures[0]) if getattr(config, "architectures", None) else CAUSAL_LM
        task = pipeline.pipeline_task or task or CAUSAL_LM
        plan = plan_blocks(meta_model(config, task), pp * stages_per_rank, pipeline.pipeline_split)
    whole = meta_model(config, plan.task)
    return plan_summary(
        plan,
        config,
        schedule=pipeline.pipeline_schedule,
        pp_size=pp,
        stages_per_rank=stages_per_rank,
        microbatches=microbatches,
        batch_size=batch,
        seq_len=seq_len,
        dtype_bytes=plan_args.dtype_bytes,
        model_params=sum(p.numel() for p in whole.parameters()),
        num_choices=plan_args.num_choices,
        tp_size=tp,
        tp_sharded=_tp_sharded(whole, plan) if tp > 1 else None,
        dp_size=dp,
        data_parallel=pipeline.pipeline_data_parallel,
    )


def _tp_sharded(model: Any, plan: Any) -> list[int]:
    """Per stage, how many of its parameters the model's TP plan shards (`tensor_parallel.sharded_names`)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    out = []
    for stage in plan.stages:
        held = {n for n in params if any(n.startswith(m + ".") or n == m for m in stage.modules)}
        out.append(sum(params[n].numel() for n in sharded_names(model, held)))
    return out


def main(argv: list[str] | None = None) -> int:
    from transformers import HfArgumentParser

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] != "plan":
        print("usage: hf-pipe plan [--model_name_or_path PATH | --model_type TYPE --config K=V,...] [pipeline flags]")
        return 2
    parser = HfArgumentParser((PlanArguments, PipelineArguments), prog="hf-pipe plan")
    plan_args, pipeline = parser.parse_args_into_dataclasses(argv[1:])
    summary = describe(plan_args, pipeline)
    print(json.dumps(summary, indent=2) if plan_args.json else format_summary(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
