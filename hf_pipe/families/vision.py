"""What every vision-language family shares: the vision tower and projector on the first stage, with the token
embeddings, the image features merged into them there; the language model's blocks split as a text model's are.

A batch holds its images apart from its rows (`pixel_values` is one entry per image, or per patch), so a cut by rows
would hand every microbatch every image, or none. Before the cut (`stage_inputs`) each row's images are laid out
along the rows, `(rows, most images in a row, ...)` padded with zeros, with the count of each row's images: the row
cut then gives each microbatch exactly the images of its rows, and the first stage runs the vision tower on those
only. Which images belong to which row follows from the image tokens of each row, in order, as HF scatters the
features into the embeddings (`masked_scatter` over the flattened batch).

The vision tower's cost is counted on the first stage: per image (per patch, through each vision layer, and the
projector), spread over the tokens of a sequence at `IMAGES_PER_SEQUENCE` images of the config's size, so the `auto`
split gives the first stage fewer language blocks. `pipeline_split` moves it by hand.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import torch

from ..errors import PipelineConfigError
from .base import CAUSAL_LM, FamilyAdapter, FlopsPerToken, attention_flops
from .llama import LlamaAdapter

#: images per sequence the split's cost model assumes (the vision tower's cost per text token scales with it)
IMAGES_PER_SEQUENCE = 1
#: batch keys made before the cut: each row's images (or patches) laid out along the rows, and their count per row
ROW_PREFIX = "rows_of_"
ROW_COUNTS = "images_per_row"
#: text families whose blocks the vision-language adapters run (the Llama adapter's decoders)
LLAMA_TEXT = ("llama", "mistral", "qwen2", "qwen3")


def unadapted_vision_language(model_type: str, vlm_types: Sequence[str], frontend: str) -> str:
    """The one message for a vision-language model without an adapter, on either frontend."""
    fix = (
        f"the module frontend has vision-language adapters for {', '.join(vlm_types)} (register one for "
        f"{model_type!r} with hf_pipe.register_family, see hf_pipe/families/llava.py), or train it on one process"
    )
    if frontend == "module":
        return f"model_type={model_type!r} is a vision-language model without a family adapter; {fix}."
    return (
        f"pipeline_frontend='trace' (or 'auto') with the vision-language model_type={model_type!r}: its forward "
        "cannot be traced into stages (torch.export fails on the DynamicCache it returns: 'Found DynamicCache in "
        f"output, which is not a known type'); {fix}."
    )


def rows_layout(items: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """`items` (one per image, in batch order) as `(rows, max(counts), ...)`: row r holds its `counts[r]` items
    first, then zeros."""
    width = int(counts.max()) if counts.numel() else 0
    out = items.new_zeros((counts.shape[0], width, *items.shape[1:]))
    out[torch.arange(width, device=counts.device) < counts[:, None]] = items
    return out


def from_rows(rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """The items of `rows_layout` back in batch order (the images of this microbatch's rows only)."""
    return rows[torch.arange(rows.shape[1], device=counts.device) < counts[:, None]]


def per_row(tokens_per_row: torch.Tensor, items: int, what: str) -> torch.Tensor:
    """How many of `items` (images, each with the same number of tokens) each row holds, from its image tokens."""
    total = int(tokens_per_row.sum())
    per_item = total // items if items else 0
    if items == 0 or total % items or (tokens_per_row % max(per_item, 1)).any():
        raise PipelineConfigError(
            f"the batch has {items} {what}(s) and {total} image tokens ({tokens_per_row.tolist()} per row), which "
            "do not divide into whole images per row: the processor's image tokens and pixel_values disagree (HF "
            "refuses the batch too: 'Image features and image tokens do not match'); build input_ids and "
            "pixel_values with the model's processor, and do not truncate rows through an image."
        )
    return tokens_per_row // per_item


def clip_flops_per_image(vision: Any, patches: int) -> float:
    """Forward FLOPs of a ViT (CLIP, SigLIP) on one image of `patches` tokens: patch embedding, then each layer's
    projections, attention and MLP."""
    h, inner = vision.hidden_size, vision.intermediate_size
    layer = 2.0 * (4 * h * h + 2 * h * inner) + attention_flops(h, patches)
    patch_embedding = 2.0 * getattr(vision, "num_channels", 3) * vision.patch_size**2 * h
    return patches * (vision.num_hidden_layers * layer + patch_embedding)


class VisionLanguageAdapter(FamilyAdapter):
    """A vision-language model whose language model is Llama-shaped (`LlamaAdapter`'s blocks, on the text config).

    Subclasses name the vision modules (in `embeddings`, on the first stage), the per-image batch keys
    (`image_keys`, laid out along the rows), compute the image features and their cost."""

    base_prefix = "model"
    layers = "language_model.layers"
    final = {"norm": "language_model.norm"}
    shared = {"rotary_emb": "language_model.rotary_emb"}
    heads = {CAUSAL_LM: {"lm_head": "lm_head"}}
    halves = LlamaAdapter.halves
    #: batch keys with one entry per image (or per patch): laid out along the rows before the cut
    image_keys: tuple[str, ...] = ("pixel_values",)
    #: HF's name of the family, for messages
    family: str = ""
    first_stage_may_skip = True  # the vision tower, in a microbatch without images

    def __init__(self) -> None:
        self.text = LlamaAdapter()

    def num_layers(self, config: Any) -> int:
        return config.text_config.num_hidden_layers

    def config_problems(self, config: Any) -> list[str]:
        text = config.text_config.model_type
        if text in LLAMA_TEXT:
            return []
        return [
            f"{self.family} with a {text!r} language model: the {config.model_type} adapter runs Llama-shaped "
            f"language models ({', '.join(LLAMA_TEXT)}); train this one on one process, or register an adapter "
            "for it with hf_pipe.register_family."
        ]

    def vision_flops_per_image(self, config: Any) -> float:
        raise NotImplementedError

    def flops_per_token(self, config: Any, task: str | None, seq_len: int) -> FlopsPerToken:
        text = self.text.flops_per_token(config.text_config, task, seq_len)
        vision = self.vision_flops_per_image(config) * IMAGES_PER_SEQUENCE / seq_len
        return replace(text, embeddings=text.embeddings + vision, vision=vision)

    # -- the whole batch, before the cut ---------------------------------------------------------------------------
    def images_per_row(self, config: Any, batch: Mapping[str, Any]) -> torch.Tensor:
        """How many images each row holds (the order of `pixel_values` is the order of the rows' image tokens)."""
        tokens = (batch["input_ids"] == config.image_token_id).sum(-1)
        return per_row(tokens, batch["pixel_values"].shape[0], "image")

    def lay_out(self, config: Any, batch: dict[str, Any], counts: torch.Tensor) -> None:
        """Replace the per-image keys of `batch` by their layout along the rows."""
        for key in self.image_keys:
            value = batch.pop(key, None)
            if value is not None:
                batch[ROW_PREFIX + key] = rows_layout(value, counts)
        batch[ROW_COUNTS] = counts

    def stage_inputs(self, config: Any, task: str | None, batch: dict[str, Any]) -> dict[str, Any]:
        batch = super().stage_inputs(config, task, batch)
        if batch.get("pixel_values") is None:
            batch.pop("pixel_values", None)
            return batch
        self.lay_out(config, batch, self.images_per_row(config, batch))
        return batch

    def row_images(self, batch: Mapping[str, Any], keys: Sequence[str]) -> dict[str, torch.Tensor] | None:
        """This microbatch's images, keyed as in the batch (None: its rows hold none)."""
        counts = batch.get(ROW_COUNTS)
        if counts is None or not bool(counts.any()):
            return None
        return {k: from_rows(batch[ROW_PREFIX + k], counts) for k in keys if batch.get(ROW_PREFIX + k) is not None}

    # -- the language model: Llama's pieces on the text config ------------------------------------------------------
    def embed(self, parts, input_ids, batch):
        return parts["embed_tokens"](input_ids)

    def context(self, config, parts, hidden, batch):
        return self.text.context(config.text_config, parts, hidden, batch)

    def layer(self, block, index, hidden, context):
        return self.text.layer(block, index, hidden, context)

    def half(self, block, part, index, hidden, context):
        return self.text.half(block, part, index, hidden, context)

    def head(self, parts, hidden, task, batch):
        return self.text.head(parts, hidden, task, batch)


def merge_features(
    embeds: torch.Tensor, input_ids: torch.Tensor, token_id: int, features: torch.Tensor
) -> torch.Tensor:
    """The image features scattered into the image tokens' embeddings, in order, as HF's models do
    (`inputs_embeds.masked_scatter(special_image_mask, image_features)`)."""
    mask = (input_ids == token_id).unsqueeze(-1).to(embeds.device)
    if int(mask.sum()) * embeds.shape[-1] != features.numel():
        raise PipelineConfigError(
            f"Image features and image tokens do not match: tokens {int(mask.sum())}, features "
            f"{features.numel() // embeds.shape[-1]} in a microbatch; build input_ids and pixel_values with the "
            "model's processor."
        )
    return embeds.masked_scatter(mask, features.to(embeds.device, embeds.dtype))
