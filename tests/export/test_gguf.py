"""`fragment export --format gguf`: our hand-written GGUF read back by the `gguf` package's
reader gives our tensors (F32 exactly, Q8_0 byte for byte what gguf-py's reference
quantiser makes, so within half a quantisation step) and llama.cpp's metadata; and
transformers' GGUF loader builds a Llama from it that computes our logits."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fragment_llm.checkpoint.load import open_checkpoint
from fragment_llm.checkpoint.trained import load_trained
from fragment_llm.config import SPECIAL_TOKENS_CHAT_FORMAT
from fragment_llm.export.chat_jinja import chat_template_jinja
from fragment_llm.export.gguf_file import Metadata, q8_0_dequantize, write_gguf_file
from fragment_llm.export.hf_tokenizer import byte_to_unicode
from fragment_llm.export.llama import gguf_tensors
from fragment_llm.finetune.artifact import load_tuned
from fragment_llm.finetune.merge import merge_checked
from fragment_llm.tokenizer.tokenizer import Tokenizer
from tests.export.conftest import HOSTILE_STRINGS

gguf = pytest.importorskip("gguf")
pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROBE = torch.randint(0, 300, (2, 48), generator=torch.Generator().manual_seed(5))


def reader(folder):
    return gguf.GGUFReader(folder / "model.gguf")


def field(read, key):
    return read.fields[key].contents()


def test_f32_tensors_read_back_exactly(exports, base_step):
    model = load_trained(base_step).model
    expected = gguf_tensors(model, model.config)
    read = reader(exports["base-gguf-f32"])
    assert [t.name for t in read.tensors] == list(expected)
    for tensor in read.tensors:
        assert tensor.tensor_type == gguf.GGMLQuantizationType.F32, tensor.name
        assert np.array_equal(tensor.data, expected[tensor.name].numpy()), tensor.name


def test_q8_0_is_the_reference_quantisation(exports, base_step):
    model = load_trained(base_step).model
    expected = gguf_tensors(model, model.config)
    for tensor in reader(exports["base-gguf-q8_0"]).tensors:
        values = expected[tensor.name].numpy()
        if values.ndim == 1:  # norm gains stay F32
            assert tensor.tensor_type == gguf.GGMLQuantizationType.F32
            assert np.array_equal(tensor.data, values)
            continue
        assert tensor.tensor_type == gguf.GGMLQuantizationType.Q8_0, tensor.name
        reference = gguf.quants.quantize(values, gguf.GGMLQuantizationType.Q8_0)
        assert np.array_equal(np.asarray(tensor.data), reference), tensor.name
        restored = q8_0_dequantize(np.asarray(tensor.data), values.shape)
        assert np.array_equal(restored, gguf.quants.dequantize(
            reference, gguf.GGMLQuantizationType.Q8_0))
        # Rounded at the fp32 step d, restored with d stored as fp16: half a step, plus
        # up to 127 times d's own rounding.
        blocks = values.reshape(-1, 32)
        step = np.abs(blocks).max(axis=1, keepdims=True) / 127
        bound = step / 2 + 127 * np.abs(step - step.astype(np.float16).astype(np.float32))
        error = np.abs(restored.reshape(-1, 32) - blocks)
        assert (error <= bound * (1 + 1e-5) + 1e-8).all(), tensor.name


def test_q8_0_file_is_about_a_quarter_of_f32(exports):
    f32 = (exports["base-gguf-f32"] / "model.gguf").stat().st_size
    q8 = (exports["base-gguf-q8_0"] / "model.gguf").stat().st_size
    assert 0.25 < q8 / f32 < 0.45  # 34/128 for the matrices, plus metadata and F32 norms


def test_metadata_is_llama_cpp_s(exports, base_step, chat_tokenizer):
    trained = load_trained(base_step)
    tok, config = trained.tokenizer, trained.model.config
    read = reader(exports["base-gguf-f32"])
    assert field(read, "general.architecture") == "llama"
    for key, value in {"llama.block_count": 2, "llama.embedding_length": 64,
                       "llama.attention.head_count": 4, "llama.attention.head_count_kv": 2,
                       "llama.context_length": 128, "llama.rope.dimension_count": 16,
                       "llama.feed_forward_length": config.hidden_dim,
                       "llama.vocab_size": 300}.items():
        assert field(read, key) == value, key
    assert field(read, "llama.rope.freq_base") == pytest.approx(config.rope_theta)
    assert field(read, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(1e-5)
    chars = byte_to_unicode()
    tokens = field(read, "tokenizer.ggml.tokens")
    assert len(tokens) == tok.vocab_size
    assert tokens[:256] == chars and tokens[-5:] == list(tok.special_tokens)
    assert tokens[300 - 6] == "".join(chars[b] for b in tok.token_bytes(300 - 6))
    assert field(read, "tokenizer.ggml.token_type")[-6:] == [1, 3, 3, 3, 3, 3]
    assert len(field(read, "tokenizer.ggml.merges")) == len(tok.merges)
    assert field(read, "tokenizer.ggml.bos_token_id") == tok.eot_id
    assert field(read, "tokenizer.ggml.eos_token_id") == tok.eot_id
    assert field(read, "tokenizer.chat_template") == chat_template_jinja(None)
    assert field(read, "fragment.source_manifest_sha256") == \
        open_checkpoint(base_step).manifest_sha256


def test_tuned_gguf_is_the_merged_model_and_chats(exports, base_step, adapter_step):
    tuned = load_tuned(base_step, adapter_step)
    merge_checked(tuned)
    expected = gguf_tensors(tuned.model, tuned.model.config)
    read = reader(exports["tuned-gguf-f32"])
    for tensor in read.tensors:
        assert np.array_equal(tensor.data, expected[tensor.name].numpy()), tensor.name
    assert field(read, "tokenizer.ggml.eos_token_id") == tuned.tokenizer.special_id("<|end|>")
    assert field(read, "tokenizer.chat_template") == \
        chat_template_jinja(SPECIAL_TOKENS_CHAT_FORMAT)
    assert field(read, "fragment.adapter_manifest_sha256") == \
        open_checkpoint(adapter_step).manifest_sha256


def test_metadata_values_round_trip(tmp_path):
    """Each value type the writer knows, read back by gguf-py as written."""
    entries = [Metadata("a.u32", 7), Metadata("a.i32", -3, signed=True),
               Metadata("a.f32", 0.5), Metadata("a.bool", True), Metadata("a.str", "é\x00🙂"),
               Metadata("a.strs", ["", "x y", "\n"]), Metadata("a.ints", [1, -2, 3])]
    path = tmp_path / "values.gguf"
    write_gguf_file(path, entries, {"t": torch.arange(6.0).view(2, 3)}, "q8_0")
    read = gguf.GGUFReader(path)
    for entry in entries:
        assert read.fields[entry.key].contents() == entry.value, entry.key
    (tensor,) = read.tensors  # rows of 3 do not split into blocks of 32: F32
    assert tensor.tensor_type == gguf.GGMLQuantizationType.F32
    assert np.array_equal(tensor.data, np.arange(6.0, dtype=np.float32).reshape(2, 3))


@pytest.mark.parametrize("name", ["base-gguf-f32", "base-gguf-q8_0", "tuned-gguf-f32"])
def test_transformers_gguf_loader_computes_our_logits(exports, base_step, adapter_step, name):
    transformers = pytest.importorskip("transformers")
    tuned = load_tuned(base_step, adapter_step if name.startswith("tuned") else None)
    if tuned.adapter is not None:
        merge_checked(tuned)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(
        exports[name], gguf_file="model.gguf").eval()
    with torch.no_grad():
        difference = (tuned.model(PROBE) - hf_model(PROBE).logits).abs().max().item()
    tolerance = 1e-4 if name.endswith("f32") else 0.5  # Q8_0: ~1% of weights' scale
    assert difference <= tolerance, difference


def test_tokenizer_in_the_gguf_gives_our_ids_on_hostile_text(exports, chat_tokenizer):
    """transformers builds a tokenizer from the file's metadata alone (tokens, merges, the
    `dbrx` pre-tokenizer name): our ids on every hostile string, and our chat template."""
    transformers = pytest.importorskip("transformers")
    tok = Tokenizer.load(chat_tokenizer)
    hf_tok = transformers.AutoTokenizer.from_pretrained(exports["tuned-gguf-f32"],
                                                        gguf_file="model.gguf")
    for text in HOSTILE_STRINGS:
        encoded = hf_tok(text, add_special_tokens=False, split_special_tokens=True).input_ids
        assert encoded == tok.encode(text), repr(text)
    assert hf_tok("hi").input_ids == [tok.eot_id, *tok.encode("hi")]  # add_bos_token
    assert hf_tok.chat_template == chat_template_jinja(SPECIAL_TOKENS_CHAT_FORMAT)
