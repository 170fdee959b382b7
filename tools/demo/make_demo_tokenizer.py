"""Train the demo's small byte-level BPE tokenizer (vocab 1024) on GSM8K text and save it as a
transformers tokenizer in fasttrain/demo/model/.

Qwen2-like on purpose, so the demo exercises the same code paths as the real models: byte-level BPE,
``<|endoftext|>`` as pad/eos, ``<|im_start|>``/``<|im_end|>`` chat markers, no BOS, and numbers split
into single digits (a tiny model can learn digit-wise arithmetic; whole-number tokens it cannot).

    python tools/demo/make_demo_tokenizer.py [--gsm8k ../shared/data/gsm8k_test.jsonl]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_GSM8K = REPO_ROOT.parent / "shared" / "data" / "gsm8k_test.jsonl"
DEFAULT_OUT = REPO_ROOT / "fasttrain" / "demo" / "model"

VOCAB_SIZE = 1024
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# Qwen2's template, shortened: a default system message, then ChatML turns.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# The fixed strings of every prompt template, so they become few tokens.
TEMPLATE_TEXTS = [
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n",
    "\nPlease reason step by step, and put your final answer within \\boxed{}.<|im_end|>\n<|im_start|>assistant\n",
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
    "\n\n### Instruction:\n",
    "\n\n### Response:\n",
    "User: ",
    "\n\nAssistant: ",
    "Let's think step by step.\nStep 1:",
    "The answer is: ",
]


def training_texts(gsm8k_path: Path) -> list[str]:
    texts = []
    with open(gsm8k_path, encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                row = json.loads(line)
                texts += [row["instruction"], row["output"]]
    # Repeated so their pieces win merges against the (much larger) problem text.
    return texts + TEMPLATE_TEXTS * 200


def build_tokenizer(texts: list[str]) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    # Digits first, so "130" becomes "1","3","0" before byte-level splitting; ByteLevel's regex
    # then splits words/punctuation GPT-2 style.
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte: no unknown characters
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def write_portable_config(out: Path) -> None:
    """Rewrite the config in the layout both transformers 4.x and 5.x read.

    transformers 5 saves ``tokenizer_class: TokenizersBackend``, ``extra_special_tokens`` and a
    separate chat_template.jinja, which 4.x does not understand; the 4.x layout below loads in both.
    """
    special = {
        "bos_token": None,
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
    }
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "model_max_length": 4096,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(
        json.dumps({k: v for k, v in special.items() if v is not None}, indent=2) + "\n")
    (out / "chat_template.jinja").unlink(missing_ok=True)  # would override the inline template in 5.x


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gsm8k", type=Path, default=DEFAULT_GSM8K)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()

    from transformers import PreTrainedTokenizerFast

    backend = build_tokenizer(training_texts(args.gsm8k))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        bos_token=None,  # like Qwen2: no BOS
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        model_max_length=4096,
        clean_up_tokenization_spaces=False,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(args.out)
    write_portable_config(args.out)
    total = sum(p.stat().st_size for p in args.out.glob("*token*"))
    print(f"saved a {len(tokenizer)}-token tokenizer to {args.out} ({total / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
