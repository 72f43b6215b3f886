"""The pieces `PipelineEngine` (`engine.py`) composes, each one concern of running this rank's stages:

- `build.py`: this rank's stages through the frontend (weights real on the device, or one error on every rank) and
  their data-parallel wrappers (DDP / FSDP2 over the replicas);
- `steps.py`: one step — the batch cut into microbatches, a torch schedule per batch shape, the loss and the
  user loss's metrics broadcast from the last stage — for training, evaluation, and the forward-only pass
  (`Steps.forward`: every microbatch through every stage with no backward, what the last stage makes of each kept
  there; a frozen reference model's log-probabilities, a KL term);
- `gradients.py`: tied weights whose copies sit on several ranks kept one parameter, the global gradient norm and
  clipping.
"""
