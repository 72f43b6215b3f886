"""PEFT adapters under the pipeline against Trainer + the same PeftModel on one process: losses, grad norms, eval loss,
the saved adapter (PEFT's own files and keys, reloaded with PeftModel.from_pretrained), resume; a PeftModel on the
meta device reads its base per stage and initialises its adapters the same on every layout."""

from __future__ import annotations

import os

import pytest
import torch

from tests._data import PadCollator, lm_dataset
from tests._dist import run_distributed
from tests._models import tiny_model
from tests.test_resume import _StopAt
from tests.test_trainer_equivalence import _common_args, _rel

LOSS_TOL = 2e-4

METHODS = {
    "lora": ("LoraConfig", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"])),
    "lora-modules-to-save": (
        "LoraConfig",
        dict(r=4, target_modules=["q_proj", "o_proj"], modules_to_save=["lm_head"]),
    ),
    "dora": ("LoraConfig", dict(r=4, target_modules=["k_proj", "down_proj"], use_dora=True)),
    "ia3": ("IA3Config", dict(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])),
}


def _peft_model(method: str, meta: bool = False, name: str = "llama"):
    import peft

    cls, kwargs = METHODS[method]
    model = tiny_model(name)
    if meta:
        with torch.device("meta"):
            model = type(model)(model.config)
    return peft.get_peft_model(model, getattr(peft, cls)(**kwargs))


def _run(method: str, output_dir: str, pipeline: dict | None, extra: dict) -> dict:
    from transformers import Trainer, TrainingArguments

    from hf_pipe import PipeTrainer, PipeTrainingArguments

    extra = dict(extra)
    resume, stop_at = extra.pop("resume", None), extra.pop("stop_at", None)
    settings = _common_args(output_dir, **extra)
    args = TrainingArguments(**settings) if pipeline is None else PipeTrainingArguments(**settings, **pipeline)
    trainer = (Trainer if pipeline is None else PipeTrainer)(
        model=_peft_model(method), args=args, train_dataset=lm_dataset(45), eval_dataset=lm_dataset(13, seed=5),
        data_collator=PadCollator("causal_lm"), callbacks=[_StopAt(stop_at)] if stop_at else None,
    )  # fmt: skip
    trainer.train(resume_from_checkpoint=resume)
    after = trainer.evaluate()
    trainer.save_model(os.path.join(output_dir, "final"))
    trainable = sorted(n for n, p in trainer.model.named_parameters() if p.requires_grad)
    logs = [e for e in trainer.state.log_history if "loss" in e and "eval_loss" not in e]
    return {"after": after, "logs": logs, "trainable": trainable}


def _runs(methods: list[str], root: str, pipeline: dict | None, extra: dict) -> dict:
    return {m: _run(m, os.path.join(root, m), pipeline, extra) for m in methods}


def _adapter(path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(os.path.join(path, "adapter_model.safetensors"))


PIPELINE = {"pipeline_schedule": "interleaved1f1b", "pipeline_microbatches": 4}


def test_adapters_train_and_save_as_with_trainer(tmp_path):
    """LoRA (q/v/up), LoRA with modules_to_save on the tied head, DoRA, IA3: 2 ranks against Trainer + PEFT."""
    from peft import PeftModel

    methods = list(METHODS)
    ref = run_distributed(_runs, 1, methods, str(tmp_path / "ref"), None, {}, launcher_env=True, timeout=300)[0]
    mine = run_distributed(_runs, 2, methods, str(tmp_path / "pp"), PIPELINE, {}, launcher_env=True, timeout=400)
    for method in methods:
        theirs, errs = ref[method], {"loss": 0.0, "grad_norm": 0.0, "adapter": 0.0}
        for rank in mine:
            run = rank[method]
            assert run["trainable"] == theirs["trainable"], method  # only the adapter trains
            assert [e["step"] for e in run["logs"]] == [e["step"] for e in theirs["logs"]]
            for a, b in zip(run["logs"], theirs["logs"]):
                errs["loss"] = max(errs["loss"], _rel(a["loss"], b["loss"]))
                errs["grad_norm"] = max(errs["grad_norm"], _rel(a["grad_norm"], b["grad_norm"]))
            errs["eval_loss"] = _rel(run["after"]["eval_loss"], theirs["after"]["eval_loss"])
        saved, expected = _adapter(tmp_path / "pp" / method / "final"), _adapter(tmp_path / "ref" / method / "final")
        assert saved.keys() == expected.keys(), method  # PEFT's own key names
        errs["adapter"] = max((saved[k] - expected[k]).abs().max().item() for k in expected)
        print(method, errs)
        assert max(errs["loss"], errs["grad_norm"], errs["eval_loss"]) < LOSS_TOL and errs["adapter"] < 5e-4, errs
        # PEFT loads it on one device, onto a fresh base model, and scores as the pipeline's last evaluation did
        reloaded = PeftModel.from_pretrained(tiny_model("llama"), tmp_path / "pp" / method / "final")
        assert (tmp_path / "pp" / method / "final" / "adapter_config.json").is_file()
        batch = PadCollator("causal_lm")([lm_dataset(13, seed=5)[i] for i in range(8)])
        ours = reloaded(**batch).loss.item()
        theirs_model = PeftModel.from_pretrained(tiny_model("llama"), tmp_path / "ref" / method / "final")
        assert ours == pytest.approx(theirs_model(**batch).loss.item(), rel=LOSS_TOL), method


def test_frozen_base_with_gradient_checkpointing(tmp_path):
    """LoRA on a frozen base with gradient checkpointing per stage, as Trainer + PEFT checkpoints the whole model."""
    extra = {"gradient_checkpointing": True, "gradient_checkpointing_kwargs": {"use_reentrant": False}}
    ref = run_distributed(_runs, 1, ["lora"], str(tmp_path / "ref"), None, extra, launcher_env=True)[0]["lora"]
    mine = run_distributed(_runs, 2, ["lora"], str(tmp_path / "pp"), PIPELINE, extra, launcher_env=True)[0]["lora"]
    for a, b in zip(mine["logs"], ref["logs"], strict=True):
        assert _rel(a["loss"], b["loss"]) < LOSS_TOL and _rel(a["grad_norm"], b["grad_norm"]) < LOSS_TOL, (a, b)
    saved, expected = _adapter(tmp_path / "pp" / "lora" / "final"), _adapter(tmp_path / "ref" / "lora" / "final")
    assert max((saved[k] - expected[k]).abs().max().item() for k in expected) < 5e-4


def test_adapter_checkpoint_resumes_exactly(tmp_path):
    """Checkpoints hold the adapter (PEFT files) and the optimizer; a stopped run resumed reaches the same adapter."""
    extra = {"save_strategy": "steps", "save_steps": 2}
    full = run_distributed(_runs, 2, ["lora"], str(tmp_path / "full"), PIPELINE, extra, launcher_env=True)[0]
    stop = {**extra, "stop_at": 3}  # the same schedule, stopped: as a killed run
    run_distributed(_runs, 2, ["lora"], str(tmp_path / "run"), PIPELINE, stop, launcher_env=True)
    checkpoint = tmp_path / "run" / "lora" / "checkpoint-2"
    assert {"adapter_model.safetensors", "adapter_config.json", "scheduler.pt"} <= set(os.listdir(checkpoint))
    resumed = run_distributed(
        _runs, 2, ["lora"], str(tmp_path / "run"), PIPELINE, {**extra, "resume": str(checkpoint)}, launcher_env=True
    )[0]
    for a, b in zip(resumed["lora"]["logs"][2:], full["lora"]["logs"][2:]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6) and a["grad_norm"] == pytest.approx(
            b["grad_norm"], rel=1e-6
        )
    a, b = _adapter(tmp_path / "run" / "lora" / "final"), _adapter(tmp_path / "full" / "lora" / "final")
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6


def _meta_start(methods: list[str], checkpoint: str, root: str, pipeline: dict) -> None:
    from hf_pipe import PipeTrainer, PipeTrainingArguments

    for method in methods:
        out = os.path.join(root, method)
        args = PipeTrainingArguments(
            output_dir=out, per_device_train_batch_size=8, report_to=[], use_cpu=True, seed=5, max_steps=1,
            pipeline_checkpoint=checkpoint, save_strategy="no", **pipeline,
        )  # fmt: skip
        trainer = PipeTrainer(model=_peft_model(method, meta=True), args=args, train_dataset=lm_dataset(8))
        trainer.save_model(os.path.join(out, "start"))


def test_adapters_on_a_meta_model(tmp_path):
    """LoRA and DoRA on a skeleton: the base from the checkpoint per stage, the adapters initialised as PEFT does,
    seeded per layer: the same on 2 ranks, on 4, and as initialize_adapters gives a whole model."""
    from hf_pipe.integrations.peft import initialize_adapters

    tiny_model("llama").save_pretrained(tmp_path / "base")
    methods = ["lora", "dora"]
    for world, pipeline in ((2, {}), (4, {"pipeline_schedule": "gpipe"})):
        out = str(tmp_path / f"w{world}")
        run_distributed(_meta_start, world, methods, str(tmp_path / "base"), out, pipeline, launcher_env=True)
    for method in methods:
        reference = _peft_model(method)
        initialize_adapters(reference, seed=5)
        from peft import get_peft_model_state_dict

        expected = get_peft_model_state_dict(reference)
        for world in (2, 4):
            saved = _adapter(tmp_path / f"w{world}" / method / "start")
            assert saved.keys() == expected.keys() and all(torch.equal(saved[k], expected[k]) for k in expected)
        assert any(v.abs().sum() > 0 for k, v in expected.items() if "lora_A" in k)  # really initialised
