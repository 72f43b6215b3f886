"""Checks that run on every rank before any step, gathering every problem into one error."""

from __future__ import annotations

from typing import Any

from .frontends import FRONTENDS
from .schedule import check_schedule
from .trainer_options import frontend_option_problems, label_names_problems, trainer_argument_problems


def frontend_problems(frontend: str) -> list[str]:
    if frontend.lower() != "auto" and frontend.lower() not in FRONTENDS:
        return [f"pipeline_frontend={frontend!r} is not a frontend; valid options are {['auto', *FRONTENDS]}."]
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
    """Problems between the model and the pipeline shape (the frontend's own: a family without an adapter, more
    stages than blocks, a data-parallel mode it cannot run)."""
    if frontend not in FRONTENDS:
        return []  # reported by frontend_problems
    return FRONTENDS[frontend](config).problems(
        config,
        pp_size=pp_size,
        stages_per_rank=stages_per_rank,
        explicit_split=explicit_split,
        data_parallel=data_parallel,
    )


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
        import pyarrow as pa
        import pyarrow.compute as pc

        ids = dataset.data.column("input_ids")
        while pa.types.is_list(ids.type) and pa.types.is_list(ids.type.value_type):  # multiple choice: per choice
            ids = pc.list_flatten(ids)
        longest = pc.max(pc.list_value_length(ids)).as_py() or 0
        if longest > positions:
            problems.append(
                f"{setting} has sequences of {longest} tokens but the model has max_position_embeddings={positions}; "
                f"truncate when tokenizing (truncation=True, max_length={positions}) or use a model with more "
                "positions."
            )
    return problems


def trainer_problems(
    args: Any, model: Any, staged: Any, frontend: str, world: int, arguments: dict[str, Any]
) -> list[str]:
    """Everything PipeTrainer can know is wrong before it builds anything: the pipeline settings against the launched
    world, the model (`staged`: what the stages are cut from), the frontend, Trainer's options and `arguments`, and
    the datasets' columns."""
    pp = args.resolved_pipeline_size(world)
    eval_sets = arguments.get("eval_dataset")
    eval_sets = eval_sets if isinstance(eval_sets, dict) else {"eval_dataset": eval_sets}
    return (
        args.pipeline_problems(world)
        + model_problems(
            staged.config,
            pp_size=pp,
            stages_per_rank=args.resolved_stages_per_rank(),
            explicit_split=not isinstance(args.pipeline_split, str),
            frontend=frontend,
            data_parallel=args.pipeline_data_parallel if world > pp else None,
        )
        + (FRONTENDS[frontend](staged.config).trainer_problems(args, staged) if frontend in FRONTENDS else [])
        + frontend_option_problems(args, frontend)
        + label_names_problems(args.label_names, model, args.pipeline_task)
        + trainer_argument_problems(arguments)
        + dataset_problems(arguments.get("train_dataset"), "train_dataset", staged.config)
        + [p for name, ds in eval_sets.items() for p in dataset_problems(ds, name, staged.config)]
    )
