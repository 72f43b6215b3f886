"""GRPOTrainer 1.16's per-token loss and its loss metrics (`_compute_loss`), for one microbatch on the pipeline's last
stage: every loss type's per-token loss with its importance weights, KL term and off-policy mask, and the metrics as
(sum, count) pairs and least / greatest values that the pipeline pools over the microbatches as TRL pools them over
processes. `trainer` is the `PipeGRPOTrainer` (its GRPOTrainer attributes: loss type, epsilons, beta, ...)."""

from __future__ import annotations

from typing import Any

import torch
from trl.trainer.utils import nanmax, nanmin


def per_token_loss(
    trainer: Any, logps: torch.Tensor, old: torch.Tensor, ref: torch.Tensor | None, advantages: torch.Tensor,
    mask: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:  # fmt: skip
    """GRPOTrainer's per-token loss (its KL term added), with the importance weights (after `delta`'s clamp),
    the per-token KL and VESPO's weights its metrics read."""
    args = trainer.args
    if trainer.off_policy_mask_threshold is not None:
        off_policy = trainer.get_off_policy_mask(advantages, logps, old, mask, trainer.off_policy_mask_threshold)
    log_ratio = logps - old
    if trainer.importance_sampling_level == "token":
        log_weights = log_ratio
    elif trainer.importance_sampling_level == "sequence":
        log_weights = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    else:
        raise ValueError(
            f"Unknown importance sampling level: {trainer.importance_sampling_level}. Possible values are 'token' "
            "and 'sequence'."
        )
    coef_1 = torch.exp(log_weights)
    kl = None
    if ref is not None:
        kl = torch.exp(ref - logps) - (ref - logps) - 1
        if args.use_bias_correction_kl:
            kl = kl * coef_1
    phi = None
    if trainer.loss_type == "cispo":
        per_token_loss = -torch.clamp(coef_1, max=trainer.epsilon_high).detach() * advantages * logps
    elif trainer.loss_type in ("grpo", "bnpo", "dr_grpo", "dapo", "luspo"):
        coef_2 = torch.clamp(coef_1, 1 - trainer.epsilon_low, 1 + trainer.epsilon_high)
        if args.delta is not None:
            coef_1 = torch.clamp(coef_1, max=args.delta)
        per_token_loss = -torch.min(coef_1 * advantages, coef_2 * advantages)
    elif trainer.loss_type == "sapo":
        temperatures = torch.where(advantages > 0, args.sapo_temperature_pos, args.sapo_temperature_neg)
        per_token_loss = -torch.sigmoid(temperatures * (coef_1 - 1)) * 4 / temperatures * advantages
    elif trainer.loss_type == "vespo":
        phi = trainer.get_gamma_weights(
            advantages=advantages, log_ratio_per_token=log_ratio, mask=mask, importance_sampling_ratio=None,
            k_pos=args.vespo_k_pos, lambda_pos=args.vespo_lambda_pos, k_neg=args.vespo_k_neg,
            lambda_neg=args.vespo_lambda_neg,
        )  # fmt: skip
        per_token_loss = -phi * advantages * logps
    else:
        raise ValueError(f"Unknown loss type: {trainer.loss_type}")
    if trainer.off_policy_mask_threshold is not None:
        per_token_loss = per_token_loss * off_policy
    if kl is not None:
        per_token_loss = per_token_loss + trainer.beta * kl
    return per_token_loss, coef_1, kl, phi


def loss_metrics(
    trainer: Any, entropies: torch.Tensor, mask: torch.Tensor, advantages: torch.Tensor, coef_1: torch.Tensor,
    kl: torch.Tensor | None, phi: torch.Tensor | None,
) -> dict[str, Any]:  # fmt: skip
    """GRPOTrainer's loss metrics for a microbatch, as (sum, count) pairs (its masked means over the batch) and
    ("min" | "max", value) (its least and greatest per-sequence clip ratios)."""

    def pooled(x: torch.Tensor) -> tuple[torch.Tensor, Any]:
        if x.shape[1] == 1:  # sequence-level values: one per row
            return x.sum(), x.shape[0]
        return (x * mask).sum(), mask.sum().float()

    def per_sequence(x: torch.Tensor) -> torch.Tensor:
        return x.squeeze(1) if x.shape[1] == 1 else (x * mask).sum(-1) / mask.sum(-1)

    metrics: dict[str, Any] = {}
    if kl is not None:
        metrics["kl"] = pooled(kl)
    metrics["entropy"] = pooled(entropies)
    if trainer.loss_type in ("grpo", "bnpo", "dr_grpo", "dapo", "luspo"):
        low = ((coef_1 < 1 - trainer.epsilon_low) & (advantages < 0)).float()
        high = ((coef_1 > 1 + trainer.epsilon_high) & (advantages > 0)).float()
        metrics["clip_ratio/low_mean"] = pooled(low)
        metrics["clip_ratio/high_mean"] = pooled(high)
        metrics["clip_ratio/region_mean"] = pooled(((low + high) > 0).float())
        least, most = nanmin(per_sequence(low)), nanmax(per_sequence(high))
        if not torch.isnan(least):  # a microbatch of empty completions has no ratio (TRL's nanmin skips it)
            metrics["clip_ratio/low_min"] = ("min", float(least))
        if not torch.isnan(most):
            metrics["clip_ratio/high_max"] = ("max", float(most))
    elif trainer.loss_type == "cispo":
        metrics["cispo_clip_ratio"] = pooled(((coef_1 > trainer.epsilon_high) & (advantages > 0)).float())
    elif trainer.loss_type == "vespo":
        metrics["vespo/phi_seq_mean"] = pooled(phi)
    return metrics
