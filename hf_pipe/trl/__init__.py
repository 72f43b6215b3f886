"""TRL's trainers over the pipeline, one file per trainer: `PipeSFTTrainer` with `PipeSFTConfig` (`sft.py`),
`PipeRewardTrainer` with `PipeRewardConfig` (`reward.py`), and from `trl.experimental` `PipeORPOTrainer` with
`PipeORPOConfig` (`orpo.py`) and `PipeCPOTrainer` with `PipeCPOConfig` (`cpo.py`, SimPO and AlphaPO included).

Each `Pipe<Name>Config` is TRL's config with the pipeline fields (`hf_pipe.PipeArgumentsMixin`), every TRL default
kept; each `Pipe<Name>Trainer` takes exactly TRL's trainer's arguments, keeps its dataset preparation, collator and
metrics, and computes its loss on the pipeline's last stage, with the numbers TRL's trainer gives on one process.
A model id or path is never built whole: every rank builds the skeleton TRL would load on the meta device and reads
its stages' weights from the checkpoint (`_model.py`).

    from hf_pipe.trl import PipeSFTConfig, PipeSFTTrainer
    trainer = PipeSFTTrainer(model="path/to/model", args=PipeSFTConfig(output_dir="out", packing=True),
                             train_dataset=dataset, peft_config=LoraConfig(...))

`PipeDPOTrainer` with `PipeDPOConfig` (`dpo.py`) also runs DPO's reference model: a second, frozen set of stages with
the policy's split (or, with PEFT, the adapters off), a forward-only pass before each step; `PipeKTOTrainer` with
`PipeKTOConfig` (`kto.py`) runs KTO's the same way, with its KL term from forward-only passes before the step.
`PipeGRPOTrainer` with `PipeGRPOConfig` (`grpo.py`) runs GRPO: completions generated through the pipeline
(`hf_pipe.generation`), old and reference log-probabilities by forward-only passes, the loss per microbatch on the last
stage. A further trainer is one file here (its config and trainer), re-exported below; `_preference.py` holds what
preference trainers share, `_paired.py` what TRL's older paired trainers (ORPO, CPO) share.
"""

try:
    import trl  # noqa: F401
except ImportError as err:  # pragma: no cover - the extra is missing
    raise ImportError("hf_pipe.trl needs TRL: pip install 'hf_pipe[trl]' (trl 1.16.x)") from err

from .dpo import PipeDPOConfig, PipeDPOTrainer
from .grpo import PipeGRPOConfig, PipeGRPOTrainer
from .kto import PipeKTOConfig, PipeKTOTrainer
from .reward import PipeRewardConfig, PipeRewardTrainer
from .sft import PipeSFTConfig, PipeSFTTrainer

__all__ = [
    "PipeCPOConfig",
    "PipeCPOTrainer",
    "PipeDPOConfig",
    "PipeDPOTrainer",
    "PipeGRPOConfig",
    "PipeGRPOTrainer",
    "PipeKTOConfig",
    "PipeKTOTrainer",
    "PipeORPOConfig",
    "PipeORPOTrainer",
    "PipeRewardConfig",
    "PipeRewardTrainer",
    "PipeSFTConfig",
    "PipeSFTTrainer",
]

#: trainers from `trl.experimental`, imported on first use: importing it warns that its APIs are unstable, which
#: only their users should read
_EXPERIMENTAL = {
    "PipeCPOConfig": "cpo",
    "PipeCPOTrainer": "cpo",
    "PipeORPOConfig": "orpo",
    "PipeORPOTrainer": "orpo",
}


def __getattr__(name: str):
    if name in _EXPERIMENTAL:
        import importlib

        return getattr(importlib.import_module(f".{_EXPERIMENTAL[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
