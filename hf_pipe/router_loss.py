"""The MoE load-balancing loss of HF's `...ForCausalLM` (`load_balancing_loss_func`), computed across stages.

HF concatenates every layer's router logits over the whole forward, then takes per expert the fraction of top-k
assignments times the mean router probability (padding left out by the attention mask), times the expert count.
Both means are sums over layers and tokens divided by one count, so the loss is a function of three partial sums:
per-expert assignment counts, per-expert probability sums, and the count of (masked) token rows. Each stage adds its
layers' sums, in HF's layer order, to those it received, and sends them on with its hidden states (one extra tensor
of `2·experts + 1` floats); the last stage turns them into HF's number. Gradients flow back through the probability
sums to every stage's routers, exactly as through HF's concatenation, on every schedule (the sums are one more stage
output, like the hidden states).

Semantics within a batch: the aux term is computed per microbatch, as Trainer computes it per gradient-accumulation
step on the same microbatches (`coef · aux` added to each microbatch's loss, unscaled, where the model's loss is
normalised by `num_items_in_batch`; TRL's SFT divides it by the accumulation steps). Evaluation runs one forward per
batch under Trainer: there the microbatches' sums are added first, which gives HF's aux of the whole batch exactly.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass
class RouterLoss:
    """HF's load-balancing loss of one MoE model (`load_balancing_loss_func` of its modeling module)."""

    num_experts: int
    top_k: int
    #: `router_aux_loss_coef`: what HF multiplies the aux loss by before adding it to the loss
    coef: float
    #: the router module class HF records `router_logits` from (its first output)
    router_class: type[nn.Module]
    #: what each microbatch's aux loss is multiplied by in training (the trainer sets it per step: `coef`, times
    #: Trainer's or TRL's scaling, see `trainer_loss.aux_weight`)
    weight: float = 0.0
    #: divide `weight` by the step's microbatch count too (a loss averaged over accumulation steps)
    mean_over_microbatches: bool = False

    def __post_init__(self) -> None:
        self.weight = self.coef

    @property
    def size(self) -> int:
        """Length of the partial sums a stage sends on: counts, probability sums, token rows."""
        return 2 * self.num_experts + 1

    def zeros(self, device: torch.device) -> torch.Tensor:
        return torch.zeros(1, self.size, dtype=torch.float32, device=device)

    def add_layers(
        self, carried: torch.Tensor, router_logits: Sequence[torch.Tensor], attention_mask: torch.Tensor | None
    ) -> torch.Tensor:
        """`carried` (1, 2E+1) plus these layers' sums, accumulated layer after layer as HF accumulates them."""
        e, k = self.num_experts, self.top_k
        counts, probs, rows = carried[0, :e], carried[0, e : 2 * e], carried[0, 2 * e]
        device = carried.device
        histc_dtype = torch.float32 if device.type in ("cpu", "mps") else torch.int32
        flat_mask = None
        if attention_mask is not None:
            flat_mask = attention_mask.reshape(-1).to(device=device, dtype=torch.float32)
        for logits in router_logits:
            routing_weights = torch.nn.functional.softmax(logits.to(device), dim=-1)
            _, selected = torch.topk(routing_weights, k, dim=-1)
            if flat_mask is None:
                counts = counts + torch.histc(selected.reshape(-1).to(histc_dtype), bins=e, min=0, max=e)
                probs = probs + routing_weights.float().sum(dim=0)
                rows = rows + routing_weights.shape[0]
            else:
                counts = counts + torch.zeros(e, dtype=torch.float32, device=device).scatter_add_(
                    0, selected.reshape(-1), flat_mask.repeat_interleave(k)
                )
                probs = probs + (routing_weights.float() * flat_mask.unsqueeze(-1)).sum(dim=0)
                rows = rows + flat_mask.sum()
        # one fresh (1, 2E+1) tensor, not a view: zero-bubble schedules detach stage outputs in place
        return torch.cat([counts.detach().unsqueeze(0), probs.unsqueeze(0), rows.detach().reshape(1, 1)], dim=1)

    def aux(self, sums: torch.Tensor) -> torch.Tensor:
        """HF's aux loss from the sums over every layer (`sums` (n, 2E+1): the rows are added first, so the sums of
        a batch's microbatches give the whole batch's aux)."""
        e = self.num_experts
        total = sums.sum(0) if sums.dim() == 2 else sums
        counts, probs, rows = total[:e].detach(), total[e : 2 * e], total[2 * e].detach()
        return torch.sum((counts / rows) * (probs / rows).unsqueeze(0)) * e


def router_loss_of(model: nn.Module) -> RouterLoss | None:
    """The load-balancing loss `model`'s forward adds (HF's `...ForCausalLM` of an MoE family with
    `output_router_logits=True`), or None: the model returns no router logits, or adds no such loss."""
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if text is None or not getattr(text, "output_router_logits", False):
        return None
    spec = router_spec(type(model))
    if spec is None:
        return None
    recorder, _ = spec
    experts = getattr(model, "num_experts", None) or getattr(text, "num_experts", None)
    experts = experts or getattr(text, "num_local_experts", None)
    top_k = getattr(model, "num_experts_per_tok", None) or getattr(text, "num_experts_per_tok", None)
    coef = getattr(model, "router_aux_loss_coef", None)
    coef = getattr(text, "router_aux_loss_coef", 0.0) if coef is None else coef
    return RouterLoss(int(experts), int(top_k), float(coef), recorder)


def router_spec(cls: type) -> tuple[type[nn.Module], Any] | None:
    """(the router class HF records `router_logits` from, the module's `load_balancing_loss_func`) of a model class
    whose forward adds HF's load-balancing loss, else None."""
    recorders = getattr(cls, "_can_record_outputs", None) or {}
    recorder = recorders.get("router_logits")
    module = inspect.getmodule(cls)
    func = getattr(module, "load_balancing_loss_func", None)
    if recorder is None or func is None or getattr(recorder, "index", 0) != 0:
        return None
    target = getattr(recorder, "target_class", None)
    try:  # the head's forward adds it (HF's MoE sequence classifiers record router logits but add no aux loss)
        adds = "load_balancing_loss_func" in inspect.getsource(cls.forward)
    except (OSError, TypeError):
        adds = False
    return (target, func) if isinstance(target, type) and adds else None


class RouterRecorder:
    """Records the router logits of the routers inside some modules (a stage's blocks) while `recording`: HF's own
    way (a forward hook on the router class it records), so a stage sees exactly the tensors HF concatenates."""

    def __init__(self, modules: Sequence[nn.Module], router_class: type[nn.Module]):
        self.logits: list[torch.Tensor] | None = None
        self._handles = []
        seen: set[int] = set()
        for module in modules:
            for sub in module.modules():
                if isinstance(sub, router_class) and id(sub) not in seen:
                    seen.add(id(sub))
                    self._handles.append(sub.register_forward_hook(self._hook))

    def _hook(self, module: nn.Module, args: Any, output: Any) -> None:
        # off outside a stage's forward: gradient checkpointing reruns the routers during the backward
        if self.logits is not None:
            self.logits.append(output[0] if isinstance(output, (tuple, list)) else output)

    @contextmanager
    def recording(self) -> Iterator[list[torch.Tensor]]:
        self.logits = []
        try:
            yield self.logits
        finally:
            self.logits = None


def router_loss_problems(config: Any, frontend: str) -> list[str]:
    """An MoE model returning its router logits (`output_router_logits=True`), for a frontend that cannot carry its
    load-balancing loss: the module frontend carries it for the families whose adapter says so (`MoeAdapter`), the
    trace frontend for HF's MoE causal LMs (checked on the model class when it builds)."""
    from .families import get_family, registered_families

    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if not getattr(text, "output_router_logits", False):
        return []
    model_type = getattr(config, "model_type", "?")
    adapter = get_family(model_type)
    carried = adapter is not None and getattr(adapter, "router_loss", False)
    if (carried and frontend == "module") or frontend == "trace":
        return []
    coef = getattr(text, "router_aux_loss_coef", None)
    moe = [t for t in registered_families() if getattr(get_family(t), "router_loss", False)]
    fix = (
        "use pipeline_frontend='module' (or 'auto'), whose stages carry it"
        if carried
        else f"the module frontend carries it for {', '.join(moe)}, the trace frontend for HF's MoE causal LMs"
    )
    return [
        f"output_router_logits=True ({model_type}, router_aux_loss_coef={coef}) with pipeline_frontend="
        f"{frontend!r}: the MoE load-balancing loss needs every layer's router statistics, which these stages do "
        f"not carry between ranks; {fix}, or set config.output_router_logits=False (or output_router_logits=False "
        "in from_pretrained / model_init_kwargs) to train without it (router_aux_loss_coef=0 alone does not do: "
        "the router logits are still returned)."
    ]
