"""Checks that run on every rank before any step, gathering every problem into one error."""

from __future__ import annotations

from typing import Any

from .families import get_family, registered_families
from .schedule import check_schedule

FRONTENDS = ("auto", "module", "trace")


def resolve_frontend(frontend: str, config: Any) -> str:
    """ "module" or "trace" (an unknown name is returned as it is, for `frontend_problems` to report): `"auto"`
    takes the module split where the model's family has an adapter. `config` is the model's, or None."""
    frontend = frontend.lower()
    if frontend == "auto":
        return "module" if config is not None and get_family(getattr(config, "model_type", "")) else "trace"
    return frontend


def frontend_problems(frontend: str) -> list[str]:
    if frontend.lower() not in FRONTENDS:
        return [f"pipeline_frontend={frontend!r} is not a frontend; valid options are {list(FRONTENDS)}."]
    return []


def pipeline_problems(
    config: Any,
    *,
    schedule: str,
    pp_size: int,
    stages_per_rank: int,
    microbatches: int,
    batch_size: int | None = None,
    explicit_split: bool = False,
    frontend: str = "module",
    data_parallel: str | None = None,
) -> list[str]:
    """Every incompatibility between a model config and the pipeline settings, each with its fix."""
    problems = check_schedule(
        schedule, pp_size=pp_size, stages_per_rank=stages_per_rank, microbatches=microbatches, batch_size=batch_size
    )
    return (
        problems
        + frontend_problems(frontend)
        + model_problems(
            config,
            pp_size=pp_size,
            stages_per_rank=stages_per_rank,
            explicit_split=explicit_split,
            frontend=frontend,
            data_parallel=data_parallel,
        )
    )


def model_problems(
    config: Any,
    *,
    pp_size: int,
    stages_per_rank: int,
    explicit_split: bool = False,
    frontend: str = "module",
    data_parallel: str | None = None,
) -> list[str]:
    """Problems between the model and the pipeline shape: a family without an adapter, more stages than blocks.

    With the trace frontend the blocks are found on the model itself (`split.plan_blocks` checks the count)."""
    problems: list[str] = []
    if frontend not in FRONTENDS:
        return []  # reported by frontend_problems
    if frontend == "trace":
        if data_parallel == "fsdp":
            problems.append(
                "pipeline_data_parallel='fsdp' shards the weights of module-split stages only; with "
                "pipeline_frontend='trace' use pipeline_data_parallel='ddp', or pipeline_frontend='module' for a "
                "family with an adapter."
            )
        return problems
    adapter = get_family(config.model_type)
    if adapter is None:
        how = "an explicit pipeline_split still needs one to run stages" if explicit_split else "no split policy"
        problems.append(
            f"model_type={config.model_type!r} has no family adapter ({how}); hf_pipe knows "
            f"{', '.join(registered_families())}. Register one with hf_pipe.register_family (a Llama-shaped decoder "
            "can reuse hf_pipe.families.LlamaAdapter), or use the trace frontend (pipeline_frontend='trace')."
        )
        return problems
    num_stages = pp_size * stages_per_rank
    num_layers = adapter.num_layers(config)
    if num_stages > num_layers:
        fits = [s for s in range(1, num_layers + 1) if s % stages_per_rank == 0]
        problems.append(
            f"pipeline_parallel_size={pp_size} × pipeline_stages_per_rank={stages_per_rank} = {num_stages} stages, "
            f"but the model has {num_layers} blocks and every stage needs at least one: use at most {num_layers} "
            f"stages (pipeline_parallel_size ≤ {max(fits) // stages_per_rank if fits else 1} at "
            f"{stages_per_rank} stage(s) per rank)."
        )
    return problems


def dataset_problems(dataset: Any, setting: str, config: Any) -> list[str]:
    """An empty dataset, or rows longer than the model has positions for (found from the Arrow column, no scan)."""
    if dataset is None:
        return []
    problems = []
    try:
        rows = len(dataset)
    except TypeError:  # iterable datasets have no length
        return []
    if rows == 0:
        problems.append(f"{setting} is empty (0 rows): check the data files and any filtering before training.")
        return problems
    positions = getattr(config, "max_position_embeddings", None)
    column = getattr(dataset, "column_names", None)
    if positions and column and "input_ids" in column:
        import pyarrow.compute as pc

        longest = pc.max(pc.list_value_length(dataset.data.column("input_ids"))).as_py() or 0
        if longest > positions:
            problems.append(
                f"{setting} has sequences of {longest} tokens but the model has max_position_embeddings={positions}; "
                f"truncate when tokenizing (truncation=True, max_length={positions}) or use a model with more "
                "positions."
            )
    return problems
