"""TRL's DPO under the pipeline: PipeDPOTrainer on 2 ranks against DPOTrainer on one process, same seed and data —
per-step loss and grad norm, every metric DPOTrainer logs, num_tokens, evaluation and final weights — for the frozen
reference stages read from the policy's checkpoint, every per-pair loss type (with loss weights and the sft mix),
f-divergences, label smoothing, LD-DPO's ld_alpha, WPO weighting, gradient accumulation and LoRA (the reference:
the adapters off); and the refusals."""

from __future__ import annotations

import os

import pytest
import torch

from tests._dist import run_distributed
from tests._models import VOCAB, tiny_model
from tests.test_trainer_errors import _moe
from tests.test_trl import _tokenizer

TOL = 1e-5
#: the metrics that are differences of far larger numbers (a reward: beta × (log-prob − reference log-prob), each
#: summed over a completion; a mean logit: a mean over the vocabulary of O(1) logits) are compared relative to their
#: terms' size (1), not to their own: float32 rounding of the terms is all that differs
DIFFERENCES = ("rewards/chosen", "rewards/rejected", "rewards/margins", "logits/chosen", "logits/rejected")
WEIGHT_TOL = 5e-5
PER_PAIR = ["sigmoid", "hinge", "ipo", "nca_pair", "bco_pair", "sppo_hard", "apo_zero", "apo_down", "discopop"]
CASES = {
    # DPO's default loss, the reference read per stage from the policy's checkpoint
    "sigmoid": {},
    # every per-pair loss type at once, each weighted, with the sft term (a token mean over the batch's chosen tokens)
    "mixed": {
        "loss_type": [*PER_PAIR, "sigmoid_norm", "sft"],
        "loss_weights": [0.5, 0.3, 0.2, 0.4, 0.1, 0.05, 0.6, 0.7, 0.2, 0.3, 1.0],
        "beta": 0.3,
    },
    # label smoothing's losses with an f-divergence, LD-DPO's ld_alpha and WPO weights
    "smoothed": {
        "loss_type": ["exo_pair", "robust"],
        "label_smoothing": 0.1,
        "f_divergence_type": "js_divergence",
        "ld_alpha": 0.5,
        "use_weighting": True,
    },
    # alpha-divergence, over 2 accumulated batches (DPOTrainer divides each batch's loss by the accumulation steps)
    "accumulated": {"f_divergence_type": "alpha_divergence", "gradient_accumulation_steps": 2, "beta": 0.5},
    # LoRA: the reference is the policy's own stages with the adapters off, a forward-only pass before each step
    "lora": {"peft": True, "loss_type": ["sigmoid", "sft"]},
    # a path and a LoRA config: the adapters TRL draws after set_seed and from_pretrained, replayed on every rank
    "lora_path": {"peft": "path", "loss_type": ["sigmoid"]},
    # the reference log-probabilities precomputed once before training (batches of 6 rows, the last of 2: 3 and 1
    # pairs per microbatch), cached as dataset columns that follow their pair into its microbatch
    "precompute": {"precompute_ref_log_probs": True, "precompute_ref_batch_size": 6, "ld_alpha": 0.7},
    # TR-DPO: the reference stages mixed with the policy's every 2 steps
    "sync": {"sync_ref_model": True, "ref_model_sync_steps": 2, "ref_model_mixup_alpha": 0.6},
    # a reference model given built (another model than the policy), cut into stages like the policy
    "given": {"ref_model": "other"},
    # a given reference with the policy's reference log-probabilities precomputed from it
    "given_precompute": {"ref_model": "other", "precompute_ref_log_probs": True},
    # GPT-2, its lm_head tied to wte across the 2 ranks
    "tied": {"model": "gpt2", "loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.5]},
    # 4 stages on 2 ranks, interleaved
    "interleaved": {"schedule": {"pipeline_schedule": "interleaved1f1b", "pipeline_stages_per_rank": 2}},
    # saved at step 2, a second trainer resumed from there (its final weights compared, and against the run's own),
    # then predict: the logits in the collator's order (chosen rows, then rejected), labels the input ids
    "resume_predict": {"resume": True, "predict": True, "loss_type": ["sigmoid", "sft"]},
    # 2 pipelines of 2 ranks (4 ranks), each replica a batch of 4 pairs: one process with batches of 8 (32 pairs, so
    # that no replica's last batch is padded with repeated pairs, as accelerate evens batches out)
    "replicas": {"dp": 2, "pairs": 32},
    # the same, precomputed in batches of 12 rows shared by the replicas (3 batches: one replica repeats one)
    "replicas_precompute": {"dp": 2, "pairs": 32, "precompute_ref_log_probs": True, "precompute_ref_batch_size": 12},
}
GROUPS = {
    "losses": ["sigmoid", "mixed", "smoothed", "accumulated"],
    "references": ["lora", "lora_path", "precompute", "sync", "given", "given_precompute"],
    "layouts": ["tied", "interleaved", "resume_predict"],
    "replicas": ["replicas", "replicas_precompute"],
}
LOGGED = (
    "loss", "grad_norm", "entropy", "logits/chosen", "logits/rejected", "mean_token_accuracy", "rewards/chosen",
    "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected",
)  # fmt: skip


def _err(key: str, a: float, b: float) -> float:
    scale = 1.0 if key.removeprefix("eval_") in DIFFERENCES else 1e-12
    return abs(a - b) / max(abs(b), scale)


def _preferences(n: int, seed: int):
    import datasets

    g = torch.Generator().manual_seed(seed)

    def words(low: int, high: int) -> str:
        length = int(torch.randint(low, high, (1,), generator=g))
        return " ".join(f"w{int(i)}" for i in torch.randint(2, VOCAB, (length,), generator=g))

    # completions end with the EOS word (DPOTrainer appends the EOS text otherwise, glued to the last word)
    rows = [
        {"prompt": words(2, 8), "chosen": " " + words(1, 8) + " [EOS]", "rejected": " " + words(1, 8) + " [EOS]"}
        for _ in range(n)
    ]
    return datasets.Dataset.from_list(rows)


def _run(case: str, output_dir: str, pipeline: bool, root: str) -> dict:
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    from hf_pipe.trl import PipeDPOConfig, PipeDPOTrainer

    options = dict(CASES[case])
    peft = options.pop("peft", False)
    checkpoint = os.path.join(root, options.pop("model", "llama"))
    ref_model = options.pop("ref_model", None)
    schedule = {"pipeline_schedule": "1f1b", "pipeline_microbatches": 4, **options.pop("schedule", {})}
    dp, pairs = options.pop("dp", 1), options.pop("pairs", 20)
    resume, predict = options.pop("resume", False), options.pop("predict", False)
    batch = 4 if pipeline else 4 * dp
    settings = dict(
        output_dir=output_dir, per_device_train_batch_size=batch, per_device_eval_batch_size=batch, learning_rate=2e-3,
        num_train_epochs=1, logging_steps=1, save_strategy="steps" if resume else "no", save_steps=2, report_to=[],
        seed=3, max_length=24,
        disable_tqdm=True, use_cpu=True, bf16=False, **options,
    )  # fmt: skip
    if dp > 1:
        schedule["pipeline_parallel_size"] = 2
    config = PipeDPOConfig(**settings, **schedule) if pipeline else DPOConfig(**settings)
    cls = PipeDPOTrainer if pipeline else DPOTrainer
    make = lambda: cls(  # noqa: E731
        # with PEFT a model built whole on every rank, its adapters drawn by get_peft_model after set_seed
        model=AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32) if peft is True else checkpoint,
        ref_model=AutoModelForCausalLM.from_pretrained(os.path.join(root, ref_model)) if ref_model else None,
        args=config,
        train_dataset=_preferences(pairs, 0),
        eval_dataset=_preferences(8, 5),
        processing_class=_tokenizer(),
        peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]) if peft else None,
    )
    trainer = make()
    trainer.train()
    evaluation = trainer.evaluate()

    def weights_of(trainer):
        model = trainer.engine if pipeline else trainer.model
        return {n: p.detach().clone() for n, p in model.named_parameters()}

    weights, extra = weights_of(trainer), {}
    if resume:
        resumed = make()
        resumed.train(resume_from_checkpoint=os.path.join(output_dir, "checkpoint-2"))
        extra["resume_diff"] = max((w - weights[n]).abs().max().item() for n, w in weights_of(resumed).items())
    if predict:
        output = trainer.predict(trainer.eval_dataset)  # DPOTrainer.predict takes a prepared dataset
        extra["predict"] = (output.predictions, output.label_ids, output.metrics["test_loss"])
    logs = [e for e in trainer.state.log_history if "loss" in e and "eval_loss" not in e]
    columns = sorted(trainer.train_dataset.column_names)  # the precomputed reference columns, where precomputed
    return {"logs": logs, "eval": evaluation, "weights": weights, "columns": columns, **extra}


def _runs(cases: list[str], out: str, pipeline: bool, root: str) -> dict:
    return {case: _run(case, os.path.join(out, case), pipeline, root) for case in cases}


def _checkpoints(root: str) -> None:
    tiny_model("llama", pad_token_id=0, eos_token_id=1).save_pretrained(os.path.join(root, "llama"))
    tiny_model("llama", seed=1, pad_token_id=0, eos_token_id=1).save_pretrained(os.path.join(root, "other"))
    tiny_model("gpt2", pad_token_id=0, eos_token_id=1, tie_word_embeddings=True).save_pretrained(
        os.path.join(root, "gpt2")
    )


def _world(group: str) -> int:
    return 4 if group == "replicas" else 2


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("dpo"))
    _checkpoints(root)
    return root


@pytest.fixture(scope="module")
def references(checkpoints) -> dict:
    """DPOTrainer on one process, every case in one forked process: each group's checks read their cases here."""
    out = os.path.join(checkpoints, "ref")
    return run_distributed(_runs, 1, list(CASES), out, False, checkpoints, launcher_env=True, timeout=900)[0]


@pytest.fixture(scope="module")
def pipelines(checkpoints):
    """PipeDPOTrainer's runs on `world` ranks, made on first use: every 2-rank group's cases in one group of ranks."""
    made: dict[int, list[dict]] = {}

    def on(world: int) -> list[dict]:
        if world not in made:
            cases = [case for group, cases in GROUPS.items() for case in cases if _world(group) == world]
            out = os.path.join(checkpoints, f"pp{world}")
            made[world] = run_distributed(_runs, world, cases, out, True, checkpoints, launcher_env=True, timeout=900)
        return made[world]

    return on


@pytest.mark.timeout(1800)
@pytest.mark.parametrize("group", list(GROUPS))
def test_pipe_dpo_matches_dpo_trainer(references, pipelines, group):
    cases, ref, mine = GROUPS[group], references, pipelines(_world(group))
    for case in cases:
        theirs, errs = ref[case], dict.fromkeys((*LOGGED, "eval", "weights"), 0.0)
        assert len(theirs["logs"]) >= 3, case
        for rank in mine:
            run = rank[case]
            assert [e["step"] for e in run["logs"]] == [e["step"] for e in theirs["logs"]], case
            assert run["columns"] == theirs["columns"], case
            for a, b in zip(run["logs"], theirs["logs"]):
                assert a["num_tokens"] == b["num_tokens"], case
                for key in LOGGED:
                    errs[key] = max(errs[key], _err(key, a[key], b[key]))
            assert set(run["eval"]) == set(theirs["eval"]), case
            assert run["eval"]["eval_num_tokens"] == theirs["eval"]["eval_num_tokens"], case
            for key in (f"eval_{k}" for k in LOGGED if k != "grad_norm"):
                errs["eval"] = max(errs["eval"], _err(key, run["eval"][key], theirs["eval"][key]))
        for rank in mine:
            if "resume_diff" in theirs:  # the resumed run ends where the uninterrupted one does
                errs["resume"] = rank[case]["resume_diff"]
                assert errs["resume"] <= max(2 * theirs["resume_diff"], 1e-7), (case, errs, theirs["resume_diff"])
            if "predict" in theirs:  # every rank holds the predictions
                (logits, labels, loss), (ref_logits, ref_labels, ref_loss) = rank[case]["predict"], theirs["predict"]
                assert logits.shape == ref_logits.shape and (labels == ref_labels).all(), case
                errs["predict"] = max(float(abs(logits - ref_logits).max()), _err("loss", loss, ref_loss))
                assert errs["predict"] < TOL, (case, errs)
        weights = {}
        for rank in mine:  # (replicas hold the same weights)
            weights.update(rank[case]["weights"])
        expected = {n.removeprefix("base_model.model."): w for n, w in theirs["weights"].items()}
        assert weights.keys() == expected.keys(), case
        errs["weights"] = max((weights[n] - expected[n]).abs().max().item() for n in weights)
        print(case, {k: f"{v:.2e}" for k, v in errs.items()})
        assert max(errs[k] for k in (*LOGGED, "eval")) < TOL and errs["weights"] < WEIGHT_TOL, (case, errs)


def test_pipe_dpo_refuses_by_name(tmp_path):
    """What the pipeline cannot train as DPOTrainer does, refused before anything is built, all in one list."""
    from hf_pipe.errors import PipelineConfigError
    from hf_pipe.trl import PipeDPOConfig, PipeDPOTrainer

    checkpoint = str(tmp_path / "llama")
    tiny_model("llama", pad_token_id=0, eos_token_id=1).save_pretrained(checkpoint)
    args = PipeDPOConfig(
        output_dir=str(tmp_path / "out"), use_cpu=True, report_to=[], loss_type=["aot", "sft"], use_weighting=False,
        padding_free=True, activation_offloading=True,
    )  # fmt: skip
    with pytest.raises(PipelineConfigError, match="use_liger_kernel=True"):  # refused by the config already
        PipeDPOConfig(output_dir=str(tmp_path / "o4"), use_cpu=True, report_to=[], use_liger_kernel=True)
    vision = _preferences(4, 0).add_column("image", [None] * 4)
    with pytest.raises(PipelineConfigError) as err:
        PipeDPOTrainer(
            checkpoint, args=args, train_dataset=vision, processing_class=_tokenizer(), compute_metrics=lambda p: {},
        )  # fmt: skip
    message = str(err.value)
    for name in ("loss_type=['aot']", "padding_free=True", "activation_offloading=True", "compute_metrics",
                 "a vision dataset"):  # fmt: skip
        assert name in message, (name, message)
    # a built Mixture-of-Experts model that names no checkpoint, on the traced frontend
    moe = _moe("mixtral")
    moe.config._name_or_path = ""
    args = PipeDPOConfig(output_dir=str(tmp_path / "o3"), use_cpu=True, report_to=[], pipeline_frontend="trace")
    with pytest.raises(PipelineConfigError) as err:
        PipeDPOTrainer(moe, args=args, train_dataset=_preferences(4, 0), processing_class=_tokenizer())
    message = str(err.value)
    for name in ("pipeline_frontend='trace'", "ref_model=None with a model that names no"):
        assert name in message, (name, message)
    with pytest.raises(PipelineConfigError, match="use_weighting=True with loss_type 'sft'"):
        PipeDPOTrainer(
            checkpoint, args=PipeDPOConfig(output_dir=str(tmp_path / "o2"), use_cpu=True, report_to=[],
                                           loss_type=["sigmoid", "sft"], use_weighting=True),
            train_dataset=_preferences(4, 0), processing_class=_tokenizer(),
        )  # fmt: skip
