"""How a rank's pipeline stages are made from a model: one interface, one file per frontend.

A frontend plans the split, builds this rank's stage modules (from the model, which may be a skeleton on the meta
device, and a weight source that makes exactly the stages' tensors real), says which batch keys its stages consume,
and gives torch's pipeline stages for a batch shape. The engine only runs what it gets:

- `module` (`module.py`): a family with an adapter split at its modules — any batch shape, no tracing;
- `trace` (`traced.py`): any model torch.export can capture, traced once per batch shape;
- `seq2seq` (`seq2seq.py`): an encoder-decoder (T5, BART) split over its encoder's then its decoder's blocks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..families import get_family
from ..split import SplitPlan, SplitPolicy
from ..timeline import Timeline


@dataclass
class LocalStages:
    """This rank's stages of one model, as a frontend built them."""

    #: the stage modules, in the order of the rank's stage indices
    modules: list[nn.Module]
    #: (FQNs of a tied weight, the stages that use it), for every tied weight of the model
    tied: list[tuple[list[str], list[int]]]
    #: the model's parameters and buffers these stages hold (real, on the device; every other one is on meta)
    keep: set[str]
    #: with tensor parallelism: the parameters (model names) whose gradients are summed over the TP ranks once per step, and those
    #: read from the checkpoint as this rank's slices only
    tp_summed: list[str] = field(default_factory=list)
    tp_sliced: list[str] = field(default_factory=list)


class Frontend:
    """The interface the engine builds and runs stages through; subclass it for a new kind of stage."""

    name: str = ""
    #: stage modules may be wrapped in DDP / FSDP2 over the data-parallel replicas (else the engine averages the
    #: replicas' gradients itself)
    wraps_data_parallel: bool = True
    #: Linear weight gradients may be accumulated in place, microbatch after microbatch (`grad_accumulation.py`)
    accumulates_in_place: bool = False
    #: stages are specialised to the shapes of every keyword input (traced graphs), not only to the activations
    shape_specialised: bool = False
    #: stages mask within each sequence of a packed batch (positions restarting, no attention mask), so a packed
    #: batch may be cut into microbatches at sequence boundaries (set by `build`)
    packs_sequences: bool = False
    #: the MoE load-balancing loss the stages carry statistics for (`router_loss.py`; set by `build`), or None
    router: Any = None

    def __init__(self, config: Any):
        self.config = config

    def problems(self, config: Any, *, pp_size: int, stages_per_rank: int, explicit_split: bool,
                 data_parallel: str | None) -> list[str]:  # fmt: skip
        """What keeps this frontend from running the model with these settings, each with its fix."""
        return []

    def trainer_problems(self, args: Any, model: nn.Module) -> list[str]:
        """Trainer options (and heads) this frontend cannot honour, each with its fix."""
        return []

    def plan(
        self, model: nn.Module, num_stages: int, split: SplitPolicy, *, task: str | None, context: Any
    ) -> SplitPlan:
        """The split; `context` has the engine's `batch_size`, `microbatches` and `device` (a measured split)."""
        raise NotImplementedError

    def build(
        self, model: nn.Module, plan: SplitPlan, stage_indices: Sequence[int], device: torch.device, weights: Any
    ) -> LocalStages:
        raise NotImplementedError

    def batch_keys(self, batch: Mapping[str, Any]) -> set[str]:
        """The batch keys the stages consume (besides `input_ids` and the labels)."""
        raise NotImplementedError

    def keys_note(self) -> str:
        """How to read `batch_keys`, for the error naming a key no stage consumes."""
        raise NotImplementedError

    def batch_problems(self, batch: Mapping[str, Any]) -> list[str]:
        """Inputs of a batch the stages cannot run (a modality the family's adapter does not handle), with the fix."""
        return []

    def unlabelled_problems(self, batch: Mapping[str, Any]) -> list[str]:
        """What keeps a batch without labels from running forward only (evaluation, prediction), each with its fix."""
        return []

    def stage_inputs(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The batch as the stages take it (a frontend may leave out keys whose information the stages get anyway)."""
        return batch

    def torch_stages(
        self,
        local: LocalStages,
        runnable: list[nn.Module],
        stage_indices: Sequence[int],
        num_stages: int,
        microbatch: tuple[torch.Tensor, Mapping[str, Any]],
        training: bool,
        *,
        device: torch.device,
        group: dist.ProcessGroup,
        timeline: Timeline,
    ) -> list[Any]:
        """torch pipeline stages for this rank, for microbatches shaped like `microbatch` (input ids, keywords)."""
        raise NotImplementedError


def frontend_name(frontend: str, config: Any) -> str:
    """A name in `FRONTENDS` (an unknown name is returned as it is, for `frontend_problems` to report): `"auto"`
    takes the frontend of the model's family adapter where it has one (`module`, or `seq2seq` for an
    encoder-decoder), else `trace`. `config` is the model's, or None."""
    frontend = frontend.lower()
    if frontend == "auto":
        adapter = get_family(getattr(config, "model_type", "")) if config is not None else None
        return adapter.frontend if adapter is not None else "trace"
    return frontend


def select_frontend(frontend: str, config: Any) -> Frontend:
    """The frontend for a setting (`"auto"` or a name in `FRONTENDS`) and a model config."""
    return FRONTENDS[frontend_name(frontend, config)](config)


from .module import ModuleFrontend  # noqa: E402  (they subclass Frontend, above)
from .seq2seq import Seq2SeqFrontend  # noqa: E402
from .traced import TraceFrontend  # noqa: E402

#: every frontend, by the name `pipeline_frontend` takes
FRONTENDS: dict[str, type[Frontend]] = {"module": ModuleFrontend, "trace": TraceFrontend, "seq2seq": Seq2SeqFrontend}
