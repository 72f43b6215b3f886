"""Vision-language models under the pipeline against Trainer (and SFTTrainer) on one process, tiny configs, fp32:
Llava, Qwen2-VL, Qwen2.5-VL, Gemma 3, Idefics3 and SmolVLM read per stage from a path, rows with 0, 1 and 2 images
(of two sizes where the family allows), gradient accumulation, 2 and 4 stages, LoRA; the saved checkpoint loads
with AutoModelForImageTextToText; the vision tower is read by the first stage's rank only; the split counts the
tower; families without an adapter and batches the stages cannot run are refused by name."""

from __future__ import annotations

import os

import pytest
import torch

from tests._dist import run_distributed
from tests.test_trainer_equivalence import _common_args, _rel

TOL = 2e-4
WEIGHT_TOL = 5e-4
VOCAB = 97
IMAGE_TOKEN, VIDEO_TOKEN = 96, 95
IMAGE = 8  # Llava: pixels a side, 4 patches of 4x4, so 4 image tokens per image
#: Qwen2-VL: each image's grid (t, h, w) in patches of 2x2 pixels, 2 frames; tokens per image t·h·w / 4
QWEN_GRIDS = ((1, 2, 4), (1, 4, 4))
PATCH = 3 * 2 * 2 * 2  # channels · temporal patch · patch²


def tiny_vlm(family: str, seed: int = 0):
    import transformers

    text = dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False,
    )  # fmt: skip
    if family == "gemma3":  # local (sliding window 4) and global layers; 4 pooled tokens per image
        text = transformers.Gemma3TextConfig(
            **text, head_dim=8, sliding_window=4, layer_types=["sliding_attention", "full_attention"] * 2
        )
        vision = transformers.SiglipVisionConfig(
            hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=IMAGE,
            patch_size=2,
        )  # fmt: skip
        config = transformers.Gemma3Config(
            text_config=text, vision_config=vision, mm_tokens_per_image=4, image_token_id=IMAGE_TOKEN,
            boi_token_index=94, eoi_token_index=93,
        )  # fmt: skip
        cls = transformers.Gemma3ForConditionalGeneration
    elif family in ("idefics3", "smolvlm"):  # 16 patches, pixel-shuffled by 2: 4 tokens per image
        prefix = "Idefics3" if family == "idefics3" else "SmolVLM"
        vision = getattr(transformers, f"{prefix}VisionConfig")(
            hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=IMAGE,
            patch_size=2,
        )  # fmt: skip
        config = getattr(transformers, f"{prefix}Config")(
            text_config=transformers.LlamaConfig(**text), vision_config=vision, scale_factor=2,
            image_token_id=IMAGE_TOKEN, tie_word_embeddings=False,
        )  # fmt: skip
        cls = getattr(transformers, f"{prefix}ForConditionalGeneration")
    elif family == "llava":
        vision = transformers.CLIPVisionConfig(
            hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=IMAGE,
            patch_size=4, projection_dim=16,
        )  # fmt: skip
        config = transformers.LlavaConfig(
            vision_config=vision, text_config=transformers.LlamaConfig(**text), image_token_id=IMAGE_TOKEN,
            vision_feature_layer=-2,
        )  # fmt: skip
        cls = transformers.LlavaForConditionalGeneration
    else:
        vision = dict(depth=2, num_heads=2, patch_size=2, temporal_patch_size=2, spatial_merge_size=2, in_channels=3)
        if family == "qwen2_vl":
            vision.update(embed_dim=16, hidden_size=32, mlp_ratio=2)
            config_cls, cls = transformers.Qwen2VLConfig, transformers.Qwen2VLForConditionalGeneration
        else:  # qwen2_5_vl: windowed attention in all but one vision block
            vision.update(
                hidden_size=16, out_hidden_size=32, intermediate_size=32, window_size=8, fullatt_block_indexes=[1]
            )
            config_cls, cls = transformers.Qwen2_5_VLConfig, transformers.Qwen2_5_VLForConditionalGeneration
        rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]}  # head_dim 8
        config = config_cls(
            vision_config=vision, text_config={**text, "rope_parameters": rope}, image_token_id=IMAGE_TOKEN,
            video_token_id=VIDEO_TOKEN, vision_start_token_id=93, vision_end_token_id=92, tie_word_embeddings=False,
        )  # fmt: skip
    torch.manual_seed(seed)
    return cls(config)


def image_rows(family: str, n: int, seed: int) -> list[dict]:
    """Rows of text with 0, 1 or 2 images (their tokens where the processor puts them), of varied lengths; for
    Qwen2-VL images of two sizes, and a video in every fourth row."""
    g = torch.Generator().manual_seed(seed)

    def words(lo: int, hi: int) -> list[int]:
        return torch.randint(2, 92, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()

    rows = []
    for i in range(n):
        ids, items = [], []
        for k in range(i % 3):  # rows without images, with one, with two
            ids += words(1, 4)
            if family in ("llava", "gemma3"):
                ids += [IMAGE_TOKEN] * 4
                items.append(("image", torch.randn(3, IMAGE, IMAGE, generator=g), None))
            elif family in ("idefics3", "smolvlm"):  # images of two sizes: 8x8, and 6x8 padded to 8x8
                ids += [IMAGE_TOKEN] * 4
                items.append(("image", torch.randn(3, IMAGE - 2 * ((i + k) % 2), IMAGE, generator=g), None))
            else:
                grid = torch.tensor(QWEN_GRIDS[(i + k) % 2])
                ids += [IMAGE_TOKEN] * int(grid.prod() // 4)
                items.append(("image", torch.randn(int(grid.prod()), PATCH, generator=g), grid))
        if family.startswith("qwen") and i % 4 == 3:
            grid = torch.tensor(QWEN_GRIDS[0])
            ids += words(1, 3) + [VIDEO_TOKEN] * int(grid.prod() // 4)
            items.append(("video", torch.randn(int(grid.prod()), PATCH, generator=g), grid))
        ids += words(3, 10)
        rows.append({"input_ids": ids, "items": items})
    return rows


class ImageCollator:
    """Right padding; labels -100 on padding and image tokens; the batch's images stacked in row order (none: no
    pixel_values, as a processor gives a text-only batch); Qwen2-VL's grids and mm_token_type_ids as its processor
    gives them."""

    def __init__(self, family: str):
        self.family = family

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        longest = max(len(f["input_ids"]) for f in features)
        ids = torch.zeros(len(features), longest, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, f in enumerate(features):
            ids[r, : len(f["input_ids"])] = torch.tensor(f["input_ids"])
            mask[r, : len(f["input_ids"])] = 1
        media = (ids == IMAGE_TOKEN) | (ids == VIDEO_TOKEN)
        batch = {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill((mask == 0) | media, -100)}
        if self.family.startswith("qwen"):
            batch["mm_token_type_ids"] = (ids == IMAGE_TOKEN).int() + 2 * (ids == VIDEO_TOKEN).int()
        if self.family == "gemma3":
            batch["token_type_ids"] = (ids == IMAGE_TOKEN).long()
        if self.family in ("idefics3", "smolvlm"):  # images laid out along the rows, zero images as padding
            most = max(len(f["items"]) for f in features)
            if most:
                batch["pixel_values"] = torch.zeros(len(features), most, 3, IMAGE, IMAGE)
                batch["pixel_attention_mask"] = torch.zeros(len(features), most, IMAGE, IMAGE, dtype=torch.bool)
                for r, f in enumerate(features):
                    for k, (_, x, _) in enumerate(f["items"]):
                        batch["pixel_values"][r, k, :, : x.shape[1]] = x
                        batch["pixel_attention_mask"][r, k, : x.shape[1]] = True
            return batch
        for kind, pixels, grids in (
            ("image", "pixel_values", "image_grid_thw"),
            ("video", "pixel_values_videos", "video_grid_thw"),
        ):
            items = [item for f in features for item in f["items"] if item[0] == kind]
            if items:
                batch[pixels] = (
                    torch.stack([x for _, x, _ in items])
                    if not self.family.startswith("qwen")
                    else torch.cat([x for _, x, _ in items])
                )
                if self.family.startswith("qwen"):
                    batch[grids] = torch.stack([grid for _, _, grid in items])
        return batch


def _train(family: str, model_path: str, output_dir: str, pipeline: dict | None, extra: dict) -> dict:
    from transformers import AutoModelForImageTextToText, Trainer, TrainingArguments

    from hf_pipe import PipeTrainer, PipeTrainingArguments

    extra = dict(extra)
    lora = extra.pop("lora", None)
    settings = _common_args(output_dir, remove_unused_columns=False, **extra)
    data = dict(train_dataset=image_rows(family, 30, 0), eval_dataset=image_rows(family, 11, 5),
                data_collator=ImageCollator(family))  # fmt: skip
    model = model_path
    if pipeline is None or lora is not None:
        model = AutoModelForImageTextToText.from_pretrained(model_path, dtype=torch.float32)
    if lora is not None:
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, **lora))
    if pipeline is None:
        trainer = Trainer(model=model, args=TrainingArguments(**settings), **data)
    else:
        trainer = PipeTrainer(model=model, args=PipeTrainingArguments(**settings, **pipeline), **data)
    held = None
    if pipeline is not None:  # what this rank read: the tensors its stages hold for real
        names = [n.removeprefix("base_model.model.") for n, _ in trainer.engine.named_parameters()]
        held = sorted({n.split(".")[1] for n in names if n.startswith("model.")})
        print(f"rank {trainer.args.process_index} holds {sum(p.numel() for p in trainer.engine.parameters())} of "
              f"{sum(p.numel() for p in trainer.model.parameters())} parameters: {held}")  # fmt: skip
    trainable = sorted(n for n, p in trainer.model.named_parameters() if p.requires_grad)
    trainer.train()
    after = trainer.evaluate()
    trainer.save_model(os.path.join(output_dir, "final"))
    logs = [e for e in trainer.state.log_history if "loss" in e and "eval_loss" not in e]
    return {"logs": logs, "eval_loss": after["eval_loss"], "held": held, "trainable": trainable}


def _runs(root: str, cases: dict) -> dict:
    return {
        name: _train(family, os.path.join(root, family), os.path.join(root, name), pipeline, extra)
        for name, (family, pipeline, extra) in cases.items()
    }


ACCUMULATE = {"gradient_accumulation_steps": 2, "per_device_train_batch_size": 4}
CHECKPOINTING = {
    "gradient_checkpointing": True,
    "gradient_checkpointing_kwargs": {"use_reentrant": False},
    "ddp_find_unused_parameters": True,
}
LANGUAGE_LORA = {"target_modules": r".*language_model.*\.(q_proj|v_proj|up_proj)"}
VISION_LORA = {"target_modules": ["q_proj", "v_proj", "linear_1"]}
ONE_F_ONE_B = {"pipeline_schedule": "1f1b", "pipeline_microbatches": 2}
CASES = {
    "llava": ("llava", ONE_F_ONE_B, ACCUMULATE),
    # 4 stages on 2 ranks: a stage of one block each, the vision tower alone with block 0 on stage 0
    "llava-4-stages": ("llava", {"pipeline_schedule": "interleaved1f1b", "pipeline_microbatches": 4}, ACCUMULATE),
    "qwen2_vl": ("qwen2_vl", ONE_F_ONE_B, ACCUMULATE),
    "qwen2_5_vl": ("qwen2_5_vl", {**ONE_F_ONE_B, "pipeline_split": [0, 1]}, ACCUMULATE),
    # gradient checkpointing in the vision tower and the language blocks of each stage
    # (the reference, Trainer on one launched process, wraps DDP: a tower left unused by text-only rows needs
    # find_unused_parameters, which Trainer turns off under checkpointing)
    "llava-checkpointing": ("llava", ONE_F_ONE_B, {**ACCUMULATE, **CHECKPOINTING}),
    "gemma3": ("gemma3", ONE_F_ONE_B, ACCUMULATE),
    "idefics3": ("idefics3", ONE_F_ONE_B, ACCUMULATE),
    "smolvlm": ("smolvlm", ONE_F_ONE_B, ACCUMULATE),
    # LoRA on the language model only, and on the vision tower and projector too (CLIP's q/v and the projector)
    "llava-lora": ("llava", ONE_F_ONE_B, {**ACCUMULATE, "lora": LANGUAGE_LORA}),
    "llava-lora-vision": ("llava", ONE_F_ONE_B, {**ACCUMULATE, "lora": VISION_LORA}),
}
FAMILIES = ("llava", "qwen2_vl", "qwen2_5_vl", "gemma3", "idefics3", "smolvlm")


VISION_MODULES = {
    "llava": {"vision_tower", "multi_modal_projector"},
    "gemma3": {"vision_tower", "multi_modal_projector"},
    "qwen2_vl": {"visual"},
    "qwen2_5_vl": {"visual"},
    "idefics3": {"vision_model", "connector"},
    "smolvlm": {"vision_model", "connector"},
}


def _weights(path: str) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).state_dict()


def _adapter(path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(os.path.join(path, "adapter_model.safetensors"))


def _check_against_trainer(tmp_path, cases: dict) -> None:
    """`cases` on 2 ranks, each model read per stage from a path, against Trainer on one process: step losses and
    grad norms, eval loss, the saved weights (loaded by AutoModelForImageTextToText, or PEFT's adapter file); the
    vision tower is read and held by the first stage's rank only."""
    families = sorted({family for family, _, _ in cases.values()})
    for family in families:
        tiny_vlm(family).save_pretrained(str(tmp_path / family))
    references = {f"ref-{family}": (family, None, ACCUMULATE) for family in families}
    references |= {
        f"ref-{name}": (family, None, extra) for name, (family, _, extra) in cases.items() if extra != ACCUMULATE
    }
    ref = run_distributed(_runs, 1, str(tmp_path), references, launcher_env=True, fork=True, timeout=400)[0]
    mine = run_distributed(_runs, 2, str(tmp_path), cases, launcher_env=True, fork=True, timeout=600)
    for name, (family, _, extra) in cases.items():
        reference = f"ref-{name}" if extra != ACCUMULATE else f"ref-{family}"
        run, theirs = mine[0][name], ref[reference]
        assert run["trainable"] == theirs["trainable"], name
        assert [e["step"] for e in run["logs"]] == [e["step"] for e in theirs["logs"]] and len(theirs["logs"]) >= 3
        errs = {
            "loss": max(_rel(a["loss"], b["loss"]) for a, b in zip(run["logs"], theirs["logs"])),
            "grad_norm": max(_rel(a["grad_norm"], b["grad_norm"]) for a, b in zip(run["logs"], theirs["logs"])),
            "eval_loss": _rel(run["eval_loss"], theirs["eval_loss"]),
        }
        load = _adapter if "lora" in extra else _weights
        saved, expected = load(str(tmp_path / name / "final")), load(str(tmp_path / reference / "final"))
        assert saved.keys() == expected.keys()
        errs["weights"] = max((saved[k] - expected[k]).abs().max().item() for k in expected)
        print(name, errs)
        assert max(errs["loss"], errs["grad_norm"], errs["eval_loss"]) < TOL and errs["weights"] < WEIGHT_TOL, errs
        vision = VISION_MODULES[family]
        assert vision <= set(mine[0][name]["held"]) and not vision & set(mine[1][name]["held"]), name


def test_llava_matches_trainer(tmp_path):
    """Llava on 2 ranks as 2 and as 4 stages, and with LoRA on its language model, or on its vision tower and
    projector too; rows with 0, 1 and 2 images, gradient accumulation."""
    _check_against_trainer(tmp_path, {k: v for k, v in CASES.items() if k.startswith("llava")})


def test_qwen_gemma_idefics_match_trainer(tmp_path):
    """Qwen2-VL and Qwen2.5-VL (images of two sizes, videos, 3-D positions), Gemma 3 (image tokens attending both
    ways, sliding-window layers), Idefics3 and SmolVLM (images of two sizes, padded) on 2 ranks; rows with 0, 1 and 2
    images, gradient accumulation."""
    _check_against_trainer(tmp_path, {k: v for k, v in CASES.items() if not k.startswith("llava")})


def test_vision_tower_cost_moves_the_split():
    """The auto split counts the vision tower on the first stage (per image, per patch): a large tower gives the first
    stage fewer language blocks than a text model of the same language model, and `hf-pipe plan` shows it."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    from hf_pipe.families import get_family
    from hf_pipe.measure import measure_costs
    from hf_pipe.split import plan_split

    text = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=32, num_attention_heads=16)
    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, image_size=336,
                              patch_size=14, num_attention_heads=16)  # fmt: skip
    config = LlavaConfig(vision_config=vision, text_config=text)
    text_plan, vlm_plan = plan_split(text, 4, seq_len=1024), plan_split(config, 4, seq_len=1024)
    assert len(vlm_plan.stages[0].layers) < len(text_plan.stages[0].layers), (vlm_plan, text_plan)
    assert {"vision_tower", "multi_modal_projector"} <= set(vlm_plan.extra_modules(vlm_plan.stages[0]))
    assert vlm_plan.imbalance < 1.1, vlm_plan  # the tower is worth about 3 language blocks here
    # the measured split times the text pieces and counts the tower at a block's measured time per FLOP
    model = tiny_vlm("llava")
    costs = measure_costs(model, get_family("llava"), "causal_lm", model.config, microbatch=2, seq_len=16,
                          device=torch.device("cpu"))  # fmt: skip
    assert 0 < costs.vision < costs.embeddings
    explicit = plan_split(config, 4, [0, 2, 8, 12], seq_len=1024)  # by hand
    assert explicit.layer_starts == [0, 2, 8, 12] and explicit.policy == "explicit"


def test_plan_cli_shows_the_vision_tower(capsys):
    """`hf-pipe plan` for Llava's default config (CLIP-L/336, Llama 7B): the tower on stage 0, its cost stated."""
    from hf_pipe.cli import main

    assert main(["plan", "--model_type", "llava", "--pipeline_parallel_size", "4", "--seq_len", "1024"]) == 0
    out = capsys.readouterr().out
    assert "vision_tower" in out and "vision tower" in out, out


def test_unadapted_vision_language_models_are_refused_by_name():
    """Before any step: a VLM family without an adapter (on either frontend), a Llava with a tower the adapter does
    not run, replicas of a VLM pipeline, generation through it, and a batch whose image tokens and images disagree."""
    from types import SimpleNamespace

    from transformers import AutoConfig

    from hf_pipe.errors import PipelineConfigError
    from hf_pipe.families import get_family
    from hf_pipe.frontends import select_frontend
    from hf_pipe.generation.problems import generator_problems

    def problems(frontend: str, config, data_parallel: str | None = None) -> list[str]:
        return select_frontend(frontend, config).problems(
            config, pp_size=2, stages_per_rank=1, explicit_split=False, data_parallel=data_parallel
        )

    paligemma = AutoConfig.for_model("paligemma")
    assert "vision-language" in problems("module", paligemma)[0] and "llava" in problems("module", paligemma)[0]
    assert "DynamicCache" in problems("trace", paligemma)[0]
    llava = tiny_vlm("llava")
    # replicas of the pipeline: DDP fails on a vision tower that a microbatch without images leaves unused
    replicas = problems("module", llava.config, "ddp")
    assert len(replicas) == 1 and "pipeline_data_parallel='ddp'" in replicas[0], replicas
    # generation through the pipeline (GRPO's rollouts) does not carry images
    engine = SimpleNamespace(
        frontend=SimpleNamespace(name="module", adapter=get_family("llava")), plan=SimpleNamespace(task="causal_lm"),
        dp=None,
    )  # fmt: skip
    assert "vision-language" in generator_problems(engine, llava, None)[0]
    pixtral = tiny_vlm("llava").config
    pixtral.vision_config.model_type = "pixtral"
    assert "pixtral" in problems("module", pixtral)[0]
    ids = torch.full((2, 6), 3)
    ids[0, :4] = IMAGE_TOKEN
    ids[1, :3] = IMAGE_TOKEN  # 7 image tokens for 2 images of 4 tokens: HF refuses it too
    with pytest.raises(PipelineConfigError, match="do not divide into whole images"):
        get_family("llava").stage_inputs(
            llava.config, "causal_lm", {"input_ids": ids, "pixel_values": torch.zeros(2, 3, 8, 8)}
        )


# -- TRL's SFT with images in the conversation ---------------------------------------------------------------------
def tiny_llava_processor():
    """A LlavaProcessor over a word-level tokenizer (`<image>` is token IMAGE_TOKEN) and 8-pixel CLIP images."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import CLIPImageProcessor, LlavaProcessor, PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[EOS]": 1, "user:": 2, "assistant:": 3, **{f"w{i}": i for i in range(4, IMAGE_TOKEN)}}
    tokenizer = Tokenizer(WordLevel({**vocab, "<image>": IMAGE_TOKEN}, unk_token="[PAD]"))
    tokenizer.pre_tokenizer = WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="[PAD]", eos_token="[EOS]",
                                        extra_special_tokens={"image_token": "<image>"})  # fmt: skip
    template = (
        "{% for m in messages %}{{ m['role'] }}: {% if m['content'] is string %}{{ m['content'] }} {% else %}"
        "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image> {% else %}{{ c['text'] }} {% endif %}"
        "{% endfor %}{% endif %}[EOS] {% endfor %}"
    )
    images = CLIPImageProcessor(size={"shortest_edge": IMAGE}, crop_size={"height": IMAGE, "width": IMAGE})
    return LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=4, chat_template=template,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1)  # fmt: skip


def image_chats(n: int, seed: int):
    """A tiny image-chat set as TRL takes it: `messages` and `images` (PIL), 0, 1 or 2 images per conversation."""
    import datasets
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)

    def words(lo: int, hi: int) -> str:
        return " ".join(f"w{i}" for i in rng.integers(4, IMAGE_TOKEN, int(rng.integers(lo, hi))))

    rows = []
    for i in range(n):
        images = [Image.fromarray(rng.integers(0, 255, (IMAGE, IMAGE, 3), dtype=np.uint8)) for _ in range(i % 3)]
        # TRL puts each image at the start of the first user turn (prepare_multimodal_messages)
        rows.append({"messages": [{"role": "user", "content": words(1, 5)}, {"role": "assistant", "content": words(2, 8)}],
                     "images": images})  # fmt: skip
    return datasets.Dataset.from_list(rows)


def _sft(path: str, output_dir: str, pipeline: dict | None) -> dict:
    from trl import SFTConfig, SFTTrainer

    from hf_pipe.trl import PipeSFTConfig, PipeSFTTrainer

    settings = dict(
        output_dir=output_dir, per_device_train_batch_size=4, per_device_eval_batch_size=4, learning_rate=1e-2,
        gradient_accumulation_steps=2, num_train_epochs=1, logging_steps=1, save_strategy="no", report_to=[],
        seed=3, max_length=None, disable_tqdm=True, use_cpu=True, gradient_checkpointing=False, bf16=False,
    )  # fmt: skip
    config = SFTConfig(**settings) if pipeline is None else PipeSFTConfig(**settings, **pipeline)
    trainer = (SFTTrainer if pipeline is None else PipeSFTTrainer)(
        model=path, args=config, train_dataset=image_chats(24, 0), eval_dataset=image_chats(8, 5),
        processing_class=tiny_llava_processor(),
    )  # fmt: skip
    trainer.train()
    evaluation = trainer.evaluate()
    trainer.save_model(os.path.join(output_dir, "final"))
    logs = [e for e in trainer.state.log_history if "loss" in e and "eval_loss" not in e]
    return {"logs": logs, "eval": evaluation}


SFT_LOGGED = ("loss", "grad_norm", "entropy", "mean_token_accuracy", "num_tokens")


def test_pipe_sft_with_images_matches_sft_trainer(tmp_path):
    """PipeSFTTrainer with TRL's vision collator (images in the conversation, the processor's chat template) on 2
    ranks against SFTTrainer on one process: SFT's logged metrics, eval metrics and the saved weights."""
    path = str(tmp_path / "llava")
    tiny_vlm("llava").save_pretrained(path)
    ref = run_distributed(_sft, 1, path, str(tmp_path / "ref"), None, launcher_env=True, fork=True)[0]
    mine = run_distributed(_sft, 2, path, str(tmp_path / "pp"), ONE_F_ONE_B, launcher_env=True, fork=True)[0]
    assert [e["step"] for e in mine["logs"]] == [e["step"] for e in ref["logs"]] and len(ref["logs"]) >= 3
    errs = {k: max(_rel(a[k], b[k]) for a, b in zip(mine["logs"], ref["logs"])) for k in SFT_LOGGED}
    errs["eval"] = max(_rel(mine["eval"][k], ref["eval"][k]) for k in ("eval_loss", "eval_entropy",
                                                                      "eval_mean_token_accuracy"))  # fmt: skip
    saved, expected = _weights(str(tmp_path / "pp" / "final")), _weights(str(tmp_path / "ref" / "final"))
    errs["weights"] = max((saved[k] - expected[k]).abs().max().item() for k in expected)
    print(errs)
    assert max(errs[k] for k in (*SFT_LOGGED, "eval")) < TOL and errs["weights"] < WEIGHT_TOL, errs
