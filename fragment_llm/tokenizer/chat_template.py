"""Chat templates: a conversation's turns as token ids, and which ids a fine-tuning loss counts.

Two formats, named by a checkpoint's config.json `"chat_format"`:
- `"special_tokens"`, for models trained on chat data:
  `<|endoftext|><|system|>S<|end|><|user|>U<|end|><|assistant|>A<|end|>...`
- `"transcript"` (anything else), plain text a base model trained on documents can
  continue: `<|endoftext|>S\\n\\nUser: U\\nAssistant: A\\n...`

Each turn is its opening (`<|assistant|>`, `Assistant:`) then its body (the text and
what closes it: `<|end|>`, or the newline). The assistant's opening is exactly what chat
feeds the model before an answer, and its body exactly what the model must produce. One
rendering serves both sides, so training and inference cannot drift:
- `render_prompt`: chat at inference, the conversation so far plus the answer's opening,
  oldest turns dropped to fit the context window;
- `render`: fine-tuning, the whole conversation, with a loss mask that is True exactly on
  each assistant body.

Special tokens come only from `Tokenizer.special_id`: text that spells `<|end|>` is
encoded as ordinary text and cannot close a turn. This module knows no model (no torch)
and no terminal.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol

from fragment_llm.config import SPECIAL_TOKENS_CHAT_FORMAT, TRANSCRIPT_CHAT_FORMAT
from fragment_llm.errors import PromptError
from fragment_llm.tokenizer.tokenizer import Tokenizer

Role = Literal["user", "assistant"]


@dataclass(frozen=True)
class Turn:
    role: Role
    text: str


@dataclass
class Conversation:
    system: str | None = None
    turns: list[Turn] = field(default_factory=list)

    def transcript(self) -> str:
        """Plain text for chat's /save: one block per turn."""
        blocks = [f"system: {self.system}"] if self.system else []
        blocks += [f"{turn.role}: {turn.text}" for turn in self.turns]
        return "# fragment chat transcript\n\n" + "\n\n".join(blocks) + "\n"


@dataclass(frozen=True)
class Rendered:
    """A conversation as ids, and the loss mask over them (True: an id the model is
    trained to produce)."""

    ids: list[int]
    mask: list[bool]


class ChatTemplate(Protocol):
    """How a conversation becomes ids, and which text ends an answer (besides any
    special token, which always does)."""

    chat_format: str  # a checkpoint config's "chat_format"
    title: str  # what chat's banner and /settings call it
    stop_strings: tuple[str, ...]

    def system(self, tok: Tokenizer, text: str) -> list[int]: ...
    def opening(self, tok: Tokenizer, role: Role) -> list[int]: ...
    def body(self, tok: Tokenizer, text: str) -> list[int]: ...


class SpecialTokenTemplate:
    """`<|system|>S<|end|><|user|>U<|end|><|assistant|>A<|end|>...<|assistant|>`."""

    chat_format = SPECIAL_TOKENS_CHAT_FORMAT
    title = "chat special tokens"
    stop_strings: tuple[str, ...] = ()

    def system(self, tok: Tokenizer, text: str) -> list[int]:
        return [tok.special_id("<|system|>"), *self.body(tok, text)]

    def opening(self, tok: Tokenizer, role: Role) -> list[int]:
        return [tok.special_id(f"<|{role}|>")]

    def body(self, tok: Tokenizer, text: str) -> list[int]:
        return [*tok.encode(text), tok.special_id("<|end|>")]


class TranscriptTemplate:
    """`S\\n\\nUser: U\\nAssistant: A\\n...User: U\\nAssistant:`. The answer ends where
    the model starts the next `User:` line.

    The opening and the body are encoded apart. With the named split patterns that
    gives the same ids as encoding the turn whole (`:` always ends a chunk before the
    space), and with any pattern it makes the ids before an answer's text the same in
    training as in chat."""

    chat_format = TRANSCRIPT_CHAT_FORMAT
    title = "plain transcript (base model)"
    stop_strings: tuple[str, ...] = ("\nUser:",)

    def system(self, tok: Tokenizer, text: str) -> list[int]:
        return tok.encode(f"{text}\n\n")

    def opening(self, tok: Tokenizer, role: Role) -> list[int]:
        return tok.encode(f"{role.capitalize()}:")

    def body(self, tok: Tokenizer, text: str) -> list[int]:
        return tok.encode(f" {text}\n")


def template_for(chat_format: str | None) -> ChatTemplate:
    """Special tokens only for checkpoints that say they were trained with them."""
    if chat_format == SPECIAL_TOKENS_CHAT_FORMAT:
        return SpecialTokenTemplate()
    return TranscriptTemplate()


def _head(conversation: Conversation, template: ChatTemplate, tok: Tokenizer) -> list[int]:
    """A document's start, then the system prompt if there is one."""
    system = template.system(tok, conversation.system) if conversation.system else []
    return [tok.eot_id, *system]


def render(conversation: Conversation, template: ChatTemplate, tok: Tokenizer) -> Rendered:
    """The whole conversation, for fine-tuning on it.

    The mask is True on each assistant body (its text and the `<|end|>` or newline that
    closes it) and False on what chat feeds the model itself: the document start, the
    system prompt, user turns and every opening. Special tokens, user "hi", assistant
    "yo" (one id per letter): `[eot, <|user|>, h, i, <|end|>, <|assistant|>, y, o,
    <|end|>] -> [F, F, F, F, F, F, T, T, T]`.
    """
    ids = _head(conversation, template, tok)
    mask = [False] * len(ids)
    for turn in conversation.turns:
        opening, body = template.opening(tok, turn.role), template.body(tok, turn.text)
        ids += opening + body
        mask += [False] * len(opening) + [turn.role == "assistant"] * len(body)
    return Rendered(ids, mask)


def render_prompt(conversation: Conversation, template: ChatTemplate, tok: Tokenizer,
                  budget: int) -> list[int]:
    """What chat feeds the model: the conversation plus the answer's opening, in at most
    `budget` ids (the same ids `render` gives up to that answer's body).

    Whole turns are dropped oldest first (a user turn with its answer), the system
    prompt always stays; if the system prompt and the last user turn alone do not fit,
    PromptError.
    """
    head = _head(conversation, template, tok)
    tail = template.opening(tok, "assistant")
    rendered = [template.opening(tok, turn.role) + template.body(tok, turn.text)
                for turn in conversation.turns]
    first = 0
    while sum(map(len, rendered[first:])) + len(head) + len(tail) > budget:
        if first >= len(rendered) - 1:
            size = len(head) + len(tail) + len(rendered[-1]) if rendered else len(head)
            raise PromptError(f"the system prompt and this message need {size:,} tokens; "
                              f"the model's context holds {budget:,} before its answer",
                              hint="send a shorter message, or shorten /system")
        first += 2 if conversation.turns[first].role == "user" else 1
        first = min(first, len(rendered) - 1)
    return [*head, *(i for ids in rendered[first:] for i in ids), *tail]
