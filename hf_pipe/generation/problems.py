"""What generation through the pipeline refuses, each by name with its fix, on every rank before any stage runs."""

from __future__ import annotations

from typing import Any

from transformers.generation import GenerationMode

from ..families import CAUSAL_LM

#: `generate` arguments the pipeline's loop cannot honour, and why
_CALL_REFUSED = {
    "assistant_model": "assisted decoding runs a second model beside the stages",
    "streamer": "tokens are chosen on the last stage's rank and the sequences returned at the end",
    "negative_prompt_ids": "classifier-free guidance runs the model a second time per step",
    "negative_prompt_attention_mask": "classifier-free guidance runs the model a second time per step",
    "custom_generate": "the pipeline's decoding loop is itself a custom_generate",
    "cache": "each stage keeps its own KV cache; a cache built for the whole model cannot be split",
    "past_key_values": "each stage keeps its own KV cache; a cache built for the whole model cannot be split",
}
#: an encoder-decoder's arguments the pipeline cannot honour: its encoder runs on the stages, from the source ids
_SEQ2SEQ_REFUSED = {
    "encoder_outputs": "the encoder runs on the pipeline's stages, from the source ids (pass input_ids)",
    "inputs_embeds": "the first stage embeds the source ids (pass input_ids)",
    "decoder_inputs_embeds": "the decoder's stage embeds the target ids (pass decoder_input_ids)",
}
_MODES = (GenerationMode.GREEDY_SEARCH, GenerationMode.SAMPLE, GenerationMode.BEAM_SEARCH, GenerationMode.BEAM_SAMPLE)
_OUTPUTS = ("return_dict_in_generate", "output_scores", "output_logits", "output_attentions", "output_hidden_states")
#: logits processors that treat each row on its own, so that a group of rows gets what the whole batch would
ROW_WISE_PROCESSORS = frozenset(
    {"TemperatureLogitsWarper", "TopKLogitsWarper", "TopPLogitsWarper", "MinPLogitsWarper", "TopHLogitsWarper",
     "TypicalLogitsWarper", "EpsilonLogitsWarper", "EtaLogitsWarper", "RepetitionPenaltyLogitsProcessor",
     "NoRepeatNGramLogitsProcessor", "NoBadWordsLogitsProcessor", "SequenceBiasLogitsProcessor",
     "MinLengthLogitsProcessor", "MinNewTokensLengthLogitsProcessor", "ForcedBOSTokenLogitsProcessor",
     "ForcedEOSTokenLogitsProcessor", "InfNanRemoveLogitsProcessor", "ExponentialDecayLengthPenalty",
     "SuppressTokensLogitsProcessor", "SuppressTokensAtBeginLogitsProcessor", "LogitNormalization"}
)  # fmt: skip
#: stopping criteria that end each row on its own and pad it afterwards, or end every row at once
_ROW_WISE_STOPPING = frozenset({"EosTokenCriteria", "MaxLengthCriteria"})
#: what the model inputs may hold that no stage reads but the loop handles
_LOOP_KEYS = ("use_cache", "logits_to_keep", "attention_mask", "position_ids")


def generator_problems(engine: Any, model: Any, groups: int | None) -> list[str]:
    """A pipeline that cannot generate."""
    problems = []
    if engine.frontend.name not in ("module", "seq2seq"):
        problems.append(
            f"generation through the pipeline runs module-split stages (a family with an adapter, decoder-only or "
            f"encoder-decoder); this pipeline's "
            f"stages are made by the {engine.frontend.name!r} frontend, whose stages cannot keep a KV cache per "
            "stage. Use pipeline_frontend='module' (or 'auto') with a family hf_pipe knows, or register an adapter "
            "(hf_pipe.register_family)."
        )
    elif engine.frontend.name == "module" and engine.plan.task != CAUSAL_LM:
        problems.append(
            f"generation needs a language-model head; {type(model).__name__} has the {engine.plan.task} head. "
            "Build the pipeline from a ...ForCausalLM / ...LMHeadModel."
        )
    elif engine.frontend.adapter.first_stage_may_skip:
        problems.append(
            f"generation through the pipeline with the vision-language {type(model).__name__}: the decoding loop "
            "does not carry the images into the prefill (nor a model's 3-D positions into the decoding steps); "
            "train it through the pipeline, and generate from the saved checkpoint on one process."
        )
    if engine.dp is not None and engine.dp.size > 1 and engine.dp.mode == "fsdp":
        problems.append(
            "generation with pipeline_data_parallel='fsdp': each replica's stages gather their sharded weights from "
            "the other replicas at every forward, and replicas generating their own prompts end at different steps; "
            "use pipeline_data_parallel='ddp' (or one replica) to generate."
        )
    if groups is not None and groups < 1:
        problems.append(f"groups={groups}: the groups of rows in flight must be at least 1.")
    return problems


def call_problems(kwargs: dict[str, Any], seq2seq: bool = False) -> list[str]:
    """`generate` arguments the pipeline's loop cannot honour."""
    refused = {**_CALL_REFUSED, **(_SEQ2SEQ_REFUSED if seq2seq else {})}
    return [
        f"generate({name}=...) is not supported through the pipeline: {why}. Leave it out."
        for name, why in refused.items()
        if kwargs.get(name) is not None
    ]


def input_problems(model: Any, input_ids: Any, kwargs: dict[str, Any]) -> list[str]:
    """Prompts a model with learned positions cannot take (HF fails with an index error deep in the embedding)."""
    positions = getattr(model.config, "n_positions", None)
    if input_ids is None or positions is None or input_ids.shape[-1] < positions:
        return []
    return [
        f"the prompts are {input_ids.shape[-1]} tokens long, but {type(model).__name__} has learned positions for "
        f"{positions} tokens (config.n_positions) and needs room for at least one new token: truncate the prompts "
        f"to at most {positions - 1} tokens."
    ]


def decoding_problems(engine: Any, model: Any, config: Any, processors: Any, stopping: Any,
                      model_kwargs: dict[str, Any], groups: int) -> list[str]:  # fmt: skip
    """Generation settings (once `generate` has merged them) the pipeline's loop cannot honour."""
    problems = []
    mode = config.get_generation_mode()
    if mode not in _MODES:
        problems.append(
            f"generation mode {mode.value!r} is not supported through the pipeline (greedy search, sampling, beam "
            "search and beam sampling are); use one of those settings."
        )
    if asked := [name for name in _OUTPUTS if getattr(config, name, False)]:
        problems.append(
            f"{', '.join(f'{n}=True' for n in asked)}: generation through the pipeline returns the sequences only; "
            "compute scores with a forward pass over the sequences (PipelineEngine.forward)."
        )
    if config.cache_implementation not in (None, "dynamic"):
        problems.append(
            f"cache_implementation={config.cache_implementation!r}: each stage keeps a dynamic cache of its own "
            "layers; unset it."
        )
    if getattr(config, "prefill_chunk_size", None) is not None:
        problems.append(f"prefill_chunk_size={config.prefill_chunk_size}: the prompt is prefilled whole; unset it.")
    read = set(engine.frontend.adapter.batch_keys) | set(_LOOP_KEYS)
    read |= {"encoder_outputs"} if model.config.is_encoder_decoder else set()  # the loop reads it
    read.add("labels")  # generate never passes them to the model (Seq2SeqTrainer hands generate its whole batch)
    if unread := sorted(k for k, v in model_kwargs.items() if v is not None and k not in read and k != "cache"):
        problems.append(
            f"generate() inputs {unread} are not read by the {model.config.model_type} stages "
            f"({', '.join(sorted(engine.frontend.adapter.batch_keys))}), so generation would run without them; "
            "leave them out."
        )
    if groups > 1:
        by_row = [type(p).__name__ for p in processors if type(p).__name__ not in ROW_WISE_PROCESSORS]
        by_row += [type(c).__name__ for c in stopping if type(c).__name__ not in _ROW_WISE_STOPPING]
        if by_row:
            problems.append(
                f"{', '.join(by_row)} may look at more than its own row (or stop rows without padding them), and "
                f"the pipeline decodes {groups} groups of rows apart: pass groups=1 to the PipelineGenerator "
                "(pipeline_generation_groups=1 for a trainer), or leave them out."
            )
    return problems
