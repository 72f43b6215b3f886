"""The decoding loop of an encoder-decoder (T5, BART) through the pipeline: the encoder once per group, then the
decoder one token at a time, each decoder stage with its own cache of self- and cross-attention keys and values.

`PipelineGenerator` hands `generate` an `encoder_outputs` whose rows are the source rows' indices (nothing is encoded
on the skeleton model, whose weights are mostly on the meta device): `generate` expands it for beams and
`num_return_sequences` as it would expand the encoder's output, so that the loop reads, for each expanded row, which
source row it continues — the expansion `_expand_inputs_for_generation` makes, reproduced on the stages.

At a group's first step the stages holding encoder blocks run them over the group's sources (each example once); the
stage that ends the encoder sends the encoder's output on with the decoder's hidden states, and each decoder stage
keeps it (expanded to the group's rows) and hands it on once. Later steps send the decoder's hidden states only:
stages holding only encoder blocks idle. The order of work and messages is `pipeline.py`'s.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import EncoderDecoderCache

from ..families.base import CACHE
from .cache import StageCache
from .pipeline import DecodeLoop, Group


def source_index(rows: int, device: torch.device) -> Any:
    """What `PipelineGenerator` passes `generate` as `encoder_outputs`: each row's own index, which `generate` then
    expands exactly as it expands an encoder's output."""
    from transformers.modeling_outputs import BaseModelOutput

    return BaseModelOutput(last_hidden_state=torch.arange(rows, device=device)[:, None])


class Seq2SeqDecodeLoop(DecodeLoop):
    """One `generate` call's decoding on this rank, for an encoder-decoder (see the module docstring)."""

    def __init__(self, generator: Any, model: Any, input_ids: torch.Tensor, processors: Any, stopping: Any,
                 config: Any, model_kwargs: dict[str, Any], source: tuple[torch.Tensor, torch.Tensor | None]):  # fmt: skip
        model_kwargs = dict(model_kwargs)
        of_row = model_kwargs.pop("encoder_outputs").last_hidden_state[:, 0]
        super().__init__(generator, model, input_ids, processors, stopping, config, model_kwargs)
        self.source_ids, self.source_mask = source
        for group in self.groups:
            index = of_row[group.rows].to(self.engine.device)
            start = int(index[0])
            group.sources, group.expand = slice(start, int(index[-1]) + 1), index - start

    def new_cache(self, stage: Any) -> EncoderDecoderCache | None:
        if not stage.decoder_ids:
            return None
        config = stage.decoder.config  # the decoder stack's: its number of layers
        return EncoderDecoderCache(StageCache(config, stage.decoder_ids), StageCache(config, stage.decoder_ids))

    def _run_stages(self, group: Group, inputs: dict[str, Any], first: bool) -> None:
        tokens = inputs["decoder_input_ids"]
        rows, length = tokens.shape
        batch = {k: inputs[k] for k in ("attention_mask", "decoder_attention_mask") if inputs.get(k) is not None}
        source = self.source_ids[group.sources]
        source_batch = {} if self.source_mask is None else {"attention_mask": self.source_mask[group.sources]}
        encoder_shape = (*source.shape, self.hidden_size)
        local: dict[int, list[torch.Tensor]] = {}  # outputs handed to the next stage on this rank

        for stage in self.stages:
            encoded = None  # the encoder's output for the group's sources, made or received at the first step
            if stage.encoder_ids:
                if not first:
                    if not stage.decoder_ids:
                        continue  # an encoder stage idles once the encoder has run
                    x = tokens
                else:
                    x = source if stage.is_first else self._receive(stage, local, encoder_shape)[0]
                    hidden = stage.encode(x, source_batch)
                    if not stage.decoder_ids:
                        self._send(stage, local, hidden)
                        continue
                    encoded, x = hidden, tokens
            elif stage.starts_decoder:
                if first:
                    (encoded,) = self._receive(stage, local, encoder_shape)
                x = tokens
            elif first:
                x, encoded = self._receive(stage, local, (rows, length, self.hidden_size), encoder_shape)
            else:
                (x,) = self._receive(stage, local, (rows, length, self.hidden_size))
            if encoded is not None:
                group.encoded[stage.index] = encoded[group.expand]
            out = stage.decode(x, group.encoded[stage.index], {**batch, CACHE: group.caches[stage.index]})
            if stage.is_last:
                self._decide(group, group.choice.choose(out))
            else:
                self._send(stage, local, out, *([encoded] if first else []))
