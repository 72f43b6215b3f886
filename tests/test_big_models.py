"""Models bigger than a process: PipeTrainer(model=<path>) and meta-device models read only each rank's stages from
the checkpoint (bitwise the checkpoint's weights, the same first step as the whole model), a meta model without one is
initialised the same for every layout, start-up memory is one rank's share, and what cannot load is one error."""

from __future__ import annotations

import os
import threading
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests._data import PadCollator, lm_dataset
from tests._dist import run_distributed
from tests._models import tiny_model

SEED = 11


def _args(output_dir: str, **overrides):
    from hf_pipe import PipeTrainingArguments

    settings = dict(
        output_dir=output_dir, per_device_train_batch_size=8, max_steps=1, report_to=[], use_cpu=True, seed=SEED,
        pipeline_microbatches=4, save_strategy="no", disable_tqdm=True, learning_rate=1e-2, logging_steps=1,
    )  # fmt: skip
    settings.update(overrides)
    return PipeTrainingArguments(**settings)


def _meta_model(path: str):
    import transformers

    with torch.device("meta"):
        return transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.from_pretrained(path))


def _model(form: str, path: str):
    """The model argument for each form: a path, a meta model, or the model loaded whole."""
    from transformers import AutoModelForCausalLM

    if form == "path":
        return path
    if form == "meta":
        return _meta_model(path)
    return AutoModelForCausalLM.from_pretrained(path)


def _start_and_step(cases: list[tuple], root: str) -> tuple[list[list[dict]], list[set[str]]]:
    """Each case (checkpoint, form, pipeline settings): save right after start-up, train one step, save again.
    Also returns the checkpoint files each case opened."""
    import safetensors

    from hf_pipe import PipeTrainer

    opened: set[str] = set()
    safe_open = safetensors.safe_open

    def recording(path, *args, **kwargs):
        opened.add(os.path.basename(str(path)))
        return safe_open(path, *args, **kwargs)

    safetensors.safe_open = recording
    logs, files = [], []
    for i, (path, form, pipeline) in enumerate(cases):
        opened.clear()
        out = os.path.join(root, str(i))
        checkpoint = path if form == "meta" else None
        args = _args(out, pipeline_checkpoint=checkpoint, **pipeline)
        trainer = PipeTrainer(
            model=_model(form, path), args=args, train_dataset=lm_dataset(16), data_collator=PadCollator("causal_lm")
        )
        trainer.save_model(os.path.join(out, "start"))
        trainer.train()
        trainer.save_model(os.path.join(out, "end"))
        logs.append([e for e in trainer.state.log_history if "loss" in e])
        files.append(set(opened))
    safetensors.safe_open = safe_open
    return logs, files


def _weights(path: str) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).state_dict()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A tied GPT-2 in many shards, a tied Llama in one file."""
    root = tmp_path_factory.mktemp("checkpoints")
    tiny_model("gpt2").save_pretrained(root / "gpt2", max_shard_size="30KB")
    tiny_model("llama-tied").save_pretrained(root / "llama")
    assert len(list((root / "gpt2").glob("*.safetensors"))) > 4 and (root / "llama" / "model.safetensors").is_file()
    return root


def test_each_rank_reads_its_stages_exactly(checkpoints, tmp_path):
    """A save right after start-up is the checkpoint, bitwise; the first step equals the whole-model path's; tied
    weights whose copies sit on both ranks are read from the one saved tensor."""
    gpt2, llama = str(checkpoints / "gpt2"), str(checkpoints / "llama")
    cases = [
        (gpt2, "whole", {}),
        (gpt2, "path", {}),
        (gpt2, "meta", {"pipeline_frontend": "trace"}),
        (llama, "whole", {"pipeline_schedule": "interleaved1f1b"}),
        (llama, "path", {"pipeline_schedule": "interleaved1f1b", "pipeline_frontend": "trace"}),
        (llama, "meta", {"pipeline_schedule": "interleaved1f1b"}),
    ]
    ranks = run_distributed(_start_and_step, 2, cases, str(tmp_path), launcher_env=True, timeout=300)
    # each rank opened only the shards holding its stages' tensors (and one of them holds the tied embedding)
    shards = {p.name for p in (checkpoints / "gpt2").glob("*.safetensors")}
    first, last = ranks[0][1][1], ranks[1][1][1]
    assert first < shards and last < shards and first != last and first & last, (first, last)
    ranks = [logs for logs, _ in ranks]
    for i, (path, form, _) in enumerate(cases):
        source, start = _weights(path), _weights(tmp_path / str(i) / "start")
        assert start.keys() == source.keys() and all(torch.equal(start[k], source[k]) for k in source), (i, form)
        whole = i - i % 3  # the whole-model run of the same checkpoint
        assert ranks[0][i] == ranks[0][whole] and ranks[1][i] == ranks[0][i], (i, form)  # loss and grad norm
        end, reference = _weights(tmp_path / str(i) / "end"), _weights(tmp_path / str(whole) / "end")
        assert all(torch.equal(end[k], reference[k]) for k in reference), (i, form)
        assert any(not torch.equal(end[k], source[k]) for k in source)  # the step moved the weights


def _from_scratch(layouts: list[dict], root: str) -> None:
    from hf_pipe import PipeTrainer

    for i, pipeline in enumerate(layouts):
        if pipeline.get("pipeline_parallel_size", 1) > int(os.environ["WORLD_SIZE"]):
            continue
        model = tiny_model("llama-tied", num_hidden_layers=4)
        with torch.device("meta"):
            model = type(model)(model.config)
        trainer = PipeTrainer(
            model=model, args=_args(os.path.join(root, str(i)), **pipeline), train_dataset=lm_dataset(8)
        )
        trainer.save_model(os.path.join(root, str(i), "start"))


SCRATCH_LAYOUTS = [
    {"pipeline_parallel_size": 1},
    {"pipeline_parallel_size": 2},
    {"pipeline_parallel_size": 2, "pipeline_frontend": "trace", "pipeline_split": "0,1"},
    {"pipeline_parallel_size": 2, "pipeline_schedule": "interleaved1f1b", "pipeline_split": "0,1.5,2,3"},
    {"pipeline_parallel_size": 4},
    # on 4 ranks: two replicas of a 2-stage pipeline, DDP and FSDP2
    {"pipeline_parallel_size": 2, "pipeline_data_parallel": "fsdp"},
]


def test_from_scratch_is_the_same_on_every_layout(tmp_path):
    """A meta model without a checkpoint: each rank initialises its stages only, and every layout (1, 2, 4 stages,
    other splits, traced stages) gets the weights `hf_pipe.initialize_weights` gives the whole model on one process."""
    import hf_pipe

    for world in (2, 4):
        run_distributed(_from_scratch, world, SCRATCH_LAYOUTS, str(tmp_path / f"w{world}"), launcher_env=True)
    reference = tiny_model("llama-tied", num_hidden_layers=4)
    hf_pipe.initialize_weights(reference, seed=SEED)
    expected = reference.state_dict()
    assert not torch.equal(expected["model.layers.0.mlp.up_proj.weight"], tiny_model("llama-tied").state_dict()[
        "model.layers.0.mlp.up_proj.weight"
    ])  # fmt: skip
    for world in (2, 4):
        for i, layout in enumerate(SCRATCH_LAYOUTS):
            saved = tmp_path / f"w{world}" / str(i) / "start"
            if not saved.exists():
                continue
            weights = _weights(saved)
            assert all(torch.equal(weights[k], expected[k]) for k in expected), (world, layout)


# -- memory ----------------------------------------------------------------------------------------------------------
def _rss_anon() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))


def _startup_model(form: str, path: str):
    """bf16 checkpoint trained in fp32 (the usual mixed-precision set-up), or built from its config from scratch: by
    PipeTrainer per stage, or whole on every rank."""
    import transformers

    if form == "path":
        return path
    if form == "whole":
        return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    config = transformers.AutoConfig.from_pretrained(path, dtype=torch.float32)
    if form == "scratch-meta":
        with torch.device("meta"):
            return transformers.AutoModelForCausalLM.from_config(config)
    return transformers.AutoModelForCausalLM.from_config(config)


def _startup_peak(path: str, form: str) -> int:
    """Peak anonymous memory building the model and PipeTrainer's start-up add to this rank (sampled every 2 ms)."""
    from hf_pipe import PipeTrainer

    args = _args("/tmp/hf_pipe-unused", model_init_kwargs={"dtype": "float32"})
    data, collator = lm_dataset(8), PadCollator("causal_lm")
    baseline, peak, done = _rss_anon(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss_anon())
            time.sleep(0.002)

    sampler = threading.Thread(target=sample)
    sampler.start()
    PipeTrainer(model=_startup_model(form, path), args=args, train_dataset=data, data_collator=collator)
    done.set()
    sampler.join()
    return max(peak[0], _rss_anon()) - baseline


def test_startup_memory_is_one_ranks_share(tmp_path):
    """A 160 MiB (fp32) Llama on 4 ranks, its checkpoint in bf16, trained in fp32 — or from scratch: from its path
    or as a meta model each rank adds at most 1.6 × (model / 4) + 64 MiB; built whole, every rank adds the whole
    model (a same-dtype load stays cheap either way: safetensors maps the file)."""
    model = tiny_model("llama", vocab_size=4096, num_hidden_layers=12, hidden_size=512, intermediate_size=1536)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    model.to(torch.bfloat16).save_pretrained(tmp_path / "llama")
    del model
    bound = 1.6 * model_bytes / 4 + 64 * 2**20
    peaks = {
        # spawned ranks: a forked one inherits this process's heap, whose free pages its allocations may reuse unseen
        form: run_distributed(
            _startup_peak, 4, str(tmp_path / "llama"), form, launcher_env=True, timeout=300, fork=False
        )
        for form in ("path", "scratch-meta", "whole", "scratch-whole")
    }
    print(f"model {model_bytes / 2**20:.0f} MiB; bound {bound / 2**20:.0f} MiB; start-up MiB per rank:",
          {form: [round(b / 2**20) for b in ranks] for form, ranks in peaks.items()})  # fmt: skip
    assert max(peaks["path"]) <= bound and max(peaks["scratch-meta"]) <= bound
    assert min(peaks["whole"]) > bound and min(peaks["scratch-whole"]) > bound  # the check can fail


# -- errors ----------------------------------------------------------------------------------------------------------
def _load_errors(cases: list[tuple]) -> list[str]:
    from hf_pipe import PipelineConfigError, PipeTrainer

    messages = []
    for form, path in cases:
        try:
            model = tiny_model("llama") if form == "partial" else _model(form, path)
            if form == "partial":
                model.model.layers[1].to_empty(device="meta")
            PipeTrainer(
                model=model, args=_args("/tmp/hf_pipe-unused", pipeline_checkpoint=None), train_dataset=lm_dataset(8)
            )
            messages.append("")
        except PipelineConfigError as err:
            messages.append(str(err))
    return messages


def test_what_cannot_load_is_one_error_on_every_rank(checkpoints, tmp_path):
    source = load_file(checkpoints / "llama" / "model.safetensors")
    for name, change in {
        "extra": lambda sd: {
            **sd,
            "model.layers.9.mlp.up_proj.weight": sd["model.layers.0.mlp.up_proj.weight"].clone(),
        },
        "missing": lambda sd: {k: v for k, v in sd.items() if k != "model.layers.3.self_attn.q_proj.weight"},
        "shape": lambda sd: {**sd, "model.layers.2.mlp.down_proj.weight": torch.zeros(64, 100)},
    }.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text((checkpoints / "llama" / "config.json").read_text())
        save_file(change(source), tmp_path / name / "model.safetensors", metadata={"format": "pt"})
    cases = [("path", str(tmp_path / "extra")), ("path", str(tmp_path / "missing")), ("path", str(tmp_path / "shape"))]
    cases.append(("partial", ""))
    ranks = run_distributed(_load_errors, 2, cases, launcher_env=True, timeout=300)
    assert ranks[0] == ranks[1]
    extra, missing, shape, partial = ranks[0]
    assert "holds 1 tensor(s) no stage of LlamaForCausalLM takes: ['model.layers.9.mlp.up_proj.weight']" in extra
    assert (
        "lacks 1 tensor(s) of LlamaForCausalLM this rank's stages need: ['model.layers.3.self_attn.q_proj" in missing
    )
    assert "model.layers.2.mlp.down_proj.weight" in shape and "ignore_mismatched_sizes" in shape
    assert "LlamaForCausalLM has 9 of 39 parameters on the meta device: build it whole, or all on the meta" in partial
