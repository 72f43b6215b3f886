"""Each example in its smallest form on 2 CPU ranks: the loss falls, the checkpoint loads with from_pretrained.

(GPT-2 runs through both launchers in test_launch.py.)"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCHRUN = [os.path.join(os.path.dirname(sys.executable), "torchrun"), "--nproc_per_node", "2"]


def _run(args: list[str], timeout: int) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(TORCHRUN + args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    return out


@pytest.mark.timeout(400)
def test_bert_example_learns_the_bundled_labels(tmp_path):
    from transformers import AutoModelForSequenceClassification

    out = _run(
        ["examples/bert/train.py", "--output_dir", str(tmp_path), "--num_train_epochs", "4",
         "--per_device_train_batch_size", "16", "--learning_rate", "2e-4", "--report_to", "none"],
        timeout=380,
    )  # fmt: skip
    before, after = map(float, re.search(r"eval accuracy ([\d.]+) -> ([\d.]+)", out).groups())
    assert after >= 0.9 and after > before, out[-2000:]
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "final")
    assert model.config.num_labels == 2 and model.config.num_hidden_layers == 6


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory) -> str:
    """SmolLM2 converted once from its wheel's GGUF file, for the Llama examples."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("smollm2", os.path.join(ROOT, "examples", "llama", "smollm2.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.plain_checkpoint(str(tmp_path_factory.mktemp("smollm2") / "base"))


@pytest.mark.timeout(600)
def test_llama_example_fine_tunes_smollm2(tmp_path, smollm2):
    from transformers import AutoModelForCausalLM

    out = _run(
        ["examples/llama/train.py", "--output_dir", str(tmp_path), "--model_name_or_path", smollm2,
         "--max_steps", "3", "--per_device_train_batch_size", "8", "--max_length", "24", "--learning_rate", "2e-4",
         "--report_to", "none"],
        timeout=580,
    )  # fmt: skip
    before, after = map(float, re.search(r"loss on the text ([\d.]+) -> ([\d.]+)", out).groups())
    assert after < before - 0.3, out[-2000:]
    assert "before fine-tuning:" in out and "after fine-tuning:" in out
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    assert model.config.num_hidden_layers == 30 and model.config.tie_word_embeddings


@pytest.mark.timeout(400)
def test_lora_example_saves_a_peft_adapter(tmp_path, smollm2):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = _run(
        ["examples/llama/lora.py", "--output_dir", str(tmp_path), "--model_name_or_path", smollm2, "--max_steps", "2",
         "--per_device_train_batch_size", "8", "--max_length", "16", "--learning_rate", "3e-3", "--report_to", "none"],
        timeout=380,
    )  # fmt: skip
    before, after = map(float, re.search(r"loss on the text ([\d.]+) -> ([\d.]+)", out).groups())
    assert after < before and "after fine-tuning:" in out, out[-2000:]
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(tmp_path / "final"))
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(smollm2), tmp_path / "final")


@pytest.mark.timeout(400)
def test_sft_example_trains_packed_chats(tmp_path, smollm2):
    out = _run(
        ["examples/llama/sft.py", "--output_dir", str(tmp_path), "--model_name_or_path", smollm2, "--max_steps", "2",
         "--max_samples", "8", "--per_device_train_batch_size", "2", "--pipeline_microbatches", "2", "--max_length",
         "128", "--packing", "--learning_rate", "1e-3", "--report_to", "none", "--bf16", "False"],
        timeout=380,
    )  # fmt: skip
    loss = re.search(r"SFT eval loss ([\d.]+) -> ([\d.]+), token accuracy ([\d.]+) -> ([\d.]+)", out)
    assert loss is not None, out[-2000:]
    before, after, acc_before, acc_after = map(float, loss.groups())
    assert after < before and acc_after > acc_before, out[-2000:]


@pytest.mark.timeout(400)
def test_dpo_example_prefers_the_right_answers(tmp_path, smollm2):
    out = _run(
        ["examples/llama/dpo.py", "--output_dir", str(tmp_path), "--model_name_or_path", smollm2, "--max_steps", "3",
         "--max_samples", "8", "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "4",
         "--pipeline_microbatches", "2", "--max_length", "64", "--learning_rate", "5e-3", "--report_to", "none",
         "--bf16", "False"],
        timeout=380,
    )  # fmt: skip
    result = re.search(r"DPO eval loss ([\d.]+) -> ([\d.]+), reward accuracy ([\d.]+) -> ([\d.]+)", out)
    assert result is not None, out[-2000:]
    before, after, acc_before, acc_after = map(float, result.groups())
    # the adapter starts at zero: the policy is the reference, every reward 0, the loss log(2)
    assert abs(before - 0.693) < 1e-3 and after < before and acc_after > acc_before, out[-2000:]
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(tmp_path / "final"))


@pytest.mark.timeout(400)
def test_grpo_example_scores_its_completions(tmp_path, smollm2):
    out = _run(
        ["examples/llama/grpo.py", "--output_dir", str(tmp_path), "--model_name_or_path", smollm2, "--max_steps", "2",
         "--per_device_train_batch_size", "8", "--num_generations", "4", "--max_completion_length", "8",
         "--pipeline_microbatches", "2", "--logging_steps", "1", "--learning_rate", "1e-3", "--report_to", "none",
         "--bf16", "False"],
        timeout=380,
    )  # fmt: skip
    result = re.search(r"GRPO mean reward, first 1 steps ([\d.]+) -> last 1 steps ([\d.]+) \(2 steps\)", out)
    assert result is not None, out[-2000:]
    assert all(0.0 <= float(r) <= 1.0 for r in result.groups()), out[-2000:]
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(tmp_path / "final"))


@pytest.mark.timeout(300)
def test_t5_example_trains_and_generates_from_its_checkpoint(tmp_path):
    from transformers import AutoModelForSeq2SeqLM

    out = _run(
        ["examples/t5/train.py", "--output_dir", str(tmp_path), "--num_train_epochs", "1", "--num_examples", "320",
         "--eval_examples", "32", "--per_device_train_batch_size", "32", "--learning_rate", "5e-3",
         "--logging_steps", "2", "--report_to", "none"],
        timeout=280,
    )  # fmt: skip
    first, last = map(float, re.search(r"train loss ([\d.]+) -> ([\d.]+)", out).groups())
    assert last < first - 0.5, out[-2000:]
    assert "exact match on held-out sentences 0.00 -> " in out and "(generated)" in out, out[-2000:]
    model = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "final")
    assert model.config.num_layers == 3 and model.lm_head.weight.data_ptr() != model.shared.weight.data_ptr()
