"""Idefics3 and SmolVLM: a SigLIP-style vision transformer and the pixel-shuffle connector on the first stage, a
Llama-shaped text model.

Their processors already lay the images out along the rows — `pixel_values` `(rows, most images in a row, 3, H, W)`,
padding images all zeros, with `pixel_attention_mask` for images padded to the batch's largest — so a cut by rows
gives each microbatch its rows' images as it is. The first stage runs HF's own `get_image_features` on them (which
drops the padding images) and scatters the features into the image tokens as the model's forward does; a
microbatch whose rows hold no image skips the tower, as the model does for a batch without images.
"""

from __future__ import annotations

import importlib
from types import SimpleNamespace
from typing import Any

import torch

from .base import ATTENTION_KWARGS, FamilyAdapter
from .vision import VisionLanguageAdapter, clip_flops_per_image, merge_features


class Idefics3Adapter(VisionLanguageAdapter):
    layers = "text_model.layers"
    embeddings = {"embed_tokens": "text_model.embed_tokens", "vision_model": "vision_model", "connector": "connector"}
    final = {"norm": "text_model.norm"}
    shared = {"rotary_emb": "text_model.rotary_emb"}
    batch_keys = ("attention_mask", "position_ids", "pixel_values", "pixel_attention_mask", *ATTENTION_KWARGS)

    def __init__(self, module: str, model_class: str, family: str):
        super().__init__()
        self._module, self._model_class, self.family = module, model_class, family

    def vision_flops_per_image(self, config: Any) -> float:
        vision, text = config.vision_config, config.text_config
        patches = (vision.image_size // vision.patch_size) ** 2
        shuffled = vision.hidden_size * config.scale_factor**2
        return clip_flops_per_image(vision, patches) + 2.0 * patches // config.scale_factor**2 * shuffled * (
            text.hidden_size
        )

    def stage_inputs(self, config, task, batch):
        return FamilyAdapter.stage_inputs(self, config, task, batch)  # the processor's layout is by rows already

    def embed_inputs(self, config, parts, input_ids, batch):
        embeds = parts["embed_tokens"](input_ids)
        pixels = batch.get("pixel_values")
        if pixels is None or not bool((pixels != 0).flatten(2).any()):
            return embeds
        model_class = getattr(importlib.import_module(self._module), self._model_class)
        model = SimpleNamespace(
            config=config, dtype=embeds.dtype, vision_model=parts["vision_model"], connector=parts["connector"]
        )
        features = model_class.get_image_features(model, pixels, batch.get("pixel_attention_mask"), return_dict=True)
        return merge_features(embeds, input_ids, config.image_token_id, torch.cat(features.pooler_output, dim=0))
