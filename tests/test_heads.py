"""Every head PipeTrainer trains, against Trainer on one process: decoder sequence classification (pooled at the last
non-padding token: right and left padding, batches without padding, regression and multi-label problem types),
token classification, question answering (answer spans as labels, Trainer's `label_names`) and multiple choice, on a
decoder (Llama) and encoders (BERT; RoBERTa, which has no adapter), module-split and traced, one schedule with two
stages per rank; each equal in logged losses, grad norms, eval loss and metrics, and saved weights."""

from __future__ import annotations

from tests._data import left_padding
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


def test_decoder_sequence_classification(tmp_path):
    """LlamaForSequenceClassification, as reward models and decoder classifiers are trained."""
    cases = [
        _case("llama-cls", [ONE_F_ONE_B, INTERLEAVED, TRACED]),
        _case("llama-cls", [ONE_F_ONE_B, TRACED], collator=left_padding, label="left padding"),
        _case("llama-cls", [ONE_F_ONE_B], data={"min_len": 12, "max_len": 12}, label="no padding"),
        _case(
            "llama-cls",
            [ONE_F_ONE_B, TRACED],
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


def test_token_classification_and_multiple_choice(tmp_path):
    cases = [
        _case("llama-tok", [ONE_F_ONE_B, INTERLEAVED, TRACED]),
        _case("bert-tok", [ONE_F_ONE_B, TRACED]),
        _case("bert-mc", [ONE_F_ONE_B, INTERLEAVED, TRACED], args=SGD),
        _case("roberta-mc", [ONE_F_ONE_B], args=SGD),  # no adapter: traced
    ]
    print(compare_many(cases, tmp_path, 2))


def test_question_answering(tmp_path):
    """Answer spans as the labels (Trainer's label_names), two gradient-accumulation steps of uneven batches."""
    cases = [
        _case("llama-qa", [ONE_F_ONE_B, TRACED], args=SGD),
        _case("bert-qa", [ONE_F_ONE_B, INTERLEAVED, TRACED], args=SGD),
    ]
    print(
        compare_many(
            cases, tmp_path, 2, label_names=["start_positions", "end_positions"], gradient_accumulation_steps=2
        )
    )
