"""Mixture-of-experts decoders (Qwen3-MoE, Mixtral) with HF's load-balancing loss on, against Trainer on one process.

Semantics under test: the aux term is per microbatch, as Trainer computes it with gradient accumulation over the
same microbatches (the reference: per_device_train_batch_size 2 × 4 accumulation steps against the pipeline's batch
of 8 in 4 microbatches); with one microbatch it is Trainer's on the whole batch. Evaluation runs the whole batch (the
microbatches' router statistics added first), as Trainer's evaluation does. The reference Trainer logs the
`aux_loss` HF's forward reports, averaged over its forwards since the last log, as PipeTrainer logs it.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers import Trainer

from hf_pipe import PipeTrainer
from hf_pipe.families import get_family
from hf_pipe.router_loss import RouterLoss, router_loss_of
from hf_pipe.split import plan_split
from tests._data import PadCollator
from tests._models import tiny_model
from tests.test_trainer_equivalence import compare_many


class AuxLoggingTrainer(Trainer):
    """Trainer that also logs HF's `outputs.aux_loss` (the mean over its forwards since the last log)."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, True, num_items_in_batch)
        mode = "train" if self.model.training else "eval"
        self.__dict__.setdefault("_aux", {}).setdefault(mode, []).append(float(outputs.aux_loss.detach()))
        return (loss, outputs) if return_outputs else loss

    def log(self, logs, start_time=None):
        mode = "train" if self.model.training else "eval"
        values = self.__dict__.setdefault("_aux", {}).pop(mode, [])
        if values:
            logs[("eval_" if mode == "eval" else "") + "aux_loss"] = sum(values) / len(values)
        super().log(logs, start_time)


def _hf_aux(model, router_logits, mask):
    module = __import__(type(model).__module__, fromlist=["load_balancing_loss_func"])
    return module.load_balancing_loss_func(router_logits, model.num_experts, model.num_experts_per_tok, mask)


@pytest.mark.parametrize("name", ["qwen3_moe", "mixtral"])
def test_stage_sums_give_hf_aux_loss(name):
    """Partial sums added stage after stage (any cut of the layers) and microbatch after microbatch give HF's
    `load_balancing_loss_func` of every layer's router logits, with and without an attention mask; gradients too."""
    model = tiny_model(name)
    router = router_loss_of(model)
    assert router is not None and (router.num_experts, router.top_k, router.coef) == (4, 2, 0.5)
    g = torch.Generator().manual_seed(3)
    logits = [torch.randn(6 * 5, 4, generator=g, requires_grad=True) for _ in range(4)]
    mask = torch.ones(6, 5, dtype=torch.long)
    mask[1, 3:] = 0
    mask[4, 1:] = 0
    for attention_mask in (None, mask):
        expected = _hf_aux(model, tuple(logits), attention_mask)
        (want,) = torch.autograd.grad(expected, logits[2])
        for cut in (1, 2, 3):  # two stages: layers [0, cut) and [cut, 4)
            sums = router.add_layers(router.zeros(torch.device("cpu")), logits[:cut], attention_mask)
            sums = router.add_layers(sums, logits[cut:], attention_mask)
            aux = router.aux(sums)
            (got,) = torch.autograd.grad(aux, logits[2])
            assert torch.equal(aux, expected) and torch.allclose(got, want, rtol=1e-6, atol=1e-9)
        # microbatches of 2 rows: their sums added first give the whole batch's aux (evaluation)
        rows = [slice(0, 2), slice(2, 4), slice(4, 6)]
        per_mb = [
            router.add_layers(
                router.zeros(torch.device("cpu")),
                [x.view(6, 5, 4)[r].reshape(-1, 4) for x in logits],
                None if attention_mask is None else attention_mask[r],
            )
            for r in rows
        ]
        assert torch.allclose(router.aux(torch.cat(per_mb)), expected, rtol=1e-6)
    # no router loss: output_router_logits off, or a head whose forward adds none
    assert router_loss_of(tiny_model(name, output_router_logits=False)) is None
    config = tiny_model(name).config
    config.num_labels = 2
    assert router_loss_of(getattr(transformers, type(model).__name__.replace("CausalLM", "SequenceClassification"))(
        config)) is None  # fmt: skip
    assert isinstance(router, RouterLoss)


def test_cost_model_counts_active_experts():
    """FLOPs per token count the top-k experts a token runs (and dense blocks at their own cost); parameters count
    every expert."""
    config = transformers.Qwen3MoeConfig(
        vocab_size=1000, hidden_size=64, intermediate_size=256, moe_intermediate_size=32, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=16, num_experts_per_tok=2,
        mlp_only_layers=[0], max_position_embeddings=128,
    )  # fmt: skip
    flops = get_family("qwen3_moe").flops_per_token(config, "causal_lm", 128)
    h = 64
    attention = flops.first_half
    sparse = 2 * h * 16 + 2 * (2 * 3 * h * 32)  # router + top-2 of 16 experts
    dense = 2 * 3 * h * 256
    assert flops.layers == (attention + dense, attention + sparse, attention + sparse, attention + sparse)
    plan = plan_split(config, 2, "uniform")
    all_experts = 16 * 3 * h * 32
    layer_params = [sum(p.numel() for p in layer.parameters()) for layer in _meta(config).model.layers]
    assert layer_params[1] > all_experts  # every expert's weights are the stage's parameters
    assert plan.stages[1].flops_per_token < plan.stages[0].flops_per_token + 2 * h * 1000 * 2  # not all experts
    # Qwen2-MoE's shared expert runs for every token
    shared = transformers.Qwen2MoeConfig(
        vocab_size=1000, hidden_size=64, intermediate_size=256, moe_intermediate_size=32,
        shared_expert_intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        num_experts=8, num_experts_per_tok=2,
    )  # fmt: skip
    cost = get_family("qwen2_moe").flops_per_token(shared, "causal_lm", 128)
    assert cost.layers[0] - cost.first_half == 2 * h * 8 + 2 * (2 * 3 * h * 32) + 2 * 3 * h * 128 + 2 * h


def _meta(config):
    with torch.device("meta"):
        return transformers.Qwen3MoeForCausalLM(config)


_GA = {
    "label": "vs GA",
    "classes": (AuxLoggingTrainer, PipeTrainer),
    "rows": (48, 16),
    "args": {"per_device_eval_batch_size": 8},
    "ref_args": {"per_device_train_batch_size": 2, "gradient_accumulation_steps": 4},
}
_WHOLE = {"label": "vs whole batch", "classes": (AuxLoggingTrainer, PipeTrainer), "rows": (48, 16)}


def test_moe_aux_loss_matches_trainer_on_every_schedule(tmp_path):
    schedules = [
        {"pipeline_schedule": "1f1b", "pipeline_microbatches": 4},
        {"pipeline_schedule": "interleaved1f1b", "pipeline_microbatches": 4},
        {"pipeline_schedule": "zbvzerobubble", "pipeline_microbatches": 4},
    ]
    cases = [
        ("qwen3_moe", schedules, _GA),
        ("mixtral", schedules, _GA),
        ("qwen3_moe", [{"pipeline_schedule": "gpipe", "pipeline_microbatches": 1}], _WHOLE),
    ]
    worst = compare_many(cases, tmp_path, 2)
    for label, errs in worst.items():
        assert "aux_loss" in errs["metric_names"] and "eval_aux_loss" in errs["metric_names"], label
    print(worst)


class FixedLengthCollator(PadCollator):
    """Rows padded to 20 tokens (masked, labels -100): one batch shape, so that traced stages are traced once."""

    def __call__(self, features):
        batch = super().__call__(features + [{"input_ids": [0] * 20}])
        return {k: v[:-1] for k, v in batch.items()}


def fixed_length(task):
    return FixedLengthCollator(task)


@pytest.mark.timeout(600)
def test_moe_aux_loss_matches_trainer_traced(tmp_path):
    """The trace frontend: the last traced stage returns every layer's router logits (threaded to it through the
    stages), turned there into the same statistics. Batches of one length (traced once), padding masked."""
    traced = [
        {"pipeline_frontend": "trace", "pipeline_schedule": "1f1b", "pipeline_microbatches": 4},
        {"pipeline_frontend": "trace", "pipeline_schedule": "zbvzerobubble", "pipeline_microbatches": 4},
    ]
    setup = {**_GA, "collator": fixed_length, "rows": (32, 8)}
    cases = [("qwen3_moe", traced[:1], setup), ("mixtral", traced[1:], setup)]
    worst = compare_many(cases, tmp_path, 2)
    for label, errs in worst.items():
        assert "aux_loss" in errs["metric_names"] and "eval_aux_loss" in errs["metric_names"], label
    print(worst)


# -- TRL -------------------------------------------------------------------------------------------------------------
def _sft_run(output_dir: str, pipeline: dict | None) -> dict:
    import os

    from trl import SFTConfig, SFTTrainer

    from hf_pipe.trl import PipeSFTConfig, PipeSFTTrainer
    from tests.test_trl import _texts, _tokenizer

    settings = dict(
        output_dir=output_dir, per_device_eval_batch_size=8, learning_rate=1e-2, num_train_epochs=1, logging_steps=1,
        save_strategy="no", report_to=[], seed=3, max_length=32, disable_tqdm=True, use_cpu=True,
        gradient_checkpointing=False, bf16=False, router_aux_loss_coef=0.3,
    )  # fmt: skip
    if pipeline is None:  # SFT accumulating over the pipeline's microbatches
        config = SFTConfig(**settings, per_device_train_batch_size=2, gradient_accumulation_steps=4)
    else:
        config = PipeSFTConfig(**settings, per_device_train_batch_size=8, **pipeline)
    # router logits off in the config: SFT turns them on for its non-zero coefficient
    model = tiny_model("qwen3_moe", pad_token_id=0, eos_token_id=1, output_router_logits=False)
    trainer = (SFTTrainer if pipeline is None else PipeSFTTrainer)(
        model=model, args=config, train_dataset=_texts(32, 0), eval_dataset=_texts(8, 5),
        processing_class=_tokenizer(),
    )  # fmt: skip
    trainer.train()
    evaluation = trainer.evaluate()
    trainer.save_model(os.path.join(output_dir, "final"))
    source = trainer.engine if pipeline is not None else trainer.model
    weights = {n: p.detach().clone() for n, p in source.named_parameters()}
    logs = [e for e in trainer.state.log_history if "loss" in e and "eval_loss" not in e]
    return {"logs": logs, "eval": evaluation, "weights": weights}


def _sft_runs(root: str, pipelines: list[dict | None]) -> list[dict]:
    import os

    return [_sft_run(os.path.join(root, str(i)), p) for i, p in enumerate(pipelines)]


@pytest.mark.timeout(400)
def test_pipe_sft_moe_aux_loss_matches_sft_trainer(tmp_path):
    """PipeSFTTrainer adds and logs SFT's aux loss (its coefficient, averaged over the accumulation steps, which are
    the microbatches here); SFT's own reference accumulates over the same microbatches."""
    from tests._dist import run_distributed
    from tests.test_trainer_equivalence import _rel

    pipelines = [
        {"pipeline_schedule": "1f1b", "pipeline_microbatches": 4},
        {"pipeline_schedule": "interleaved1f1b", "pipeline_microbatches": 4},
    ]
    [ref] = run_distributed(_sft_runs, 1, str(tmp_path / "ref"), [None], launcher_env=True, timeout=300)[0]
    mine = run_distributed(_sft_runs, 2, str(tmp_path / "pp"), pipelines, launcher_env=True, timeout=300)
    assert len(ref["logs"]) == 4 and all(e["aux_loss"] > 1.0 for e in ref["logs"])
    for i, pipeline in enumerate(pipelines):
        errs = dict.fromkeys(("loss", "grad_norm", "aux_loss", "eval", "weights"), 0.0)
        weights = {}
        for rank in mine:
            run = rank[i]
            weights.update(run["weights"])
            assert [e["step"] for e in run["logs"]] == [e["step"] for e in ref["logs"]]
            for a, b in zip(run["logs"], ref["logs"]):
                for key in ("loss", "grad_norm", "aux_loss"):
                    errs[key] = max(errs[key], _rel(a[key], b[key]))
            for key in ("eval_loss", "eval_aux_loss"):
                errs["eval"] = max(errs["eval"], _rel(run["eval"][key], ref["eval"][key]))
        errs["weights"] = max((weights[n] - ref["weights"][n]).abs().max().item() for n in weights)
        print(pipeline["pipeline_schedule"], errs)
        assert max(errs[k] for k in ("loss", "grad_norm", "aux_loss", "eval")) < 2e-4 and errs["weights"] < 5e-4, errs


def _dpo_run(output_dir: str, pipeline: dict | None, checkpoint: str) -> dict:
    import os

    from trl import DPOConfig, DPOTrainer

    from hf_pipe.trl import PipeDPOConfig, PipeDPOTrainer
    from tests.test_trl import _tokenizer
    from tests.test_trl_dpo import _preferences

    settings = dict(
        output_dir=output_dir, per_device_eval_batch_size=4, learning_rate=2e-3, num_train_epochs=1, logging_steps=1,
        save_strategy="no", report_to=[], seed=3, max_length=24, disable_tqdm=True, use_cpu=True, bf16=False,
        router_aux_loss_coef=0.3,
    )  # fmt: skip
    if pipeline is None:  # DPO accumulating over the pipeline's microbatches (2 pairs each)
        config = DPOConfig(**settings, per_device_train_batch_size=2, gradient_accumulation_steps=2)
    else:
        config = PipeDPOConfig(**settings, per_device_train_batch_size=4, **pipeline)
    trainer = (DPOTrainer if pipeline is None else PipeDPOTrainer)(
        model=checkpoint, args=config, train_dataset=_preferences(12, 0), eval_dataset=_preferences(4, 5),
        processing_class=_tokenizer(),
    )  # fmt: skip
    trainer.train()
    evaluation = trainer.evaluate()
    source = trainer.engine if pipeline is not None else trainer.model
    weights = {n: p.detach().clone() for n, p in source.named_parameters()}
    logs = [e for e in trainer.state.log_history if "loss" in e and "eval_loss" not in e]
    return {"logs": logs, "eval": evaluation, "weights": weights, "dir": os.path.basename(output_dir)}


def _dpo_runs(root: str, pipelines: list[dict | None], checkpoint: str) -> list[dict]:
    import os

    return [_dpo_run(os.path.join(root, str(i)), p, checkpoint) for i, p in enumerate(pipelines)]


@pytest.mark.timeout(400)
def test_pipe_dpo_moe_aux_loss_matches_dpo_trainer(tmp_path):
    """PipeDPOTrainer adds and logs DPO's aux loss of the policy's forward (DPO's coefficient, divided by the
    accumulation steps as Trainer divides DPO's loss; the frozen reference adds none); DPOTrainer's reference
    accumulates over the same microbatches (pairs), the reference model read from the checkpoint."""
    from tests._dist import run_distributed
    from tests.test_trainer_equivalence import _rel

    checkpoint = str(tmp_path / "moe")
    tiny_model("qwen3_moe", pad_token_id=0, eos_token_id=1, output_router_logits=False).save_pretrained(checkpoint)
    pipelines = [{"pipeline_schedule": "zbvzerobubble", "pipeline_microbatches": 2}]
    [ref] = run_distributed(_dpo_runs, 1, str(tmp_path / "ref"), [None], checkpoint, launcher_env=True, timeout=300)[0]
    mine = run_distributed(_dpo_runs, 2, str(tmp_path / "pp"), pipelines, checkpoint, launcher_env=True, timeout=300)
    assert len(ref["logs"]) == 3 and all(e["aux_loss"] > 1.0 for e in ref["logs"])
    errs = dict.fromkeys(("loss", "grad_norm", "aux_loss", "rewards/margins", "eval", "weights"), 0.0)
    weights = {}
    for rank in mine:
        run = rank[0]
        weights.update(run["weights"])
        assert [e["step"] for e in run["logs"]] == [e["step"] for e in ref["logs"]]
        for a, b in zip(run["logs"], ref["logs"]):
            for key in ("loss", "grad_norm", "aux_loss"):
                errs[key] = max(errs[key], _rel(a[key], b[key]))
            errs["rewards/margins"] = max(errs["rewards/margins"], abs(a["rewards/margins"] - b["rewards/margins"]))
        for key in ("eval_loss", "eval_aux_loss"):
            errs["eval"] = max(errs["eval"], _rel(run["eval"][key], ref["eval"][key]))
    errs["weights"] = max((weights[n] - ref["weights"][n]).abs().max().item() for n in weights)
    print(errs)
    assert max(errs[k] for k in ("loss", "grad_norm", "aux_loss", "rewards/margins", "eval")) < 2e-4, errs
    assert errs["weights"] < 5e-4, errs


# -- the other families, one step against HF's forward per microbatch -------------------------------------------------
def _step_batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 97, (8, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    mask[5, 5:] = 0
    return dict(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))


def _hf_step(name: str, microbatches: int):
    """HF's forward and backward per microbatch, its loss normalised by the batch's label tokens (Trainer with
    gradient accumulation): the summed loss, the mean aux loss, the gradients."""
    model, batch = tiny_model(name), _step_batch()
    items = int((batch["labels"][:, 1:] != -100).sum())
    total, aux = 0.0, 0.0
    for i in range(microbatches):
        out = model(**{k: v.chunk(microbatches)[i] for k, v in batch.items()}, num_items_in_batch=items)
        out.loss.backward()
        total, aux = total + out.loss.item(), aux + out.aux_loss.item() / microbatches
    return total, aux, {n: p.grad for n, p in model.named_parameters()}


def _pipe_steps(names: list[str], schedules: list[str], microbatches: int):
    from hf_pipe.engine import PipelineEngine

    results = {}
    for name in names:
        for schedule in schedules:
            engine = PipelineEngine(tiny_model(name), schedule=schedule, microbatches=microbatches)
            batch = _step_batch()
            loss = engine.train_step(batch, num_items=int((batch["labels"][:, 1:] != -100).sum()))
            _, aux, count = engine.metrics["aux_loss"]
            grads = {n: p.grad.clone() for n, p in engine.named_parameters()}
            results[name, schedule] = (loss.item(), aux / count, grads)
    return results


def test_shared_expert_and_olmoe_step_matches_hf():
    """Qwen2-MoE (a shared expert, dense blocks between sparse ones) and OLMoE: one step's loss (aux included), the
    aux loss and every gradient against HF's forward per microbatch, on 1F1B and ZBV."""
    from tests._dist import run_distributed

    names, schedules = ["qwen2_moe", "olmoe"], ["1f1b", "zbvzerobubble"]
    per_rank = run_distributed(_pipe_steps, 2, names, schedules, 4, fork=True)
    for name in names:
        loss, aux, grads = _hf_step(name, 4)
        for schedule in schedules:
            mine = {}
            for rank in per_rank:
                mine.update(rank[name, schedule][2])
            got_loss, got_aux, _ = per_rank[0][name, schedule]
            assert mine.keys() == grads.keys()
            worst = max(((mine[n] - g).abs().max() / g.abs().max()).item() for n, g in grads.items())
            router = [n for n in grads if n.endswith("mlp.gate.weight")]
            assert router and all(grads[n].abs().max() > 0 for n in router)  # the aux loss reaches the routers
            assert abs(got_loss - loss) / loss < 1e-6 and abs(got_aux - aux) / aux < 1e-6 and worst < 1e-5, (
                name, schedule, got_loss, loss, got_aux, aux, worst,
            )  # fmt: skip
