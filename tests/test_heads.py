"""Every head PipeTrainer trains, against Trainer on one process: decoder sequence classification (pooled at the last
non-padding token: right and left padding, batches without padding, regression and multi-label problem types),
token classification, question answering (answer spans as labels, Trainer's `label_names`) and multiple choice, on a
decoder (Llama) and encoders (BERT; RoBERTa, which has no adapter), module-split and traced, one schedule with two
stages per rank; each equal in logged losses, grad norms, eval loss and metrics, and saved weights. Then the heads of
the other adapters (GPT-2, Qwen2, Mistral, BERT's causal LM), one step against the model in one process."""

from __future__ import annotations

import pytest
import torch

from tests._data import left_padding
from tests._dist import run_distributed
from tests._models import VOCAB, rel_err, tiny_model
from tests.test_trainer_equivalence import compare_many

ONE_F_ONE_B = {"pipeline_schedule": "1f1b", "pipeline_microbatches": 4}
INTERLEAVED = {"pipeline_schedule": "interleaved1f1b", "pipeline_microbatches": 4}
TRACED = {"pipeline_frontend": "trace", **ONE_F_ONE_B}
ROWS = (20, 6)  # 3 steps (the last one short), one evaluation batch
# Multiple choice and question answering take a softmax over choices / positions, which a bias added to all of them
# leaves unchanged: the classifier's bias gradient is zero but for fp32 rounding, whose sign AdamW turns into a step
# of a whole learning rate (Trainer run twice in other microbatches moves it as differently). SGD keeps it at zero.
SGD = {"optim": "sgd", "learning_rate": 0.5}


def _case(name: str, pipelines: list[dict], **setup) -> tuple:
    return name, pipelines, {"rows": ROWS, **setup}


@pytest.mark.rotary_trace  # traced Llama-family heads among the cases
def test_decoder_sequence_classification(tmp_path):
    """LlamaForSequenceClassification, as reward models and decoder classifiers are trained."""
    cases = [
        _case("llama-cls", [ONE_F_ONE_B, INTERLEAVED]),  # traced: with left padding, and the reward model below
        _case("llama-cls", [ONE_F_ONE_B, TRACED], collator=left_padding, label="left padding"),
        _case("llama-cls", [ONE_F_ONE_B], data={"min_len": 12, "max_len": 12}, label="no padding"),
        _case(
            "llama-cls",
            [ONE_F_ONE_B],
            model={"num_labels": 1},
            data={"problem": "regression"},
            label="regression",
        ),
        _case(
            "llama-cls",
            [ONE_F_ONE_B],
            model={"problem_type": "multi_label_classification"},
            data={"problem": "multi_label"},
            label="multi-label",
        ),
        # a class that names no task: its own forward traced, the loss named by pipeline_task (a reward model)
        _case("llama-rm", [{**TRACED, "pipeline_task": "seq_cls"}], data={"problem": "regression"}),
    ]
    print(compare_many(cases, tmp_path, 2))


@pytest.mark.rotary_trace  # traced Llama-family heads among the cases
def test_token_classification_and_multiple_choice(tmp_path):
    cases = [
        _case("llama-tok", [ONE_F_ONE_B, INTERLEAVED, TRACED]),
        _case("bert-tok", [ONE_F_ONE_B]),
        _case("bert-mc", [ONE_F_ONE_B, INTERLEAVED], args=SGD),
        _case("roberta-mc", [ONE_F_ONE_B], args=SGD),  # no adapter: traced
    ]
    print(compare_many(cases, tmp_path, 2))


@pytest.mark.rotary_trace  # traced Llama-family heads among the cases
def test_question_answering(tmp_path):
    """Answer spans as the labels (Trainer's label_names), two gradient-accumulation steps of uneven batches."""
    cases = [
        _case("llama-qa", [ONE_F_ONE_B, TRACED], args=SGD),
        _case("bert-qa", [ONE_F_ONE_B, INTERLEAVED], args=SGD),
    ]
    print(
        compare_many(
            cases, tmp_path, 2, label_names=["start_positions", "end_positions"], gradient_accumulation_steps=2
        )
    )


# The heads of the other adapters, one step each against the model's own forward and loss in one process: GPT-2's
# classifiers (pooled with left padding), Qwen2's question answering (its body under `transformer`), Mistral's
# classifier (sliding windows), BERT's causal LM (BertLMHeadModel).
ENGINE_CASES = {
    "gpt2-cls": "seq_cls",
    "gpt2-tok": "token_cls",
    "gpt2-qa": "question_answering",
    "qwen2-qa": "question_answering",
    "mistral-cls": "seq_cls",
    "bert-lm": "causal_lm",
}


def _batch(task: str, seed: int, rows: int = 8, seq: int = 12) -> dict[str, torch.Tensor]:
    """Left-padded rows of uneven lengths (one without padding) with the task's labels."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(seq // 3, seq + 1, (rows,), generator=g)
    lengths[0] = seq
    mask = (torch.arange(seq)[None] >= seq - lengths[:, None]).long()
    ids = torch.randint(1, VOCAB, (rows, seq), generator=g).masked_fill(mask == 0, 0)
    batch = {"input_ids": ids, "attention_mask": mask}
    if task == "seq_cls":
        batch["labels"] = torch.randint(0, 3, (rows,), generator=g)
    elif task == "token_cls":
        batch["labels"] = torch.randint(0, 3, (rows, seq), generator=g).masked_fill(mask == 0, -100)
    elif task == "question_answering":
        batch["start_positions"], batch["end_positions"] = torch.randint(0, seq + 3, (2, rows), generator=g)
    else:
        batch["labels"] = ids.masked_fill(mask == 0, -100)
    return batch


def _engine_runs(names: list[str]) -> dict[str, tuple]:
    from hf_pipe import PipelineConfigError
    from hf_pipe.engine import PipelineEngine

    out = {}
    for name in names:
        engine = PipelineEngine(tiny_model(name), schedule="1f1b", microbatches=4, device="cpu")
        loss = engine.train_step(_batch(ENGINE_CASES[name], 1)).item()
        engine.reduce_tied_gradients()
        grads = {n: p.grad.clone() for n, p in engine.named_parameters() if p.grad is not None}
        for module in engine.modules:
            module.eval()
        out[name] = (loss, grads, engine.eval_step(_batch(ENGINE_CASES[name], 2))[0].item())
    # a decoder classifier without a pad token: HF refuses a batch of 4 rows, so must a pipeline whose microbatches
    # hold one row each (where HF's forward would take the last token of each)
    for frontend in ("module", "trace"):
        engine = PipelineEngine(tiny_model("llama-cls", pad_token_id=None), microbatches=4, frontend=frontend)
        try:
            engine.train_step(_batch("seq_cls", 1, rows=4))
        except PipelineConfigError as error:
            out[frontend] = str(error)
    return out


@pytest.mark.rotary_trace  # traced Llama-family heads among the cases
def test_every_adapter_head_against_one_process():
    names = list(ENGINE_CASES)
    ranks = run_distributed(_engine_runs, 2, names, timeout=300)
    for rank in ranks:
        for frontend in ("module", "trace"):
            assert "pad_token_id=None in the model config, with batches of 4 rows" in rank.get(frontend, ""), frontend
    for name in names:
        model = tiny_model(name)
        expected = model(**_batch(ENGINE_CASES[name], 1)).loss
        expected.backward()
        with torch.no_grad():
            expected_eval = model.eval()(**_batch(ENGINE_CASES[name], 2)).loss.item()
        ref = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        floor = 1e-3 * max(g.abs().max().item() for g in ref.values())  # gradients zero but for rounding
        seen = set()
        for loss, grads, eval_loss in (rank[name] for rank in ranks):
            assert abs(loss - expected.item()) <= 1e-6 * abs(expected.item()), name
            assert abs(eval_loss - expected_eval) <= 1e-6 * abs(expected_eval), name
            for n, g in grads.items():
                # qa_outputs' bias shifts every position's logit alike: its gradient is zero but for rounding
                zero = n == "qa_outputs.bias" and (g - ref[n]).abs().max() < 1e-6
                assert zero or rel_err(g, ref[n], floor) < 1e-5, (name, n, rel_err(g, ref[n], floor))
            seen |= set(grads)
        assert seen == set(ref) - {"lm_head.weight"} or seen == set(ref), (name, set(ref) - seen)
