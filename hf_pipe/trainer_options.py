"""Which Trainer options combine with pipeline stages: each check returns the problems it finds, every one naming the
option, its value, why it cannot work on stages and the fix. Options not refused here give Trainer's numbers (the
table in docs/trainer-options.md lists each with its test)."""

from __future__ import annotations

import json
from typing import Any

import torch

_PER_PARAMETER = (
    "use an optimizer whose update reads only each weight's own gradient and state (adamw_torch, adamw_torch_fused, "
    "adafactor, sgd, adagrad, rmsprop, ...), or pass optimizer_cls_and_kwargs=(torch.optim.<Optimizer>, {...})"
)
_LOW_RANK = (
    "projects the gradients of the nn.Linear modules that optim_target_modules names on the model it is given, and "
    "PipeTrainer can give it only this rank's stages, whose modules are renamed (stages.<i>.…) and, on traced "
    "stages, are no longer nn.Linear: it would project other weights than under Trainer"
)
_LAYERWISE = "; the layer-wise variants also step each weight inside backward, once per microbatch instead of per step"
_LOMO = (
    "fuses the update into the backward pass, which Trainer runs through optimizer.fused_backward(loss, lr); the "
    "pipeline schedule runs every stage's backward itself, per microbatch, and never calls it"
)
_SCHEDULE_FREE = (
    "keeps two points per weight and must be switched with optimizer.train() before every training step and "
    "optimizer.eval() before evaluation: Trainer's training_step switches it to train, PipeTrainer's pipelined step "
    "does not, so steps after an evaluation would start from the evaluation weights"
)
_BNB_8BIT = (
    "keeps the state of every nn.Embedding weight among the modules it optimizes in 32 bits; a rank sees only its "
    "stages, so a tied embedding whose copy is the last stage's output layer (GPT-2's wte / lm_head), and every "
    "embedding of a traced stage (which has no nn.Embedding modules), would get 8-bit state: updates unlike "
    "Trainer's, and tied copies drifting apart (the 32-bit variants, paged_adamw_32bit, lion_32bit, ..., have no "
    "such rule)"
)
_GROK = (
    "gives each weight the momentum beta1 * (1 - gamma) ** i, i its position in the parameter group, and a rank's "
    "group lists only its stages' weights, so every weight after the first stage would get another beta1"
)
# OptimizerNames values whose update reads only each weight's own gradient and state: each rank's optimizer over its
# own stages makes Trainer's update. A test checks that every OptimizerNames value is here or refused below.
PER_WEIGHT_OPTIMIZERS = frozenset(
    {
        "adamw_torch", "adamw_torch_fused", "adamw_torch_xla", "adamw_torch_npu_fused", "adamw_anyprecision",
        "adamw_torch_4bit", "adamw_torch_8bit", "adafactor", "sgd", "adagrad", "rmsprop", "rmsprop_bnb",
        "rmsprop_bnb_32bit", "paged_adamw_32bit", "ademamix", "paged_ademamix_32bit", "lion_32bit", "paged_lion_32bit",
        "stable_adamw",
    }
)  # fmt: skip
# OptimizerNames values that cannot run on stages, and why.
REFUSED_OPTIMIZERS: dict[str, str] = {
    **dict.fromkeys(
        (
            "adamw_bnb_8bit",
            "adamw_8bit",
            "paged_adamw_8bit",
            "ademamix_8bit",
            "paged_ademamix_8bit",
            "lion_8bit",
            "paged_lion_8bit",
            "rmsprop_bnb_8bit",
        ),
        "Trainer's 8-bit bitsandbytes set-up " + _BNB_8BIT,
    ),
    "grokadamw": "GrokAdamW " + _GROK,
    "galore_adamw": "GaLore " + _LOW_RANK,
    "galore_adamw_8bit": "GaLore " + _LOW_RANK,
    "galore_adafactor": "GaLore " + _LOW_RANK,
    "galore_adamw_layerwise": "GaLore " + _LOW_RANK + _LAYERWISE,
    "galore_adamw_8bit_layerwise": "GaLore " + _LOW_RANK + _LAYERWISE,
    "galore_adafactor_layerwise": "GaLore " + _LOW_RANK + _LAYERWISE,
    "apollo_adamw": "APOLLO " + _LOW_RANK,
    "apollo_adamw_layerwise": "APOLLO " + _LOW_RANK + _LAYERWISE,
    "lomo": "LOMO " + _LOMO,
    "adalomo": "AdaLOMO " + _LOMO,
    "schedule_free_radam": "a schedule-free optimizer " + _SCHEDULE_FREE,
    "schedule_free_adamw": "a schedule-free optimizer " + _SCHEDULE_FREE,
    "schedule_free_sgd": "a schedule-free optimizer " + _SCHEDULE_FREE,
}


#: the label columns a pipeline's loss can read (sorted): `labels`, or question answering's two answer positions
_LABEL_SETS = (["labels"], ["end_positions", "start_positions"])


def training_args_problems(args: Any, data_parallel_size: int = 1) -> list[str]:
    """Training arguments Trainer would apply to the whole model, or across all processes, and so cannot reach the
    stages. Works on the fields as given (before `TrainingArguments.__post_init__` normalises them) and after."""
    problems = []
    if args.deepspeed:
        problems.append(
            f"deepspeed={args.deepspeed!r}: DeepSpeed wraps the whole model in its own engine and shards it over "
            "all ranks, which conflicts with each rank holding only its pipeline stage; remove deepspeed."
        )
    if args.fsdp:
        problems.append(
            f"fsdp={args.fsdp!r}: FSDP here would shard the whole model over every rank, across pipeline stages; "
            "remove fsdp (sharding within each stage comes with data-parallel pipelines)."
        )
    if getattr(args, "parallelism_config", None) is not None:
        problems.append(
            f"parallelism_config={_name(args.parallelism_config)}(...): accelerate would shard the whole model "
            "(tensor, context or sequence parallel, FSDP) over all processes, across the pipeline stages; remove it "
            "(launch a multiple of pipeline_parallel_size processes for data-parallel replicas of the pipeline)."
        )
    if args.label_smoothing_factor:
        problems.append(
            f"label_smoothing_factor={args.label_smoothing_factor}: the loss runs inside the last pipeline stage "
            "with the model's own semantics; set it to 0."
        )
    problems += _compile_problems(args) + _checkpointing_problems(args)
    if args.use_liger_kernel:
        problems.append(
            "use_liger_kernel=True: Liger patches the model's forward and loss (its fused linear cross-entropy "
            "replaces the model's forward), which the stages never call, while its norm and MLP kernels would still "
            "reach the blocks: the numbers would match neither Trainer with nor without Liger; set it to False."
        )
    if args.fp16:
        problems.append(
            "fp16=True: Trainer's fp16 GradScaler scales the loss in accelerator.backward, which the pipeline "
            "schedule never calls (each stage runs its own backward), so the optimizer step would unscale gradients "
            "that were never scaled; use bf16=True (no loss scaling), or leave both off."
        )
    for name in ("fp16_full_eval", "bf16_full_eval"):
        if getattr(args, name):
            problems.append(
                f"{name}=True: for this option Trainer moves the whole model to the device when training starts, "
                "which fails on the weights of other ranks' stages (meta tensors here), and an evaluation outside "
                "train() casts this rank's stages to half precision for good; evaluate in the training precision "
                f"(bf16=True autocasts evaluation too), or set {name}=False."
            )
    optim = str(getattr(args.optim, "value", args.optim))
    if optim in REFUSED_OPTIMIZERS:
        problems.append(f"optim={optim!r}: {REFUSED_OPTIMIZERS[optim]}; {_PER_PARAMETER}.")
    if args.auto_find_batch_size:
        problems.append(
            "auto_find_batch_size=True: an out-of-memory retry on one rank would leave its peers waiting; "
            "set per_device_train_batch_size yourself."
        )
    if args.label_names is not None and sorted(args.label_names) not in _LABEL_SETS:
        problems.append(
            f"label_names={list(args.label_names)!r}: the pipeline's loss and evaluation read the batch's 'labels' "
            "(or, for question answering, 'start_positions' and 'end_positions'); name the label columns so and "
            "leave label_names unset (or set it to those names)."
        )
    if getattr(args, "past_index", -1) != -1:  # a field of older transformers releases
        problems.append(
            f"past_index={args.past_index}: the stages return no past states for Trainer to feed back into the "
            "next step; set past_index=-1."
        )
    if str(getattr(args.train_sampling_strategy, "value", args.train_sampling_strategy)) == "batch_rebalance":
        problems.append(
            "train_sampling_strategy='batch_rebalance': the sampler gives each of the world_size processes its own "
            "share of every batch, but all ranks of one pipeline must read the same batch; use 'group_by_length' "
            "(or 'random')."
        )
    debug = args.debug or []  # None from the command line
    debug = debug.split() if isinstance(debug, str) else [str(getattr(d, "value", d)) for d in debug]
    if "underflow_overflow" in debug:
        problems.append(
            "debug='underflow_overflow': its forward hooks abort on the first inf/nan in any module's output, and "
            "torch's pipeline stages run their forward once on placeholder tensors (ones) to infer the shapes they "
            "pass on, which can give such values; remove it from debug."
        )
    if args.enable_jit_checkpoint:
        problems.append(
            "enable_jit_checkpoint=True: each rank decides to save on its own timer after its SIGTERM, possibly at "
            "another step than its peers, while a pipeline's checkpoint is written by all ranks together (a rank "
            "that saves while its peer runs the next step hangs); save every few steps instead (save_strategy="
            "'steps', save_steps=N) and resume with resume_from_checkpoint=True."
        )
    if args.eval_use_gather_object and data_parallel_size > 1:
        problems.append(
            f"eval_use_gather_object=True with {data_parallel_size} data-parallel replicas: Trainer + DDP would "
            "gather the predictions as Python objects (a list of rows), PipeTrainer gathers them over the replicas as "
            "tensors; set eval_use_gather_object=False."
        )
    return problems


def _compile_problems(args: Any) -> list[str]:
    # torch_compile_backend or torch_compile_mode turn torch_compile on in TrainingArguments.__post_init__
    setting = next(
        (
            f"{name}={value!r}" + ("" if name == "torch_compile" else " (which turns torch_compile on)")
            for name in ("torch_compile", "torch_compile_backend", "torch_compile_mode")
            if (value := getattr(args, name)) not in (None, False)
        ),
        None,
    )
    if setting is None:
        return []
    return [f"{setting}: Trainer compiles the whole model, which no rank holds; set torch_compile to False."]


def _checkpointing_problems(args: Any) -> list[str]:
    # activation_checkpointing: the new name (transformers >= 5.20) of gradient_checkpointing, the same after
    # __post_init__; a JSON string from the command line
    if not (getattr(args, "activation_checkpointing", False) or args.gradient_checkpointing):
        return []
    renamed = getattr(args, "activation_checkpointing_kwargs", None)
    name = "activation_checkpointing_kwargs" if renamed else "gradient_checkpointing_kwargs"
    kwargs = getattr(args, name) or {}
    if isinstance(kwargs, str):
        kwargs = json.loads(kwargs) if kwargs.startswith("{") else {}
    # Trainer passes use_reentrant=False when no checkpoint kwargs remain; torch.utils.checkpoint defaults to True
    checkpoint_kwargs = {k: v for k, v in kwargs.items() if k not in ("every_n_layers", "offload")}
    if not checkpoint_kwargs or not checkpoint_kwargs.get("use_reentrant", True):
        return []
    return [
        f"{name}={kwargs!r} (use_reentrant={checkpoint_kwargs.get('use_reentrant', True)}): torch's pipeline stages "
        "take their input gradients with torch.autograd.grad(inputs=...), which reentrant checkpointing refuses; "
        "set use_reentrant=False (Trainer's default when no other checkpoint kwargs are given)."
    ]


def frontend_option_problems(args: Any, frontend: str) -> list[str]:
    """Options that hold on module-split stages on the CPU only."""
    problems = []
    alpha = args.neftune_noise_alpha
    if alpha is not None and frontend == "trace":
        problems.append(
            f"neftune_noise_alpha={alpha} with pipeline_frontend='trace' (or 'auto' for a model without a family "
            "adapter): Trainer adds the noise in a forward hook on the input embeddings, which a traced stage does "
            "not call; use pipeline_frontend='module' with a family adapter, or unset neftune_noise_alpha."
        )
    elif alpha is not None and torch.cuda.is_available():
        problems.append(
            f"neftune_noise_alpha={alpha} on CUDA: the stage draws the noise once per microbatch, and CUDA's "
            "generator gives m draws of batch/m rows other numbers than Trainer's one draw for the whole batch (on "
            "the CPU they are the same numbers); unset neftune_noise_alpha, or train on CPU ranks "
            "(CUDA_VISIBLE_DEVICES='')."
        )
    return problems


def label_names_problems(label_names: Any, model: Any, task: str | None = None) -> list[str]:
    """`label_names` other than the columns the model's head reads: Trainer would gather those as the labels of
    `compute_metrics`, while the pipeline's loss reads the head's own."""
    from .families import task_of
    from .families.base import LABEL_KEYS

    task = task or task_of(type(model).__name__, getattr(model, "config", None))
    if label_names is None or task is None or sorted(label_names) == sorted(LABEL_KEYS[task]):
        return []
    return [
        f"label_names={list(label_names)!r} for {type(model).__name__}, whose loss reads {list(LABEL_KEYS[task])}: "
        "the pipeline's loss and evaluation read those columns; leave label_names unset (Trainer then finds them "
        f"in the model's forward) or set label_names={list(LABEL_KEYS[task])}."
    ]


def trainer_argument_problems(arguments: dict[str, Any]) -> list[str]:
    """Trainer constructor arguments (other than model and args) that would reach past this rank's stages."""
    problems = []
    if arguments.get("model_init") is not None:
        problems.append(
            f"model_init={_name(arguments['model_init'])}: Trainer calls it again at train() (and for every "
            "hyperparameter_search trial) for a new whole model, while PipeTrainer splits the model once, when it is "
            "built; build the model yourself and pass model=model_init()."
        )
    optimizer, scheduler = arguments.get("optimizers") or (None, None)
    if optimizer is not None or scheduler is not None:
        problems.append(
            f"optimizers=({_name(optimizer)}, {_name(scheduler)}): an optimizer built before PipeTrainer holds the "
            "whole model's parameters, and PipeTrainer frees every one this rank's stages do not own (its step would "
            "update freed tensors, its state would not be per stage), and a scheduler needs PipeTrainer's own "
            "optimizer; leave optimizers unset and choose with optim / optim_args / lr_scheduler_type / "
            "lr_scheduler_kwargs, pass optimizer_cls_and_kwargs=(torch.optim.<Optimizer>, {...}), or override "
            "create_optimizer / create_scheduler."
        )
    cls_and_kwargs = arguments.get("optimizer_cls_and_kwargs")
    if cls_and_kwargs is not None:
        cls = cls_and_kwargs[0]
        if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
            problems.append(
                f"optimizer_cls_and_kwargs=({_name(cls)}, ...): not a torch.optim.Optimizer subclass, so Trainer "
                "would call it as a factory with the whole model (as for Muon or Dion, which group the weights by "
                "name and shape), and PipeTrainer has only this rank's stages, named stages.<i>.…; pass an "
                "Optimizer subclass (it gets this rank's parameters in Trainer's weight-decay groups), or override "
                "create_optimizer."
            )
    return problems


def _name(value: Any) -> str:
    if value is None:
        return "None"
    return getattr(value, "__qualname__", None) or type(value).__name__
