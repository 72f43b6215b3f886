"""The trace frontend (torch.export through torch.distributed.pipelining) against one process.

Same check as the module-split engine tests: loss, every gradient, grad norm and weights after two optimizer steps
at two sequence lengths (a retrace per shape), within 1e-5 relative — on families with an adapter traced anyway,
on GPT-NeoX (no adapter) and on a user's own nn.Module.
"""

from __future__ import annotations

import pytest

from tests.test_engine_equivalence import check_against_reference

TRACE_SCHEDULES = [("1f1b", 1), ("interleaved1f1b", 2)]


@pytest.mark.parametrize("name", ["gpt2", "llama", "bert-cls", "gpt_neox", "custom"])
def test_trace_matches_one_process(name):
    print(check_against_reference(name, 2, TRACE_SCHEDULES, frontend="trace"))


@pytest.mark.parametrize("name", ["gpt2", "bert-mlm", "llama-tied"])
def test_trace_every_other_schedule(name):
    """Tied embeddings on two ranks (or, on V placements, two stages of one rank) and the zero-bubble schedules."""
    cases = [("gpipe", 1), ("loopedbfs", 2), ("interleavedzerobubble", 2), ("zbvzerobubble", 2), ("dualpipev", 2)]
    print(check_against_reference(name, 2, cases, frontend="trace"))
