"""`fragment export --format hf`: the folder loads in transformers with no custom code,
computes our logits (within 1e-4) and our greedy continuations (same ids, same text), for
a base checkpoint and a fine-tuned one (LoRA merged, chat special tokens); its tokenizer
encodes hostile strings to our ids and its chat template renders our prompts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fragment_llm.checkpoint.trained import load_trained
from fragment_llm.config import SPECIAL_TOKENS_CHAT_FORMAT, TRANSCRIPT_CHAT_FORMAT
from fragment_llm.export.hf_model import write_hf
from fragment_llm.export.run import ExportRequest, export
from fragment_llm.finetune.artifact import load_tuned
from fragment_llm.finetune.merge import merge_checked
from fragment_llm.model.gpt import GPT
from fragment_llm.tokenizer.chat_template import (
    Conversation,
    Turn,
    render_prompt,
    template_for,
)
from fragment_llm.tokenizer.tokenizer import Tokenizer
from tests.export.conftest import (
    HOSTILE_STRINGS,
    save_model,
    save_random_adapter,
    scaled_model,
)

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_torch_thread")

LOGIT_TOLERANCE = 1e-4
NEW_TOKENS = 64


def load_hf(folder: Path):
    """The exported folder through the Auto classes, as a user would (no remote code)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=False)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    return model.eval(), tokenizer


@torch.no_grad()
def our_greedy(model: GPT, ids: list[int], steps: int) -> list[int]:
    out = list(ids)
    for _ in range(steps):
        out.append(int(model(torch.tensor([out]))[0, -1].argmax()))
    return out[len(ids):]


@torch.no_grad()
def hf_greedy(model, ids: list[int], steps: int) -> list[int]:
    """transformers' own generate (its KV cache), greedy, through any eos: `eos_token_id=[]`
    (None would fall back to generation_config.json's, and `min_new_tokens` would mask
    the eos logits, so a model that says `<|end|>` would part ways with ours there)."""
    config = transformers.GenerationConfig(do_sample=False, max_new_tokens=steps,
                                           eos_token_id=[], pad_token_id=0)
    output = model.generate(torch.tensor([ids]), generation_config=config)
    return output[0, len(ids):].tolist()


def check_same_model(ours: GPT, folder: Path, tok: Tokenizer, prompt_ids: list[int]) -> None:
    """Logits at every position of the prompt and our continuation, greedy ids, text."""
    hf_model, hf_tok = load_hf(folder)
    ours_ids = our_greedy(ours, prompt_ids, NEW_TOKENS)
    probe = torch.tensor([prompt_ids + ours_ids])
    with torch.no_grad():
        difference = (ours(probe) - hf_model(probe).logits).abs().max().item()
    assert difference <= LOGIT_TOLERANCE, difference
    hf_ids = hf_greedy(hf_model, prompt_ids, NEW_TOKENS)
    assert hf_ids == ours_ids
    assert hf_tok.decode(hf_ids) == tok.decode(ours_ids)


def test_base_export_computes_our_logits_and_greedy_text(exports, base_step):
    trained = load_trained(base_step)
    tok = trained.tokenizer
    prompt = "User: hello there, how are you? Café 🙂"
    _model, hf_tok = load_hf(exports["base-hf"])
    prompt_ids = hf_tok(prompt).input_ids  # <|endoftext|> first, as our prompts start
    assert prompt_ids == [tok.eot_id, *tok.encode(prompt)]
    check_same_model(trained.model, exports["base-hf"], tok, prompt_ids)


def test_tuned_export_is_the_merged_adapter_with_our_chat_template(exports, base_step,
                                                                    adapter_step):
    tuned = load_tuned(base_step, adapter_step)
    merge_checked(tuned)
    tok = tuned.tokenizer
    messages = [{"role": "system", "content": "Answer kindly."},
                {"role": "user", "content": "hello there, how are you?"}]
    _model, hf_tok = load_hf(exports["tuned-hf"])
    prompt_ids = list(hf_tok.apply_chat_template(messages, add_generation_prompt=True,
                                                 tokenize=True, return_dict=False))
    conversation = Conversation("Answer kindly.", [Turn("user", "hello there, how are you?")])
    assert prompt_ids == render_prompt(conversation, template_for(SPECIAL_TOKENS_CHAT_FORMAT),
                                       tok, 10_000)
    check_same_model(tuned.model, exports["tuned-hf"], tok, prompt_ids)
    config = json.loads((exports["tuned-hf"] / "generation_config.json").read_text())
    assert config["eos_token_id"] == [tok.special_id("<|end|>"), tok.eot_id]


def test_untied_output_layer_is_exported_as_lm_head(tmp_path, chat_tokenizer):
    model = scaled_model(seed=3, tie_embeddings=False, n_kv_head=1)
    step = save_model(tmp_path / "run", model, chat_tokenizer)
    export(ExportRequest(step, None, "hf", tmp_path / "hf"))
    hf_model, _tok = load_hf(tmp_path / "hf")
    assert not hf_model.config.tie_word_embeddings
    probe = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (model(probe) - hf_model(probe).logits).abs().max() <= LOGIT_TOLERANCE


def test_dora_adapter_and_full_fine_tune_export_as_chat_models(tmp_path, base_step,
                                                               chat_tokenizer):
    """A DoRA adapter merges into the export as LoRA does; a fully fine-tuned checkpoint
    (its own config says special tokens) exports with the special-token template."""
    dora = save_random_adapter(tmp_path / "dora", base_step, seed=4, method="dora")
    export(ExportRequest(base_step, dora, "hf", tmp_path / "dora-hf"))
    tuned = load_tuned(base_step, dora)
    merge_checked(tuned)
    hf_model, _tok = load_hf(tmp_path / "dora-hf")
    probe = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert (tuned.model(probe) - hf_model(probe).logits).abs().max() <= LOGIT_TOLERANCE
    full = save_model(tmp_path / "full", scaled_model(seed=5), chat_tokenizer,
                      chat_format=SPECIAL_TOKENS_CHAT_FORMAT)
    export(ExportRequest(full, None, "hf", tmp_path / "full-hf"))
    config = json.loads((tmp_path / "full-hf" / "tokenizer_config.json").read_text())
    assert "<|assistant|>" in config["chat_template"] and config["eos_token"] == "<|end|>"


@pytest.mark.parametrize("text", HOSTILE_STRINGS)
def test_exported_tokenizer_gives_our_ids_on_hostile_text(exports, chat_tokenizer, text):
    tok = Tokenizer.load(chat_tokenizer)
    hf_tok = transformers.AutoTokenizer.from_pretrained(exports["base-hf"])
    # split_special_tokens: special-token text stays text, as our encode keeps it.
    encoded = hf_tok(text, add_special_tokens=False, split_special_tokens=True).input_ids
    assert encoded == tok.encode(text)
    assert hf_tok.decode(encoded) == tok.decode(encoded) == text


CONVERSATIONS = [
    Conversation(None, [Turn("user", "hi")]),
    Conversation("", [Turn("user", "hi")]),
    Conversation("Be brief.\n", [Turn("user", "hello there"), Turn("assistant", "hi, you."),
                                 Turn("user", "Café 日本語 🙂\r\nsecond line  ")]),
    Conversation("  spaced  ", [Turn("user", " lead"), Turn("assistant", "trail "),
                                Turn("user", "\n\nnewlines\n")]),
]


@pytest.mark.parametrize("chat_format", [SPECIAL_TOKENS_CHAT_FORMAT, TRANSCRIPT_CHAT_FORMAT])
@pytest.mark.parametrize("conversation", CONVERSATIONS)
def test_chat_template_renders_our_prompt(exports, chat_tokenizer, chat_format, conversation):
    """The tuned export chats with the special tokens, the base one with the transcript."""
    tok = Tokenizer.load(chat_tokenizer)
    folder = exports["tuned-hf" if chat_format == SPECIAL_TOKENS_CHAT_FORMAT else "base-hf"]
    hf_tok = transformers.AutoTokenizer.from_pretrained(folder)
    messages = [{"role": turn.role, "content": turn.text} for turn in conversation.turns]
    if conversation.system is not None:
        messages.insert(0, {"role": "system", "content": conversation.system})
    ids = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                     return_dict=False)
    assert list(ids) == render_prompt(conversation, template_for(chat_format), tok, 10_000)


def test_chat_template_refuses_a_late_system_message(exports):
    hf_tok = transformers.AutoTokenizer.from_pretrained(exports["tuned-hf"])
    with pytest.raises(Exception, match="system message must come first"):
        hf_tok.apply_chat_template([{"role": "user", "content": "a"},
                                    {"role": "system", "content": "b"}], tokenize=False)


def test_hf_folder_records_its_source(exports, base_step, adapter_step):
    from fragment_llm.checkpoint.load import open_checkpoint
    from fragment_llm.safety.files import sha256_bytes

    record = json.loads((exports["tuned-hf"] / "fragment_export.json").read_text())
    assert record["source_manifest_sha256"] == open_checkpoint(base_step).manifest_sha256
    assert record["adapter_manifest_sha256"] == open_checkpoint(adapter_step).manifest_sha256
    for name, entry in record["files"].items():
        assert sha256_bytes((exports["tuned-hf"] / name).read_bytes()) == entry["sha256"]
    assert set(record["files"]) == {"config.json", "generation_config.json",
                                    "model.safetensors", "tokenizer.json",
                                    "tokenizer_config.json"}
    from safetensors import safe_open

    with safe_open(exports["tuned-hf"] / "model.safetensors", "pt") as weights:
        assert weights.metadata()["adapter_manifest_sha256"] == record["adapter_manifest_sha256"]


def test_write_hf_needs_no_transformers(monkeypatch, tmp_path, base_step):
    """The package writes the folder without importing transformers (a bench extra)."""
    import sys

    monkeypatch.setitem(sys.modules, "transformers", None)  # any import of it now fails
    export(ExportRequest(base_step, None, "hf", tmp_path / "hf"))
    assert (tmp_path / "hf" / "model.safetensors").is_file()
    assert write_hf.__module__ == "fragment_llm.export.hf_model"


def test_hf_folder_carries_no_code(exports):
    """Nothing a loader could execute: no modelling code, no auto_map, no pickle."""
    for name in ("base-hf", "tuned-hf"):
        folder = exports[name]
        assert sorted(path.name for path in folder.iterdir()) == sorted(
            ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
             "tokenizer_config.json", "fragment_export.json"])
        for document in ("config.json", "tokenizer_config.json"):
            assert "auto_map" not in json.loads((folder / document).read_text())
