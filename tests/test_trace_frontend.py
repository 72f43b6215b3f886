"""The trace frontend (torch.export through torch.distributed.pipelining) against one process.

Same check as the module-split engine tests: loss, every gradient, grad norm and weights after two optimizer steps
at two sequence lengths (a retrace per shape), within 1e-5 relative — on families with an adapter traced anyway,
on GPT-NeoX, Falcon and GPT-J (no adapter) and on a user's own nn.Module. `scripts/trace_survey.py` runs the same
check over 28 HF families (docs/trace-survey.md).
"""

from __future__ import annotations

import pytest
import torch

from tests._dist import run_distributed
from tests._models import TinyDecoder, padded_batch, tiny_model
from tests.test_engine_equivalence import check_against_reference

TRACE_SCHEDULES = [("1f1b", 1), ("interleaved1f1b", 2)]


@pytest.mark.parametrize(
    "name", ["gpt2", *(pytest.param(n, marks=pytest.mark.rotary_trace) for n in ("llama", "gpt_neox", "falcon")),
             "bert-cls", "gptj", "custom"]
)  # fmt: skip
def test_trace_matches_one_process(name):
    print(check_against_reference(name, 2, TRACE_SCHEDULES, frontend="trace"))


@pytest.mark.parametrize("name", ["gpt2", "bert-mlm", pytest.param("llama-tied", marks=pytest.mark.rotary_trace)])
def test_trace_every_other_schedule(name):
    """Tied embeddings on two ranks (or, on V placements, two stages of one rank) and the zero-bubble schedules."""
    cases = [("gpipe", 1), ("loopedbfs", 2), ("interleavedzerobubble", 2), ("zbvzerobubble", 2), ("dualpipev", 2)]
    print(check_against_reference(name, 2, cases, frontend="trace"))


class _DataDependent(TinyDecoder):
    """Branches on the values of its input: torch.export cannot capture that as one graph."""

    def forward(self, input_ids, attention_mask=None, labels=None):
        if input_ids.sum() > 0:
            input_ids = input_ids.flip(1)
        return super().forward(input_ids, attention_mask, labels)


def test_export_failure_is_one_clear_error():
    from hf_pipe import TraceError, pipeline

    ids = torch.randint(0, 97, (2, 8))
    with pytest.raises(TraceError) as info:
        pipeline(_DataDependent(), (ids,), split_policy="auto", num_stages=2)
    text = str(info.value)
    assert "torch.export could not capture _DataDependent as one graph" in text
    assert "data-dependent" in text.lower()  # torch.export's own words, quoted
    assert "pipeline_frontend='module'" in text and "register_family" in text


def _engine_error(frontend: str):
    from hf_pipe import PipelineConfigError
    from hf_pipe.engine import PipelineEngine

    try:
        PipelineEngine(
            _DataDependent(), schedule="1f1b", microbatches=2, device="cpu", frontend=frontend, task="causal_lm"
        )
    except PipelineConfigError as error:
        return str(error)
    return None


def test_export_failure_on_every_rank_before_any_step():
    messages = run_distributed(_engine_error, 2, "trace", timeout=120)
    assert all(m is not None and "could not capture _DataDependent" in m for m in messages), messages


@pytest.mark.rotary_trace
def test_pipeline_api_split_spec_pipe_split_and_policies():
    """`hf_pipe.pipeline` cuts where asked (SplitPoint marks, pipe_split() in the forward, policies), shares the
    model's weights, and the cut pipe computes what the model does (one process, no ranks)."""
    from hf_pipe import SplitPoint, annotate_split_points, pipe_split, pipeline

    model = tiny_model("llama").eval()
    batch = padded_batch("llama", batch_size=2, seq_len=10)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    expected = model(ids, attention_mask=mask).logits

    def logits_of(pipe):
        out = pipe(ids, attention_mask=mask)
        return out[0] if isinstance(out, tuple) else out

    pipe = pipeline(model, (ids,), {"attention_mask": mask}, split_spec={"model.layers.1": SplitPoint.END})
    assert pipe.num_stages == 2 and torch.equal(logits_of(pipe), expected)
    names = {n for i in range(2) for n, _ in pipe.get_stage_module(i).named_parameters()}
    assert "model.layers.2.mlp.up_proj.weight" in {n for n, _ in pipe.get_stage_module(1).named_parameters()}
    own = dict(model.named_parameters())
    assert all(p is own[n] for i in range(2) for n, p in pipe.get_stage_module(i).named_parameters()), names

    pipe = pipeline(model, (ids,), {"attention_mask": mask}, split_policy="uniform", num_stages=4)
    assert pipe.num_stages == 4 and torch.equal(logits_of(pipe), expected)

    custom = TinyDecoder(layers=4).eval()
    annotate_split_points(custom, {"blocks.3": SplitPoint.BEGINNING})
    pipe = pipeline(custom, (ids,), {"attention_mask": mask}, split_policy="auto", num_stages=2)
    assert [len(list(pipe.get_stage_module(i).parameters())) > 0 for i in range(2)] == [True, True]
    assert "blocks.3.qkv.weight" in {n for n, _ in pipe.get_stage_module(1).named_parameters()}
    assert torch.equal(logits_of(pipe), custom(ids, attention_mask=mask))

    class Marked(TinyDecoder):
        def forward(self, input_ids, attention_mask=None, labels=None):
            x = self.embed(input_ids)
            mask4 = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool).tril()[None, None]
            for i, block in enumerate(self.blocks):
                if i == 1:
                    pipe_split()
                x = block(x, mask4)
            return self.head(self.norm(x))

    marked = Marked(layers=3).eval()
    pipe = pipeline(marked, (ids,))
    assert pipe.num_stages == 2 and torch.equal(logits_of_plain(pipe, ids), marked(ids))


def logits_of_plain(pipe, ids):
    out = pipe(ids)
    return out[0] if isinstance(out, tuple) else out
