"""Vision-language models under the pipeline against Trainer on one process: a tiny Llava (CLIP tower, projector,
Llama) read from a path per stage, rows with 0, 1 and 2 images, gradient accumulation, 2 ranks and 4 stages; the
saved checkpoint loads with AutoModelForImageTextToText; the vision tower is read by the first stage only; families
without an adapter are refused by name."""

from __future__ import annotations

import os

import pytest
import torch

from tests._dist import run_distributed
from tests.test_trainer_equivalence import _common_args, _rel

TOL = 2e-4
WEIGHT_TOL = 5e-4
VOCAB = 97
IMAGE_TOKEN = 96
IMAGE = 8  # pixels a side: 4 patches of 4x4, so 4 image tokens per image


def tiny_llava(seed: int = 0):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=IMAGE,
        patch_size=4, projection_dim=16,
    )  # fmt: skip
    text = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False,
    )  # fmt: skip
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN, vision_feature_layer=-2)
    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(config)


def image_rows(n: int, seed: int, tokens_per_image: int = 4) -> list[dict]:
    """Rows of text with 0, 1 or 2 images (their tokens where the processor puts them), of varied lengths."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        images = i % 3  # rows without images, with one, with two
        ids = []
        for _ in range(images):
            ids += torch.randint(2, IMAGE_TOKEN, (int(torch.randint(1, 4, (1,), generator=g)),), generator=g).tolist()
            ids += [IMAGE_TOKEN] * tokens_per_image
        ids += torch.randint(2, IMAGE_TOKEN, (int(torch.randint(3, 10, (1,), generator=g)),), generator=g).tolist()
        rows.append({"input_ids": ids, "pixel_values": torch.randn(images, 3, IMAGE, IMAGE, generator=g)})
    return rows


class ImageCollator:
    """Right padding; labels -100 on padding and image tokens; the batch's images stacked in row order (none: no
    pixel_values, as a processor gives a text-only batch)."""

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        longest = max(len(f["input_ids"]) for f in features)
        ids = torch.zeros(len(features), longest, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, f in enumerate(features):
            ids[r, : len(f["input_ids"])] = torch.tensor(f["input_ids"])
            mask[r, : len(f["input_ids"])] = 1
        labels = ids.masked_fill((mask == 0) | (ids == IMAGE_TOKEN), -100)
        batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        images = [f["pixel_values"] for f in features if len(f["pixel_values"])]
        if images:
            batch["pixel_values"] = torch.cat(images)
        return batch


def _train(model_path: str, output_dir: str, pipeline: dict | None, extra: dict) -> dict:
    from transformers import AutoModelForImageTextToText, Trainer, TrainingArguments

    from hf_pipe import PipeTrainer, PipeTrainingArguments

    settings = _common_args(output_dir, remove_unused_columns=False, **extra)
    if pipeline is None:
        model = AutoModelForImageTextToText.from_pretrained(model_path, dtype=torch.float32)
        trainer = Trainer(model=model, args=TrainingArguments(**settings), train_dataset=image_rows(30, 0),
                          eval_dataset=image_rows(11, 5), data_collator=ImageCollator())  # fmt: skip
    else:
        args = PipeTrainingArguments(**settings, **pipeline)
        trainer = PipeTrainer(model=model_path, args=args, train_dataset=image_rows(30, 0),
                              eval_dataset=image_rows(11, 5), data_collator=ImageCollator())  # fmt: skip
    held = None
    if pipeline is not None:  # what this rank read: the tensors its stages hold for real
        held = sorted({n.split(".")[1] for n, p in trainer.engine.named_parameters() if n.startswith("model.")})
    trainer.train()
    after = trainer.evaluate()
    trainer.save_model(os.path.join(output_dir, "final"))
    logs = [e for e in trainer.state.log_history if "loss" in e and "eval_loss" not in e]
    return {"logs": logs, "eval_loss": after["eval_loss"], "held": held}


def _runs(model_path: str, root: str, cases: dict, world: int) -> dict:
    return {name: _train(model_path, os.path.join(root, name), *case) for name, case in cases.items()}


ACCUMULATE = {"gradient_accumulation_steps": 2, "per_device_train_batch_size": 4}
LLAVA_CASES = {
    "1f1b": ({"pipeline_schedule": "1f1b", "pipeline_microbatches": 2}, ACCUMULATE),
    # 4 stages on 2 ranks: a stage of one block each, the vision tower alone with block 0 on stage 0
    "interleaved": ({"pipeline_schedule": "interleaved1f1b", "pipeline_microbatches": 4}, ACCUMULATE),
}


def _weights(path: str) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).state_dict()


def test_llava_matches_trainer(tmp_path):
    """Llava read per stage from a path, 2 ranks (2 and 4 stages), rows with 0-2 images, gradient accumulation: step
    losses and grad norms, eval loss, and the saved weights (loaded by AutoModelForImageTextToText) as Trainer's."""
    path = str(tmp_path / "llava")
    tiny_llava().save_pretrained(path)
    ref = run_distributed(_runs, 1, path, str(tmp_path / "ref"), {"ref": (None, ACCUMULATE)}, 1,
                          launcher_env=True, fork=True)[0]["ref"]  # fmt: skip
    mine = run_distributed(_runs, 2, path, str(tmp_path / "pp"), LLAVA_CASES, 2, launcher_env=True, fork=True,
                           timeout=400)  # fmt: skip
    expected = _weights(str(tmp_path / "ref" / "ref" / "final"))
    for name in LLAVA_CASES:
        run = mine[0][name]
        assert [e["step"] for e in run["logs"]] == [e["step"] for e in ref["logs"]] and len(ref["logs"]) >= 3
        errs = {
            "loss": max(_rel(a["loss"], b["loss"]) for a, b in zip(run["logs"], ref["logs"])),
            "grad_norm": max(_rel(a["grad_norm"], b["grad_norm"]) for a, b in zip(run["logs"], ref["logs"])),
            "eval_loss": _rel(run["eval_loss"], ref["eval_loss"]),
        }
        saved = _weights(str(tmp_path / "pp" / name / "final"))
        assert saved.keys() == expected.keys()
        errs["weights"] = max((saved[k] - expected[k]).abs().max().item() for k in expected)
        print(name, errs)
        assert max(errs["loss"], errs["grad_norm"], errs["eval_loss"]) < TOL and errs["weights"] < WEIGHT_TOL, errs
    # the vision tower and projector are read and held by the rank of the first stage only
    assert mine[0]["1f1b"]["held"] == ["language_model", "multi_modal_projector", "vision_tower"]
    assert mine[1]["1f1b"]["held"] == ["language_model"]
    assert "vision_tower" in mine[0]["interleaved"]["held"] and "vision_tower" not in mine[1]["interleaved"]["held"]


def test_vision_tower_cost_moves_the_split():
    """The auto split counts the vision tower on the first stage (per image, per patch): a large tower gives the first
    stage fewer language blocks than a text model of the same language model, and `hf-pipe plan` shows it."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    from hf_pipe.split import plan_split

    text = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=32, num_attention_heads=16)
    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, image_size=336,
                              patch_size=14, num_attention_heads=16)  # fmt: skip
    config = LlavaConfig(vision_config=vision, text_config=text)
    text_plan, vlm_plan = plan_split(text, 4, seq_len=1024), plan_split(config, 4, seq_len=1024)
    assert len(vlm_plan.stages[0].layers) < len(text_plan.stages[0].layers), (vlm_plan, text_plan)
    assert {"vision_tower", "multi_modal_projector"} <= set(vlm_plan.extra_modules(vlm_plan.stages[0]))
    assert vlm_plan.imbalance < 1.1, vlm_plan  # the tower is worth about 3 language blocks here
    explicit = plan_split(config, 4, [0, 2, 8, 12], seq_len=1024)  # by hand
    assert explicit.layer_starts == [0, 2, 8, 12] and explicit.policy == "explicit"


def test_plan_cli_shows_the_vision_tower(capsys):
    """`hf-pipe plan` for Llava's default config (CLIP-L/336, Llama 7B): the tower on stage 0, its cost stated."""
    from hf_pipe.cli import main

    assert main(["plan", "--model_type", "llava", "--pipeline_parallel_size", "4", "--seq_len", "1024"]) == 0
    out = capsys.readouterr().out
    assert "vision_tower" in out and "vision tower" in out, out


def test_unadapted_vision_language_models_are_refused_by_name():
    """A VLM family without an adapter, and a Llava input the adapter does not run, are refused before any step."""
    from transformers import AutoConfig

    from hf_pipe.errors import PipelineConfigError
    from hf_pipe.frontends import select_frontend

    config = AutoConfig.for_model("paligemma")
    problems = select_frontend("module", config).problems(
        config, pp_size=2, stages_per_rank=1, explicit_split=False, data_parallel=None
    )
    assert problems and "vision-language" in problems[0] and "llava" in problems[0], problems
    traced = select_frontend("trace", config).problems(
        config, pp_size=2, stages_per_rank=1, explicit_split=False, data_parallel=None
    )
    assert traced and "DynamicCache" in traced[0], traced
    bad = tiny_llava().config
    bad.vision_config.model_type = "pixtral"
    assert (
        "pixtral"
        in select_frontend("module", bad).problems(
            bad, pp_size=2, stages_per_rank=1, explicit_split=False, data_parallel=None
        )[0]
    )
    from hf_pipe.families import get_family

    adapter = get_family("llava")
    ids = torch.full((2, 6), 3)
    ids[0, :4] = IMAGE_TOKEN
    ids[1, :3] = IMAGE_TOKEN  # 7 image tokens for 2 images of 4 tokens: HF refuses it too
    with pytest.raises(PipelineConfigError, match="do not divide into whole images"):
        adapter.stage_inputs(bad, "causal_lm", {"input_ids": ids, "pixel_values": torch.zeros(2, 3, 8, 8)})
