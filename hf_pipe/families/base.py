"""What hf_pipe needs to know about a model family to split it into stages and run each stage.

An adapter names the modules of the family (embeddings, the list of blocks, the final norm, the heads) and runs the
four pieces of a stage's forward: embed (first stage), per-stage context (masks, positions, rotary tables: rebuilt on
every stage from the batch each rank already holds, so nothing but hidden states travels between stages), one block,
and the head (last stage). Everything else — which blocks a stage owns, sending activations, the schedule — is
shared code.

A head is one entry of the adapter's `heads` (its modules by role) and one branch of its `head` forward, built from
the helpers below, which compute what HF's own heads compute (the last non-padding token a decoder classifier pools,
the start/end split of question answering, the choices of multiple choice).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

CAUSAL_LM = "causal_lm"
MASKED_LM = "masked_lm"
SEQ_CLS = "seq_cls"
TOKEN_CLS = "token_cls"
QUESTION_ANSWERING = "question_answering"
MULTIPLE_CHOICE = "multiple_choice"
#: an encoder-decoder's language-model head (T5, BART): labels not shifted, the decoder reads them shifted right
SEQ2SEQ_LM = "seq2seq_lm"
TASKS = (CAUSAL_LM, MASKED_LM, SEQ_CLS, TOKEN_CLS, QUESTION_ANSWERING, MULTIPLE_CHOICE, SEQ2SEQ_LM)

# Class-name endings that tell which head (and so which loss) a model carries.
_TASK_SUFFIXES = (
    ("ForCausalLM", CAUSAL_LM),
    ("LMHeadModel", CAUSAL_LM),
    ("ForMaskedLM", MASKED_LM),
    ("ForSequenceClassification", SEQ_CLS),
    ("ForTokenClassification", TOKEN_CLS),
    ("ForQuestionAnswering", QUESTION_ANSWERING),
    ("ForMultipleChoice", MULTIPLE_CHOICE),
)
#: the HF head class names of each task, for messages ("...ForQuestionAnswering")
TASK_CLASSES = {
    CAUSAL_LM: "...ForCausalLM / ...LMHeadModel",
    MASKED_LM: "...ForMaskedLM",
    SEQ_CLS: "...ForSequenceClassification",
    TOKEN_CLS: "...ForTokenClassification",
    QUESTION_ANSWERING: "...ForQuestionAnswering",
    MULTIPLE_CHOICE: "...ForMultipleChoice",
    SEQ2SEQ_LM: "...ForConditionalGeneration (encoder-decoder)",
}
#: the batch keys each task's loss reads (Trainer's `label_names` for the head); never passed to a stage
LABEL_KEYS = {task: ("labels",) for task in TASKS} | {QUESTION_ANSWERING: ("start_positions", "end_positions")}
#: keys the module frontend adds to each microbatch for the head (see `head_inputs`)
LAST_NON_PAD = "last_non_pad_token"
NUM_CHOICES = "num_choices"


def task_of(class_name: str, config: Any = None) -> str | None:
    """The training task of a model class (`"GPT2LMHeadModel"` -> `"causal_lm"`), or None (a bare body, or a head
    hf_pipe has no loss for).

    `...ForConditionalGeneration` is an encoder-decoder's LM head only when `config.is_encoder_decoder` says so (vision-
    language models of that name are decoders)."""
    if class_name.endswith("ForConditionalGeneration") and getattr(config, "is_encoder_decoder", False):
        return SEQ2SEQ_LM
    if class_name.endswith("ForConditionalGeneration") and is_vision_language(config):
        return CAUSAL_LM  # an image-text-to-text model: a causal LM over text whose embeddings take images
    for suffix, task in _TASK_SUFFIXES:
        if class_name.endswith(suffix):
            return task
    return None


def is_vision_language(config: Any) -> bool:
    """A vision-language decoder (Llava, Qwen2-VL, ...): a composite config with a vision tower and a text model."""
    return (
        config is not None
        and getattr(config, "vision_config", None) is not None
        and not getattr(config, "is_encoder_decoder", False)
    )


def is_bare_body(model: nn.Module) -> bool:
    """A HF base model (`LlamaModel`, `BertModel`): no head, the body is the model itself. Anything else without a
    known task carries a head hf_pipe cannot run."""
    prefix = getattr(model, "base_model_prefix", None)
    return not prefix or not isinstance(getattr(model, prefix, None), nn.Module)


@dataclass(frozen=True)
class FlopsPerToken:
    """Forward FLOPs per token of the pieces of a model; what the `auto` split balances."""

    embeddings: float
    layer: float
    head: float
    #: the first half of a block (attention), for families that can end a stage mid-block; 0: cannot
    first_half: float = 0.0
    #: of `embeddings`, what a vision-language model's vision tower and projector cost, per text token (their cost
    #: per image spread over the tokens of a sequence, `families/vision.py`); 0 for text models
    vision: float = 0.0
    #: each block's cost, where blocks differ (an MoE's dense layers); empty: every block costs `layer`
    layers: tuple[float, ...] = ()

    def layer_costs(self, num_layers: int) -> list[float]:
        """The cost of each of `num_layers` blocks."""
        return list(self.layers) if self.layers else [self.layer] * num_layers


class FamilyAdapter:
    """How one model family is split and run stage by stage. Subclass it to add a family (see `register_family`)."""

    #: attribute of a head model that holds the body ("transformer" for GPT2LMHeadModel, "model" for Llama).
    base_prefix: str
    #: the `nn.ModuleList` of blocks, relative to the body.
    layers: str
    #: body modules the first stage runs before the blocks, by role.
    embeddings: Mapping[str, str]
    #: body modules the last stage runs after the blocks, by role.
    final: Mapping[str, str] = {}
    #: parameter-free body modules every stage runs (rotary tables).
    shared: Mapping[str, str] = {}
    #: per task, head modules relative to the *root* model, by role.
    heads: Mapping[str, Mapping[str, str]]
    #: the sub-modules of each half of a block (attention, then MLP), for families whose stages may begin mid-block;
    #: `half` runs one of them. Empty: stages begin at whole blocks only.
    halves: tuple[tuple[str, ...], tuple[str, ...]] | tuple[()] = ()
    #: batch keys the pieces consume besides `input_ids` and the labels; any other key in a batch is an error (it
    #: would be dropped silently)
    batch_keys: tuple[str, ...] = ("attention_mask",)
    #: the family's masks take `position_ids`, so a packed batch (positions restarting, no attention mask) attends
    #: within each sequence, and may be cut into microbatches at sequence boundaries
    packed_sequences: bool = False
    #: the frontend (`frontends.FRONTENDS`) whose stages run this family: "module", or "seq2seq" (encoder-decoders)
    frontend: str = "module"
    #: the first stage runs some of its modules only for microbatches that carry their input (a vision tower, for
    #: rows with images): DDP over pipeline replicas then stalls on the parameters left unused (see `frontends/module`)
    first_stage_may_skip: bool = False

    def num_layers(self, config: Any) -> int:
        return config.num_hidden_layers

    def flops_per_token(self, config: Any, task: str | None, seq_len: int) -> FlopsPerToken:
        raise NotImplementedError

    def config_problems(self, config: Any) -> list[str]:
        """What in this model's config the adapter cannot run (a vision-language model's text or vision family),
        each with its fix; checked before any step."""
        return []

    def batch_problems(self, config: Any, batch: Mapping[str, Any]) -> list[str]:
        """What in a whole batch the adapter cannot run (inputs of a modality it does not handle), each with its fix;
        checked on every rank before the batch's first microbatch runs."""
        return []

    def stage_inputs(self, config: Any, task: str | None, batch: dict[str, Any]) -> dict[str, Any]:
        """The whole batch as it is cut into microbatches: by default with `head_inputs`' keys added. A vision-language
        adapter also lays each row's images out along the rows here, so that a cut by rows gives each microbatch the
        images of its own rows."""
        return {**batch, **self.head_inputs(config, task, batch)}

    # Forward pieces. `parts` maps role -> module for this stage; `batch` holds this microbatch's extra inputs.
    def embed_inputs(
        self, config: Any, parts: Mapping[str, nn.Module], input_ids: torch.Tensor, batch: Mapping[str, Any]
    ) -> torch.Tensor:
        """The first stage's input embeddings; a vision-language adapter merges the image features in here."""
        return self.embed(parts, input_ids, batch)

    def embed(self, parts: Mapping[str, nn.Module], input_ids: torch.Tensor, batch: Mapping[str, Any]) -> torch.Tensor:
        raise NotImplementedError

    def context(self, config: Any, parts: Mapping[str, nn.Module], hidden: torch.Tensor, batch: Mapping[str, Any]):
        raise NotImplementedError

    def layer(self, block: nn.Module, index: int, hidden: torch.Tensor, context: Any) -> torch.Tensor:
        raise NotImplementedError

    def half(self, block: nn.Module, part: int, index: int, hidden: torch.Tensor, context: Any) -> torch.Tensor:
        """Half `part` (0: attention, 1: MLP) of block `index`, residual included, exactly as the block computes it."""
        raise NotImplementedError

    def head(
        self, parts: Mapping[str, nn.Module], hidden: torch.Tensor, task: str, batch: Mapping[str, Any]
    ) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """The last stage's output for `task`: what the HF head returns as its logits (for question answering the
        pair `(start_logits, end_logits)`). `batch` holds the microbatch's extra inputs and `head_inputs`' keys."""
        raise NotImplementedError

    #: tasks whose head pools each sequence at its last non-padding token (decoder classifiers)
    pools_last_token: tuple[str, ...] = ()

    def head_inputs(self, config: Any, task: str, batch: Mapping[str, Any]) -> dict[str, Any]:
        """What the head needs from the whole batch besides hidden states, computed once before the batch is cut (the
        last stage never sees `input_ids`): the pooled positions of a decoder classifier, the choice count."""
        ids = batch["input_ids"]
        if task in self.pools_last_token:
            return {LAST_NON_PAD: last_non_pad_token(ids, config)}
        if task == MULTIPLE_CHOICE:
            return {NUM_CHOICES: ids.shape[1]}
        return {}


#: keyword arguments of HF attention (flash attention's packed-sequence boundaries; linear attention's sequence index)
ATTENTION_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx")


def positions(hidden: torch.Tensor, batch: Mapping[str, Any]) -> torch.Tensor:
    """The batch's `position_ids`, or 0..seq-1 as HF builds them when none are given (no KV cache in training)."""
    given = batch.get("position_ids")
    if given is not None:
        return given
    return torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)


def _cache_keyword() -> str:
    import inspect

    from transformers.masking_utils import create_causal_mask

    return "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"


#: the keyword of a KV cache in transformers' mask functions and layers: `cache` from 5.20 on, `past_key_values` before
CACHE_KEYWORD = _cache_keyword()
#: "no KV cache" for transformers' mask functions
NO_CACHE: dict[str, None] = {CACHE_KEYWORD: None}
#: the batch key under which generation (`generation/`) hands a stage its KV cache; never in a training batch
CACHE = "hf_pipe_kv_cache"


def kv_cache(batch: Mapping[str, Any]) -> dict[str, Any]:
    """The stage's KV cache as transformers' mask functions take it (`NO_CACHE` in training)."""
    return {CACHE_KEYWORD: batch.get(CACHE)}


def attention_kwargs(batch: Mapping[str, Any]) -> dict[str, Any]:
    """The batch's attention keyword arguments, which HF passes from the model's forward down to each attention; in
    generation, the stage's KV cache."""
    kwargs = {k: batch[k] for k in ATTENTION_KWARGS if batch.get(k) is not None}
    if batch.get(CACHE) is not None:
        kwargs[CACHE_KEYWORD] = batch[CACHE]
    return kwargs


def attention_flops(hidden_size: int, seq_len: int) -> float:
    """Scores and weighted sum, per token: 2·s·h each."""
    return 4.0 * seq_len * hidden_size


def softmax_loss_flops(vocab_size: int) -> float:
    """Cross-entropy over the vocabulary per token (exp, sum, log, gather): a few operations per logit."""
    return 4.0 * vocab_size


def head_flops(
    task: str | None, config: Any, hidden: int, seq_len: int, *, lm: float = 0.0, pooler: bool = False
) -> float:
    """Forward FLOPs per token of a head and its loss. `lm`: the family's LM head per token (causal and masked LM);
    classifiers scored on every token (token classification, question answering, a decoder's sequence classifier,
    which HF scores on every token before pooling) cost their matrix per token; with `pooler`, sequence
    classification and multiple choice run a pooler and a classifier once per sequence, spread over its tokens."""
    labels = getattr(config, "num_labels", 2)
    if task in (CAUSAL_LM, MASKED_LM):
        return lm
    if task in (SEQ_CLS, MULTIPLE_CHOICE) and pooler:
        outputs = labels if task == SEQ_CLS else 1
        return 2.0 * (hidden * hidden + hidden * outputs) / seq_len
    if task in (SEQ_CLS, TOKEN_CLS):
        return 2.0 * hidden * labels
    if task == QUESTION_ANSWERING:
        return 2.0 * hidden * 2
    return 0.0


def last_non_pad_token(input_ids: torch.Tensor, config: Any) -> torch.Tensor:
    """Per row, the position a decoder classifier pools: the rightmost token that is not `pad_token_id` (left or
    right padding alike; the last one when a row has no padding), exactly as `GenericForSequenceClassification` and
    `GPT2ForSequenceClassification` find it. HF refuses a batch of several rows when the config has no pad token."""
    from ..errors import PipelineConfigError

    pad = config.get_text_config().pad_token_id if hasattr(config, "get_text_config") else config.pad_token_id
    rows = input_ids.shape[0]
    if pad is None:
        if rows != 1:
            raise PipelineConfigError(
                f"pad_token_id=None in the model config, with batches of {rows} rows: a decoder classifier pools "
                "each sequence at its last non-padding token, and HF refuses batches of more than one row without "
                'a pad token ("Cannot handle batch sizes > 1 if no padding token is defined"); set '
                "model.config.pad_token_id = tokenizer.pad_token_id (or the eos token id)."
            )
        return torch.full((rows,), -1, dtype=torch.long, device=input_ids.device)
    non_pad = (input_ids != pad).to(torch.int32)
    indices = torch.arange(input_ids.shape[-1], device=input_ids.device, dtype=torch.int32)
    return (indices * non_pad).argmax(-1)


def pool_last_token(logits: torch.Tensor, batch: Mapping[str, Any]) -> torch.Tensor:
    """A decoder classifier's logits (scored on every token, as HF scores them) at each row's pooled position."""
    return logits[torch.arange(logits.shape[0], device=logits.device), batch[LAST_NON_PAD]]


def span_logits(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`qa_outputs`' two logits per token as HF splits them: (start_logits, end_logits), each (rows, seq)."""
    start, end = logits.split(1, dim=-1)
    return start.squeeze(-1).contiguous(), end.squeeze(-1).contiguous()


def choice_logits(logits: torch.Tensor, batch: Mapping[str, Any]) -> torch.Tensor:
    """One score per (example, choice) sequence back to (examples, choices), as `...ForMultipleChoice` reshapes."""
    return logits.view(-1, batch[NUM_CHOICES])


def flatten_choices(batch: Mapping[str, Any], choices: int) -> dict[str, Any]:
    """A multiple-choice microbatch's per-choice inputs, `(examples, choices, seq)`, as the body takes them:
    `(examples · choices, seq)`, as `...ForMultipleChoice` flattens `input_ids`, masks, token types and positions."""
    return {
        k: v.flatten(0, 1) if torch.is_tensor(v) and v.dim() >= 3 and v.shape[1] == choices else v
        for k, v in batch.items()
    }
