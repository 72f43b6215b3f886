"""What the preference trainers over the pipeline share: a pair's two rows side by side (so that they travel in one
microbatch) and back, the per-token values TRL's fused LM head gives, computed on the last stage from its logits, and
the frozen reference model (its stages, and the forward-only pass through them or through the policy's own stages with
PEFT's adapters off).

TRL's collators stack the chosen rows above the rejected ones; a pipeline cuts the batch into row chunks, so the rows
are interleaved (chosen 0, rejected 0, chosen 1, ...) before the step and put back in the collator's order after it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from trl.trainer.utils import use_adapter

from ..frontends import frontend_name
from ..integrations.peft import is_peft_model
from ..weights import Resident

IGNORE_INDEX = -100


def pair_order(rows: int, device: Any = None) -> torch.Tensor:
    """The row order that puts row i of the first half next to row i of the second half."""
    return torch.arange(rows, device=device).view(2, rows // 2).t().reshape(-1)


def interleave(batch: dict[str, Any]) -> dict[str, Any]:
    """A batch whose first half of rows pairs with its second half, each pair's rows side by side."""
    rows = batch["input_ids"].shape[0]
    order = pair_order(rows, batch["input_ids"].device)
    return {k: v[order] if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == rows else v for k, v in batch.items()}


def deinterleave(values: torch.Tensor) -> torch.Tensor:
    """Per-row values of an interleaved batch, back in the collator's order (first rows of pairs, then seconds)."""
    return torch.cat([values[0::2], values[1::2]])


@dataclass
class TokenStats:
    """Per-token values of a causal LM's output, as TRL's fused LM head (`trl.trainer.utils.add_fused_lm_head`)
    returns them: zero where the label is -100; `log_probs` differentiable, the others detached."""

    log_probs: torch.Tensor
    entropy: torch.Tensor
    mean_logits: torch.Tensor
    is_top1: torch.Tensor
    log_sum_sq_probs: torch.Tensor | None
    mask: torch.Tensor


def token_stats(logits: torch.Tensor, shift_labels: torch.Tensor, log_sum_sq_probs: bool = False) -> TokenStats:
    """TRL's fused-head values at every position whose shifted label is not -100, from the last stage's logits, in
    float32: the label's log-probability, the entropy, the mean logit, whether the label is the first argmax, and
    (for WPO weights) log Σ p². The fused head folds the same quantities tile by tile without the full logits; the
    two agree to float32 rounding (the pipeline's last stage has the logits of its microbatch anyway)."""
    z = logits.float()
    mask = shift_labels != IGNORE_INDEX
    targets = shift_labels.clamp(min=0).unsqueeze(-1)
    log_z = z.logsumexp(-1)
    log_probs = (z.gather(-1, targets).squeeze(-1) - log_z) * mask
    with torch.no_grad():
        log_p = z - log_z.unsqueeze(-1)
        entropy = -(log_p.exp() * log_p).sum(-1) * mask
        mean_logits = z.mean(-1) * mask
        is_top1 = (z.argmax(-1) == targets.squeeze(-1)) & mask
        sq = (2 * log_p).logsumexp(-1) * mask if log_sum_sq_probs else None
    return TokenStats(log_probs, entropy, mean_logits, is_top1, sq, mask)


def reference_stages(trainer: Any) -> Any:
    """The reference's stages on this rank, cut like the policy's and frozen; None where the reference is the policy's
    own stages (PEFT's adapters off, or nothing to keep: `trainer.ref_model` is None). A skeleton the TRL trainer built
    (its `_pipe_weights` set, `_reference.reference_init`) is read stage by stage from its checkpoint."""
    ref = trainer.ref_model
    if ref is None:
        return None
    weights = getattr(ref, "_pipe_weights", None)
    if weights is not None:  # a skeleton the TRL trainer made: no accelerator state to keep for it
        trainer.accelerator._models = [m for m in trainer.accelerator._models if m is not ref]
    engine = trainer.engine
    if hasattr(ref.config, "get_text_config") and hasattr(ref.config.get_text_config(), "output_router_logits"):
        ref.config.get_text_config().output_router_logits = False  # TRL's reference forward returns no aux loss
    local = engine.frontend.build(
        ref, engine.plan, engine.stage_indices, engine.device, weights if weights is not None else Resident()
    )
    for module in local.modules:
        module.requires_grad_(False)
        module.eval()
    return local


def reference_forward(
    trainer: Any, reference: Any, batch: dict[str, Any], on_last: Callable[[Any, dict[str, Any]], torch.Tensor]
) -> torch.Tensor | None:
    """`on_last`'s per-row values of `batch` under the reference, on the last stage's rank (None elsewhere): a
    forward-only pass through `reference` (the stages `reference_stages` built), or with None through the policy's
    own stages with PEFT's adapters off (or the `"ref"` copy of a given adapter), as TRL's reference forward. A pass
    of its own, before the step: toggling adapters also toggles their `requires_grad`, which the training schedule
    must not see change."""
    if reference is not None:
        per_mb, _, _ = trainer.engine.forward(batch, on_last=on_last, stages=(reference, reference.modules))
    else:  # PEFT's adapters off; or (precomputing, full fine-tuning) the policy before its first step
        adapters = contextlib.nullcontext()
        if is_peft_model(trainer.model):
            adapter = "ref" if "ref" in trainer.model.peft_config else None
            adapters = use_adapter(trainer.model, adapter_name=adapter)
        with adapters:
            per_mb, _, _ = trainer.engine.forward(batch, on_last=on_last)
    return torch.cat(per_mb) if per_mb is not None else None


def reference_trainer_problems(
    trainer: str, args: Any, model: Any, train_dataset: Any, kwargs: dict, loads_reference: bool
) -> list[str]:
    """What a trainer with a reference model (`trainer`: "DPOTrainer", "KTOTrainer") refuses under the pipeline, each
    with why and the fix; `loads_reference`: the reference is read from the model's checkpoint path."""
    problems = []
    if kwargs.get("compute_metrics") is not None:
        problems.append(
            f"compute_metrics: {trainer} passes it logits recomputed by a second forward of the whole model "
            f"(deprecated in TRL); the pipeline's evaluation logs {trainer}'s own metrics (eval_rewards/*, ...). "
            "Drop compute_metrics."
        )
    if train_dataset is not None:
        with contextlib.suppress(StopIteration, TypeError):
            sample = next(iter(train_dataset))
            if "image" in sample or "images" in sample:
                problems.append(
                    "a vision dataset ('image' / 'images' columns): vision-language models are not split by the "
                    f"pipeline's {trainer} yet; use a text-only dataset."
                )
    frontend = frontend_name(args.pipeline_frontend, getattr(model, "config", None))
    if frontend != "module":
        problems.append(
            f"pipeline_frontend={args.pipeline_frontend!r} resolves to {frontend!r}: the frozen reference stages are "
            "cut with the module split; use a model family with a module adapter (pipeline_frontend='module')."
        )
    config = getattr(model, "config", None)
    if config is None:
        return problems
    text = config.get_text_config()
    coef = args.router_aux_loss_coef
    coef = getattr(text, "router_aux_loss_coef", 0.0) if coef is None else coef
    if hasattr(text, "output_router_logits") and coef and trainer != "DPOTrainer":  # DPO adds it (`dpo.py`)
        problems.append(
            f"a Mixture-of-Experts model with router_aux_loss_coef={coef}: the router's load-balancing loss "
            "spans every layer's router logits, which live on different stages; set router_aux_loss_coef=0.0."
        )
    if loads_reference and not getattr(config, "_name_or_path", ""):
        problems.append(
            f"ref_model=None with a model that names no checkpoint (config._name_or_path is empty): {trainer} "
            "loads the reference from that path; pass the checkpoint path as model, or give ref_model=."
        )
    return problems
