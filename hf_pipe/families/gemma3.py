"""Gemma 3 (vision): a SigLIP tower and the pooling projector on the first stage; Gemma 3's language model, whose
image tokens attend to each other both ways.

Every image gives `mm_tokens_per_image` features, so a row's image count is its image tokens over that. Each stage
rebuilds the masks as `Gemma3Model.forward` builds them for the language model — causal, sliding-window on the local
layers, and from `token_type_ids` the blocks of image tokens that see one another (`create_masks_for_vision_model`)
— and the two rotary tables (local and global layers). A stage begins at whole blocks only (a Gemma 3 block norms
each residual branch on both sides).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch

from .base import ATTENTION_KWARGS, NO_CACHE, attention_kwargs
from .vision import VisionLanguageAdapter, clip_flops_per_image, merge_features


class Gemma3Adapter(VisionLanguageAdapter):
    family = "Gemma 3"
    embeddings = {
        "embed_tokens": "language_model.embed_tokens",
        "vision_tower": "vision_tower",
        "multi_modal_projector": "multi_modal_projector",
    }
    halves = ()
    batch_keys = ("attention_mask", "position_ids", "token_type_ids", "pixel_values", *ATTENTION_KWARGS)

    def config_problems(self, config: Any) -> list[str]:
        return []  # its own language model (Gemma 3 blocks)

    def vision_flops_per_image(self, config: Any) -> float:
        vision, text = config.vision_config, config.text_config
        patches = (vision.image_size // vision.patch_size) ** 2
        return clip_flops_per_image(vision, patches) + 2.0 * config.mm_tokens_per_image * vision.hidden_size * (
            text.hidden_size
        )

    def embed_inputs(self, config, parts, input_ids, batch):
        from transformers.models.gemma3.modeling_gemma3 import Gemma3Model

        ids = input_ids
        if config.image_token_id >= config.text_config.vocab_size:  # an image token outside the vocabulary: as HF
            ids = input_ids.masked_fill(input_ids == config.image_token_id, 0)
        embeds = parts["embed_tokens"](ids)
        images = self.row_images(batch, self.image_keys)
        if images is None:
            return embeds
        model = SimpleNamespace(
            config=config, vision_tower=parts["vision_tower"], multi_modal_projector=parts["multi_modal_projector"]
        )
        features = Gemma3Model.get_image_features(model, images["pixel_values"], return_dict=True).pooler_output
        return merge_features(embeds, input_ids, config.image_token_id, features)

    def context(self, config, parts, hidden, batch):
        from transformers.masking_utils import create_masks_for_generate
        from transformers.models.gemma3.modeling_gemma3 import (
            create_masks_for_vision_model,
            get_block_sequence_ids_for_mask,
        )

        text = config.text_config
        given = batch.get("position_ids")
        kwargs = dict(
            config=text, inputs_embeds=hidden, attention_mask=batch.get("attention_mask"), **NO_CACHE,
            position_ids=given,
        )  # fmt: skip
        if batch.get("token_type_ids") is not None:
            blocks = get_block_sequence_ids_for_mask(batch["token_type_ids"], device=hidden.device)
            masks = create_masks_for_vision_model(block_sequence_ids=blocks, **kwargs)
        else:
            masks = create_masks_for_generate(**kwargs)
        positions = given if given is not None else torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
        rotary = {t: parts["rotary_emb"](hidden, positions, t) for t in set(text.layer_types)}
        types = list(text.layer_types)
        return [masks[t] for t in types], [rotary[t] for t in types], positions, attention_kwargs(batch)

    def layer(self, block, index, hidden, context):
        masks, rotary, positions, kwargs = context
        return block(
            hidden, position_embeddings=rotary[index], attention_mask=masks[index], position_ids=positions, **kwargs
        )
