"""How the last stage chooses each group's next tokens: the token selection of transformers' `_sample` (greedy and
multinomial sampling) and `_beam_search`, step by step, on one group of rows.

transformers' decoding loops call the model themselves, so they cannot be driven from a pipeline; these classes are
their loop bodies, unchanged — the same logits processors, stopping criteria and beam bookkeeping (HF's own beam
helpers), on the logits the last stage computed. What a group sends back to the first stage after each step is
`Step`: the next input tokens, the reordering of its rows (beam search), and whether it is done.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers.generation import GenerationMixin


@dataclass
class Step:
    """What the last stage decided for one group: the tokens the first stage embeds next (one per row), the order of
    the rows' caches for that step (beam search; None: unchanged), and whether the group is done."""

    tokens: torch.Tensor
    reorder: torch.Tensor | None
    done: bool


class _Choice:
    """What both token choices share: the shape of the group's last random draw."""

    config: Any
    device: torch.device
    draw_shape: tuple[int, ...] | None = None

    def skip_draw(self) -> None:
        """The random numbers a draw of this group would take (`torch.multinomial` takes one exponential per
        probability), taken while other groups still decode: a finished row keeps drawing in `generate` until every
        row of the batch is done, so later draws — and the generator's state afterwards — stay the same."""
        if self.config.do_sample and self.draw_shape is not None:
            torch.empty(self.draw_shape, dtype=torch.float32, device=self.device).exponential_()


class Sampling(_Choice):
    """Greedy or multinomial sampling on one group, as `GenerationMixin._sample` selects tokens."""

    def __init__(self, input_ids: torch.Tensor, processors: Any, stopping: Any, config: Any, model: Any = None):
        self.ids, self.processors, self.stopping, self.config = input_ids, processors, stopping, config
        self.device = input_ids.device
        self.pad = config._pad_token_tensor
        self.pad = self.pad.to(input_ids.device) if self.pad is not None else None
        self.pads_finished = any(hasattr(criteria, "eos_token_id") for criteria in stopping)
        self.unfinished = torch.ones(input_ids.shape[0], dtype=torch.long, device=input_ids.device)

    @property
    def rows(self) -> torch.Tensor:
        """The rows the first stage feeds next: every row's sequence so far."""
        return self.ids

    def choose(self, logits: torch.Tensor) -> Step:
        scores = self.processors(self.ids, logits[:, -1].to(copy=True, dtype=torch.float32))
        if self.config.do_sample:
            probs = nn.functional.softmax(scores, dim=-1)
            self.draw_shape = tuple(probs.shape)
            tokens = torch.multinomial(probs, num_samples=1).squeeze(1)
        else:
            tokens = torch.argmax(scores, dim=-1)
        if self.pads_finished:
            tokens = tokens * self.unfinished + self.pad * (1 - self.unfinished)
        self.ids = torch.cat([self.ids, tokens[:, None]], dim=-1)
        self.unfinished = self.unfinished & ~self.stopping(self.ids, None)
        return Step(tokens, None, bool(self.unfinished.max() == 0))

    def sequences(self) -> torch.Tensor:
        return self.ids


class BeamSearch(_Choice):
    """Beam search (and beam sampling) on one group of whole examples, as `GenerationMixin._beam_search` runs it,
    with HF's own helpers for the top-k continuations, the running and finished beams and the stopping heuristic."""

    def __init__(self, input_ids: torch.Tensor, processors: Any, stopping: Any, config: Any, model: Any):
        self.processors, self.stopping, self.config, self.hf = processors, stopping, config, model
        self.device = input_ids.device
        self.beams = beams = config.num_beams
        rows, self.length = input_ids.shape
        self.prompt = self.length
        self.batch = batch = rows // beams
        device = input_ids.device
        eos = config._eos_token_tensor
        self.keep = max(2, 1 + (eos.shape[0] if eos is not None else 0)) * beams
        self.top = torch.cat([torch.ones(beams, dtype=torch.bool), torch.zeros(self.keep - beams, dtype=torch.bool)])
        self.top = self.top.to(device)
        pad = config._pad_token_tensor
        fill = pad or eos[0] if eos is not None else -1
        max_length = config.max_length
        self.running = torch.full((batch, beams, max_length), fill_value=fill, dtype=torch.int64, device=device)
        self.running[:, :, : self.length] = GenerationMixin._unflatten_beam_dim(input_ids, batch, beams)
        self.finished = self.running.detach().clone()
        self.running_scores = torch.zeros((batch, beams), dtype=torch.float, device=device)
        self.running_scores[:, 1:] = -1e9
        self.scores = torch.full((batch, beams), fill_value=-1e9, dtype=torch.float, device=device)
        self.sent_finished = torch.zeros((batch, beams), dtype=torch.bool, device=device)
        self.heuristic_unsatisfied = torch.ones((batch, 1), dtype=torch.bool, device=device)
        self.running_indices = torch.full(
            (batch, beams, max_length - self.length), fill_value=-1, dtype=torch.int32, device=device
        )
        self.indices = self.running_indices.detach().clone()

    @property
    def rows(self) -> torch.Tensor:
        return GenerationMixin._flatten_beam_dim(self.running[:, :, : self.length])

    def choose(self, logits: torch.Tensor) -> Step:
        hf, config, batch, beams = self.hf, self.config, self.batch, self.beams
        log_probs = nn.functional.log_softmax(logits[:, -1].to(copy=True, dtype=torch.float32), dim=-1)
        log_probs = self.processors(self.rows, log_probs)
        log_probs = hf._unflatten_beam_dim(log_probs, batch, beams) + self.running_scores[:, :, None]
        log_probs = torch.reshape(log_probs, (batch, -1))
        if config.do_sample:
            self.draw_shape = tuple(log_probs.shape)
        topk_log_probs, topk_sequences, topk_indices = hf._get_top_k_continuations(
            accumulated_log_probs=log_probs,
            running_sequences=self.running,
            running_beam_indices=self.running_indices,
            cur_len=self.length,
            decoder_prompt_len=self.prompt,
            do_sample=config.do_sample,
            beams_to_keep=self.keep,
            num_beams=beams,
            batch_size=batch,
        )
        hits = self.stopping(hf._flatten_beam_dim(topk_sequences[:, :, : self.length + 1]), None)
        hits = hf._unflatten_beam_dim(hits, batch, self.keep)
        self.running, self.running_scores, self.running_indices = hf._get_running_beams_for_next_iteration(
            topk_log_probs=topk_log_probs,
            topk_running_sequences=topk_sequences,
            topk_running_beam_indices=topk_indices,
            next_token_hits_stopping_criteria=hits,
            num_beams=beams,
        )
        self.finished, self.scores, self.indices, self.sent_finished = hf._update_finished_beams(
            sequences=self.finished,
            topk_running_sequences=topk_sequences,
            beam_scores=self.scores,
            topk_log_probs=topk_log_probs,
            beam_indices=self.indices,
            topk_running_beam_indices=topk_indices,
            is_early_stop_heuristic_unsatisfied=self.heuristic_unsatisfied,
            is_sent_finished=self.sent_finished,
            next_token_hits_stopping_criteria=hits,
            top_num_beam_mask=self.top,
            num_beams=beams,
            cur_len=self.length,
            decoder_prompt_len=self.prompt,
            length_penalty=config.length_penalty,
            early_stopping=config.early_stopping,
        )
        reorder = hf._flatten_beam_dim(self.running_indices[..., self.length - self.prompt]).long()
        self.length += 1
        self.heuristic_unsatisfied = hf._check_early_stop_heuristic(
            is_early_stop_heuristic_unsatisfied=self.heuristic_unsatisfied,
            running_beam_scores=self.running_scores,
            beam_scores=self.scores,
            is_sent_finished=self.sent_finished,
            cur_len=self.length,
            max_length=config.max_length,
            decoder_prompt_len=self.prompt,
            early_stopping=config.early_stopping,
            length_penalty=config.length_penalty,
        )
        done = not hf._beam_search_has_unfinished_sequences(
            self.heuristic_unsatisfied, self.sent_finished, hits, config.early_stopping
        )
        return Step(self.rows[:, -1], reorder, done)

    def sequences(self) -> torch.Tensor:
        """The best `num_return_sequences` beams per example, cut at the longest, as `_beam_search` returns them."""
        hf, keep = GenerationMixin, self.config.num_return_sequences
        sequences = hf._flatten_beam_dim(self.finished[:, :keep, :])
        indices = hf._flatten_beam_dim(self.indices[:, :keep, :])
        generated = ((indices + 1).bool()).sum(dim=1).max()
        return sequences[:, : self.prompt + generated]
