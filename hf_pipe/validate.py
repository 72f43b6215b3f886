"""Checks that run on every rank before any step, gathering every problem into one error."""

from __future__ import annotations

from typing import Any

from .families import task_of
from .frontends import FRONTENDS
from .router_loss import router_loss_problems
from .schedule import check_schedule
from .tensor_parallel import tensor_parallel_problems
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
    stages than blocks, a data-parallel mode it cannot run), and an MoE router loss the frontend cannot carry."""
    problems = router_loss_problems(config, frontend)
    if frontend not in FRONTENDS:
        return problems  # the frontend itself is reported by frontend_problems
    return problems + FRONTENDS[frontend](config).problems(
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
        + tensor_parallel_problems(
            staged.config,
            args.pipeline_tensor_parallel_size,
            frontend=frontend,
            data_parallel=args.pipeline_data_parallel if args.resolved_replicas(world) > 1 else None,
            peft=staged is not model,
        )
        + (FRONTENDS[frontend](staged.config).trainer_problems(args, staged) if frontend in FRONTENDS else [])
        + frontend_option_problems(args, frontend)
        + label_names_problems(args.label_names, model, args.pipeline_task)
        + trainer_argument_problems(arguments)
        + dataset_problems(arguments.get("train_dataset"), "train_dataset", staged.config)
        + [p for name, ds in eval_sets.items() for p in dataset_problems(ds, name, staged.config)]
        + label_column_problems(
            None,  # the training set's labels are checked when training starts (`PipeTrainer.train`)
            {name: ds for name, ds in eval_sets.items() if ds is not None},
            args.pipeline_task or task_of(type(staged).__name__, staged.config),
            arguments.get("data_collator"),
            # evaluate() runs the forward for its metrics; it scores the loss alone without compute_metrics
            forward_needs_labels=arguments.get("compute_metrics") is not None
            and not args.prediction_loss_only
            and not getattr(args, "predict_with_generate", False),
        )
    )


def _passes_columns_only(collator: Any) -> bool:
    """A collator that makes no labels of its own: it pads (or stacks) the columns it is given (`label` and
    `label_ids` renamed `labels`). Trainer's default (None) is one of them; an unknown collator may make labels."""
    from transformers import (
        DataCollatorForSeq2Seq,
        DataCollatorForTokenClassification,
        DataCollatorWithPadding,
        DefaultDataCollator,
        default_data_collator,
    )

    plain = (DefaultDataCollator, DataCollatorWithPadding, DataCollatorForSeq2Seq, DataCollatorForTokenClassification)
    return collator is None or collator is default_data_collator or type(collator) in plain


def label_column_problems(
    train: Any, evaluation: dict[str, Any], task: str | None, collator: Any, *, forward_needs_labels: bool
) -> list[str]:
    """Datasets whose columns cannot give the head what it needs, when the collator cannot add it, known before any
    step: training without the head's label columns (the loss reads them), and — `forward_needs_labels`, an
    encoder-decoder whose evaluate() runs its forward for compute_metrics — evaluation without labels nor
    decoder_input_ids (the decoder's input is made from them). A dataset without labels evaluates and predicts
    otherwise, as under Trainer."""
    from .families import QUESTION_ANSWERING, SEQ2SEQ_LM
    from .families.base import LABEL_KEYS

    if task is None or not _passes_columns_only(collator):
        return []
    wanted = LABEL_KEYS[task] if task == QUESTION_ANSWERING else ("labels", "label", "label_ids")

    def lacks(dataset: Any, extra: tuple[str, ...] = ()) -> list[str] | None:
        columns = getattr(dataset, "column_names", None)
        if not isinstance(columns, list):  # iterable datasets may not know theirs
            return None
        if any(c in columns for c in extra):
            return None
        has = all(c in columns for c in wanted) if task == QUESTION_ANSWERING else any(c in columns for c in wanted)
        return None if has else columns

    collator_name = "Trainer's default collator" if collator is None else f"data_collator={type(collator).__name__}"
    problems = []
    if (columns := lacks(train)) is not None:
        need = " and ".join(map(repr, wanted)) if task == QUESTION_ANSWERING else "'labels' (or 'label' / 'label_ids')"
        problems.append(
            f"train_dataset has the columns {columns} but no {need}, and {collator_name} makes no labels: the "
            f"{task} head trains on its loss, which reads them. Add the label column(s) to the dataset, or give a "
            "collator that makes them (DataCollatorForLanguageModeling for a language model)."
        )
    if forward_needs_labels and task == SEQ2SEQ_LM:
        for name, dataset in evaluation.items():
            if (columns := lacks(dataset, extra=("decoder_input_ids",))) is not None:
                problems.append(
                    f"{name} has the columns {columns}, with neither 'labels' nor 'decoder_input_ids', and "
                    f"{collator_name} makes neither: an encoder-decoder's decoder reads its input from one of them, "
                    "so evaluate() with compute_metrics cannot run (HF's forward fails the same way). Add labels (or "
                    "decoder_input_ids) to the evaluation set, or generate instead (PipeSeq2SeqTrainer with "
                    "predict_with_generate=True needs no labels), or evaluate without compute_metrics."
                )
    return problems
