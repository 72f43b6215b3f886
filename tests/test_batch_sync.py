"""Every rank of a pipeline trains and evaluates on the same batch, whatever the collator draws; a batch key no stage
consumes is one clear error on every rank before any gradient is applied."""

from __future__ import annotations

import torch

from tests._data import PadCollator, lm_dataset
from tests._dist import run_distributed
from tests._models import VOCAB, tiny_model


def _tokenizer():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[MASK]": 1, **{f"t{i}": i for i in range(2, VOCAB)}}
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="[PAD]")), pad_token="[PAD]", mask_token="[MASK]"
    )


def _masked_accuracy(pred):
    logits, labels = pred
    keep = labels != -100
    return {"accuracy": float((logits.argmax(-1) == labels)[keep].mean())}


def _train_with_random_masks(output_dir: str) -> dict:
    """BERT MLM with its dropout on and transformers' random-masking collator, on 2 ranks: what each rank saw."""
    from transformers import DataCollatorForLanguageModeling

    from hf_pipe import PipeTrainer, PipeTrainingArguments

    seen = []

    class Recording(PipeTrainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            seen.append((int((inputs["labels"] != -100).sum()), int(inputs["labels"].clamp(min=0).sum())))
            return super().training_step(model, inputs, num_items_in_batch)

    model = tiny_model("bert-mlm", hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    args = PipeTrainingArguments(
        output_dir=output_dir, per_device_train_batch_size=8, per_device_eval_batch_size=8, max_steps=8,
        logging_steps=1, report_to=[], use_cpu=True, seed=3, learning_rate=1e-2, pipeline_microbatches=4, disable_tqdm=True,
        save_strategy="no",
    )  # fmt: skip
    trainer = Recording(
        model=model,
        args=args,
        train_dataset=lm_dataset(64, seed=0),
        eval_dataset=lm_dataset(64, seed=0),
        data_collator=DataCollatorForLanguageModeling(_tokenizer(), mlm_probability=0.3),
        compute_metrics=_masked_accuracy,
    )
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    return {"seen": seen, "eval": trainer.evaluate(), "losses": losses}


def test_random_collator_gives_one_batch_per_pipeline(tmp_path):
    ranks = run_distributed(_train_with_random_masks, 2, str(tmp_path), launcher_env=True, timeout=200)
    assert ranks[0]["seen"] == ranks[1]["seen"]  # the same masked tokens on the rank that embeds and that scores
    assert len(set(ranks[0]["seen"])) > 4  # and the masks really are drawn anew each step
    assert ranks[0]["eval"]["eval_accuracy"] == ranks[1]["eval"]["eval_accuracy"] > 0
    assert ranks[0]["eval"]["eval_loss"] == ranks[1]["eval"]["eval_loss"]
    assert ranks[0]["losses"] == ranks[1]["losses"]


class ExtraKey(PadCollator):
    """The padding collator, plus one more key in every batch."""

    def __init__(self, key: str, value):
        super().__init__("causal_lm")
        self.key, self.value = key, value

    def __call__(self, features):
        batch = super().__call__(features)
        batch[self.key] = self.value(batch["input_ids"])
        return batch


def _embeds(ids):
    return torch.zeros(*ids.shape, 64)


def _zeros(ids):
    return torch.zeros_like(ids)


def _images(ids):
    return torch.zeros(ids.shape[0], 3, 8, 8)


def _key_errors(cases: list[tuple]) -> list[tuple[str, bool]]:
    """Each case (model name, pipeline frontend, key, value function): the error training raises, and whether every
    weight is still as it was built."""
    from hf_pipe import PipelineConfigError, PipeTrainer, PipeTrainingArguments

    out = []
    for name, frontend, key, value in cases:
        model = tiny_model(name)
        initial = {n: p.detach().clone() for n, p in model.named_parameters()}
        args = PipeTrainingArguments(
            output_dir="/tmp/hf_pipe-unused", per_device_train_batch_size=8, max_steps=2, report_to=[],
            use_cpu=True, pipeline_frontend=frontend, pipeline_microbatches=4, disable_tqdm=True,
        )  # fmt: skip
        trainer = PipeTrainer(model=model, args=args, train_dataset=lm_dataset(16), data_collator=ExtraKey(key, value))
        kept = dict(trainer.engine.named_parameters())
        try:
            trainer.train()
            message = ""
        except PipelineConfigError as err:
            message = str(err)
        out.append((message, all(torch.equal(p, initial[n]) for n, p in kept.items())))
    return out


KEY_CASES = [
    ("llama", "module", "inputs_embeds", _embeds, "batch key 'inputs_embeds' is not consumed by the pipeline"),
    (
        "llama",
        "module",
        "token_type_ids",
        _zeros,
        "batch key 'token_type_ids' is not consumed by the pipeline (the llama",
    ),
    ("llama", "module", "pixel_values", _images, "batch key 'pixel_values' is not consumed"),
    ("gpt2", "module", "decoder_input_ids", _zeros, "batch key 'decoder_input_ids' is not consumed"),
    ("gpt_neox", "trace", "token_type_ids", _zeros, "traced stages feed only the named inputs of GPTNeoXForCausalLM"),
]


def test_unconsumed_batch_keys_fail_before_any_gradient():
    cases = [case[:4] for case in KEY_CASES]
    ranks = run_distributed(_key_errors, 2, cases, launcher_env=True, timeout=200)
    for rank in ranks:
        for (*_, expected), (message, untouched) in zip(KEY_CASES, rank):
            assert expected in message and "remove it from the collator's output" in message, message
            assert untouched
    assert [m for m, _ in ranks[0]] == [m for m, _ in ranks[1]]
