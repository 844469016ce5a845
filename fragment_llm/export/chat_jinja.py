"""Our chat templates (tokenizer/chat_template.py) as Jinja `chat_template` strings.

transformers' `apply_chat_template` and llama.cpp render a conversation to text with
this template, then tokenize the text with special tokens recognised. For every
conversation whose text spells no special token, that gives exactly the ids
`render_prompt` gives (tested against it): the document start `<|endoftext|>`, the
system prompt if any, each turn's opening and body, and with `add_generation_prompt`
the assistant's opening.

What text cannot express: a message that spells `<|end|>` becomes the special token
there, where our renderer keeps it text. Every Jinja chat template has this weakness;
docs/export.md says so. Newlines are written as `'\\n'` expressions, never literally:
transformers renders with `trim_blocks`, which would eat a newline after a tag.
"""

from __future__ import annotations

from fragment_llm.config import SPECIAL_TOKENS_CHAT_FORMAT
from fragment_llm.tokenizer.tokenizer import EOT

# Shared frame: one optional system message, first; then user and assistant turns.
_FRAME = (
    "{{- '" + EOT + "' -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}"
    "{%- if not loop.first -%}{{- raise_exception('a system message must come first') -}}"
    "{%- endif -%}"
    "{%- if message['content'] -%}SYSTEM{%- endif -%}"
    "{%- elif message['role'] == 'user' -%}USER"
    "{%- elif message['role'] == 'assistant' -%}ASSISTANT"
    "{%- else -%}{{- raise_exception('roles are system, user and assistant') -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}OPENING{%- endif -%}")

_SPECIAL_TOKENS = {
    "SYSTEM": "{{- '<|system|>' + message['content'] + '<|end|>' -}}",
    "USER": "{{- '<|user|>' + message['content'] + '<|end|>' -}}",
    "ASSISTANT": "{{- '<|assistant|>' + message['content'] + '<|end|>' -}}",
    "OPENING": "{{- '<|assistant|>' -}}",
}
_TRANSCRIPT = {
    "SYSTEM": "{{- message['content'] + '\\n\\n' -}}",
    "USER": "{{- 'User: ' + message['content'] + '\\n' -}}",
    "ASSISTANT": "{{- 'Assistant: ' + message['content'] + '\\n' -}}",
    "OPENING": "{{- 'Assistant:' -}}",
}


def chat_template_jinja(chat_format: str | None) -> str:
    """The Jinja template for a checkpoint's `chat_format` (as `template_for` picks)."""
    parts = _SPECIAL_TOKENS if chat_format == SPECIAL_TOKENS_CHAT_FORMAT else _TRANSCRIPT
    template = _FRAME
    for slot, jinja in parts.items():
        template = template.replace(slot, jinja)
    return template
