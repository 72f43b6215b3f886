"""TRL's ORPO and CPO (SimPO, AlphaPO) under the pipeline: PipeORPOTrainer and PipeCPOTrainer on 2 ranks against
TRL's trainers on one process — losses, grad norms, every metric TRL logs, evaluation metrics and predictions, and
weights — with a model path (with and without a PEFT config), a built model with a PEFT config, gradient
accumulation and an interleaved schedule; and what they refuse."""

from __future__ import annotations

import os

import pytest
import torch

from tests._dist import run_distributed
from tests._models import VOCAB, tiny_model
from tests.test_trainer_equivalence import _rel
from tests.test_trl import _tokenizer, _trl_warnings

pytest.importorskip("trl.experimental.orpo")

#: loss and grad norm relative; metrics relative, or absolute below 1 in size: most are means of signed values (reward
#: margins, log-odds, logits) whose terms are larger than their mean, and whose fp32 noise is the terms'; weights
#: absolute
TOL, METRIC_SCALE, WEIGHT_TOL = 1e-5, 1.0, 5e-5
#: what a log entry holds besides the trainer's numbers
_NOT_COMPARED = ("epoch", "step", "learning_rate")
_TIMING = ("runtime", "samples_per_second", "steps_per_second")

ORPO_CASES = {
    # a model path (the skeleton, each rank reading its stages), model_init_kwargs hidden from ORPOTrainer's check,
    # 2 accumulated batches
    "orpo-path-ga2": {"path": True, "model_init_kwargs": {"dtype": "float32"}, "gradient_accumulation_steps": 2},
    "orpo-lora": {"peft": True, "beta": 0.3},
    # TRL draws a path's adapters after set_seed: the pipeline replays those draws (the skeleton's are lost)
    "orpo-path-lora": {"peft": True, "path": True},
}
CPO_CASES = {
    "sigmoid-path-ga2": {"path": True, "label_smoothing": 0.1, "gradient_accumulation_steps": 2},
    "hinge-interleaved": {"loss_type": "hinge", "beta": 0.5, "schedule": "interleaved1f1b"},  # 4 stages on 2 ranks
    "ipo-short-last-batch": {"loss_type": "ipo", "train_rows": 18},  # the last batch: 2 pairs, 2 microbatches
    "simpo": {"loss_type": "simpo", "simpo_gamma": 0.3, "cpo_alpha": 0.5, "beta": 2.0},
    "alphapo": {"loss_type": "alphapo", "alpha": 0.25, "beta": 2.0},
    "sigmoid-lora": {"peft": True},
}


def _triples(n: int, seed: int):
    import datasets

    g = torch.Generator().manual_seed(seed)

    def text(low: int, high: int) -> str:
        length = int(torch.randint(low, high, (1,), generator=g))
        return " ".join(f"w{int(i)}" for i in torch.randint(2, VOCAB, (length,), generator=g))

    rows = [{"prompt": text(2, 8), "chosen": " " + text(1, 9), "rejected": " " + text(1, 9)} for _ in range(n)]
    return datasets.Dataset.from_list(rows)


def _run(trainer: str, case: str, output_dir: str, pipeline: bool, checkpoint: str) -> dict:
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM

    if trainer == "orpo":
        from trl.experimental.orpo import ORPOConfig as Config
        from trl.experimental.orpo import ORPOTrainer as Trainer

        from hf_pipe.trl import PipeORPOConfig as PipeConfig
        from hf_pipe.trl import PipeORPOTrainer as PipeTrainer
    else:
        from trl.experimental.cpo import CPOConfig as Config
        from trl.experimental.cpo import CPOTrainer as Trainer

        from hf_pipe.trl import PipeCPOConfig as PipeConfig
        from hf_pipe.trl import PipeCPOTrainer as PipeTrainer

    options = dict((ORPO_CASES if trainer == "orpo" else CPO_CASES)[case])
    peft, path = options.pop("peft", False), options.pop("path", False)
    pipe = {"pipeline_schedule": options.pop("schedule", "1f1b"), "pipeline_microbatches": 4}
    train_rows = options.pop("train_rows", 16 * options.get("gradient_accumulation_steps", 1))  # 4 optimizer steps
    settings = dict(
        output_dir=output_dir, per_device_train_batch_size=4, per_device_eval_batch_size=8, learning_rate=1e-3,
        num_train_epochs=1, logging_steps=1, save_strategy="no", report_to=[], seed=3, max_length=32,
        disable_tqdm=True, use_cpu=True, bf16=False, **options,
    )  # fmt: skip
    config = PipeConfig(**settings, **pipe) if pipeline else Config(**settings)
    cls = PipeTrainer if pipeline else Trainer
    with _trl_warnings(cls) as warned:
        trainer_ = cls(
            model=checkpoint if path else AutoModelForCausalLM.from_pretrained(checkpoint),
            args=config,
            train_dataset=_triples(train_rows, 0),
            eval_dataset=_triples(12, 5),
            processing_class=_tokenizer(),
            peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]) if peft else None,
        )
    trainer_.train()
    evaluation = trainer_.evaluate()
    predictions = trainer_.predict(trainer_.eval_dataset).predictions
    model = trainer_.engine if pipeline else trainer_.model
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    logs = [e for e in trainer_.state.log_history if "loss" in e and "eval_loss" not in e]
    return {
        "logs": logs, "eval": evaluation, "predictions": torch.as_tensor(predictions), "weights": weights,
        "warned": warned,
    }  # fmt: skip


def _runs(trainer: str, cases: list[str], root: str, pipeline: bool, checkpoint: str) -> dict:
    return {case: _run(trainer, case, os.path.join(root, case), pipeline, checkpoint) for case in cases}


def _metric_error(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), METRIC_SCALE)


def _worst(errs: dict, worst: dict, group: str, key: str, error: float) -> None:
    """Keep the largest error of `group` in `errs` and which key it came from in `worst`."""
    if error >= errs[group]:
        errs[group], worst[group] = error, key


def _compare(trainer: str, cases: dict, tmp_path) -> None:
    checkpoint = str(tmp_path / "llama")
    tiny_model("llama", pad_token_id=0, eos_token_id=1).save_pretrained(checkpoint)
    names = list(cases)
    launch = {"launcher_env": True}
    ref = run_distributed(_runs, 1, trainer, names, str(tmp_path / "ref"), False, checkpoint, **launch)[0]
    mine = run_distributed(_runs, 2, trainer, names, str(tmp_path / "pp"), True, checkpoint, **launch)
    for case in names:
        theirs, errs = ref[case], {"loss": 0.0, "grad_norm": 0.0, "metrics": 0.0, "eval": 0.0, "predictions": 0.0}
        worst: dict[str, str] = {}
        assert len(theirs["logs"]) >= 4, case
        for rank in mine:
            run = rank[case]
            assert [e["step"] for e in run["logs"]] == [e["step"] for e in theirs["logs"]], case
            for a, b in zip(run["logs"], theirs["logs"]):
                assert a.keys() == b.keys(), (case, a.keys() ^ b.keys())
                errs["loss"] = max(errs["loss"], _rel(a["loss"], b["loss"]))
                errs["grad_norm"] = max(errs["grad_norm"], _rel(a["grad_norm"], b["grad_norm"]))
                for key in b.keys() - {"loss", "grad_norm", *_NOT_COMPARED}:
                    _worst(errs, worst, "metrics", key, _metric_error(a[key], b[key]))
            evaluated = {k for k in theirs["eval"] if not k.endswith(_TIMING) and k != "epoch"}
            assert "eval_logits/chosen" in evaluated and run["eval"].keys() == theirs["eval"].keys(), case
            for key in evaluated:
                _worst(errs, worst, "eval", key, _metric_error(run["eval"][key], theirs["eval"][key]))
            assert run["predictions"].shape == theirs["predictions"].shape, case
            errs["predictions"] = max(errs["predictions"], (run["predictions"] - theirs["predictions"]).abs().max())
        weights = {}
        for rank in mine:
            weights.update(rank[case]["weights"])
        prefix = "base_model.model."
        expected = {n.removeprefix(prefix): w for n, w in theirs["weights"].items()}
        assert weights.keys() == expected.keys(), case
        errs["weights"] = max((weights[n] - expected[n]).abs().max().item() for n in weights)
        print(trainer, case, {k: float(v) for k, v in errs.items()}, worst)
        assert max(errs[k] for k in ("loss", "grad_norm", "metrics", "eval")) < TOL, (case, errs)
        assert errs["predictions"] < 1e-6 and errs["weights"] < WEIGHT_TOL, (case, errs)
        assert not [m for m in mine[0][case]["warned"] if "model_init_kwargs" in m], mine[0][case]["warned"]


@pytest.mark.timeout(600)
def test_pipe_orpo_matches_orpo_trainer(tmp_path):
    _compare("orpo", ORPO_CASES, tmp_path)


@pytest.mark.timeout(600)
def test_pipe_cpo_matches_cpo_trainer(tmp_path):
    _compare("cpo", CPO_CASES, tmp_path)


def test_refused_before_anything_is_built(tmp_path):
    """An encoder-decoder, an MoE router loss and generation during evaluation: one PipelineConfigError naming each,
    raised before TRL tokenises anything (no process group: the checks come first); a config of another type: a
    TypeError."""
    from trl.experimental.orpo import ORPOConfig

    from hf_pipe import PipelineConfigError
    from hf_pipe.trl import PipeCPOConfig, PipeCPOTrainer, PipeORPOConfig, PipeORPOTrainer

    settings = dict(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to=[])
    model = tiny_model("t5")
    model.config.output_router_logits = True
    for config, trainer in ((PipeORPOConfig, PipeORPOTrainer), (PipeCPOConfig, PipeCPOTrainer)):
        with pytest.raises(PipelineConfigError) as err:
            trainer(model=model, args=config(**settings, generate_during_eval=True), train_dataset=_triples(4, 0))
        message = str(err.value)
        for problem in ("encoder-decoder", "output_router_logits=True", "generate_during_eval=True"):
            assert problem in message, (problem, message)
    with pytest.raises(TypeError, match="PipeORPOConfig"):
        PipeORPOTrainer(model=tiny_model("llama"), args=ORPOConfig(**settings), train_dataset=_triples(4, 0))
