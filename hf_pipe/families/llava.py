"""Llava: a CLIP or SigLIP vision tower and a two-layer projector on the first stage, a Llama-shaped language model.

Each image gives the same number of features (the patches, less CLS with the "default" strategy), so a row's image
count is its image tokens over the tokens per image. The features are HF's own: `LlavaModel.get_image_features` runs
on the first stage's vision tower and projector; they are scattered into the image tokens as `LlavaModel.forward`
does.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch

from .vision import VisionLanguageAdapter, clip_flops_per_image, merge_features

#: vision towers whose every image gives the same number of features (Pixtral's depend on each image's size)
FIXED_SIZE_TOWERS = ("clip_vision_model", "siglip_vision_model")


class LlavaAdapter(VisionLanguageAdapter):
    family = "Llava"
    embeddings = {
        "embed_tokens": "language_model.embed_tokens",
        "vision_tower": "vision_tower",
        "multi_modal_projector": "multi_modal_projector",
    }
    batch_keys = ("attention_mask", "position_ids", "pixel_values")

    def config_problems(self, config: Any) -> list[str]:
        problems = super().config_problems(config)
        tower = config.vision_config.model_type
        if tower not in FIXED_SIZE_TOWERS:
            problems.append(
                f"Llava with a {tower!r} vision tower: the llava adapter runs towers whose images all give the same "
                f"number of features ({', '.join(FIXED_SIZE_TOWERS)}); train this one on one process."
            )
        return problems

    def vision_flops_per_image(self, config: Any) -> float:
        vision, text = config.vision_config, config.text_config
        patches = (vision.image_size // vision.patch_size) ** 2 + 1  # CLS
        features = patches - (1 if config.vision_feature_select_strategy == "default" else 0)
        layers = config.vision_feature_layer
        width = vision.hidden_size * (1 if isinstance(layers, int) else len(layers))
        projector = 2.0 * features * (width * text.hidden_size + text.hidden_size**2)
        return clip_flops_per_image(vision, patches) + projector

    def embed_inputs(self, config, parts, input_ids, batch):
        embeds = parts["embed_tokens"](input_ids)
        images = self.row_images(batch, self.image_keys)
        if images is None:
            return embeds
        from transformers.models.llava.modeling_llava import LlavaModel

        # HF's own feature code, on the first stage's vision tower and projector
        model = SimpleNamespace(
            config=config, vision_tower=parts["vision_tower"], multi_modal_projector=parts["multi_modal_projector"]
        )
        features = LlavaModel.get_image_features(model, pixel_values=images["pixel_values"], return_dict=True)
        return merge_features(embeds, input_ids, config.image_token_id, torch.cat(features.pooler_output, dim=0))
