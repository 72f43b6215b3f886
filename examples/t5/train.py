"""Train a small T5 from scratch across pipeline ranks to reverse the order of words, with PipeSeq2SeqTrainer.

Offline by default: sentences of 3-6 words are cut from the bundled text, the target is the same words in reverse
order ("the river runs" -> "runs river the"), a word-level tokenizer is trained on the text at start-up, and a small
T5 v1.1 (gated-gelu, untied head) is built from the arguments. Its encoder and decoder blocks are spread over the
ranks; evaluation generates (predict_with_generate) and scores the exact match, and the saved checkpoint is loaded
with AutoModelForSeq2SeqLM to generate before/after. On a machine with the hub, pass --model_name_or_path instead.

    torchrun --nproc_per_node 2 examples/t5/train.py --output_dir out/t5
    accelerate launch --config_file examples/accelerate/cpu.yaml examples/t5/train.py --output_dir out/t5
"""

from __future__ import annotations

import os
import random
import re
from dataclasses import dataclass, field

import datasets
import numpy as np
import torch
from transformers import (
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    DataCollatorForSeq2Seq,
    HfArgumentParser,
    PreTrainedTokenizerFast,
    T5Config,
    T5ForConditionalGeneration,
    set_seed,
)

from hf_pipe import PipeSeq2SeqTrainer, PipeSeq2SeqTrainingArguments

HERE = os.path.dirname(os.path.abspath(__file__))
BUNDLED_TEXT = os.path.join(HERE, "..", "data", "corpus.txt")


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(default=None, metadata={"help": "Pretrained T5; default: from scratch."})
    num_layers: int = field(default=3, metadata={"help": "Encoder blocks (and as many decoder blocks)."})
    d_model: int = field(default=128, metadata={"help": "Hidden size of the from-scratch model."})
    num_heads: int = field(default=4, metadata={"help": "Attention heads of the from-scratch model."})
    d_ff: int = field(default=256, metadata={"help": "Feed-forward size of the from-scratch model."})


@dataclass
class DataArguments:
    train_file: str = field(default=BUNDLED_TEXT, metadata={"help": "Plain text the sentences are cut from."})
    num_examples: int = field(default=4000, metadata={"help": "Training sentences."})
    eval_examples: int = field(default=128, metadata={"help": "Held-out sentences (scored by exact match)."})
    min_words: int = field(default=3, metadata={"help": "Shortest sentence, in words."})
    max_words: int = field(default=6, metadata={"help": "Longest sentence, in words."})


def train_tokenizer(text: str) -> PreTrainedTokenizerFast:
    """A word-level tokenizer of the text (lower-cased words; pad 0 is T5's decoder start, eos 1 ends each side)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([text], trainers.WordLevelTrainer(special_tokens=["<pad>", "</s>", "<unk>"]))
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def sentences(text: str, count: int, data: DataArguments, seed: int) -> list[dict[str, str]]:
    """`count` windows of the text's words, each with its words reversed as the target."""
    words = re.findall(r"[a-z]+", text.lower())
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        n = rng.randint(data.min_words, data.max_words)
        start = rng.randrange(len(words) - n)
        window = words[start : start + n]
        out.append({"source": " ".join(window), "target": " ".join(reversed(window))})
    return out


def generate(model, tokenizer, sources: list[str]) -> list[str]:
    inputs = tokenizer(sources, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**inputs, do_sample=False)
    return tokenizer.batch_decode(out, skip_special_tokens=True)


def exact_match(model, tokenizer, rows: list[dict[str, str]]) -> float:
    predictions = generate(model, tokenizer, [r["source"] for r in rows])
    return sum(p == r["target"] for p, r in zip(predictions, rows)) / len(rows)


def main() -> None:
    parser = HfArgumentParser((ModelArguments, DataArguments, PipeSeq2SeqTrainingArguments))
    model_args, data_args, args = parser.parse_args_into_dataclasses()
    args.predict_with_generate = True  # evaluation scores the generated words
    set_seed(args.seed)
    with open(data_args.train_file) as f:
        text = f.read()

    if model_args.model_name_or_path:
        tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path)
        model = AutoModelForSeq2SeqLM.from_pretrained(model_args.model_name_or_path)
    else:
        tokenizer = train_tokenizer(text)
        config = T5Config(
            vocab_size=len(tokenizer),
            d_model=model_args.d_model,
            d_kv=model_args.d_model // model_args.num_heads,
            d_ff=model_args.d_ff,
            num_layers=model_args.num_layers,
            num_heads=model_args.num_heads,
            feed_forward_proj="gated-gelu",
            tie_word_embeddings=False,  # T5 v1.1: no rescaling before the head
            dropout_rate=0.0,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            decoder_start_token_id=tokenizer.pad_token_id,
        )
        model = T5ForConditionalGeneration(config)  # same seed on every rank: the same weights everywhere
        # an untied head of its own, as T5 v1.1 checkpoints load (transformers ties T5's head otherwise)
        model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.shared.weight) * config.d_model**-0.5)
        model.all_tied_weights_keys.pop("lm_head.weight", None)

    model.generation_config.max_new_tokens = data_args.max_words + 2  # the words and the end of the sequence

    train_rows = sentences(text, data_args.num_examples, data_args, args.seed)
    eval_rows = sentences(text, data_args.eval_examples, data_args, args.seed + 1)
    before = exact_match(model, tokenizer, eval_rows[:32]) if args.process_index == 0 else None

    def tokenize(rows):
        return tokenizer(rows["source"], text_target=rows["target"])

    train = datasets.Dataset.from_list(train_rows).map(tokenize, batched=True, remove_columns=["source", "target"])
    evaluation = datasets.Dataset.from_list(eval_rows).map(tokenize, batched=True, remove_columns=["source", "target"])

    def metrics(pred):
        tokens = np.where(pred.predictions != -100, pred.predictions, tokenizer.pad_token_id)
        labels = np.where(pred.label_ids != -100, pred.label_ids, tokenizer.pad_token_id)
        predicted = tokenizer.batch_decode(tokens, skip_special_tokens=True)
        wanted = tokenizer.batch_decode(labels, skip_special_tokens=True)
        return {"exact_match": float(np.mean([p == w for p, w in zip(predicted, wanted)]))}

    # Sources and targets differ in length: each batch pads both to their own longest (dynamic padding); the
    # collator makes decoder_input_ids with the model's own shift of the labels.
    trainer = PipeSeq2SeqTrainer(
        model=model,
        args=args,
        train_dataset=train,
        eval_dataset=evaluation,
        data_collator=DataCollatorForSeq2Seq(tokenizer, model=model),
        processing_class=tokenizer,
        compute_metrics=metrics,
    )
    trainer.train()
    scores = trainer.evaluate()
    final_dir = os.path.join(args.output_dir, "final")
    trainer.save_model(final_dir)

    if trainer.is_world_process_zero():
        logged = [e["loss"] for e in trainer.state.log_history if "loss" in e]
        if len(logged) >= 2:
            print(f"train loss {logged[0]:.3f} -> {logged[-1]:.3f} (logged every {args.logging_steps} steps)")
        print(f"eval loss {scores['eval_loss']:.3f}, exact match {scores.get('eval_exact_match', 0):.2f} (generated)")
        # The checkpoint is an ordinary HF one: load it on one device and generate.
        reloaded = AutoModelForSeq2SeqLM.from_pretrained(final_dir)
        tokenizer = AutoTokenizer.from_pretrained(final_dir)
        after = exact_match(reloaded, tokenizer, eval_rows[:32])
        print(f"exact match on held-out sentences {before:.2f} -> {after:.2f} (before training, saved checkpoint)")
        for row, predicted in zip(eval_rows[:3], generate(reloaded, tokenizer, [r["source"] for r in eval_rows[:3]])):
            print(f"  {row['source']!r} -> {predicted!r} (wanted {row['target']!r})")


if __name__ == "__main__":
    main()
