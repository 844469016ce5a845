"""chat template: the loss mask marks only the answers, and a transcript turn is the ids
of its whole line (what chat fed the model before the template had a mask)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fragment_llm.config import TokenizerConfig
from fragment_llm.tokenizer.chat_template import (
    Conversation,
    SpecialTokenTemplate,
    TranscriptTemplate,
    Turn,
    render,
)
from fragment_llm.tokenizer.tokenizer import Tokenizer
from tests.helpers import CHAT_TEXT


def test_the_loss_mask_in_words(trained):
    tok = trained.tokenizer
    conversation = Conversation("S", [Turn("user", "hi"), Turn("assistant", "yo")])
    rendered = render(conversation, SpecialTokenTemplate(), tok)
    marked = [tok.decode([i]) for i, on in zip(rendered.ids, rendered.mask) if on]
    assert "".join(marked) == "yo<|end|>" and rendered.ids[0] == tok.eot_id


@pytest.fixture(scope="module", params=["gpt2", "gpt4"])
def named_pattern_tokenizer(request) -> Tokenizer:
    return Tokenizer.train([CHAT_TEXT], TokenizerConfig(vocab_size=300, pattern=request.param,
                                                        workers=1))


@settings(max_examples=100, deadline=None)
@given(st.sampled_from(["user", "assistant"]), st.text(max_size=30))
def test_a_transcript_turn_is_the_ids_of_its_whole_line(named_pattern_tokenizer, role, text):
    """The opening and the body are encoded apart; with a named split pattern that is
    the same as encoding the line at once, as chat did before the template had a mask."""
    tok, template = named_pattern_tokenizer, TranscriptTemplate()
    assert template.opening(tok, role) + template.body(tok, text) == \
        tok.encode(f"{role.capitalize()}: {text}\n")
