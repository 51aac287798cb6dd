"""Prompt templates for instruction records: Alpaca, the paper's Unnatural Instructions format, or the chat template."""

from __future__ import annotations

from typing import Callable

ALPACA_WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                     "context. Write a response that appropriately completes the request.\n\n"
                     "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
ALPACA_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                   "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
UNNATURAL = "{instruction} ###{input} ###Response:"
TEMPLATES = ("alpaca", "unnatural", "chat")


def alpaca_prompt(record: dict) -> str:
    template = ALPACA_WITH_INPUT if record.get("input") else ALPACA_NO_INPUT
    return template.format(instruction=record["instruction"], input=record.get("input", ""))


def unnatural_prompt(record: dict) -> str:
    return UNNATURAL.format(instruction=record["instruction"], input=record.get("input", ""))


def chat_prompt(record: dict, tokenizer) -> str:
    """The model's own chat template around instruction and input, ready for the assistant's answer."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("template 'chat' is not available: this tokenizer has no chat template; use alpaca")
    content = record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")
    return tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                         add_generation_prompt=True)


def prompt_renderer(template: str, tokenizer=None) -> Callable[[dict], str]:
    """A function from record to prompt text for a template name."""
    if template == "alpaca":
        return alpaca_prompt
    if template == "unnatural":
        return unnatural_prompt
    if template == "chat":
        return lambda record: chat_prompt(record, tokenizer)
    raise ValueError(f"template {template!r} is not known: use one of {', '.join(TEMPLATES)}")


def full_text_renderer(template: str, tokenizer=None) -> Callable[[dict], str]:
    """Prompt plus reference answer: the text a model is calibrated or teacher-forced on."""
    prompt = prompt_renderer(template, tokenizer)
    return lambda record: prompt(record) + record["output"]
