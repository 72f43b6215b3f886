"""Qwen2-VL and Qwen2.5-VL: the vision transformer (`visual`: patch embedding, blocks, patch merger) on the first
stage; a Qwen2 language model with multimodal rotary positions (M-RoPE).

Images and videos come as patches, `pixel_values` `(all patches, channels·temporal·patch²)`, with each one's grid
`image_grid_thw` / `video_grid_thw` `(items, 3)`: of any size, so each image gives `t·h·w / merge²` tokens. The 3-D
positions are built once from the whole batch (HF's own `get_rope_index`, over every row's tokens, masks and grids)
on every rank, before the cut, and travel with the rows; each stage rebuilds its rotary tables from them. Patches
and grids are laid out along the rows (`vision.py`), so the first stage runs the vision transformer on the images
of its microbatch's rows only, and scatters their features in as `Qwen2VLModel.forward` does (images, then videos).
"""

from __future__ import annotations

import importlib
from types import SimpleNamespace
from typing import Any

import torch
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from ..errors import PipelineConfigError
from .base import ATTENTION_KWARGS, NO_CACHE, FamilyAdapter, attention_flops, attention_kwargs
from .vision import ROW_PREFIX, VisionLanguageAdapter, from_rows, merge_features, rows_layout

#: the 3-D positions of each row, (rows, seq, 3): made before the cut from the whole batch
MROPE_POSITIONS = "mrope_position_ids"
#: (modality, pixel key, grid key, config attribute of its token id)
MODALITIES = (
    ("image", "pixel_values", "image_grid_thw", "image_token_id"),
    ("video", "pixel_values_videos", "video_grid_thw", "video_token_id"),
)
#: image side (pixels) the split's cost model assumes for one image
ASSUMED_IMAGE_SIDE = 448


def items_per_row(tokens_per_row: torch.Tensor, tokens_per_item: torch.Tensor, what: str) -> torch.Tensor:
    """How many of the items (images or videos, in batch order, each `tokens_per_item` tokens) each row holds."""
    item_ends = tokens_per_item.cumsum(0)
    row_ends = tokens_per_row.cumsum(0)
    taken = torch.searchsorted(item_ends, row_ends, right=True)
    reached = torch.where(taken > 0, item_ends[(taken - 1).clamp(min=0)], torch.zeros_like(row_ends))
    if (reached != row_ends).any() or int(taken[-1]) != tokens_per_item.numel():
        raise PipelineConfigError(
            f"the batch's {what} tokens ({tokens_per_row.tolist()} per row) do not divide into its "
            f"{tokens_per_item.numel()} {what}(s) of {tokens_per_item.tolist()} tokens each (from their grids): the "
            f"processor's {what} tokens and grid_thw disagree (HF refuses the batch too: 'features and tokens do "
            "not match'); build the batch with the model's processor, and do not truncate rows through an image."
        )
    return taken.diff(prepend=taken.new_zeros(1))


class Qwen2VLAdapter(VisionLanguageAdapter):
    embeddings = {"embed_tokens": "language_model.embed_tokens", "visual": "visual"}
    batch_keys = (
        "attention_mask",
        "position_ids",
        "mm_token_type_ids",
        "pixel_values",
        "image_grid_thw",
        "pixel_values_videos",
        "video_grid_thw",
        "second_per_grid_ts",
        *ATTENTION_KWARGS,
    )

    def __init__(self, module: str, model_class: str, family: str):
        super().__init__()
        self._module, self._model_class, self.family = module, model_class, family

    @property
    def model_class(self) -> Any:
        """HF's base model class (`Qwen2VLModel`), whose own methods build the positions and the features."""
        return getattr(importlib.import_module(self._module), self._model_class)

    def config_problems(self, config: Any) -> list[str]:
        return []  # its own language model (Qwen2 blocks with M-RoPE)

    def batch_problems(self, config: Any, batch: Any) -> list[str]:
        given = batch.get("position_ids")
        if given is not None and given.dim() == 3 and given.shape[0] == 4:
            return [
                f"position_ids of shape {tuple(given.shape)}: packed {self.family} batches (text positions "
                "prepended to the 3-D ones) are not supported by the pipeline yet; pad the batch instead "
                "(padding_free=False, packing=False)."
            ]
        return []

    def vision_flops_per_image(self, config: Any) -> float:
        vision, text = config.vision_config, config.text_config
        width = getattr(vision, "embed_dim", None) or vision.hidden_size  # Qwen2.5-VL names it hidden_size
        inner = getattr(vision, "intermediate_size", None) or width * vision.mlp_ratio
        out = getattr(vision, "out_hidden_size", None) or text.hidden_size
        patches = (ASSUMED_IMAGE_SIDE // vision.patch_size) ** 2
        layer = 2.0 * (4 * width * width + (3 if hasattr(vision, "intermediate_size") else 2) * width * inner)
        layer += attention_flops(width, patches)
        merged = width * vision.spatial_merge_size**2
        tokens = patches // vision.spatial_merge_size**2
        embedding = 2.0 * vision.in_channels * vision.temporal_patch_size * vision.patch_size**2 * width
        return patches * (vision.depth * layer + embedding) + tokens * 2.0 * (merged * merged + merged * out)

    # -- the whole batch, before the cut ---------------------------------------------------------------------------
    def stage_inputs(self, config, task, batch):
        batch = FamilyAdapter.stage_inputs(self, config, task, batch)
        given = batch.pop("position_ids", None)
        grids = {key: batch.get(key) for _, _, key, _ in MODALITIES}
        extra = (
            {"second_per_grid_ts": batch["second_per_grid_ts"]} if batch.get("second_per_grid_ts") is not None else {}
        )
        if given is not None and given.dim() == 3:  # 3-D positions given: as the model takes them
            batch[MROPE_POSITIONS] = given.permute(1, 2, 0)
        elif given is not None:
            batch["position_ids"] = given  # 1-D positions: the text model repeats them for the 3 sections
        elif any(g is not None for g in grids.values()):
            if batch.get("mm_token_type_ids") is None:
                raise PipelineConfigError(
                    f"{self.family} batch with image or video grids but no mm_token_type_ids: the model builds its "
                    "3-D positions from them (HF raises the same); keep the processor's mm_token_type_ids in the "
                    "batch."
                )
            # HF's own positions, from the whole batch (the model's forward computes them when none are given)
            model = SimpleNamespace(
                config=config,
                get_vision_position_ids=lambda *a, **k: self.model_class.get_vision_position_ids(None, *a, **k),
            )
            positions, _ = self.model_class.get_rope_index(
                model,
                batch["input_ids"],
                mm_token_type_ids=batch["mm_token_type_ids"],
                attention_mask=batch.get("attention_mask"),
                **grids,
                **extra,
            )
            batch[MROPE_POSITIONS] = positions.permute(1, 2, 0)
        batch.pop("mm_token_type_ids", None)  # read by the positions only
        batch.pop("second_per_grid_ts", None)
        merge = config.vision_config.spatial_merge_size
        for modality, pixel_key, grid_key, token in MODALITIES:
            pixels, grid = batch.pop(pixel_key, None), batch.pop(grid_key, None)
            if pixels is None:
                continue
            patches = grid.prod(-1)
            tokens = (batch["input_ids"] == getattr(config, token)).sum(-1)
            counts = items_per_row(tokens, patches // merge**2, modality)
            patch_counts = torch.stack([p.sum() for p in patches.split(counts.tolist())])
            batch[ROW_PREFIX + grid_key] = rows_layout(grid, counts)
            batch[f"{modality}s_per_row"] = counts
            batch[ROW_PREFIX + pixel_key] = rows_layout(pixels, patch_counts)
            batch[f"{modality}_patches_per_row"] = patch_counts
        return batch

    # -- the first stage -------------------------------------------------------------------------------------------
    def embed_inputs(self, config, parts, input_ids, batch):
        embeds = parts["embed_tokens"](input_ids)
        model = SimpleNamespace(config=config, visual=parts["visual"])
        for modality, pixel_key, grid_key, token in MODALITIES:
            counts = batch.get(f"{modality}s_per_row")
            if counts is None or not bool(counts.any()):
                continue
            grid = from_rows(batch[ROW_PREFIX + grid_key], counts)
            pixels = from_rows(batch[ROW_PREFIX + pixel_key], batch[f"{modality}_patches_per_row"])
            features = getattr(self.model_class, f"get_{modality}_features")(model, pixels, grid, return_dict=True)
            embeds = merge_features(embeds, input_ids, getattr(config, token), torch.cat(features.pooler_output))
        return embeds

    # -- every stage: masks and M-RoPE tables from the positions ----------------------------------------------------
    def context(self, config, parts, hidden, batch):
        text = config.text_config
        rows, length = hidden.shape[:2]
        positions = batch.get(MROPE_POSITIONS)
        if positions is not None:
            positions = positions.permute(2, 0, 1)
        elif batch.get("position_ids") is not None:
            positions = batch["position_ids"][None, ...].expand(3, rows, -1)
        else:  # as the text model numbers a batch without images
            positions = torch.arange(length, device=hidden.device).view(1, 1, -1).expand(3, rows, -1)
        kwargs = dict(
            config=text, inputs_embeds=hidden, attention_mask=batch.get("attention_mask"), **NO_CACHE,
            position_ids=None,
        )  # fmt: skip
        types = list(text.layer_types)
        masks = {"full_attention": create_causal_mask(**kwargs)}
        if "sliding_attention" in types:
            masks["sliding_attention"] = create_sliding_window_causal_mask(**kwargs)
        rotary = parts["rotary_emb"](hidden, positions)
        return [masks[t] for t in types], rotary, None, attention_kwargs(batch)
