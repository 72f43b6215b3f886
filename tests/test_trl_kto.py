"""TRL's KTO under the pipeline: PipeKTOTrainer on 2 ranks against KTOTrainer on one process, same seed and data —
per-step loss and grad norm, every metric KTOTrainer logs (and on which steps it logs it), num_tokens, evaluation and
final weights — for the reference read per stage from the policy's checkpoint, apo_zero_unpaired, desirable /
undesirable weights with gradient accumulation, LoRA (the reference: the adapters off), a given reference model,
TR-DPO's reference sync, the reference log-probabilities precomputed (the policy's before training, with the KL
completions'; and a given reference's, for apo_zero_unpaired), and 2 pipeline replicas against KTOTrainer on 2
processes (the reference per step, or precomputed over the replicas); and the refusals."""

from __future__ import annotations

import os

import pytest
import torch

from tests._dist import run_distributed
from tests._models import VOCAB, tiny_model
from tests.test_trl import _tokenizer

TOL = 1e-5
#: differences of far larger numbers (a reward: beta × (log-prob − reference log-prob), each summed over a completion;
#: a mean logit over the vocabulary; the KL term, a mean of such log-ratios) compared relative to their terms' size (1)
DIFFERENCES = ("rewards/chosen", "rewards/rejected", "rewards/margins", "logits/chosen", "logits/rejected", "kl")
WEIGHT_TOL = 5e-5
CASES = {
    # KTO's default loss, the reference read per stage from the policy's checkpoint
    "kto": {},
    # APO's unpaired loss (no KL term, no KL completions), weighted
    "apo": {"loss_type": "apo_zero_unpaired", "desirable_weight": 1.3, "undesirable_weight": 0.7, "beta": 0.5},
    # 2 accumulated batches of 2 rows (KTOTrainer divides each batch's mean by the accumulation steps; the KL
    # completions swap within each batch), weighted; a microbatch per row
    "accumulated": {
        "gradient_accumulation_steps": 2,
        "per_device_train_batch_size": 2,
        "desirable_weight": 1.2,
        "beta": 0.3,
        "schedule": {"pipeline_microbatches": 2},
    },
    # LoRA: the reference is the policy's own stages with the adapters off
    "lora": {"peft": True},
    # a reference model given built (another model than the policy), cut into stages like the policy
    "given": {"ref_model": "other"},
    # TR-DPO: the reference stages mixed with the policy's every 2 steps
    "sync": {"sync_ref_model": True, "ref_model_sync_steps": 2, "ref_model_mixup_alpha": 0.6},
    # the reference log-probabilities precomputed once before training from the policy itself (full fine-tuning),
    # the KL completions' too (columns ref_logps, ref_KL_logps), in batches of 6 rows (the last of 2) that the
    # training batches of 4 and their microbatches of 1 row cut differently: each value follows its row
    "precompute": {"precompute_ref_log_probs": True, "precompute_ref_batch_size": 6},
    # APO's unpaired loss (no KL column) with a given reference's log-probabilities precomputed from its stages
    "precompute_apo": {"loss_type": "apo_zero_unpaired", "ref_model": "other", "precompute_ref_log_probs": True},
    # 2 pipelines of 2 ranks (4 ranks) against KTOTrainer on 2 processes, a batch of 4 each: the KL term a mean over
    # the replicas' batch means, the metrics gathered over them (32 rows: 4 steps, no replica short of a batch)
    "replicas": {"dp": 2, "rows": 32},
    # the same, the reference precomputed in batches of 12 rows shared by the replicas (3 batches: one replica repeats
    # one), the KL term then a mean over the replicas of the policy's KL rows less their precomputed column; the
    # datasets read from disk (KTOTrainer's processes share the cache file through the dataset's cache directory,
    # which an in-memory dataset lacks), a copy for each run
    "replicas_precompute": {
        "dp": 2,
        "rows": 32,
        "precompute_ref_log_probs": True,
        "precompute_ref_batch_size": 12,
        "on_disk": True,
    },
}
GROUPS = {
    "losses": ["kto", "apo", "accumulated"],
    "references": ["lora", "given", "sync", "precompute", "precompute_apo"],
    "replicas": ["replicas", "replicas_precompute"],
}
LOGGED = (
    "loss", "grad_norm", "kl", "entropy", "logits/chosen", "logits/rejected", "rewards/chosen", "rewards/rejected",
    "rewards/margins", "logps/chosen", "logps/rejected",
)  # fmt: skip
#: desirable labels, in dataset order: the 4th batch of 4 all desirable, the 5th all undesirable (no rewards/rejected,
#: no rewards/margins, no logits/rejected that step; and the converse)
LABELS = [True, False, False, True, False, True, True, False, True, False, True, True] + [True] * 4 + [False] * 4


def _err(key: str, a: float, b: float) -> float:
    scale = 1.0 if key.removeprefix("eval_") in DIFFERENCES else 1e-12
    return abs(a - b) / max(abs(b), scale)


def _unpaired(labels: list[bool], seed: int):
    import datasets

    g = torch.Generator().manual_seed(seed)

    def words(low: int, high: int) -> str:
        length = int(torch.randint(low, high, (1,), generator=g))
        return " ".join(f"w{int(i)}" for i in torch.randint(2, VOCAB, (length,), generator=g))

    # completions end with the EOS word (KTOTrainer appends the EOS text otherwise, glued to the last word)
    rows = [{"prompt": words(2, 8), "completion": " " + words(1, 8) + " [EOS]", "label": x} for x in labels]
    return datasets.Dataset.from_list(rows)


def _datasets(case: str, output_dir: str, save: bool = False) -> tuple:
    """The case's train and eval datasets; with `on_disk`, saved under `output_dir` (`save`) or read from there."""
    import datasets

    paths = os.path.join(output_dir, "train_data"), os.path.join(output_dir, "eval_data")
    if CASES[case].get("on_disk") and not save:
        return tuple(datasets.load_from_disk(path) for path in paths)
    rows = CASES[case].get("rows", len(LABELS))
    made = _unpaired((LABELS * 2)[:rows], 0), _unpaired([True, False, True, True, False, False, True, False], 5)
    if save:
        for dataset, path in zip(made, paths, strict=True):
            dataset.save_to_disk(path)
    return made


def _run(case: str, output_dir: str, pipeline: bool, root: str) -> dict:
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM
    from trl import KTOConfig, KTOTrainer

    from hf_pipe.trl import PipeKTOConfig, PipeKTOTrainer

    options = dict(CASES[case])
    peft = options.pop("peft", False)
    checkpoint = os.path.join(root, "llama")
    ref_model = options.pop("ref_model", None)
    dp = options.pop("dp", 1)
    options.pop("rows", None), options.pop("on_disk", None)
    train_dataset, eval_dataset = _datasets(case, output_dir)
    schedule = {"pipeline_schedule": "1f1b", "pipeline_microbatches": 4, **options.pop("schedule", {})}
    settings = dict(
        output_dir=output_dir, per_device_train_batch_size=4, per_device_eval_batch_size=4, learning_rate=2e-3,
        num_train_epochs=1, logging_steps=1, save_strategy="no", report_to=[], seed=3, max_length=24,
        disable_tqdm=True, use_cpu=True, bf16=False,
    )  # fmt: skip
    settings.update(options)
    if dp > 1:
        schedule["pipeline_parallel_size"] = 2
    config = PipeKTOConfig(**settings, **schedule) if pipeline else KTOConfig(**settings)
    cls = PipeKTOTrainer if pipeline else KTOTrainer
    trainer = cls(
        # with PEFT a model built whole on every rank, its adapters drawn by get_peft_model after set_seed
        model=AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32) if peft else checkpoint,
        ref_model=AutoModelForCausalLM.from_pretrained(os.path.join(root, ref_model)) if ref_model else None,
        args=config,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=_tokenizer(),
        peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]) if peft else None,
    )
    trainer.train()
    evaluation = trainer.evaluate()
    model = trainer.engine if pipeline else trainer.model
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    logs = [e for e in trainer.state.log_history if "loss" in e and "eval_loss" not in e]
    columns = sorted(trainer.train_dataset.column_names)  # the precomputed reference columns, where precomputed
    return {"logs": logs, "eval": evaluation, "weights": weights, "columns": columns}


def _runs(cases: list[str], out: str, pipeline: bool, root: str) -> dict:
    return {case: _run(case, os.path.join(out, case), pipeline, root) for case in cases}


def _replicas(group: str) -> int:
    """KTOTrainer runs on as many processes as the pipeline has replicas."""
    return 2 if group == "replicas" else 1


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """KTOTrainer's and PipeKTOTrainer's runs for `dp` replicas, made on first use: every group with as many replicas
    in one reference process group and one group of pipeline ranks."""
    root = str(tmp_path_factory.mktemp("kto"))
    tiny_model("llama", pad_token_id=0, eos_token_id=1).save_pretrained(os.path.join(root, "llama"))
    tiny_model("llama", seed=1, pad_token_id=0, eos_token_id=1).save_pretrained(os.path.join(root, "other"))
    made: dict[int, tuple[dict, list[dict]]] = {}

    def for_replicas(dp: int) -> tuple[dict, list[dict]]:
        if dp not in made:
            cases = [case for group, cases in GROUPS.items() for case in cases if _replicas(group) == dp]
            ref_out, pp_out = os.path.join(root, f"ref{dp}"), os.path.join(root, f"pp{dp}")
            for case in (c for c in cases if CASES[c].get("on_disk")):
                for out in (ref_out, pp_out):
                    _datasets(case, os.path.join(out, case), save=True)
            launch = {"launcher_env": True, "timeout": 900}
            ref = run_distributed(_runs, dp, cases, ref_out, False, root, **launch)[0]
            made[dp] = ref, run_distributed(_runs, 2 * dp, cases, pp_out, True, root, **launch)
        return made[dp]

    return for_replicas


@pytest.mark.timeout(1800)
@pytest.mark.parametrize("group", list(GROUPS))
def test_pipe_kto_matches_kto_trainer(runs, group):
    cases, dp = GROUPS[group], _replicas(group)
    ref, mine = runs(dp)
    for case in cases:
        theirs, errs = ref[case], dict.fromkeys((*LOGGED, "eval", "weights"), 0.0)
        assert len(theirs["logs"]) >= 4, case
        # the steps without undesirable (desirable) rows log no rejected (chosen) metrics, nor the margins; with
        # replicas, one replica's batch of desirable rows only (rows 12-15) meets the other's mixed one
        assert any("rewards/margins" not in e for e in theirs["logs"]) or dp > 1, case
        for rank in mine:
            run = rank[case]
            assert [e["step"] for e in run["logs"]] == [e["step"] for e in theirs["logs"]], case
            assert run["columns"] == theirs["columns"], (case, run["columns"], theirs["columns"])
            for a, b in zip(run["logs"], theirs["logs"]):
                assert a["num_tokens"] == b["num_tokens"], case
                assert {k for k in a if k in LOGGED} == {k for k in b if k in LOGGED}, (case, a, b)
                for key in (k for k in LOGGED if k in b):
                    errs[key] = max(errs[key], _err(key, a[key], b[key]))
            assert set(run["eval"]) == set(theirs["eval"]), case
            assert run["eval"]["eval_num_tokens"] == theirs["eval"]["eval_num_tokens"], case
            for key in (f"eval_{k}" for k in LOGGED if k != "grad_norm"):
                errs["eval"] = max(errs["eval"], _err(key, run["eval"][key], theirs["eval"][key]))
        weights = {}
        for rank in mine:
            weights.update(rank[case]["weights"])
        expected = {n.removeprefix("base_model.model."): w for n, w in theirs["weights"].items()}
        assert weights.keys() == expected.keys(), case
        errs["weights"] = max((weights[n] - expected[n]).abs().max().item() for n in weights)
        print(case, {k: f"{v:.2e}" for k, v in errs.items()})
        assert max(errs[k] for k in (*LOGGED, "eval")) < TOL and errs["weights"] < WEIGHT_TOL, (case, errs)


def test_pipe_kto_refuses_by_name(tmp_path):
    """What the pipeline cannot train as KTOTrainer does, refused before anything is built, all in one list."""
    from hf_pipe.errors import PipelineConfigError
    from hf_pipe.trl import PipeKTOConfig, PipeKTOTrainer

    checkpoint = str(tmp_path / "llama")
    tiny_model("llama", pad_token_id=0, eos_token_id=1).save_pretrained(checkpoint)
    args = PipeKTOConfig(
        output_dir=str(tmp_path / "out"), use_cpu=True, report_to=[], activation_offloading=True,
    )  # fmt: skip
    with pytest.raises(PipelineConfigError) as err:
        PipeKTOTrainer(
            checkpoint, args=args, train_dataset=_unpaired([True, False], 0), processing_class=_tokenizer(),
            compute_metrics=lambda p: {},
        )  # fmt: skip
    message = str(err.value)
    for name in ("activation_offloading=True", "compute_metrics"):
        assert name in message, (name, message)
    with pytest.raises(TypeError, match="PipeKTOConfig"):
        from trl import KTOConfig

        PipeKTOTrainer(checkpoint, args=KTOConfig(output_dir=str(tmp_path / "o2"), use_cpu=True, report_to=[]))
