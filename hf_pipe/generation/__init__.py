"""Generation through the pipeline: `model.generate` where every rank runs only its own stages.

`PipelineGenerator(engine, model).generate(...)` takes `generate`'s arguments and returns what it returns (the
sequences, on every rank of the pipeline). transformers does everything before the decoding loop — the generation
config merged from the model's and the call's, special tokens, attention mask and positions, expansion for beams and
`num_return_sequences`, `max_length`, the logits processors and stopping criteria — by running the model's own
`generate` with a `custom_generate` loop: ours (`pipeline.py`), which runs the stages and picks tokens as `_sample` and
`_beam_search` do (`choice.py`). Supported: greedy search, multinomial sampling (temperature, top-k, top-p, min-p,
typical, repetition penalty, bad words, min length, ...), beam search and beam sampling, `num_return_sequences`, EOS
and pad handling, stopping when every sequence has ended. Anything else is refused by name (`problems.py`).

Encoder-decoders (T5, BART: the `seq2seq` frontend's stages) generate from source ids: `generate` is handed each source
row's index as `encoder_outputs` (nothing runs on the skeleton model) and expands it for beams as it would expand the
encoder's output; the loop (`seq2seq.py`) runs the encoder on its stages once per group and keeps the encoder's output
on every decoder stage, each with a self- and cross-attention cache of its own layers.

Random draws happen on the last stage's rank, group after group within a step: on the CPU that is the same stream
of numbers as one `torch.multinomial` over the whole batch, so a seeded run draws exactly the tokens `generate` on one
process draws (finished groups keep taking their share while others decode, as finished rows do in `generate`). CUDA
generators advance per call, not per number: there, several groups in flight draw other tokens (from the same
distribution) than one call on the whole batch; with `groups=1` they are the same.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..errors import PipelineConfigError, raise_if_any
from ..evaluation import broadcast_from_last_stage
from ..launch import timeout_s, twin_group
from .pipeline import DecodeLoop
from .problems import call_problems, decoding_problems, generator_problems, input_problems
from .seq2seq import Seq2SeqDecodeLoop, source_index

__all__ = ["PipelineGenerator"]


class PipelineGenerator:
    """`generate` for a model whose stages `engine` holds (a `PipelineEngine`, e.g. `PipeTrainer.engine`), with `model`
    the model it was built from (every rank's copy, other ranks' weights on the meta device: it only prepares inputs).

    `groups`: groups of rows in flight at once (default: one per stage, so that every stage has work at every moment
    of the decode; 1: one group walks the stages while the others idle, as accelerate's and transformers' pipelined
    inference do). Collective over the world when built (it creates the process group the tokens travel back on) and
    over the pipeline for each `generate`; every rank of the pipeline passes the same prompts.

    Example:
        >>> generator = PipelineGenerator(trainer.engine, trainer.model)
        >>> tokens = generator.generate(input_ids, attention_mask=mask, max_new_tokens=32, do_sample=True, top_p=0.9)
    """

    def __init__(self, engine: Any, model: nn.Module, groups: int | None = None):
        raise_if_any(generator_problems(engine, model, groups))
        self.engine, self.model = engine, model
        self.groups = groups or engine.num_stages
        self.back = twin_group(engine.group, timeout_s())
        self.seq2seq = bool(getattr(model.config, "is_encoder_decoder", False))
        self._source: tuple[torch.Tensor, torch.Tensor | None] | None = None  # an encoder-decoder's, per call
        self.dtype = next(p.dtype for m in engine.modules for p in m.parameters() if p.is_floating_point())

    @classmethod
    def from_pretrained(
        cls,
        path: str,
        *,
        pipeline_parallel_size: int | None = None,
        split: Any = "auto",
        groups: int | None = None,
        device: torch.device | str | None = None,
        ddp_timeout: float = 1800,
        **model_init_kwargs: Any,
    ) -> PipelineGenerator:
        """A generator for the model saved at `path` (a folder or hub id), each rank reading only its stages' tensors:
        no rank ever holds the whole model. Run under torchrun / `accelerate launch` (or alone: one stage);
        `pipeline_parallel_size` ranks per pipeline (default: the world; fewer: data-parallel replicas, each
        generating its own prompts). `model_init_kwargs` as `from_pretrained` takes them (`dtype`,
        `attn_implementation`, `revision`, ...). The stages are in evaluation mode (no dropout), as after
        `from_pretrained`.

        Example (`torchrun --nproc-per-node 4 generate.py`):
            >>> generator = PipelineGenerator.from_pretrained("path/to/llama", dtype=torch.bfloat16)
            >>> tokens = generator.generate(**tokenizer(prompts, return_tensors="pt", padding=True), max_new_tokens=64)
        """
        from ..engine import PipelineEngine
        from ..launch import pipeline_groups, start_for_inference
        from ..loading import skeleton
        from ..weights import Checkpoint

        start_for_inference(ddp_timeout)
        world = dist.get_world_size()
        pp = pipeline_parallel_size or world
        if world % pp:
            raise PipelineConfigError(
                f"pipeline_parallel_size={pp} does not divide the {world} launched ranks; pass a divisor of {world}."
            )
        group, _ = pipeline_groups(world, pp, "ddp", ddp_timeout)
        model = skeleton(path, model_init_kwargs)
        weights = Checkpoint(path, seed=0, **model_init_kwargs)
        engine = PipelineEngine(model, group=group, split=split, device=device, weights=weights)
        for module in engine.modules:
            module.eval()
        return cls(engine, model.eval(), groups)

    def generate(
        self,
        inputs: torch.Tensor | None = None,
        generation_config: Any = None,
        logits_processor: Any = None,
        stopping_criteria: Any = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """As `model.generate(inputs, generation_config, logits_processor, stopping_criteria, **kwargs)`: the sequences
        (prompt and new tokens) on every rank of the pipeline."""
        raise_if_any(call_problems(kwargs, self.seq2seq))
        raise_if_any(input_problems(self.model, inputs if inputs is not None else kwargs.get("input_ids"), kwargs))
        if self.seq2seq:  # the encoder runs on the stages: generate gets each source row's index in its place
            inputs = inputs if inputs is not None else kwargs.pop("input_ids")
            self._source = (inputs, kwargs.get("attention_mask"))
            kwargs["encoder_outputs"] = source_index(inputs.shape[0], inputs.device)
        self._sampled = False
        try:
            with torch.no_grad():
                sequences = self.model.generate(
                    inputs,
                    generation_config=generation_config,
                    logits_processor=logits_processor,
                    stopping_criteria=stopping_criteria,
                    custom_generate=self._decode,
                    **kwargs,
                )
            if self._sampled:
                share_random_state(self.engine)
            return sequences
        finally:
            self._source = None

    def _decode(self, model: Any, input_ids: torch.Tensor, logits_processor: Any, stopping_criteria: Any,
                generation_config: Any, **model_kwargs: Any) -> torch.Tensor:  # fmt: skip
        """The `custom_generate` loop `generate` calls once its inputs are prepared."""
        model_kwargs.pop("synced_gpus", None)  # every rank of the pipeline steps together anyway
        groups = min(self.groups, input_ids.shape[0] // generation_config.num_beams)
        raise_if_any(
            decoding_problems(
                self.engine, model, generation_config, logits_processor, stopping_criteria, model_kwargs, groups
            )
        )
        self._sampled = bool(generation_config.do_sample)
        args = (self, model, input_ids, logits_processor, stopping_criteria, generation_config, model_kwargs)
        loop = Seq2SeqDecodeLoop(*args, source=self._source) if self.seq2seq else DecodeLoop(*args)
        return loop.run()


def share_random_state(engine: Any) -> None:
    """The sampling rank's random generators (CPU, and the device's) on every rank of the pipeline: tokens are drawn
    on the last stage's rank, so that every rank's generator then stands where one process's would after `generate`
    (and what draws next — a trainer's shuffles, the next evaluation — agrees across the pipeline)."""
    if engine.pp_size == 1:
        return

    def on_device(state: torch.Tensor) -> torch.Tensor | None:  # NCCL broadcasts device tensors only
        return state.to(engine.device) if engine.has_last else None

    torch.set_rng_state(broadcast_from_last_stage(engine, on_device(torch.get_rng_state())).cpu())
    if engine.device.type == "cuda":
        torch.cuda.set_rng_state(broadcast_from_last_stage(engine, on_device(torch.cuda.get_rng_state())).cpu())
