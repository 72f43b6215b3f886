"""Packed (padding-free) batches: cut into microbatches at sequence boundaries, each with its own positions and
flash-attention boundaries, equal to Trainer on one process; the cutting itself, without a process group."""

from __future__ import annotations

import itertools

import pytest
import torch

from hf_pipe import PipelineConfigError
from hf_pipe.microbatch import balanced_groups, cut_packed, flash_kwargs, is_packed, shifted_labels
from tests.test_trainer_equivalence import compare

TWO_SCHEDULES = [
    {"pipeline_schedule": "1f1b", "pipeline_microbatches": 4},
    {"pipeline_schedule": "interleaved1f1b", "pipeline_microbatches": 4},
]


# -- collators (module level: they travel to the spawned ranks) -----------------------------------------------------
def flattening(task: str):
    """transformers' padding-free collator: one row, positions restarting, flash-attention boundaries."""
    from transformers import DataCollatorWithFlattening

    return DataCollatorWithFlattening(return_flash_attn_kwargs=True)


def trl_padding_free(task: str):
    """TRL's SFT collator with padding_free=True (as packing=True uses it): adds `seq_idx`, pads to a multiple."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    return DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True, pad_to_multiple_of=8)


class PackedRows:
    """Two rows, each several sequences back to back, the shorter row padded with one-token sequences (labels -100),
    no attention mask: a packer's output (BFD-style), which Trainer attends within sequence by sequence."""

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        rows = [features[0::2], features[1::2]]
        ids = [sum((f["input_ids"] for f in row), []) for row in rows]
        pos = [sum((list(range(len(f["input_ids"]))) for f in row), []) for row in rows]
        longest = max(map(len, ids))
        labels = [[-100 if p == 0 else t for t, p in zip(i, q)] for i, q in zip(ids, pos)]
        pad = [longest - len(i) for i in ids]
        return {
            "input_ids": torch.tensor([i + [0] * n for i, n in zip(ids, pad)]),
            "position_ids": torch.tensor([q + [0] * n for q, n in zip(pos, pad)]),
            "labels": torch.tensor([la + [-100] * n for la, n in zip(labels, pad)]),
        }


def packed_rows(task: str):
    return PackedRows()


# -- equal to Trainer ------------------------------------------------------------------------------------------------
@pytest.mark.rotary_trace
def test_packed_llama_eager(tmp_path):
    """One packed row with flash-attention kwargs; module-split stages on two schedules, and traced stages."""
    pipelines = [*TWO_SCHEDULES, {**TWO_SCHEDULES[0], "pipeline_frontend": "trace"}]
    setup = {"collator": flattening, "model": {"attn_implementation": "eager"}}
    print(compare("llama", tmp_path, 2, pipelines, setup=setup))


def test_packed_rows_llama_sdpa(tmp_path):
    print(compare("llama", tmp_path, 2, TWO_SCHEDULES, setup={"collator": packed_rows}))


def test_packed_gpt2(tmp_path):
    setup = {"collator": trl_padding_free, "model": {"attn_implementation": "eager"}}
    print(compare("gpt2", tmp_path / "trl", 2, TWO_SCHEDULES, setup=setup))
    print(compare("gpt2", tmp_path / "flat", 2, TWO_SCHEDULES[:1], setup={"collator": flattening}))


# -- the cut ---------------------------------------------------------------------------------------------------------
def _packed(lengths: list[int]) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 50, (1, sum(lengths)), generator=g)
    pos = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    labels = ids.masked_fill(pos == 0, -100)
    return {"input_ids": ids, "position_ids": pos, "labels": labels, **flash_kwargs(pos)}


def test_balanced_groups_are_optimal():
    for lengths in ([5, 1, 1, 1, 9, 2], [3, 3, 3, 3], [10, 1, 1], [1, 2, 3, 4, 5, 6, 7]):
        for count in range(1, len(lengths) + 1):
            sizes = balanced_groups(lengths, count)
            assert len(sizes) == count and sum(sizes) == len(lengths) and min(sizes) >= 1
            bounds = [0, *itertools.accumulate(sizes)]
            worst = max(sum(lengths[a:b]) for a, b in zip(bounds, bounds[1:]))
            best = min(
                max(sum(lengths[a:b]) for a, b in zip((0, *cuts), (*cuts, len(lengths))))
                for cuts in itertools.combinations(range(1, len(lengths)), count - 1)
            )
            assert worst == best, (lengths, count, sizes)


def test_cut_keeps_sequences_whole_and_merges_back():
    lengths = [7, 3, 12, 5, 5, 2]
    batch = _packed(lengths)
    assert is_packed(batch)
    mbs = cut_packed(batch, 3, shifted_labels(batch["labels"]))
    assert len(mbs) == 3 and mbs.num_sequences == len(lengths)
    shape = mbs.input_ids[0].shape
    assert all(ids.shape == shape for ids in mbs.input_ids) and shape[1] % 64 == 0  # one padded length
    for ids, kwargs, shift in zip(mbs.input_ids, mbs.kwargs, mbs.shift_labels):
        starts = kwargs["cu_seq_lens_q"].tolist()
        assert starts[0] == 0 and starts[-1] == ids.shape[1]
        assert kwargs["max_length_q"] == max(b - a for a, b in zip(starts, starts[1:]))
        # each microbatch's positions restart at its own sequences
        assert (kwargs["position_ids"][0, torch.tensor(starts[:-1])] == 0).all()
        assert shift.shape == ids.shape
    # the microbatches' tokens, put back, are the batch; padding predicts nothing
    assert torch.equal(mbs.merge([ids.unsqueeze(-1) for ids in mbs.input_ids]).squeeze(-1), batch["input_ids"])
    assert torch.equal(
        mbs.merge([s.unsqueeze(-1) for s in mbs.shift_labels]).squeeze(-1), shifted_labels(batch["labels"])
    )
    assert sum(int((s != -100).sum()) for s in mbs.shift_labels) == int(
        (shifted_labels(batch["labels"]) != -100).sum()
    )


def test_fewer_sequences_than_microbatches_is_one_clear_error():
    batch = _packed([4, 6, 3])
    with pytest.raises(
        PipelineConfigError, match="a packed batch of 3 sequence\\(s\\) cannot fill pipeline_microbatches=4"
    ):
        cut_packed(batch, 4, None)
