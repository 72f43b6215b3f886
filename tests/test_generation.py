"""Generation through the pipeline (`hf_pipe.generation.PipelineGenerator`) against `model.generate` on one process:
greedy search, seeded sampling (top-k, top-p, temperature, `num_return_sequences`), beam search and beam sampling,
left-padded prompts, an EOS that ends some rows (and whole groups) early — with one group in flight and with several,
on 2 ranks (one and two stages per rank, a stage beginning mid-block) and on 4, and data-parallel pipelines; the random generator's state after generation; the refusals."""

from __future__ import annotations

import pytest
import torch

from tests._dist import run_distributed
from tests._models import tiny_model

PAD = 1
#: (decoding settings, seed); `eos_token_id` is set per model to a token its greedy search emits early
DECODING = [
    dict(max_new_tokens=8),
    dict(max_new_tokens=8, do_sample=True, top_k=20, temperature=0.8),
    dict(max_new_tokens=6, do_sample=True, top_p=0.9, num_return_sequences=2),
    dict(max_new_tokens=6, num_beams=2),
    dict(max_new_tokens=5, num_beams=2, do_sample=True, num_return_sequences=2),
]
#: an EOS the tiny model's greedy search reaches on two rows of the last group (which then ends early)
EOS = {"llama": 35, "gpt2": 82, "t5": 94, "bart": 13}
#: encoder-decoders: weights drawn wide enough that greedy search follows the source rather than repeating one token
SEQ2SEQ_INIT = {"t5": dict(initializer_factor=4.0), "bart": dict(init_std=0.3)}


def prompts(rows: int = 6, length: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompts of uneven lengths, as a decoder-only model generates from."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(2, 97, (rows, length), generator=g)
    mask = torch.ones_like(ids)
    for r in range(1, rows, 2):
        mask[r, : r % 4 + 1] = 0
        ids[r, : r % 4 + 1] = PAD
    return ids, mask


def sources(rows: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded sources of uneven lengths, as an encoder-decoder generates from."""
    from tests._models import seq2seq_batch

    batch = seq2seq_batch(rows, 9, 5, 2)
    return batch["input_ids"], batch["attention_mask"]


def _model(name: str):
    model = tiny_model(name, **SEQ2SEQ_INIT.get(name, {})).eval()
    config = model.generation_config
    if name in SEQ2SEQ_INIT:  # every step a new token (tiny random models repeat one), no forced EOS at the end
        config.no_repeat_ngram_size, config.forced_eos_token_id = 1, None
    else:
        config.pad_token_id = PAD
    config.eos_token_id = EOS[name]
    return model


def _generate(generate, name: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every decoding case's sequences and the generator's next draws after it (same seed before each case)."""
    ids, mask = sources() if name in SEQ2SEQ_INIT else prompts()
    out = []
    for settings in DECODING:
        torch.manual_seed(11)
        tokens = generate(ids, attention_mask=mask, **settings)
        out.append((tokens, torch.rand(4)))
    return out


def _reference(name: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return _generate(_model(name).generate, name)


def _ranks(cases: list[tuple]) -> dict:
    """(model, schedule, groups[, split]) each: the pipeline's generations, on every rank."""
    from hf_pipe.engine import PipelineEngine
    from hf_pipe.generation import PipelineGenerator

    out = {}
    for name, schedule, groups, *split in cases:
        model = _model(name)
        engine = PipelineEngine(model, schedule=schedule, split=split[0] if split else "auto", device="cpu")
        generator = PipelineGenerator(engine, model, groups=groups)
        key = (name, schedule, groups, *map(str, split))
        out[key] = {"tokens": _generate(generator.generate, name)}
    return out


def _check(results: list[dict], references: dict) -> None:
    for case in results[0]:
        for rank, result in enumerate(results):
            for settings, (tokens, draws), (ref_tokens, ref_draws) in zip(
                DECODING, result[case]["tokens"], references[case[0]]
            ):
                assert torch.equal(tokens, ref_tokens), (case, rank, settings, tokens, ref_tokens)
                # every rank's generator is where one process leaves it (the drawing rank's shared after sampling)
                assert torch.equal(draws, ref_draws), (case, rank, settings)


def test_two_ranks_match_generate():
    """Decoders (a Llama stage beginning mid-block: [0, 1.5]); and encoder-decoders with the encoder cut (T5 [0, 3]),
    whole on one rank and the decoder cut (BART [0, 5]), and interleaved (4 stages: a stage of encoder blocks only,
    one of decoder blocks only, on each rank)."""
    cases = [("llama", "1f1b", None), ("llama", "1f1b", 1, [0, 1.5]), ("gpt2", "1f1b", None),
             ("llama", "interleaved1f1b", 3), ("t5", "1f1b", None, [0, 3]), ("t5", "1f1b", 1),
             ("bart", "1f1b", None, [0, 5]), ("bart", "interleaved1f1b", 3)]  # fmt: skip
    results = run_distributed(_ranks, 2, cases, fork=True, timeout=420)
    _check(results, {name: _reference(name) for name in ("llama", "gpt2", "t5", "bart")})


def _four_ranks(cases: list, path: str) -> dict:
    """`_ranks` on one 4-stage pipeline, then two 2-rank pipelines read from `path`, each generating its own
    prompts (data-parallel replicas)."""
    import torch.distributed as dist

    from hf_pipe import PipelineGenerator

    out = _ranks(cases)
    generator = PipelineGenerator.from_pretrained(path, pipeline_parallel_size=2)
    ids, mask = prompts()
    replica = dist.get_rank() // 2
    torch.manual_seed(11)
    out["replica"] = generator.generate(ids[replica::2], attention_mask=mask[replica::2], max_new_tokens=5)
    return out


def test_four_ranks_match_generate(tmp_path):
    """Decoders; T5 cut inside both stacks (a stage holding the end of the encoder and decoder block 0), BART with
    one group; two data-parallel pipelines of a Llama read by path."""
    cases = [("llama", "1f1b", None), ("gpt2", "1f1b", 2), ("t5", "1f1b", None, [0, 2, 5, 6]), ("bart", "1f1b", 1)]
    model = _model("llama")
    model.save_pretrained(tmp_path)
    results = run_distributed(_four_ranks, 4, cases, str(tmp_path), fork=True, timeout=420)
    ids, mask = prompts()
    for rank, result in enumerate(results):
        replica = rank // 2
        expected = model.generate(ids[replica::2], attention_mask=mask[replica::2], max_new_tokens=5)
        assert torch.equal(result.pop("replica"), expected), rank
    _check(results, {name: _reference(name) for name in ("llama", "gpt2", "t5", "bart")})


def _trainer_and_path(path: str, output_dir: str) -> dict:
    """`PipeTrainer.generator` on a trainer's stages, and `PipelineGenerator.from_pretrained` reading each rank's
    stages from a saved model."""
    from hf_pipe import PipelineGenerator, PipeTrainer, PipeTrainingArguments

    ids, mask = prompts()
    args = PipeTrainingArguments(output_dir=output_dir, use_cpu=True, report_to=[], pipeline_generation_groups=2)
    trainer = PipeTrainer(model=_model("llama"), args=args)
    torch.manual_seed(11)
    by_trainer = trainer.generator.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=True)
    generator = PipelineGenerator.from_pretrained(path)
    torch.manual_seed(11)
    by_path = generator.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=True)
    held = sum(p.numel() for p in generator.engine.parameters())
    return {"trainer": by_trainer, "path": by_path, "held": held, "training": generator.engine.modules[0].training}


def test_trainer_generator_and_model_read_per_stage(tmp_path):
    model = _model("llama")
    model.save_pretrained(tmp_path / "model")
    torch.manual_seed(11)
    ids, mask = prompts()
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=True)
    results = run_distributed(_trainer_and_path, 2, str(tmp_path / "model"), str(tmp_path / "out"), fork=True)
    for result in results:
        assert torch.equal(result["trainer"], expected)
        assert torch.equal(result["path"], expected)
        assert result["held"] < 0.75 * sum(p.numel() for p in model.parameters())  # its stages only
        assert not result["training"]


def _refusals() -> list[str]:
    from transformers import LogitsProcessor, LogitsProcessorList

    from hf_pipe.engine import PipelineEngine
    from hf_pipe.errors import PipelineConfigError
    from hf_pipe.generation import PipelineGenerator

    class RowMixing(LogitsProcessor):
        def __call__(self, input_ids, scores):
            return scores - scores.mean(0, keepdim=True)

    messages = []

    def refused(call) -> None:
        with pytest.raises(PipelineConfigError) as error:
            call()
        messages.append(str(error.value))

    model = _model("gpt2")
    generator = PipelineGenerator(PipelineEngine(model, device="cpu"), model)
    ids, mask = prompts()
    refused(lambda: generator.generate(ids, attention_mask=mask, max_new_tokens=2, return_dict_in_generate=True))
    refused(lambda: generator.generate(ids, attention_mask=mask, max_new_tokens=2, streamer=object()))
    refused(lambda: generator.generate(ids, max_new_tokens=2, logits_processor=LogitsProcessorList([RowMixing()])))
    refused(lambda: generator.generate(ids, max_new_tokens=2, penalty_alpha=0.6, top_k=4))
    refused(lambda: generator.generate(torch.randint(2, 97, (2, 64)), max_new_tokens=2))
    # one group: a processor that looks across rows sees the whole batch, as in generate
    torch.manual_seed(0)
    one = PipelineGenerator(generator.engine, model, groups=1)
    messages.append(one.generate(ids, max_new_tokens=2, logits_processor=LogitsProcessorList([RowMixing()])))
    trace = tiny_model("llama")
    refused(lambda: PipelineGenerator(PipelineEngine(trace, frontend="trace", device="cpu"), trace))
    # an encoder-decoder: its encoder runs on the stages; a processor reading every row's source needs one group
    t5 = _model("t5")
    t5_generator = PipelineGenerator(PipelineEngine(t5, device="cpu"), t5)
    source, source_mask = sources()
    refused(lambda: t5_generator.generate(source, encoder_outputs=(torch.zeros(6, 9, 64),), max_new_tokens=2))
    refused(lambda: t5_generator.generate(source, encoder_repetition_penalty=1.5, max_new_tokens=2))
    one = PipelineGenerator(t5_generator.engine, t5, groups=1)
    messages.append(one.generate(source, attention_mask=source_mask, encoder_repetition_penalty=1.5, max_new_tokens=4))
    return messages


def test_refusals_name_the_setting():
    messages = run_distributed(_refusals, 2, fork=True, timeout=240)[0]
    dict_out, streamer, processor, contrastive, too_long, one_group, trace, encoded, penalty, one_t5 = messages
    assert "return_dict_in_generate=True" in dict_out
    assert "streamer" in streamer
    assert "RowMixing" in processor and "groups=1" in processor
    assert "contrastive" in contrastive or "penalty_alpha" in contrastive or "mode" in contrastive
    assert "n_positions" in too_long and "64" in too_long
    model = _model("gpt2")
    torch.manual_seed(0)
    from transformers import LogitsProcessor, LogitsProcessorList

    class RowMixing(LogitsProcessor):
        def __call__(self, input_ids, scores):
            return scores - scores.mean(0, keepdim=True)

    ids, _ = prompts()
    expected = model.generate(ids, max_new_tokens=2, logits_processor=LogitsProcessorList([RowMixing()]))
    assert torch.equal(one_group, expected)
    assert "'trace' frontend" in trace
    assert "generate(encoder_outputs=...) is not supported" in encoded and "pass input_ids" in encoded
    assert "EncoderRepetitionPenaltyLogitsProcessor" in penalty and "pipeline_generation_groups=1" in penalty
    source, source_mask = sources()
    t5 = _model("t5")
    expected = t5.generate(source, attention_mask=source_mask, encoder_repetition_penalty=1.5, max_new_tokens=4)
    assert torch.equal(one_t5, expected)
