"""The GGUF export in llama.cpp itself (through llama-cpp-python, where it is installed:
it compiles llama.cpp, so no extra of ours pulls it in). llama.cpp's own tokenizer gives
our ids on hostile text and on a rendered chat, and its forward pass our logits and our
greedy continuations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fragment_llm.checkpoint.trained import load_trained
from fragment_llm.config import SPECIAL_TOKENS_CHAT_FORMAT
from fragment_llm.export.chat_jinja import chat_template_jinja
from fragment_llm.finetune.artifact import load_tuned
from fragment_llm.finetune.merge import merge_checked
from fragment_llm.model.gpt import GPT
from fragment_llm.tokenizer.chat_template import Conversation, Turn, render_prompt, template_for
from fragment_llm.tokenizer.tokenizer import Tokenizer
from tests.export.conftest import HOSTILE_STRINGS

llama_cpp = pytest.importorskip("llama_cpp")
pytestmark = pytest.mark.usefixtures("one_torch_thread")

NEW_TOKENS = 64


def load(folder, vocab_only: bool = False):
    """The file in llama.cpp, its KV cache in float32: the default float16 cache alone
    moves the logits by ~1e-3 (measured: 8.7e-4 here, 2.4e-6 with float32)."""
    return llama_cpp.Llama(model_path=str(folder / "model.gguf"), n_ctx=128, logits_all=True,
                           vocab_only=vocab_only, verbose=False, n_threads=1,
                           type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)


def test_llama_cpp_tokenizes_hostile_text_like_us(exports, chat_tokenizer):
    tok = Tokenizer.load(chat_tokenizer)
    llm = load(exports["base-gguf-f32"], vocab_only=True)
    for text in HOSTILE_STRINGS:
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == tok.encode(text), \
            repr(text)
    assert llm.tokenize(b"hi", add_bos=True, special=False) == [tok.eot_id, *tok.encode("hi")]


def test_llama_cpp_tokenizes_the_rendered_chat_to_our_ids(exports, chat_tokenizer):
    """Our template rendered as llama.cpp's chat code renders it (Jinja), tokenized with
    special tokens parsed: the ids `fragment chat` feeds the model."""
    jinja2 = pytest.importorskip("jinja2")
    tok = Tokenizer.load(chat_tokenizer)
    llm = load(exports["tuned-gguf-f32"], vocab_only=True)
    conversation = Conversation("Be brief.", [Turn("user", "hi"), Turn("assistant", "hello."),
                                              Turn("user", "Café 🙂\r\n")])
    messages = [{"role": "system", "content": "Be brief."},
                *({"role": turn.role, "content": turn.text} for turn in conversation.turns)]
    template = jinja2.Environment(trim_blocks=True, lstrip_blocks=True).from_string(
        llm.metadata["tokenizer.chat_template"])
    text = template.render(messages=messages, add_generation_prompt=True)
    assert llm.metadata["tokenizer.chat_template"] == \
        chat_template_jinja(SPECIAL_TOKENS_CHAT_FORMAT)
    assert llm.tokenize(text.encode(), add_bos=False, special=True) == render_prompt(
        conversation, template_for(SPECIAL_TOKENS_CHAT_FORMAT), tok, 10_000)


@torch.no_grad()
def check_llama_cpp(model: GPT, llm, prompt: list[int], tolerance: float) -> None:
    ours = list(prompt)
    for _ in range(NEW_TOKENS):
        ours.append(int(model(torch.tensor([ours]))[0, -1].argmax()))
    llm.reset()
    llm.eval(ours)
    difference = np.abs(np.asarray(llm.scores[:len(ours)]) - model(torch.tensor([ours]))[0]
                        .numpy()).max()
    assert difference <= tolerance, difference
    llm.reset()
    llm.eval(prompt)
    for _ in range(NEW_TOKENS):
        llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
    assert list(llm.input_ids[:llm.n_tokens]) == ours


@pytest.mark.parametrize(("name", "tolerance"), [("base-gguf-f32", 1e-4),
                                                  ("tuned-gguf-f32", 1e-4)])
def test_llama_cpp_computes_our_logits_and_greedy_ids(exports, base_step, adapter_step, name,
                                                      tolerance):
    tuned = load_tuned(base_step, adapter_step if name.startswith("tuned") else None)
    if tuned.adapter is not None:
        merge_checked(tuned)
    tok = tuned.tokenizer
    check_llama_cpp(tuned.model, load(exports[name]), [tok.eot_id, *tok.encode("Café, how")],
                    tolerance)


def test_llama_cpp_q8_0_stays_close(exports, base_step):
    model = load_trained(base_step).model
    llm = load(exports["base-gguf-q8_0"])
    probe = [5, 17, 200, 33, 299, 1, 64]
    llm.eval(probe)
    with torch.no_grad():
        ours = model(torch.tensor([probe]))[0].numpy()
    assert np.abs(np.asarray(llm.scores[:len(probe)]) - ours).max() <= 0.5
