"""Prompt templates (DESIGN §2): the raw strings the Step-DPO paper used, plus the tokenizer's own
chat template. The result always ends with ``initial_reason_steps`` so the step continues it."""
from __future__ import annotations

from fasttrain.errors import DataError

TEMPLATES = ("qwen2-boxed", "alpaca", "deepseek-math", "chat")

BOXED_INSTRUCTION = "\nPlease reason step by step, and put your final answer within \\boxed{}."


def render_prompt(template: str, prompt: str, initial_reason_steps: str, tokenizer=None) -> str:
    """The text the model sees before the step. Plain concatenation, never str.format: prompts
    contain braces (LaTeX), and so does the instruction's ``\\boxed{}``."""
    if template == "qwen2-boxed":
        return (
            "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
            + prompt
            + BOXED_INSTRUCTION
            + "<|im_end|>\n<|im_start|>assistant\n"
            + initial_reason_steps
        )
    if template == "alpaca":
        return (
            "Below is an instruction that describes a task. Write a response that appropriately "
            "completes the request.\n\n### Instruction:\n"
            + prompt
            + "\n\n### Response:"
            + "\n"
            + initial_reason_steps
        )
    if template == "deepseek-math":
        return "User: " + prompt + BOXED_INSTRUCTION + "\n\nAssistant:" + " " + initial_reason_steps
    if template == "chat":
        return _render_chat(prompt, tokenizer) + initial_reason_steps
    raise ValueError(f"unknown prompt template {template!r}; choose one of {', '.join(TEMPLATES)}")


def _render_chat(prompt: str, tokenizer) -> str:
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__
        raise DataError(
            f"template 'chat' needs a tokenizer with a chat template, and {name!r} has none; "
            f"choose another template ({', '.join(t for t in TEMPLATES if t != 'chat')})"
        )
    messages = [{"role": "user", "content": prompt + BOXED_INSTRUCTION}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
