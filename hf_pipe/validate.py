"""Checks that run on every rank before any step, gathering every problem into one error."""

from __future__ import annotations

from typing import Any

from .frontends import FRONTENDS
from .schedule import check_schedule


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
    stages than blocks, a data-parallel mode it cannot run), and what no frontend runs yet (an MoE router loss)."""
    problems = router_loss_problems(config)
    if frontend not in FRONTENDS:
        return problems  # the frontend itself is reported by frontend_problems
    return problems + FRONTENDS[frontend](config).problems(
        config,
        pp_size=pp_size,
        stages_per_rank=stages_per_rank,
        explicit_split=explicit_split,
        data_parallel=data_parallel,
    )


def router_loss_problems(config: Any) -> list[str]:
    """An MoE model returning its router logits for the load-balancing loss: HF adds that loss from every layer's
    router logits, gathered over the whole forward, which a pipeline runs in pieces on several ranks (the last stage
    would return its layers' router logits and the auxiliary loss next to the logits, where the loss reads logits
    alone). Refused until MoE support lands; with router_aux_loss_coef=0 the outputs are the same, so only
    output_router_logits=False runs."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if not getattr(text, "output_router_logits", False):
        return []
    coef = getattr(text, "router_aux_loss_coef", None)
    return [
        f"output_router_logits=True ({getattr(config, 'model_type', '?')}, router_aux_loss_coef={coef}): the MoE "
        "load-balancing loss needs every layer's router logits, which the pipeline's stages hold on different ranks "
        "(not supported yet); set config.output_router_logits=False (or output_router_logits=False in "
        "from_pretrained / model_init_kwargs) to train without it (router_aux_loss_coef=0 alone does not do: the "
        "router logits are still returned)."
    ]


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
