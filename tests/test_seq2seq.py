"""Encoder-decoders (T5, BART and their kin) under the pipeline, against one process: stages holding encoder blocks,
decoder blocks or both, the encoder's output carried to every decoder stage and its gradient summed back, T5's
position biases per stack, the shared embedding tied across encoder, decoder and head, both sides dynamically padded.

Each group of ranks is spawned once and runs every family and schedule of its test (start-up dominates on 2 cores);
the Trainer references (one process) are shared by the 2- and 4-rank tests."""

from __future__ import annotations

import os

import pytest

from tests._dist import run_distributed
from tests.test_engine_equivalence import _pipeline_worker, check_engine_runs
from tests.test_trainer_equivalence import _pipeline_runs, check_runs, run_trainer

TRAINED = ("t5", "bart")  # 4 encoder + 4 decoder blocks each (tests/_models.py)
TWO_RANKS = [
    {"pipeline_schedule": "gpipe", "pipeline_microbatches": 4},  # the auto split
    {"pipeline_schedule": "1f1b", "pipeline_microbatches": 4, "pipeline_split": [0, 3]},  # cuts inside the encoder
    {"pipeline_schedule": "zbvzerobubble", "pipeline_microbatches": 4, "pipeline_split": [0, 2, 5, 7]},
]
FOUR_RANKS = [
    {"pipeline_schedule": "1f1b", "pipeline_microbatches": 4, "pipeline_split": [0, 2, 5, 6]},  # inside both stacks
    {"pipeline_schedule": "interleaved1f1b", "pipeline_microbatches": 4},  # 8 stages of one block
]


def _exact_tokens(pred):
    """Share of the target tokens the generated sequences (after the decoder start) get right."""
    tokens, labels = pred
    tokens = tokens[:, 1 : labels.shape[1] + 1]
    known = (labels[:, : tokens.shape[1]] != -100) & (labels[:, : tokens.shape[1]] != 0)
    return {"token_match": float((tokens == labels[:, : tokens.shape[1]])[known].mean())}


def _generation_run(root: str, pipeline: dict | None) -> dict:
    """Seq2SeqTrainer (pipeline None) or PipeSeq2SeqTrainer with predict_with_generate: evaluate and predict."""
    from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments

    from hf_pipe import PipeSeq2SeqTrainer, PipeSeq2SeqTrainingArguments
    from tests._data import PadCollator, seq2seq_dataset
    from tests._models import tiny_model
    from tests.test_trainer_equivalence import _common_args

    args = _common_args(root, num_train_epochs=2, predict_with_generate=True, generation_max_length=10)
    if pipeline is None:
        cls, args = Seq2SeqTrainer, Seq2SeqTrainingArguments(**args)
    else:
        cls, args = PipeSeq2SeqTrainer, PipeSeq2SeqTrainingArguments(**args, **pipeline)
    trainer = cls(
        model=tiny_model("t5"),
        args=args,
        train_dataset=seq2seq_dataset(45),
        eval_dataset=seq2seq_dataset(13, seed=5),
        data_collator=PadCollator("seq2seq_lm"),
        compute_metrics=_exact_tokens,
    )
    trainer.train()
    evaluation = trainer.evaluate()
    prediction = trainer.predict(seq2seq_dataset(13, seed=5), max_new_tokens=6, num_beams=2)
    return {"eval": evaluation, "tokens": prediction.predictions, "labels": prediction.label_ids}


GENERATE = {"pipeline_schedule": "1f1b", "pipeline_microbatches": 4}


def _references(names: tuple[str, ...], root: str) -> dict[str, dict]:
    out = {name: run_trainer(name, os.path.join(root, name, "ref"), None, {}) for name in names}
    out["generate"] = _generation_run(os.path.join(root, "generate"), None)
    return out


def _pipelines(names: tuple[str, ...], root: str, pipelines: list[dict]) -> dict[str, list[dict]]:
    out = {name: _pipeline_runs(name, os.path.join(root, name), pipelines, {}, None) for name in names}
    if len(pipelines) == len(TWO_RANKS):  # once, in the 2-rank group
        out["generate"] = _generation_run(os.path.join(root, "generate"), GENERATE)
    return out


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    root = tmp_path_factory.mktemp("seq2seq-ref")
    [refs] = run_distributed(_references, 1, TRAINED, str(root), timeout=300, launcher_env=True)
    return root, refs


def _against_trainer(references, tmp_path, world: int, pipelines: list[dict]) -> tuple[dict, list]:
    ref_root, refs = references
    per_rank = run_distributed(_pipelines, world, TRAINED, str(tmp_path), pipelines, timeout=500, launcher_env=True)
    worst = {}
    for name in TRAINED:
        os.symlink(ref_root / name / "ref", tmp_path / name / "ref")
        runs = [rank[name] for rank in per_rank]
        worst.update(check_runs(name, tmp_path / name, world, pipelines, refs[name], runs))
    return worst, per_rank


def test_pipetrainer_matches_trainer_on_two_ranks(references, tmp_path):
    """T5 and BART: losses, grad norms, eval loss and token accuracy (compute_metrics on the logits and encoder
    output Trainer predicts), saved weights loaded with AutoModelForSeq2SeqLM. And PipeSeq2SeqTrainer with
    predict_with_generate against Seq2SeqTrainer: the same generated tokens (greedy in evaluate, beam search in
    predict), metrics on them and eval loss."""
    worst, per_rank = _against_trainer(references, tmp_path, 2, TWO_RANKS)
    ref = references[1]["generate"]
    for rank in per_rank:
        mine = rank["generate"]
        assert (mine["tokens"] == ref["tokens"]).all() and (mine["labels"] == ref["labels"]).all()
        assert mine["eval"]["eval_token_match"] == ref["eval"]["eval_token_match"]
        assert abs(mine["eval"]["eval_loss"] - ref["eval"]["eval_loss"]) < 2e-4 * ref["eval"]["eval_loss"]
    worst["t5 generate 1f1b x2"] = {"eval_loss": abs(mine["eval"]["eval_loss"] / ref["eval"]["eval_loss"] - 1)}
    print(worst, ref["eval"], ref["tokens"][:2])


def test_pipetrainer_matches_trainer_on_four_ranks(references, tmp_path):
    print(_against_trainer(references, tmp_path, 4, FOUR_RANKS)[0])


# (name, cases): every other piece the adapters serve, each against one process on 2 ranks, two sequence lengths
# on each side in a row
ENGINE_CASES = {
    "t5-v1_1": [("1f1b", 1, [0, 5]), ("interleavedzerobubble", 2, [0, 3, 4, 6])],  # untied head, gated-gelu
    "mt5": [("loopedbfs", 2, [0, 2, 4, 7])],
    "bart-untied": [("1f1b", 1, [0, 4]), ("dualpipev", 2, [0, 1, 4, 7])],
    "mbart": [("interleaved1f1b", 2, [0, 3, 4, 6])],
    "plbart": [("zbvzerobubble", 2, [0, 3, 5, 7])],
}


def _engine_runs() -> dict[str, list[dict]]:
    return {name: _pipeline_worker(name, cases, 0, 4, "seq2seq") for name, cases in ENGINE_CASES.items()}


def test_engine_every_family_and_schedule_kind():
    ranks = run_distributed(_engine_runs, 2, timeout=400)
    for name, cases in ENGINE_CASES.items():
        print(check_engine_runs(name, 2, cases, [rank[name] for rank in ranks], 0, "seq2seq"))
