"""Registry of model-family adapters, keyed by `config.model_type` (PEFT's constants mapping, as a registry).

Adding a family is one file with a `FamilyAdapter` subclass and one `register_family` line.
"""

from __future__ import annotations

from .bart import BartAdapter
from .base import (
    CAUSAL_LM,
    MASKED_LM,
    MULTIPLE_CHOICE,
    QUESTION_ANSWERING,
    SEQ2SEQ_LM,
    SEQ_CLS,
    TASKS,
    TOKEN_CLS,
    FamilyAdapter,
    FlopsPerToken,
    task_of,
)
from .bert import BertAdapter
from .gemma3 import Gemma3Adapter
from .gpt2 import Gpt2Adapter
from .idefics3 import Idefics3Adapter
from .llama import LlamaAdapter
from .llava import LlavaAdapter
from .moe import MoeAdapter
from .qwen2_vl import Qwen2VLAdapter
from .t5 import T5Adapter
from .vision import VisionLanguageAdapter

_FAMILIES: dict[str, FamilyAdapter] = {}


def register_family(model_type: str, adapter: FamilyAdapter) -> None:
    """Teach hf_pipe how to split and run models whose `config.model_type` is `model_type`.

    Refuses a `model_type` that already has an adapter, so two plugins cannot silently override each other.

    Example:
        >>> register_family("my_llama", LlamaAdapter())  # a Llama-shaped decoder under another name
    """
    if model_type in _FAMILIES:
        raise ValueError(
            f"model_type {model_type!r} already has an adapter ({type(_FAMILIES[model_type]).__name__}); "
            "use another model_type, or pass an explicit split instead of registering a second adapter."
        )
    if not isinstance(adapter, FamilyAdapter):
        raise TypeError(f"adapter must be a FamilyAdapter instance, got {type(adapter).__name__}")
    _FAMILIES[model_type] = adapter


def get_family(model_type: str) -> FamilyAdapter | None:
    """The adapter registered for `model_type`, or None."""
    return _FAMILIES.get(model_type)


def vision_language_families() -> list[str]:
    """Every `model_type` of a vision-language model hf_pipe can split (vision tower on the first stage), sorted."""
    return sorted(t for t, adapter in _FAMILIES.items() if isinstance(adapter, VisionLanguageAdapter))


def registered_families() -> list[str]:
    """Every `model_type` hf_pipe can split with the module-split frontend, sorted."""
    return sorted(_FAMILIES)


register_family("gpt2", Gpt2Adapter())
register_family("bert", BertAdapter())
# The Llama adapter serves these decoders unchanged; each is checked against one-process gradients in the tests.
for _model_type in ("llama", "mistral", "qwen2", "qwen3"):
    register_family(_model_type, LlamaAdapter())
# Mixture-of-experts decoders shaped like Llama, their load-balancing loss carried between stages; each checked
# against one-process Trainer in the tests.
for _model_type in ("qwen3_moe", "qwen2_moe", "mixtral", "olmoe"):
    register_family(_model_type, MoeAdapter())
# Encoder-decoders (stages by the seq2seq frontend), each checked against one process in the tests.
register_family("t5", T5Adapter())
register_family("mt5", T5Adapter())
register_family("bart", BartAdapter())
register_family("plbart", BartAdapter())
register_family("mbart", BartAdapter(final_layer_norm=True))
# Vision-language models: the vision tower on the first stage, the language model's blocks split (`vision.py`).
register_family("llava", LlavaAdapter())
register_family("gemma3", Gemma3Adapter())
register_family(
    "idefics3", Idefics3Adapter("transformers.models.idefics3.modeling_idefics3", "Idefics3Model", "Idefics3")
)
register_family("smolvlm", Idefics3Adapter("transformers.models.smolvlm.modeling_smolvlm", "SmolVLMModel", "SmolVLM"))
register_family(
    "qwen2_vl", Qwen2VLAdapter("transformers.models.qwen2_vl.modeling_qwen2_vl", "Qwen2VLModel", "Qwen2-VL")
)
register_family(
    "qwen2_5_vl",
    Qwen2VLAdapter("transformers.models.qwen2_5_vl.modeling_qwen2_5_vl", "Qwen2_5_VLModel", "Qwen2.5-VL"),
)

__all__ = [
    "CAUSAL_LM",
    "MASKED_LM",
    "SEQ2SEQ_LM",
    "MULTIPLE_CHOICE",
    "QUESTION_ANSWERING",
    "SEQ_CLS",
    "TASKS",
    "TOKEN_CLS",
    "FamilyAdapter",
    "FlopsPerToken",
    "MoeAdapter",
    "get_family",
    "register_family",
    "registered_families",
    "vision_language_families",
    "task_of",
]
