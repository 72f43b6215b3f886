"""TRL's SFT under the pipeline: PipeSFTTrainer on 2 ranks against plain SFTTrainer on one process — losses, grad
norms, SFT's entropy / mean_token_accuracy / num_tokens, eval metrics and weights — with and without packing, with
and without a PEFT config, for nll, dft and completion-only losses."""

from __future__ import annotations

import contextlib
import os

import pytest
import torch

from tests._dist import run_distributed
from tests._models import VOCAB, tiny_model
from tests.test_trainer_equivalence import _rel

TOL = 2e-4


def _tokenizer():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[EOS]": 1, **{f"w{i}": i for i in range(2, VOCAB)}}
    tokenizer = Tokenizer(WordLevel(vocab, unk_token="[PAD]"))
    tokenizer.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="[PAD]", eos_token="[EOS]")


def _texts(n: int, seed: int, prompts: bool = False):
    import datasets

    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        words = [
            f"w{int(i)}" for i in torch.randint(2, VOCAB, (int(torch.randint(4, 14, (1,), generator=g)),), generator=g)
        ]
        if prompts:
            cut = len(words) // 2
            rows.append({"prompt": " ".join(words[:cut]), "completion": " " + " ".join(words[cut:])})
        else:
            rows.append({"text": " ".join(words)})
    return datasets.Dataset.from_list(rows)


CASES = {
    "nll": {},
    "packing": {"packing": True},
    "dft-lora": {"loss_type": "dft", "peft": True},
    "packing-lora": {"packing": True, "peft": True},
    "completion-only": {"prompts": True},
    # a model path: PipeSFTTrainer builds the skeleton and reads each rank's stages, SFTTrainer loads it whole; both
    # with model_init_kwargs, which TRL must not call ignored (hf_pipe builds the skeleton with them)
    "path": {"path": True, "model_init_kwargs": {"dtype": "float32"}},
    # a path and a LoRA config: TRL draws the adapters after set_seed and from_pretrained, hf_pipe replays its draws
    "path-lora": {"path": True, "peft": True},
}


def _run(case: str, output_dir: str, pipeline: dict | None, checkpoint: str) -> dict:
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from hf_pipe.trl import PipeSFTConfig, PipeSFTTrainer

    options = dict(CASES[case])
    peft, prompts, path = options.pop("peft", False), options.pop("prompts", False), options.pop("path", False)
    settings = dict(
        output_dir=output_dir, per_device_train_batch_size=8, per_device_eval_batch_size=8, learning_rate=1e-2,
        num_train_epochs=1, logging_steps=1, save_strategy="no", report_to=[], seed=3, max_length=32,
        disable_tqdm=True, use_cpu=True, gradient_checkpointing=False, bf16=False, **options,
    )  # fmt: skip
    config = SFTConfig(**settings) if pipeline is None else PipeSFTConfig(**settings, **pipeline)
    cls = SFTTrainer if pipeline is None else PipeSFTTrainer
    with _trl_warnings(cls) as warned:
        trainer = cls(
            model=checkpoint if path else tiny_model("llama", pad_token_id=0, eos_token_id=1),
            args=config,
            train_dataset=_texts(40, 0, prompts),
            eval_dataset=_texts(12, 5, prompts),
            processing_class=_tokenizer(),
            peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]) if peft else None,
        )
    trainer.train()
    evaluation = trainer.evaluate()
    trainer.save_model(os.path.join(output_dir, "final"))
    weights = {n: p.detach().clone() for n, p in trainer.engine.named_parameters()} if pipeline else None
    if pipeline is None:
        weights = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    logs = [e for e in trainer.state.log_history if "loss" in e and "eval_loss" not in e]
    return {"logs": logs, "eval": evaluation, "weights": weights, "warned": warned}


@contextlib.contextmanager
def _trl_warnings(trainer_cls: type):
    """The warnings TRL's trainer module logs while the trainer is built (rank 0 logs them)."""
    import logging

    module = next(c for c in trainer_cls.__mro__ if c.__module__.startswith("trl.")).__module__
    records: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: records.append(record.getMessage())
    logging.getLogger(module).addHandler(handler)
    try:
        yield records
    finally:
        logging.getLogger(module).removeHandler(handler)


def _runs(cases: list[str], root: str, pipeline: dict | None, checkpoint: str) -> dict:
    return {case: _run(case, os.path.join(root, case), pipeline, checkpoint) for case in cases}


PIPELINE = {"pipeline_schedule": "1f1b", "pipeline_microbatches": 4}
LOGGED = ("loss", "grad_norm", "entropy", "mean_token_accuracy", "num_tokens")


@pytest.mark.timeout(600)
def test_pipe_sft_matches_sft_trainer(tmp_path):
    cases, checkpoint = list(CASES), str(tmp_path / "llama")
    tiny_model("llama", pad_token_id=0, eos_token_id=1).save_pretrained(checkpoint)
    ref = run_distributed(_runs, 1, cases, str(tmp_path / "ref"), None, checkpoint, launcher_env=True, timeout=400)[0]
    mine = run_distributed(_runs, 2, cases, str(tmp_path / "pp"), PIPELINE, checkpoint, launcher_env=True, timeout=500)
    for case in cases:
        theirs, errs = ref[case], dict.fromkeys((*LOGGED, "eval", "weights"), 0.0)
        for rank in mine:
            run = rank[case]
            assert [e["step"] for e in run["logs"]] == [e["step"] for e in theirs["logs"]], case
            for a, b in zip(run["logs"], theirs["logs"]):
                for key in LOGGED:
                    errs[key] = max(errs[key], _rel(a[key], b[key]))
            for key in ("eval_loss", "eval_entropy", "eval_mean_token_accuracy", "eval_num_tokens"):
                errs["eval"] = max(errs["eval"], _rel(run["eval"][key], theirs["eval"][key]))
        weights = {}
        for rank in mine:
            weights.update(rank[case]["weights"])
        prefix = "base_model.model." if CASES[case].get("peft") else ""
        expected = {n.removeprefix(prefix): w for n, w in theirs["weights"].items()}
        assert weights.keys() <= expected.keys() and len(weights) > 0, case
        errs["weights"] = max((weights[n] - expected[n]).abs().max().item() for n in weights)
        print(case, errs)
        assert max(errs[k] for k in (*LOGGED, "eval")) < TOL and errs["weights"] < 5e-4, (case, errs)
        assert not [m for m in mine[0][case]["warned"] if "model_init_kwargs" in m], mine[0][case]["warned"]


# -- reward modelling ------------------------------------------------------------------------------------------------
REWARD_CASES = {
    # gradient accumulation over 2 batches: RewardTrainer's mean over pairs, divided by the accumulation steps
    "pairs": {"gradient_accumulation_steps": 2},
    # 4 stages interleaved on the 2 ranks
    "margin-centered": {"margin": True, "center_rewards_coefficient": 0.1, "schedule": "interleaved1f1b"},
    # a causal LM's checkpoint, as TRL's reward.py takes one: the skeleton built as AutoModelForSequenceClassification,
    # its stages read per rank, the new score head drawn as RewardTrainer's from_pretrained draws it (set_seed first)
    "path": {"path": True, "model_init_kwargs": {"dtype": "float32"}},
    # and with a LoRA config: the score head's draw, then the adapters', as RewardTrainer makes them
    "path-lora": {"path": True, "peft": True},
}
REWARD_LOGGED = ("loss", "grad_norm", "min_reward", "mean_reward", "max_reward", "accuracy", "margin", "num_tokens")


def _preferences(n: int, seed: int, margin: bool):
    import datasets

    g = torch.Generator().manual_seed(seed)

    def text():
        length = int(torch.randint(3, 12, (1,), generator=g))
        return " ".join(f"w{int(i)}" for i in torch.randint(2, VOCAB, (length,), generator=g))

    rows = [{"chosen": text(), "rejected": text()} for _ in range(n)]
    if margin:
        for row in rows:
            row["margin"] = float(torch.rand((), generator=g))
    return datasets.Dataset.from_list(rows)


def _reward_run(case: str, output_dir: str, pipeline: bool, checkpoint: str) -> dict:
    from peft import LoraConfig
    from trl import RewardConfig, RewardTrainer

    from hf_pipe.trl import PipeRewardConfig, PipeRewardTrainer

    options = dict(REWARD_CASES[case])
    margin, path, peft = options.pop("margin", False), options.pop("path", False), options.pop("peft", False)
    schedule = {"pipeline_schedule": options.pop("schedule", "1f1b"), "pipeline_microbatches": 4}
    settings = dict(
        output_dir=output_dir, per_device_train_batch_size=4, per_device_eval_batch_size=8, learning_rate=2e-3,
        num_train_epochs=1, logging_steps=1, save_strategy="no", report_to=[], seed=3, max_length=32,
        disable_tqdm=True, use_cpu=True, bf16=False, **options,
    )  # fmt: skip
    config = PipeRewardConfig(**settings, **schedule) if pipeline else RewardConfig(**settings)
    cls = PipeRewardTrainer if pipeline else RewardTrainer
    with _trl_warnings(cls) as warned:
        trainer = cls(
            model=checkpoint if path else _reward_model(),
            args=config,
            train_dataset=_preferences(36, 0, margin),
            eval_dataset=_preferences(12, 5, margin),
            processing_class=_tokenizer(),
            peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="SEQ_CLS") if peft else None,
        )
    model = trainer.engine if pipeline else trainer.model
    named = {n.removeprefix("base_model.model."): p for n, p in model.named_parameters()}
    head = {n: p.detach().clone() for n, p in named.items() if n.startswith("score.")}
    lora = {n: p.detach().clone() for n, p in named.items() if ".lora_" in n}
    trainer.train()
    evaluation = trainer.evaluate()
    predictions = trainer.predict(trainer.eval_dataset).predictions
    weights = {n.removeprefix("base_model.model."): p.detach().clone() for n, p in model.named_parameters()}
    logs = [e for e in trainer.state.log_history if "loss" in e and "eval_loss" not in e]
    return {
        "logs": logs, "eval": evaluation, "predictions": torch.as_tensor(predictions), "weights": weights,
        "head": head, "lora": lora, "warned": warned,
    }  # fmt: skip


def _reward_model():
    return tiny_model("llama-cls", num_labels=1, pad_token_id=0, eos_token_id=1)


def _reward_runs(cases: list[str], root: str, pipeline: bool, checkpoint: str) -> dict:
    return {case: _reward_run(case, os.path.join(root, case), pipeline, checkpoint) for case in cases}


@pytest.mark.timeout(600)
def test_pipe_reward_trainer_matches_reward_trainer(tmp_path):
    """Losses, grad norms, RewardTrainer's reward / accuracy / margin metrics and num_tokens, eval metrics, predicted
    rewards (in the collator's order) and weights, on 2 ranks against RewardTrainer on one process."""
    cases, checkpoint = list(REWARD_CASES), str(tmp_path / "causal-lm")
    tiny_model("llama", pad_token_id=0, eos_token_id=1).save_pretrained(checkpoint)
    ref = run_distributed(_reward_runs, 1, cases, str(tmp_path / "ref"), False, checkpoint, launcher_env=True)[0]
    mine = run_distributed(_reward_runs, 2, cases, str(tmp_path / "pp"), True, checkpoint, launcher_env=True)
    for case in cases:
        theirs, errs = ref[case], dict.fromkeys((*REWARD_LOGGED, "eval", "predictions", "weights"), 0.0)
        for rank in mine:
            run = rank[case]
            assert [e["step"] for e in run["logs"]] == [e["step"] for e in theirs["logs"]], case
            for a, b in zip(run["logs"], theirs["logs"]):
                for key in REWARD_LOGGED:
                    errs[key] = max(errs[key], _rel(a[key], b[key]))
            for key in ("eval_loss", *(f"eval_{k}" for k in REWARD_LOGGED[2:])):
                errs["eval"] = max(errs["eval"], _rel(run["eval"][key], theirs["eval"][key]))
            assert run["predictions"].shape == theirs["predictions"].shape, case
            errs["predictions"] = max(errs["predictions"], (run["predictions"] - theirs["predictions"]).abs().max())
        weights, head, lora = {}, {}, {}
        for rank in mine:
            weights.update(rank[case]["weights"])
            head.update(rank[case]["head"])
            lora.update(rank[case]["lora"])
        assert weights.keys() == theirs["weights"].keys(), case
        # the score head at the start: RewardTrainer's very draw (a new head with a path), bit for bit; with LoRA
        # (PEFT's copy of the head to train beside the original) the adapters TRL draws after it too
        assert head.keys() == theirs["head"].keys() and head, case
        assert all(torch.equal(head[n], theirs["head"][n]) for n in head), case
        assert lora.keys() == theirs["lora"].keys() and bool(lora) == ("lora" in case), case
        assert all(torch.equal(lora[n], theirs["lora"][n]) for n in lora), case
        assert not [m for m in mine[0][case]["warned"] if "model_init_kwargs" in m], mine[0][case]["warned"]
        errs["weights"] = max((weights[n] - theirs["weights"][n]).abs().max().item() for n in weights)
        print(case, errs)
        assert max(errs[k] for k in (*REWARD_LOGGED, "eval")) < TOL, (case, errs)
        assert errs["predictions"] < 1e-4 and errs["weights"] < 5e-4, (case, errs)
