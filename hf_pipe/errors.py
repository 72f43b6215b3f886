"""The one exception type hf_pipe raises for bad pipeline settings."""

from __future__ import annotations

from collections.abc import Iterable


class PipelineConfigError(ValueError):
    """Every problem found in a pipeline configuration, as one numbered list.

    Each problem names the setting, its value and the fix, so that a user sees all of them at once instead of
    fixing one per launch.
    """

    def __init__(self, problems: str | Iterable[str]):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        if len(self.problems) == 1:
            message = f"hf_pipe configuration error: {self.problems[0]}"
        else:
            lines = "\n".join(f"  {i}. {p}" for i, p in enumerate(self.problems, 1))
            message = f"hf_pipe found {len(self.problems)} configuration errors:\n{lines}"
        super().__init__(message)


def raise_if_any(problems: list[str]) -> None:
    """Raise one `PipelineConfigError` listing `problems`, if there are any."""
    if problems:
        raise PipelineConfigError(problems)


def raise_on_every_rank(problems: list[str], group=None) -> None:
    """Raise the problems any rank of `group` found, on every rank (collective): a problem one rank alone sees (its
    stage's checkpoint) must not leave the others waiting at the first step."""
    import torch.distributed as dist

    gathered: list[list[str] | None] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, list(problems), group=group)
    raise_if_any(list(dict.fromkeys(p for rank_problems in gathered for p in rank_problems or [])))
