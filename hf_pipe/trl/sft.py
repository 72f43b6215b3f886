"""TRL's supervised fine-tuning over the pipeline: `PipeSFTTrainer` with `PipeSFTConfig`.

`PipeSFTTrainer` takes exactly `trl.SFTTrainer`'s arguments and keeps what SFT does — dataset preparation, chat
templates, `completion_only_loss` / `assistant_only_loss` masks, packing (BFD, padding-free: cut into microbatches at
sequence boundaries, see `microbatch.py`), PEFT configs — and runs SFT's loss on the pipeline's last stage: `loss_type`
`"nll"` or `"dft"`, normalised as SFT normalises it, with SFT's `entropy` and `mean_token_accuracy` computed there
over the whole batch and `num_tokens` counted once per pipeline, all reported on every rank as SFT logs them.
An MoE model's load-balancing loss is added as SFT adds it (`router_aux_loss_coef`, per microbatch, averaged over
the microbatches as SFT averages it over accumulation steps) and logged as SFT's `aux_loss`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from trl import SFTConfig, SFTTrainer

from ..errors import raise_if_any
from ..trainer import PipeTrainer
from ..training_args import PipeArgumentsMixin
from ._config import config_problems
from ._metrics import count_train_tokens
from ._model import model_for, path_given, replay_adapter_draws, route_router_logits


@dataclass
class PipeSFTConfig(PipeArgumentsMixin, SFTConfig):
    """`trl.SFTConfig` with the pipeline fields of `PipeArgumentsMixin` (every SFTConfig default kept)."""


def _sft_problems(args: PipeSFTConfig) -> list[str]:
    problems = config_problems(args, PipeSFTConfig, SFTConfig, "SFTTrainer")
    if args.loss_type not in ("nll", "dft"):
        problems.append(
            f"loss_type={args.loss_type!r}: PipeSFTTrainer computes SFT's 'nll' and 'dft' losses on the last stage; "
            "use one of those."
        )
    if args.use_liger_kernel:
        problems.append("use_liger_kernel=True: Liger patches the whole model's forward, which no rank runs.")
    return problems


class PipeSFTTrainer(SFTTrainer, PipeTrainer):
    """`trl.SFTTrainer` whose model runs as a pipeline over the launched ranks (see the module docstring).

    Example:
        >>> trainer = PipeSFTTrainer(model=path, args=PipeSFTConfig(output_dir="out", pipeline_schedule="1f1b"),
        ...                          train_dataset=dataset)
        >>> trainer.train()
    """

    def __init__(self, model: Any, args: PipeSFTConfig | None = None, *positional: Any, **kwargs: Any):
        raise_if_any(_sft_problems(args))
        self._total_train_tokens = 0
        with path_given(SFTTrainer, model):
            built = model_for(self, model, args)
            route_router_logits(built, args)  # before the stages are cut: SFT switches the router logits after
            super().__init__(built, args, *positional, **kwargs)  # not built whole
        replay_adapter_draws(self)  # a path's LoRA adapters: TRL's draws
        if (router := self.engine.loss.router) is not None:
            router.coef = self.router_aux_loss_coef  # SFT weighs the aux loss with its own coefficient

    # SFT's evaluation runs its compute_loss on the whole model: the pipeline's own runs the last stage's loss
    compute_loss = PipeTrainer.compute_loss

    def prediction_step(self, model: Any, inputs: dict[str, Any], prediction_loss_only: bool, ignore_keys=None):
        self._metrics["eval"]["num_tokens"] = [self._total_train_tokens]  # as SFT logs it: the tokens trained on
        return PipeTrainer.prediction_step(self, model, inputs, prediction_loss_only, ignore_keys)

    def training_step(self, model: Any, inputs: dict[str, Any], num_items_in_batch: Any = None) -> torch.Tensor:
        # SFT's num_tokens: every token of the batch (padding-free batches: the whole row)
        tokens = inputs["attention_mask"].sum() if "attention_mask" in inputs else inputs["position_ids"].size(1)
        count_train_tokens(self, tokens)
        return super().training_step(model, inputs, num_items_in_batch)

    def _router_aux_weight(self, num_items_in_batch: Any) -> tuple[float, bool]:
        # SFT adds `coef · aux / steps` per forward, the steps being the accumulation steps (the microbatches here)
        # when the loss is normalised by `num_items_in_batch`
        if num_items_in_batch is None:
            return self.router_aux_loss_coef, False
        return self.router_aux_loss_coef / self.current_gradient_accumulation_steps, True

    def compute_microbatch_loss(self, outputs, labels, inputs, num_items_in_batch):
        """SFT's loss and metrics from the last stage's logits (the fused LM head's numbers, computed whole)."""
        targets = inputs["shift_labels"]
        mask = targets != -100
        log_probs = F.log_softmax(outputs.logits.float(), dim=-1)
        token = log_probs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask
        valid = mask.sum()
        if self.compute_loss_func is not None:  # SFT hands it the model's outputs; its metrics still come from here
            loss = PipeTrainer.compute_microbatch_loss(self, outputs, labels, inputs, num_items_in_batch)
        else:
            per_token = -token
            if self.args.loss_type == "dft":  # https://huggingface.co/papers/2508.05629
                per_token = per_token * token.exp().detach()
            count = valid if num_items_in_batch is None else num_items_in_batch
            loss = per_token.sum() / torch.as_tensor(count).clamp(min=1)
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * self._dp_size  # as SFT scales it by the processes, DDP averaging the gradients
            if getattr(outputs, "aux_loss", None) is not None:  # an MoE model's load-balancing loss, weighted as SFT
                loss = loss + self.engine.loss.aux_weight * outputs.aux_loss
        with torch.no_grad():
            entropy = -(log_probs.exp() * log_probs).sum(-1) * mask
            top1 = (outputs.logits.argmax(-1) == targets) & mask
        metrics = {"entropy": (entropy.sum(), valid), "mean_token_accuracy": (top1.sum(), valid)}
        return loss, metrics

    def store_pipeline_metric(self, mode: str, name: str, value: float) -> None:
        self._metrics[mode][name].append(value)  # SFT's own store, averaged by its log()
