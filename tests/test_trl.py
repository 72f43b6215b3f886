"""TRL's SFT under the pipeline: PipeSFTTrainer on 2 ranks against plain SFTTrainer on one process — losses, grad
norms, SFT's entropy / mean_token_accuracy / num_tokens, eval metrics and weights — with and without packing, with
and without a PEFT config, for nll, dft and completion-only losses."""

from __future__ import annotations

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
    # a model path: PipeSFTTrainer builds the skeleton and reads each rank's stages, SFTTrainer loads it whole
    "path": {"path": True},
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
    return {"logs": logs, "eval": evaluation, "weights": weights}


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
            for key in ("eval_loss", "eval_entropy", "eval_mean_token_accuracy"):
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
