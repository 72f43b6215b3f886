"""Encoder-decoders (T5, BART and their kin) under the pipeline, against one process: stages holding encoder blocks,
decoder blocks or both, the encoder's output carried to every decoder stage and its gradient summed back, T5's
position biases per stack, the shared embedding tied across encoder, decoder and head, both sides dynamically padded.

Each group of ranks is spawned once and runs every family and schedule of its test (start-up dominates on 2 cores);
the Trainer references (one process) are shared by the 2- and 4-rank tests."""

from __future__ import annotations

import os

import pytest
import torch

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


def _generated_tokens(pred):
    """A causal LM's metric on what it generated: the mean token id, and how many rows end in EOS."""
    tokens, _ = pred
    return {
        "mean_token": float(tokens.astype("float64").mean()),
        "eos_rows": float((tokens == CAUSAL_EOS).any(1).sum()),
    }


#: an EOS token the tiny Llama generates early in some rows
CAUSAL_EOS = 78


def _causal_generation_run(root: str, pipeline: dict | None) -> dict:
    """Seq2SeqTrainer with a causal LM (it generates from the batch's input_ids, right-padded here as the collator
    pads them) or PipeSeq2SeqTrainer: evaluate greedy, predict with beams."""
    from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments

    from hf_pipe import PipeSeq2SeqTrainer, PipeSeq2SeqTrainingArguments
    from tests._data import PadCollator, lm_dataset
    from tests._models import tiny_model
    from tests.test_trainer_equivalence import _common_args

    model = tiny_model("llama").eval()
    model.config.pad_token_id = model.generation_config.pad_token_id = 0  # Seq2SeqTrainer pads the tokens with it
    model.generation_config.eos_token_id = CAUSAL_EOS
    args = _common_args(root, predict_with_generate=True, generation_num_beams=2)
    if pipeline is None:
        cls, args = Seq2SeqTrainer, Seq2SeqTrainingArguments(**args)
    else:
        cls, args = PipeSeq2SeqTrainer, PipeSeq2SeqTrainingArguments(**args, **pipeline)
    data = lm_dataset(13, seed=5, max_len=12)
    trainer = cls(model=model, args=args, eval_dataset=data, data_collator=PadCollator("causal_lm"),
                  compute_metrics=_generated_tokens)  # fmt: skip
    evaluation = trainer.evaluate(max_new_tokens=6, num_beams=1)  # the gen_kwargs of the call: greedy
    prediction = trainer.predict(data, max_new_tokens=4)  # generation_num_beams=2: beam search
    return {"eval": evaluation, "tokens": prediction.predictions, "labels": prediction.label_ids,
            "metrics": prediction.metrics}  # fmt: skip


def _generation_memory() -> dict:
    """Anonymous memory a generating evaluation adds to each rank (peak RssAnon, sampled every 2 ms), for a T5 of
    120 MiB. Large blocks are given back to the system when freed (a fixed mmap threshold), so that memory freed
    before (the weights of other ranks' stages) cannot hide what the evaluation takes."""
    import ctypes
    import threading
    import time

    from hf_pipe import PipeSeq2SeqTrainer, PipeSeq2SeqTrainingArguments
    from tests._data import PadCollator, seq2seq_dataset
    from tests._models import tiny_model
    from tests.test_big_models import _rss_anon
    from tests.test_trainer_equivalence import _common_args

    ctypes.CDLL("libc.so.6").mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
    model = tiny_model("t5", d_model=512, d_kv=64, d_ff=2048, num_heads=8, vocab_size=4096).eval()
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    args = _common_args("/tmp/hf_pipe-unused", predict_with_generate=True, generation_max_length=8,
                        per_device_eval_batch_size=4)  # fmt: skip
    trainer = PipeSeq2SeqTrainer(
        model=model,
        args=PipeSeq2SeqTrainingArguments(**args, pipeline_microbatches=2),
        eval_dataset=seq2seq_dataset(8, seed=5),
        data_collator=PadCollator("seq2seq_lm"),
        compute_metrics=_exact_tokens,
    )
    baseline, peak, done = _rss_anon(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss_anon())
            time.sleep(0.002)

    sampler = threading.Thread(target=sample)
    sampler.start()
    metrics = trainer.evaluate()
    done.set()
    sampler.join()
    return {"model": model_bytes, "growth": max(peak[0], _rss_anon()) - baseline, "metrics": metrics}


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
    # sources alone (no labels, no decoder inputs): generated all the same, no loss, label_ids None
    from tests.test_predict import AnyCollator

    trainer.data_collator = AnyCollator()  # PadCollator's padding, for batches without labels
    unlabelled = trainer.predict(seq2seq_dataset(13, seed=5).remove_columns(["labels"]), max_new_tokens=6)
    return {
        "eval": evaluation,
        "tokens": prediction.predictions,
        "labels": prediction.label_ids,
        "unlabelled": (unlabelled.predictions, unlabelled.label_ids, sorted(unlabelled.metrics)),
    }


GENERATE = {"pipeline_schedule": "1f1b", "pipeline_microbatches": 4}


# (name, cases): every other piece the adapters serve, on the engine against one process (two batches of other
# source and target lengths in a row)
ENGINE_CASES = {
    "t5-v1_1": [("1f1b", 1, [0, 5]), ("interleavedzerobubble", 2, [0, 3, 4, 6])],  # untied head, gated-gelu
    "mt5": [("loopedbfs", 2, [0, 2, 4, 7])],
    "bart-untied": [("1f1b", 1, [0, 4]), ("dualpipev", 2, [0, 1, 4, 7])],
    "mbart": [("interleaved1f1b", 2, [0, 3, 4, 6])],  # decoder inputs and mask given by the batch
    "plbart": [("zbvzerobubble", 2, [0, 3, 5, 7])],
}


def _references(names: tuple[str, ...], root: str) -> dict[str, dict]:
    out = {name: run_trainer(name, os.path.join(root, name, "ref"), None, {}) for name in names}
    out["generate"] = _generation_run(os.path.join(root, "generate"), None)
    out["generate-causal"] = _causal_generation_run(os.path.join(root, "generate-causal"), None)
    return out


def _pipelines(names: tuple[str, ...], root: str, pipelines: list[dict]) -> dict[str, list[dict]]:
    return {name: _pipeline_runs(name, os.path.join(root, name), pipelines, {}, None) for name in names}


def _two_rank_runs(root: str) -> dict:
    """Everything the 2-rank tests check, in one group of ranks: PipeTrainer, PipeSeq2SeqTrainer, the engine."""
    from hf_pipe.engine import PipelineEngine
    from tests._models import padded_batch, tiny_model

    out = _pipelines(TRAINED, root, TWO_RANKS)
    out["generate"] = _generation_run(os.path.join(root, "generate"), GENERATE)
    out["generate-causal"] = _causal_generation_run(os.path.join(root, "generate-causal"), GENERATE)
    out["memory"] = _generation_memory()
    out["engine"] = {name: _pipeline_worker(name, cases, 0, 4, "seq2seq") for name, cases in ENGINE_CASES.items()}
    # every batch key reaches a stage or is refused: the decoder's inputs and mask are consumed, others are not
    engine = PipelineEngine(tiny_model("t5"), microbatches=4, device="cpu")
    batch = padded_batch("mbart")
    out["consumed"] = engine.batch_problems(batch)
    out["refused"] = engine.batch_problems({**batch, "decoder_inputs_embeds": batch["labels"], "token_type_ids": 1})
    return out


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    root = tmp_path_factory.mktemp("seq2seq-ref")
    [refs] = run_distributed(_references, 1, TRAINED, str(root), timeout=300, launcher_env=True)
    return root, refs


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    root = tmp_path_factory.mktemp("seq2seq-x2")
    return root, run_distributed(_two_rank_runs, 2, str(root), timeout=600, launcher_env=True)


def _check_against_trainer(references, root, world: int, pipelines: list[dict], per_rank: list) -> dict:
    ref_root, refs = references
    worst = {}
    for name in TRAINED:
        os.symlink(ref_root / name / "ref", root / name / "ref")
        runs = [rank[name] for rank in per_rank]
        worst.update(check_runs(name, root / name, world, pipelines, refs[name], runs))
    return worst


def test_pipetrainer_matches_trainer_on_two_ranks(references, two_ranks):
    """T5 and BART: losses, grad norms, eval loss and token accuracy (compute_metrics on the logits and encoder
    output Trainer predicts), saved weights loaded with AutoModelForSeq2SeqLM."""
    root, per_rank = two_ranks
    print(_check_against_trainer(references, root, 2, TWO_RANKS, per_rank))


def test_generation_matches_seq2seq_trainer(references, two_ranks):
    """PipeSeq2SeqTrainer with predict_with_generate against Seq2SeqTrainer: the same generated tokens (greedy in
    evaluate, beam search in predict, and for sources without labels), the same metric on them and eval loss."""
    ref = references[1]["generate"]
    for rank in two_ranks[1]:
        mine = rank["generate"]
        assert (mine["tokens"] == ref["tokens"]).all() and (mine["labels"] == ref["labels"]).all()
        assert mine["eval"]["eval_token_match"] == ref["eval"]["eval_token_match"]
        assert abs(mine["eval"]["eval_loss"] - ref["eval"]["eval_loss"]) < 2e-4 * ref["eval"]["eval_loss"]
        (tokens, label_ids, names), (ref_tokens, _, ref_names) = mine["unlabelled"], ref["unlabelled"]
        assert (tokens == ref_tokens).all() and label_ids is None and names == ref_names, (names, ref_names)
        assert not any("loss" in name for name in names)
    print(ref["eval"], ref["tokens"][:2])


def test_causal_lm_generation_matches_seq2seq_trainer(references, two_ranks):
    """PipeSeq2SeqTrainer with a causal LM (Llama) against Seq2SeqTrainer: generated from the batch's input_ids,
    greedy in evaluate (gen_kwargs of the call), beam search in predict (generation_num_beams), the same tokens,
    labels padded alike, the same metrics on them."""
    ref = references[1]["generate-causal"]
    assert ref["eval"]["eval_eos_rows"] > 0  # some rows end early: their padding is compared too
    for rank in two_ranks[1]:
        mine = rank["generate-causal"]
        assert mine["tokens"].shape == ref["tokens"].shape and (mine["tokens"] == ref["tokens"]).all()
        assert (mine["labels"] == ref["labels"]).all()
        for key in ("eval_mean_token", "eval_eos_rows"):
            assert mine["eval"][key] == ref["eval"][key], key
        assert mine["metrics"]["test_mean_token"] == ref["metrics"]["test_mean_token"]
        assert abs(mine["eval"]["eval_loss"] - ref["eval"]["eval_loss"]) < 2e-5 * ref["eval"]["eval_loss"]
    print(ref["eval"], ref["tokens"][:2])


def test_generating_evaluation_holds_no_whole_model(two_ranks):
    """No rank grows by anything near the model during a generating evaluation (each runs only its stages); the
    assembled model this replaced made the first rank grow by 531 MiB (rank 1: 175 MiB) on the same 120 MiB T5."""
    memory = [rank["memory"] for rank in two_ranks[1]]
    model = memory[0]["model"]
    print(f"model {model / 2**20:.0f} MiB; growth per rank MiB:", [round(m["growth"] / 2**20, 1) for m in memory])
    assert all(m["growth"] < model / 8 for m in memory)
    assert memory[0]["metrics"]["eval_token_match"] == memory[1]["metrics"]["eval_token_match"]


def test_engine_every_family_and_schedule_kind(two_ranks):
    """Every adapter family against one process; given decoder inputs and masks (mbart's batches) too; and the batch
    keys no stage consumes are refused."""
    ranks = two_ranks[1]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the one-process references: a tiny model on a busy host is 100x slower on 2 threads
    try:
        for name, cases in ENGINE_CASES.items():
            print(check_engine_runs(name, 2, cases, [rank["engine"][name] for rank in ranks], 0, "seq2seq"))
    finally:
        torch.set_num_threads(threads)
    assert ranks[0]["consumed"] == []
    refused = ranks[0]["refused"]
    assert len(refused) == 2 and all(
        "is not consumed by the pipeline (the t5 encoder-decoder stages" in p for p in refused
    )
    assert "'decoder_inputs_embeds'" in refused[0] and "'token_type_ids'" in refused[1]


def test_pipetrainer_matches_trainer_on_four_ranks(references, tmp_path):
    per_rank = run_distributed(_pipelines, 4, TRAINED, str(tmp_path), FOUR_RANKS, timeout=500, launcher_env=True)
    print(_check_against_trainer(references, tmp_path, 4, FOUR_RANKS, per_rank))


# -- the plan and the refusals: no process group ----------------------------------------------------------------------
def _t5_config(**overrides):
    import transformers

    return transformers.T5Config(
        **{"vocab_size": 1000, "d_model": 256, "d_kv": 32, "d_ff": 1024, "num_heads": 8, "num_layers": 6,
           "decoder_start_token_id": 0, **overrides}
    )  # fmt: skip


def test_plan_weighs_decoder_blocks_and_both_lengths():
    from hf_pipe import plan_seq2seq
    from hf_pipe.families import get_family

    flops = get_family("t5").seq2seq_flops(_t5_config(), 128, 128)
    assert flops.decoder_layer > 1.2 * flops.encoder_layer  # cross-attention
    long_source = get_family("t5").seq2seq_flops(_t5_config(), 512, 32)
    assert long_source.encoder_layer > 4 * long_source.decoder_layer  # the encoder runs over the longer side
    even = plan_seq2seq(_t5_config(), 2, source_len=128, target_len=128)
    assert even.layer_starts == [0, 7] and even.imbalance < 1.1  # 6 + 1 encoder-side blocks vs 5 decoder blocks
    # a long source: encoder blocks weigh most, stage 0 takes fewer; a long target: it takes the encoder and more
    assert plan_seq2seq(_t5_config(), 2, source_len=512, target_len=32).layer_starts == [0, 4]
    assert plan_seq2seq(_t5_config(), 2, source_len=32, target_len=512).layer_starts == [0, 9]
    assert plan_seq2seq(_t5_config(), 4, "uniform").layer_starts == [0, 3, 6, 9]


def test_plan_gives_every_stage_what_its_stack_needs():
    from hf_pipe import plan_seq2seq

    plan = plan_seq2seq(_t5_config(), 4, [0, 3, 7, 9])
    first, mixed, middle, last = (set(s.modules) for s in plan.stages)
    bias = "block.0.layer.0.SelfAttention.relative_attention_bias"
    assert {"shared", "encoder.embed_tokens", "encoder.block.0"} <= first
    # block 0's bias, shared by the stack; the end of the encoder and the decoder's embedding where they meet
    assert f"encoder.{bias}" in mixed and "encoder.block.0" not in mixed
    assert {"encoder.final_layer_norm", "decoder.embed_tokens", "encoder.block.5", "decoder.block.0"} <= mixed
    assert (
        f"decoder.{bias}" in middle and f"decoder.{bias}" in last and {"decoder.final_layer_norm", "lm_head"} <= last
    )
    assert [plan.stage_blocks(s) for s in plan.stages] == ["enc 0-2", "enc 3-5 + dec 0-0", "dec 1-2", "dec 3-5"]
    assert "decoder.relative_attention_bias" in str(plan) and "source 512 / target 512" in str(plan)


def test_refusals_name_the_setting_and_the_fix(tmp_path):
    import transformers

    from hf_pipe import PipelineConfigError, PipeSeq2SeqTrainingArguments, plan_seq2seq
    from hf_pipe.validate import pipeline_problems

    def problems(config, **kw):
        return pipeline_problems(config, **{"schedule": "1f1b", "pp_size": 2, "stages_per_rank": 1,
                                            "microbatches": 2, **kw})  # fmt: skip

    (msg,) = problems(_t5_config(), frontend="seq2seq", data_parallel="ddp")
    assert "pipeline_data_parallel='ddp': replicas of an encoder-decoder pipeline" in msg
    (msg,) = problems(_t5_config(num_layers=1, num_decoder_layers=1), frontend="seq2seq", pp_size=4, microbatches=4)
    assert "= 4 stages, but the model has 2 blocks (encoder and decoder)" in msg
    (msg,) = problems(_t5_config(), frontend="module")
    assert "its stages are made by the 'seq2seq' frontend" in msg
    (msg,) = problems(transformers.PegasusConfig(), frontend="trace")
    assert "does not pipeline encoder-decoders" in msg and "register a hf_pipe.families.seq2seq.Seq2SeqAdapter" in msg
    (msg,) = problems(transformers.GPT2Config(), frontend="seq2seq")
    assert "model_type='gpt2' is not an encoder-decoder hf_pipe can split" in msg and "t5" in msg
    with pytest.raises(PipelineConfigError, match="pipeline_split='measured' times the pieces of a decoder-only"):
        plan_seq2seq(_t5_config(), 2, "measured")
    with pytest.raises(PipelineConfigError, match="a stage can begin mid-block"):
        plan_seq2seq(_t5_config(), 2, [0, 6.5])
    with pytest.raises(PipelineConfigError, match="pipeline_generation_groups=0: the groups of rows in flight"):
        PipeSeq2SeqTrainingArguments(output_dir=str(tmp_path), pipeline_generation_groups=0, use_cpu=True)


def test_hf_pipe_plan_for_t5(capsys):
    from hf_pipe.cli import main

    config = "num_layers=6,d_model=512,d_ff=2048,num_heads=8,decoder_start_token_id=0"
    flags = ["--architecture", "T5ForConditionalGeneration", "--pipeline_parallel_size", "2"]
    assert (
        main(["plan", "--model_type", "t5", "--config", config, *flags, "--seq_len", "512", "--target_len", "64"]) == 0
    )
    table = capsys.readouterr().out
    assert "(source 512 + target 64) tokens" in table and "enc 4-5 + dec 0-5" in table and "lm_head" in table


def _read_by_path(path: str, output_dir: str) -> dict[str, torch.Tensor]:
    from hf_pipe import PipeSeq2SeqTrainer, PipeSeq2SeqTrainingArguments

    args = PipeSeq2SeqTrainingArguments(output_dir=output_dir, use_cpu=True, report_to=[], pipeline_split=[0, 3])
    return PipeSeq2SeqTrainer(model=path, args=args).engine.local_state()


def test_t5_read_by_path_holds_the_saved_weights(tmp_path):
    """A T5 built per stage from its checkpoint: a stage that keeps the stack's shared position bias without the
    attention projections around it loads it without drawing anything."""
    from tests._models import tiny_model

    model = tiny_model("t5")
    model.save_pretrained(tmp_path / "t5")
    saved = model.state_dict()
    states = run_distributed(_read_by_path, 2, str(tmp_path / "t5"), str(tmp_path / "out"))
    assert set(states[0]) != set(states[1])
    for state in states:
        for name, tensor in state.items():
            assert torch.equal(tensor, saved[name]), name
