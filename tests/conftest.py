"""Tests that trace a rotary model (the Llama family, GPT-NeoX, Falcon) are marked `rotary_trace`: torch < 2.13's
pipeline split cannot place such a graph (hf_pipe refuses it with one TraceError, see `trace.py`), so on those
versions (`scripts/smoke_oldest.sh`) they are skipped."""

from __future__ import annotations

import pytest
import torch

from hf_pipe.versions import torch_at_least

ROTARY_TRACE = torch_at_least(2, 13)


def pytest_configure(config):
    config.addinivalue_line("markers", "rotary_trace: traces a rotary model (needs torch >= 2.13)")


def pytest_collection_modifyitems(config, items):
    if ROTARY_TRACE:
        return
    skip = pytest.mark.skip(reason=f"torch {torch.__version__} cannot split a traced rotary model (torch >= 2.13 can)")
    for item in items:
        if item.get_closest_marker("rotary_trace"):
            item.add_marker(skip)
