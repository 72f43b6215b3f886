"""TRL's GRPO under the pipeline: PipeGRPOTrainer on 2 ranks against GRPOTrainer on one process, same seed and data —
the same sampled completions (seeded generation through the pipeline), per-step loss and grad norm, every metric
GRPOTrainer logs (rewards per function, completion lengths, clip ratios, entropy, KL), evaluation, final weights —
for DAPO (the default loss) without a reference, GRPO with the reference stages read from the checkpoint, synced with
the policy, and num_iterations 2 (old-policy log-probabilities by a forward-only pass), BNPO over 2 accumulated steps
per generation with a reward model beside the rule, Dr. GRPO with sequence-level importance weights, delta, the
off-policy mask and an entropy bonus, LoRA with the adapters off as the reference, and SAPO on 4 interleaved stages;
and the refusals."""

from __future__ import annotations

import math
import os

import pytest
import torch

from tests._dist import run_distributed
from tests._models import VOCAB, tiny_model
from tests.test_trl import _tokenizer

TOL = 1e-5
WEIGHT_TOL = 5e-5
#: values that are differences of far larger terms, compared relative to a floor: the loss (and the entropy bonus's
#: policy part) of an on-policy step is 0 by construction (ratios of 1, advantages of zero mean per group) up to
#: float32 rounding of O(1) terms (~1e-8), so it is compared relative to 1e-2 (relative wherever it is larger); KL
#: and clip fractions (0 on the first step) relative to 1
FLOORS = {"loss": 1e-2, "policy_loss": 1e-2, "kl": 1.0, "clip_ratio/": 1.0}
#: logged per step but not a number of the training (wall time)
UNTIMED = (
    "step_time",
    "train_runtime",
    "train_samples_per_second",
    "train_steps_per_second",
    "runtime",
    "samples_per_second",
    "steps_per_second",
)
CASES = {
    # DAPO, GRPO's default loss, no reference (beta 0), one iteration per generation; then evaluate (generation
    # and loss in evaluation mode)
    "dapo": {"evaluate": True},
    # the reference's stages read from the checkpoint (beta > 0), two iterations per generation: old log-probs from a
    # forward-only pass of the policy, reference log-probs from one through the frozen stages, mixed with the
    # policy's every 2 steps (TR-DPO's sync, stage by stage)
    "reference": {
        "beta": 0.1,
        "loss_type": "grpo",
        "num_iterations": 2,
        "sync_ref_model": True,
        "ref_model_sync_steps": 2,
        "ref_model_mixup_alpha": 0.6,
    },
    # BNPO, 2 accumulation steps sharing one generation batch, top-k / top-p sampling, and a reward model (a small
    # sequence classifier, whole on every rank, as TRL loads it) beside the rule, weighted
    "accumulated": {
        "loss_type": "bnpo",
        "gradient_accumulation_steps": 2,
        "top_k": 30,
        "top_p": 0.9,
        "reward_model": True,
        "reward_weights": [1.0, 0.5],
    },
    # Dr. GRPO with sequence-level importance weights, delta, the off-policy mask and a static entropy bonus
    "dr_grpo": {
        "loss_type": "dr_grpo",
        "importance_sampling_level": "sequence",
        "delta": 1.5,
        "num_iterations": 2,
        "off_policy_mask_threshold": 0.5,
        "entropy_coef": 0.01,
    },
    # LoRA: the reference is the policy's stages with the adapters off
    "lora": {"peft": True, "beta": 0.2},
    # 4 stages on 2 ranks, interleaved: generation, the reference's and the training passes through all four
    "interleaved": {
        "beta": 0.05,
        "loss_type": "sapo",
        "schedule": {"pipeline_schedule": "interleaved1f1b", "pipeline_stages_per_rank": 2},
    },
}
STEPS = 3


def _prompts(n: int, seed: int):
    import datasets

    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        length = int(torch.randint(2, 6, (1,), generator=g))
        rows.append({"prompt": " ".join(f"w{int(i)}" for i in torch.randint(2, VOCAB, (length,), generator=g))})
    return datasets.Dataset.from_list(rows)


def even_words(completions: list[str], **kwargs) -> list[float]:
    """A rule-based reward: the share of a completion's words with an even number (0 for an empty completion)."""
    out = []
    for text in completions:
        words = [w for w in text.split() if w[1:].isdigit()]
        out.append(sum(int(w[1:]) % 2 == 0 for w in words) / len(words) if words else 0.0)
    return out


def _run(case: str, output_dir: str, pipeline: bool, root: str) -> dict:
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM
    from trl import GRPOConfig, GRPOTrainer

    from hf_pipe.trl import PipeGRPOConfig, PipeGRPOTrainer

    options = dict(CASES[case])
    peft, evaluate = options.pop("peft", False), options.pop("evaluate", False)
    reward_model = options.pop("reward_model", False)
    schedule = {"pipeline_schedule": "1f1b", "pipeline_microbatches": 4, **options.pop("schedule", {})}
    checkpoint = os.path.join(root, "llama")
    settings = dict(
        output_dir=output_dir, per_device_train_batch_size=8, per_device_eval_batch_size=8, num_generations=4,
        max_completion_length=8, learning_rate=5e-3, max_steps=STEPS, logging_steps=1, save_strategy="no",
        report_to=[], seed=3,
        disable_tqdm=True, use_cpu=True, bf16=False, **options,
    )  # fmt: skip
    config = PipeGRPOConfig(**settings, **schedule) if pipeline else GRPOConfig(**settings)
    cls = PipeGRPOTrainer if pipeline else GRPOTrainer
    trainer = cls(
        model=AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32) if peft else checkpoint,
        reward_funcs=[even_words, os.path.join(root, "reward")] if reward_model else even_words,
        args=config,
        train_dataset=_prompts(24, 0),
        eval_dataset=_prompts(4, 5) if evaluate else None,
        processing_class=_tokenizer(),
        peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]) if peft else None,
    )
    trainer.train()
    evaluation = trainer.evaluate() if evaluate else {}
    model = trainer.engine if pipeline else trainer.model
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    logs = [e for e in trainer.state.log_history if "loss" in e]
    return {"logs": logs, "weights": weights, "eval": evaluation}


def _reward_model(path: str) -> None:
    """A tiny Llama sequence classifier (one score) with the word-level tokenizer, as a reward model checkpoint."""
    from transformers import LlamaForSequenceClassification

    from tests._models import CASES as MODELS

    config_cls, _, kwargs = MODELS["llama"]
    torch.manual_seed(5)
    LlamaForSequenceClassification(
        config_cls(vocab_size=VOCAB, num_labels=1, pad_token_id=0, **kwargs)
    ).save_pretrained(path)
    _tokenizer().save_pretrained(path)


def _runs(cases: list[str], out: str, pipeline: bool, root: str) -> dict:
    return {case: _run(case, os.path.join(out, case), pipeline, root) for case in cases}


def _err(key: str, a: float | None, b: float | None) -> float:
    if a is None or b is None or (isinstance(b, float) and math.isnan(b)):
        return 0.0 if a is b or (a is not None and math.isnan(a)) else math.inf
    scale = next((floor for prefix, floor in FLOORS.items() if key.startswith(prefix)), 1e-12)
    return abs(a - b) / max(abs(b), scale)


@pytest.mark.timeout(600)
def test_pipe_grpo_matches_grpo_trainer(tmp_path):
    cases, root = list(CASES), str(tmp_path)
    tiny_model("llama", pad_token_id=0, eos_token_id=1).save_pretrained(os.path.join(root, "llama"))
    _reward_model(os.path.join(root, "reward"))
    ref = run_distributed(_runs, 1, cases, str(tmp_path / "ref"), False, root, launcher_env=True, fork=True,
                          timeout=400)[0]  # fmt: skip
    mine = run_distributed(_runs, 2, cases, str(tmp_path / "pp"), True, root, launcher_env=True, fork=True,
                           timeout=500)  # fmt: skip
    for case in cases:
        theirs, errs = ref[case], {}
        assert len(theirs["logs"]) == STEPS, case
        for rank in mine:
            run = rank[case]
            assert [e["step"] for e in run["logs"]] == [e["step"] for e in theirs["logs"]], case
            for a, b in zip(run["logs"], theirs["logs"]):
                assert set(a) == set(b), (case, set(a) ^ set(b))
                for key in b:
                    if key not in UNTIMED:
                        errs[key] = max(errs.get(key, 0.0), _err(key, a[key], b[key]))
            assert set(run["eval"]) == set(theirs["eval"]), (case, set(run["eval"]) ^ set(theirs["eval"]))
            for key, value in theirs["eval"].items():
                if key.removeprefix("eval_") not in UNTIMED:
                    errs["eval"] = max(errs.get("eval", 0.0), _err(key.removeprefix("eval_"), run["eval"][key], value))
        weights = {}
        for rank in mine:
            weights.update(rank[case]["weights"])
        expected = {n.removeprefix("base_model.model."): w for n, w in theirs["weights"].items()}
        assert weights.keys() == expected.keys(), case
        errs["weights"] = max((weights[n] - expected[n]).abs().max().item() for n in weights)
        worst = max(errs, key=lambda k: errs[k] if k != "weights" else 0.0)
        print(case, f"loss {errs['loss']:.1e} grad_norm {errs['grad_norm']:.1e} worst metric {worst} "
              f"{errs[worst]:.1e} weights {errs['weights']:.1e}")  # fmt: skip
        assert max(v for k, v in errs.items() if k != "weights") < TOL and errs["weights"] < WEIGHT_TOL, (case, errs)
        assert theirs["logs"][-1]["loss"] != theirs["logs"][0]["loss"], case  # it trained


def test_pipe_grpo_refuses_by_name(tmp_path):
    """What the pipeline cannot run as GRPOTrainer does, refused before anything is built, all in one list."""
    from hf_pipe.errors import PipelineConfigError
    from hf_pipe.trl import PipeGRPOConfig, PipeGRPOTrainer

    checkpoint = str(tmp_path / "llama")
    tiny_model("llama", pad_token_id=0, eos_token_id=1).save_pretrained(checkpoint)
    args = PipeGRPOConfig(
        output_dir=str(tmp_path / "out"), use_cpu=True, report_to=[], per_device_train_batch_size=8,
        num_generations=4, use_vllm=True, top_entropy_quantile=0.2, use_adaptive_entropy=True,
        cast_lm_head_to_fp32=True,
    )  # fmt: skip
    with pytest.raises(PipelineConfigError) as err:
        PipeGRPOTrainer(
            checkpoint, reward_funcs=even_words, args=args, train_dataset=_prompts(4, 0),
            processing_class=_tokenizer(), rollout_func=lambda prompts, trainer: {},
        )  # fmt: skip
    message = str(err.value)
    for name in ("use_vllm=True", "top_entropy_quantile=0.2", "use_adaptive_entropy=True",
                 "cast_lm_head_to_fp32=True", "rollout_func"):  # fmt: skip
        assert name in message, (name, message)
