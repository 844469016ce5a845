"""Fuzzing every loader and parser (issue #6): whatever the input, only a FragmentError.

Each loader is fed inputs built three ways: a valid artifact with structure-aware edits
(a field deleted, retyped, made huge or deeply nested), the same with raw byte edits on
top (truncation, flipped bits, spliced runs, planted length fields), and plain junk.
Files are re-sealed where a hash guards them (checkpoint manifest, processed and token
manifests), so the parser behind the hash really sees the bytes. The properties:

- a loader returns a value or raises a `FragmentError` subclass whose message is one
  line naming the file; never RecursionError, UnicodeDecodeError, KeyError, a pyarrow
  exception, ... and never a hang (`hang_guard`);
- `read_input_file` never raises at all, and what preprocess keeps is clean text;
- the sanitisers' output holds no forbidden character, sanitising twice equals
  sanitising once, and streaming in any chunking equals the one-shot result.

Budgets come from the Hypothesis profile (tests/conftest.py): `ci` by default,
`HYPOTHESIS_PROFILE=fuzz` for a long local run. Valid artifacts are built once per
module and copied per example.
"""

from __future__ import annotations

import contextlib
import copy
import faulthandler
import json
import random
import shutil
import signal
import struct
import tempfile
import unicodedata
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from fragment_llm.checkpoint.layout import (
    CONFIG_FILE,
    MANIFEST_FILE,
    MODEL_FILE,
    OPTIMIZER_FILE,
    TRAINER_STATE_FILE,
)
from fragment_llm.checkpoint.load import load_checkpoint, resolve_checkpoint
from fragment_llm.checkpoint.records import Manifest
from fragment_llm.checkpoint.rng import capture_rng_state, restore_rng_state
from fragment_llm.checkpoint.save import build_manifest, save_checkpoint
from fragment_llm.checkpoint.tensors import read_safetensors_header
from fragment_llm.config import (
    STAGE_TABLES,
    ChatConfig,
    FinetuneConfig,
    GenerateConfig,
    ModelConfig,
    PreprocessConfig,
    ServeConfig,
    TokenizerConfig,
    TrainConfig,
    load_stage_config,
    read_config_file,
)
from fragment_llm.data.batches import TokenStream, eval_batches
from fragment_llm.data.preprocess import run_preprocess
from fragment_llm.data.processed import MANIFEST_NAME, ProcessedCorpus
from fragment_llm.data.readers import FileResult, FileTask, read_input_file
from fragment_llm.data.shards import MANIFEST as TOKENS_MANIFEST
from fragment_llm.data.shards import TokenShards
from fragment_llm.errors import CheckpointError, ConfigError, FragmentError, ProcessedDataError
from fragment_llm.safety.files import sha256_bytes
from fragment_llm.safety.text import (
    OutputSanitizer,
    escape_for_display,
    sanitize_output,
    sanitize_prompt,
    strip_unsafe,
)
from fragment_llm.tokenizer.tokenizer import Tokenizer, TrainingInfo
from tests.helpers import DOCS, MERGES, write_token_shards

# ----------------------------------------------------------------- budget and hangs

HANG_SECONDS = 10.0  # one example of any loader; the real ones take milliseconds
HARD_HANG_SECONDS = 120  # a hang inside C code never returns to Python to see the alarm


def budget(fraction: float) -> settings:
    """A share of the profile's `max_examples`: heavy per-example work gets less."""
    return settings(max_examples=max(10, int(settings.default.max_examples * fraction)))


class HangError(Exception):
    """A loader ran past HANG_SECONDS on one example (not an OSError: loaders catch those)."""


@contextlib.contextmanager
def hang_guard(seconds: float = HANG_SECONDS) -> Iterator[None]:
    """Turn a hang into a test failure: an alarm for Python code, and faulthandler (which
    dumps every thread's stack and exits) for a hang that never returns from C."""
    def alarm(signum: int, frame: object) -> None:
        raise HangError(f"no answer within {seconds} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    faulthandler.dump_traceback_later(HARD_HANG_SECONDS, exit=True)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        faulthandler.cancel_dump_traceback_later()
        signal.signal(signal.SIGALRM, previous)


def refused_or_loaded(where: Path | str, load: Callable[..., Any], *args: Any,
                      **kwargs: Any) -> Any:
    """`load(*args)`'s result, or None when it refused with a FragmentError whose message
    is one line naming `where`. Any other exception (or a hang) fails the test."""
    with hang_guard():
        try:
            return load(*args, **kwargs)
        except FragmentError as exc:
            assert isinstance(exc.message, str) and exc.message, repr(exc)
            assert "\n" not in exc.message, exc.message
            assert str(where) in exc.message, exc.message
            return None


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@contextlib.contextmanager
def fresh_dir(root: Path) -> Iterator[Path]:
    """A new empty folder per example (fixtures are per test, examples are many)."""
    path = Path(tempfile.mkdtemp(dir=root))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# ----------------------------------------------------------------- byte mutation

INTERESTING_INTS = [0, 1, 0x7F, 0xFF, 1 << 15, (1 << 16) - 1, (1 << 31) - 1, 1 << 31,
                    (1 << 32) - 1, (1 << 63) - 1, 1 << 63, (1 << 64) - 1]
BYTE_OPS = ["truncate", "flip", "set", "insert", "delete", "splice", "int"]


def position(draw: st.DrawFn, size: int) -> int:
    """Anywhere, or near either end (where headers, footers and lengths live)."""
    return draw(st.one_of(st.integers(0, size), st.integers(max(0, size - 64), size),
                          st.integers(0, min(size, 64))))


def _apply_byte_op(draw: st.DrawFn, buf: bytearray, op: str) -> None:
    at = position(draw, len(buf))
    if op == "truncate":
        del buf[at:]
    elif op == "flip" and at < len(buf):
        buf[at] ^= 1 << draw(st.integers(0, 7))
    elif op == "set":
        buf[at:at + 1] = bytes([draw(st.integers(0, 255))])
    elif op == "insert":
        buf[at:at] = draw(st.binary(min_size=1, max_size=16))
    elif op == "delete":
        del buf[at:at + draw(st.integers(1, 64))]
    elif op == "splice":  # a copy of another run of the file: plausible structure, wrong place
        start = position(draw, len(buf))
        buf[at:at] = buf[start:start + draw(st.integers(1, 256))]
    elif op == "int":  # a planted length or offset field
        width = draw(st.sampled_from([4, 8]))
        value = draw(st.sampled_from(INTERESTING_INTS)) % (1 << (8 * width))
        buf[at:at + width] = value.to_bytes(width, "little")


@st.composite
def mutated_bytes(draw: st.DrawFn, data: bytes) -> bytes:
    buf = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        _apply_byte_op(draw, buf, draw(st.sampled_from(BYTE_OPS)))
    return bytes(buf)


JUNK = st.one_of(
    st.binary(max_size=96),
    st.text(max_size=48).map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.sampled_from([b"", b"{}", b"[]", b"null", b"0", b'""', b"\xef\xbb\xbf{}", b"{" * 200_000,
                     b"[" * 100_000 + b"]" * 100_000, b"\xff\xfe{\x00}\x00", b"\x00" * 64]),
)

# ----------------------------------------------------------------- JSON mutation

JSON_SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-(1 << 70), 1 << 70),
    st.sampled_from([-1, 0, 1, 255, 256, (1 << 31) - 1, (1 << 63) - 1, 1 << 63, 1 << 64]),
    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=16),
    st.sampled_from(["", "\ud800", "\udfff\ud800", "\x00", "\x1b[2J", "../../etc/passwd",
                     "/etc/passwd", "shard-00000.parquet", "train-00000.bin", "x" * 5000,
                     "fragment-bpe", "fragment-checkpoint", "F32", "uint16", "gpt4", "custom",
                     "__tensor__", "__tuple__", "0" * 64]),
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                max_size=3),
    max_leaves=8)
# JSON text no Python value serialises to: nesting bombs, numbers past every limit, ...
RAW_JSON = st.one_of(
    st.integers(1, 5000).map(lambda n: "[" * n + "]" * n),
    st.integers(1, 3000).map(lambda n: '{"a":' * n + "1" + "}" * n),
    st.integers(300, 6000).map(lambda n: "9" * n),
    st.sampled_from(["1e400", "-1e400", "NaN", "Infinity", "-Infinity", "-0.0", "1E-400",
                     "18446744073709551616", '"\\ud800"', '"\\u0000"', '{"a": 1, "a": 2}',
                     "[1,]", "01", '"\\x41"', "true", "1.0"]),
)


def _placeholder(index: int) -> str:
    return f"\x00raw{index}\x00"


def json_paths(doc: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every location in a parsed JSON document (the first 3 items of long lists)."""
    found = [prefix]
    if isinstance(doc, dict):
        for key, value in doc.items():
            found += json_paths(value, (*prefix, key))
    elif isinstance(doc, list):
        for index, value in enumerate(doc[:3]):
            found += json_paths(value, (*prefix, index))
    return found


def _edit(draw: st.DrawFn, doc: Any, raws: list[str]) -> Any:
    """One structure-aware edit at a random location; returns the (new) document."""
    path = draw(st.sampled_from(json_paths(doc)))
    op = draw(st.sampled_from(["replace", "raw", "delete", "add"]))
    if op == "raw":
        value: Any = _placeholder(len(raws))
        raws.append(draw(RAW_JSON))
    else:
        value = draw(JSON_VALUES)
    if not path:
        return doc if op == "delete" else value
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    target = parent[path[-1]]
    if op == "delete":
        del parent[path[-1]]
    elif op == "add" and isinstance(target, dict):
        target[draw(st.text(max_size=8))] = value
    elif op == "add" and isinstance(target, list):
        target.insert(draw(st.integers(0, len(target))), value)
    else:
        parent[path[-1]] = value
    return doc


@st.composite
def hostile_json(draw: st.DrawFn, doc: Any, seal: Callable[[Any], None] | None = None) -> bytes:
    """`doc` as JSON bytes after structure edits, byte edits or both; or junk.

    `seal(doc)` re-computes an embedded checksum after the edits (an attacker who edits
    a file and its seal), so the rules behind the checksum are reached.
    """
    how = draw(st.sampled_from(["edit", "edit", "edit+bytes", "bytes", "junk"]))
    if how == "junk":
        return draw(JUNK)
    doc, raws = copy.deepcopy(doc), []
    if how != "bytes":
        for _ in range(draw(st.integers(1, 3))):
            doc = _edit(draw, doc, raws)
        if seal is not None and isinstance(doc, dict) and draw(st.booleans()):
            seal(doc)
    text = json.dumps(doc, ensure_ascii=draw(st.booleans()))
    for index, raw in enumerate(raws):
        text = text.replace(json.dumps(_placeholder(index)), raw, 1)
    data = text.encode("utf-8", "surrogatepass")  # a lone surrogate becomes invalid UTF-8
    return draw(mutated_bytes(data)) if how != "edit" else data


# ----------------------------------------------------------------------- tokenizer

def tokenizer_doc() -> dict[str, Any]:
    doc = Tokenizer.from_merges(MERGES).to_file_model().model_dump(mode="json",
                                                                         exclude_none=True)
    training = TrainingInfo(config=TokenizerConfig(vocab_size=264), corpus_sha256="0" * 64,
                            documents=3, chars=30, stop_reason="vocab_size reached")
    return {**doc, "training": training.model_dump(mode="json")}


TOKENIZER_DOC = tokenizer_doc()


def test_valid_tokenizer_template_loads(scratch):
    path = scratch / "tokenizer-template.json"
    path.write_text(json.dumps(TOKENIZER_DOC))
    assert Tokenizer.load(path).merges == MERGES


@budget(1.0)
@given(data=st.data())
def test_tokenizer_load_only_raises_tokenizer_errors(scratch, data):
    path = scratch / "tokenizer.json"
    path.write_bytes(data.draw(hostile_json(TOKENIZER_DOC)))
    tok = refused_or_loaded(path, Tokenizer.load, path)
    if tok is not None:
        with hang_guard():
            assert tok.decode(tok.encode("abcdd é")) == "abcdd é"


# ---------------------------------------------------------------------- checkpoint

VOCAB, DIM = 11, 4


class TinyLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.wte = nn.Embedding(VOCAB, DIM)
        self.ln = nn.LayerNorm(DIM)
        self.head = nn.Linear(DIM, VOCAB, bias=False)
        self.head.weight = self.wte.weight  # tied: exercises the aliases metadata


def tiny_model_and_optimizer() -> tuple[TinyLM, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = TinyLM()
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


@pytest.fixture(scope="module")
def checkpoint_template(tmp_path_factory) -> Path:
    """A valid step folder (model + stepped AdamW + RNG state), saved once."""
    tmp = tmp_path_factory.mktemp("ckpt-template")
    model, opt = tiny_model_and_optimizer()
    model.head(model.ln(model.wte(torch.tensor([1, 2, 3])))).sum().backward()
    opt.step()
    tokenizer = tmp / "tok.json"
    tokenizer.write_text(json.dumps(TOKENIZER_DOC))
    return save_checkpoint(tmp / "run", 1, model=model, optimizer=opt,
                              trainer_state={"step": 1, "rng": capture_rng_state()},
                              config={"vocab": VOCAB, "n_embd": DIM}, tokenizer_file=tokenizer)


def reseal(folder: Path) -> None:
    (folder / MANIFEST_FILE).write_text(build_manifest(folder, 1, {}).to_json())


def seal_manifest(doc: dict[str, Any]) -> None:
    with contextlib.suppress(Exception):  # an edit may have made the body unhashable
        doc["checksum"] = Manifest.body_checksum(doc)


def split_safetensors(blob: bytes) -> tuple[dict[str, Any], bytes]:
    length = int.from_bytes(blob[:8], "little")
    return json.loads(blob[8:8 + length]), blob[8 + length:]


@st.composite
def hostile_safetensors(draw: st.DrawFn, blob: bytes) -> bytes:
    """A safetensors file: its header JSON edited (its JSON-in-metadata too), its length
    field kept true or planted, its data section kept or mutated; or raw byte edits."""
    if draw(st.integers(0, 3)) == 0:
        return draw(mutated_bytes(blob))
    header, body = split_safetensors(blob)
    meta = header.get("__metadata__", {})
    nested = [key for key, value in meta.items() if value[:1] in "[{"]  # aliases, layout
    if nested and draw(st.booleans()):
        key = draw(st.sampled_from(nested))
        meta[key] = draw(hostile_json(json.loads(meta[key]))).decode("utf-8", "replace")
    raw = draw(hostile_json(header))
    length = draw(st.one_of(st.just(len(raw)), st.sampled_from(INTERESTING_INTS),
                            st.integers(0, len(raw) + len(body) + 8)))
    if draw(st.booleans()):
        body = draw(mutated_bytes(body))
    return struct.pack("<Q", length) + raw + body


FOLDER_EDITS = ["json", "json", "safetensors", "safetensors", "manifest", "remove", "add"]
JSON_FILES = [CONFIG_FILE, TRAINER_STATE_FILE]
TENSOR_FILES = [MODEL_FILE, OPTIMIZER_FILE]


def vandalise_checkpoint(draw: st.DrawFn, folder: Path) -> None:
    """One hostile edit of a copied step folder, re-sealed unless the manifest is the target."""
    edit = draw(st.sampled_from(FOLDER_EDITS))
    if edit == "manifest":
        path = folder / MANIFEST_FILE
        path.write_bytes(draw(hostile_json(json.loads(path.read_text()), seal=seal_manifest)))
        return
    if edit == "json":
        path = folder / draw(st.sampled_from(JSON_FILES))
        path.write_bytes(draw(hostile_json(json.loads(path.read_text()))))
    elif edit == "safetensors":
        path = folder / draw(st.sampled_from(TENSOR_FILES))
        path.write_bytes(draw(hostile_safetensors(path.read_bytes())))
    elif edit == "remove":
        (folder / draw(st.sampled_from(sorted(p.name for p in folder.iterdir())))).unlink()
    else:
        name = draw(st.sampled_from(["model.pt", "notes.txt", "extra.json", ".hidden"]))
        (folder / name).write_bytes(b"{}")
    if draw(st.integers(0, 4)):  # mostly re-sealed: the attacker edits the manifest too
        with contextlib.suppress(FragmentError):
            reseal(folder)


def load_checkpoint_fully(folder: Path) -> None:
    """What a resume does with a step folder: verify, read every tensor, take a step."""
    checkpoint = load_checkpoint(folder)
    model, opt = tiny_model_and_optimizer()
    checkpoint.load_model_into(model)
    if checkpoint.has_optimizer:
        checkpoint.load_optimizer_into(opt)
    model.head(model.ln(model.wte(torch.tensor([1, 2, 3])))).sum().backward()
    opt.step()  # a state that loads but cannot be stepped would crash the resumed run


def test_valid_checkpoint_template_loads(checkpoint_template):
    load_checkpoint_fully(checkpoint_template)


@budget(0.6)
@given(data=st.data())
def test_checkpoint_loaders_only_raise_checkpoint_errors(checkpoint_template, scratch, data):
    with fresh_dir(scratch) as tmp:
        folder = Path(shutil.copytree(checkpoint_template, tmp / "run" / "step-0000001"))
        vandalise_checkpoint(data.draw, folder)
        refused_or_loaded(folder, load_checkpoint_fully, folder)
        refused_or_loaded(folder, read_safetensors_header, folder / MODEL_FILE)
        refused_or_loaded(tmp / "run", resolve_checkpoint, tmp / "run")


@contextlib.contextmanager
def global_rng_kept() -> Iterator[None]:
    """`restore_rng_state` sets the global generators: put them back afterwards."""
    saved = torch.get_rng_state(), np.random.get_state(), random.getstate()
    try:
        yield
    finally:
        torch.set_rng_state(saved[0])
        np.random.set_state(saved[1])
        random.setstate(saved[2])


@budget(0.5)
@given(data=st.data())
def test_restore_rng_state_only_raises_checkpoint_errors(data):
    state = json.loads(json.dumps(capture_rng_state()))
    raw = data.draw(hostile_json(state))
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError):  # the JSON loader's job (fuzzed above)
        return
    with global_rng_kept():
        refused_or_loaded("trainer_state.json", restore_rng_state, doc)


# ----------------------------------------------------------------------- processed

OTHER_TYPES = [pa.large_string(), pa.binary(), pa.int64(), pa.list_(pa.string()),
               pa.dictionary(pa.int32(), pa.string()), pa.null()]


def column(draw: st.DrawFn, kind: pa.DataType, rows: int) -> pa.Array:
    """A column of `kind`; string columns may hold nulls or invalid UTF-8."""
    values = st.text(max_size=12)
    if draw(st.integers(0, 3)) == 0:
        values = st.one_of(st.none(), values)
    texts = draw(st.lists(values, min_size=rows, max_size=rows))
    encoded = [t.encode("utf-8", "surrogatepass") if t is not None else None for t in texts]
    valid = [t.encode("utf-8", "replace").decode() if t is not None else None for t in texts]
    if kind == pa.null():
        return pa.nulls(rows)
    if kind == pa.int64():
        return pa.array([len(t or "") for t in texts], kind)
    if kind == pa.list_(pa.string()):
        return pa.array([[t] if t is not None else None for t in valid], kind)
    if kind == pa.binary():
        return pa.array(encoded, kind)
    if kind in (pa.string(), pa.large_string()) and draw(st.booleans()):
        # Raw bytes viewed as strings, unvalidated: a shard can hold invalid UTF-8.
        binary = pa.binary() if kind == pa.string() else pa.large_binary()
        raw = [draw(st.binary(max_size=8)) if t is not None and draw(st.booleans()) else t
               for t in encoded]
        return pa.array(raw, binary).view(kind)
    return pa.array(valid, pa.string()).cast(kind)


def schema_edits(draw: st.DrawFn, names: list[str]) -> list[tuple[str, pa.DataType]]:
    """The all-string schema `names`, with up to two columns retyped, renamed, dropped,
    duplicated or moved."""
    schema = [(name, pa.string()) for name in names]
    for _ in range(draw(st.integers(0, 2))):
        op = draw(st.sampled_from(["retype", "rename", "drop", "add", "move"]))
        at = draw(st.integers(0, len(schema) - 1))
        name, kind = schema[at]
        if op == "retype":
            schema[at] = (name, draw(st.sampled_from(OTHER_TYPES)))
        elif op == "rename":
            schema[at] = (draw(st.sampled_from([*names, "Text", "", "x"])), kind)
        elif op == "drop" and len(schema) > 1:
            del schema[at]
        elif op == "add":
            schema.insert(draw(st.integers(0, len(schema))),
                          (draw(st.sampled_from([*names, "extra"])), pa.string()))
        elif op == "move":
            schema.insert(draw(st.integers(0, len(schema) - 1)), schema.pop(at))
    return schema


@st.composite
def parquet_tables(draw: st.DrawFn, names: list[str]) -> bytes:
    """Parquet bytes of a generated table whose schema is near `names` (all strings)."""
    schema = schema_edits(draw, names)
    rows = draw(st.integers(0, 4))
    table = pa.Table.from_arrays([column(draw, kind, rows) for _, kind in schema],
                                 names=[name for name, _ in schema])
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, row_group_size=draw(st.integers(1, 3)),
                   compression=draw(st.sampled_from(["none", "zstd", "snappy"])))
    return sink.getvalue().to_pybytes()


@st.composite
def hostile_parquet(draw: st.DrawFn, valid: bytes, names: list[str]) -> bytes:
    how = draw(st.sampled_from(["generated", "generated", "generated+bytes", "bytes", "junk"]))
    if how == "junk":
        return draw(JUNK)
    data = valid if how == "bytes" else draw(parquet_tables(names))
    return draw(mutated_bytes(data)) if how != "generated" else data


def reseal_processed(folder: Path, shard: bytes) -> None:
    """Point the manifest at the new shard bytes, as an attacker editing both would."""
    path = folder / MANIFEST_NAME
    doc = json.loads(path.read_text())
    doc["shards"][0].update(sha256=sha256_bytes(shard), size=max(1, len(shard)))
    with contextlib.suppress(Exception):
        doc["shards"][0]["documents"] = pq.ParquetFile(pa.BufferReader(shard)).metadata.num_rows
        doc["counts"]["documents"] = doc["shards"][0]["documents"]
    path.write_text(json.dumps(doc))


def read_corpus(folder: Path) -> list[Any]:
    """Everything later stages do with a processed folder: open it, stream it twice."""
    corpus = ProcessedCorpus.open(folder)
    documents = list(corpus.iter_documents())
    assert list(corpus.iter_texts()) == [doc.text for doc in documents]
    assert all(isinstance(part, str) for doc in documents for part in doc)
    return documents


def test_valid_processed_template_loads(processed_template):
    assert [doc.text for doc in read_corpus(processed_template)] == [d.rstrip() for d in DOCS]


@budget(0.6)
@given(data=st.data())
def test_processed_corpus_only_raises_processed_errors(processed_template, scratch, data):
    with fresh_dir(scratch) as tmp:
        folder = Path(shutil.copytree(processed_template, tmp / "processed"))
        if data.draw(st.booleans()):
            manifest = folder / MANIFEST_NAME
            manifest.write_bytes(data.draw(hostile_json(json.loads(manifest.read_text()))))
        else:
            shard = folder / "shard-00000.parquet"
            shard.write_bytes(data.draw(hostile_parquet(shard.read_bytes(),
                                                        ["text", "source", "sha256"])))
            reseal_processed(folder, shard.read_bytes())
        refused_or_loaded(folder, read_corpus, folder)


# --------------------------------------------------------------------- token shards

TOKENS_VOCAB = 300


@pytest.fixture(scope="module")
def tokens_template(tmp_path_factory) -> Path:
    """A token-shard folder built by hand: two train shards, one val shard."""
    rng = np.random.default_rng(0)
    train = [rng.integers(0, TOKENS_VOCAB, 40), rng.integers(0, TOKENS_VOCAB, 17)]
    val = [rng.integers(0, TOKENS_VOCAB, 20)]
    return write_token_shards(tmp_path_factory.mktemp("tokens-template"), train, val,
                              vocab=TOKENS_VOCAB)


def reseal_tokens(folder: Path, name: str, shard: bytes, itemsize: int) -> None:
    path = folder / TOKENS_MANIFEST
    doc = json.loads(path.read_text())
    split = doc[name.split("-")[0]]
    entry = next(e for e in split["shards"] if e["file"] == name)
    old = entry["tokens"]
    entry.update(sha256=sha256_bytes(shard), tokens=max(1, len(shard) // itemsize))
    split["tokens"] += entry["tokens"] - old
    path.write_text(json.dumps(doc))


def use_token_shards(folder: Path, vocab: int | None, block: int) -> None:
    """Open the folder and draw batches from it the way training and eval do."""
    shards = TokenShards.open(folder, vocab)
    stream = TokenStream(shards.train, block, seed=1)
    inputs, targets = stream.next_batch(3)
    assert inputs.shape == targets.shape == (3, block)
    assert int(inputs.max()) < shards.manifest.vocab_size
    for x, _y in eval_batches(shards.val, block, 2, 4):
        assert int(x.max()) < shards.manifest.vocab_size


def test_valid_tokens_template_loads(tokens_template):
    use_token_shards(tokens_template, TOKENS_VOCAB, 4)


@budget(0.6)
@given(data=st.data())
def test_token_shards_only_raise_dataset_errors(tokens_template, scratch, data):
    with fresh_dir(scratch) as tmp:
        folder = Path(shutil.copytree(tokens_template, tmp / "tokens"))
        target = data.draw(st.sampled_from(["manifest", "train-00000.bin", "val-00000.bin"]))
        if target == "manifest":
            path = folder / TOKENS_MANIFEST
            path.write_bytes(data.draw(hostile_json(json.loads(path.read_text()))))
        else:
            shard = folder / target
            shard.write_bytes(data.draw(st.one_of(mutated_bytes(shard.read_bytes()), JUNK)))
            reseal_tokens(folder, target, shard.read_bytes(), itemsize=2)
        vocab = data.draw(st.sampled_from([None, TOKENS_VOCAB, 256]))
        refused_or_loaded(folder, use_token_shards, folder, vocab, data.draw(st.integers(1, 8)))


# ------------------------------------------------------------------- preprocess readers

FORBIDDEN_BIDI = "\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u200e\u200f\u061c"
FORBIDDEN_ZERO_WIDTH = "\u200b\u200c\u200d\u2060\ufeff"


def forbidden(ch: str) -> bool:
    """Written out here, not imported: C0 but \\n and \\t, DEL, C1, bidi controls,
    zero-width characters, lone surrogates."""
    code = ord(ch)
    return ((code < 0x20 and ch not in "\n\t") or 0x7F <= code <= 0x9F
            or ch in FORBIDDEN_BIDI or ch in FORBIDDEN_ZERO_WIDTH or 0xD800 <= code <= 0xDFFF)


def is_safe(text: str) -> bool:
    return not any(map(forbidden, text))


HOSTILE_LINES = st.one_of(
    st.dictionaries(st.sampled_from(["text", "body", "id"]), JSON_VALUES, max_size=3)
    .map(lambda d: json.dumps(d).encode()),
    st.text(max_size=40).map(lambda t: json.dumps({"text": t}, ensure_ascii=False)
                             .encode("utf-8", "surrogatepass")),
    RAW_JSON.map(lambda raw: ('{"text": ' + raw + "}").encode()),
    RAW_JSON.map(str.encode),
    st.binary(max_size=40),
    st.sampled_from([b"", b"   ", b"\xef\xbb\xbf", b'{"text": "\\u001b[2J\\u202e ok ok ok"}',
                     b'{"text": "a", "text": "b"}', b'{"text": NaN}', b"\r"]),
)


@st.composite
def hostile_jsonl(draw: st.DrawFn) -> bytes:
    lines = draw(st.lists(HOSTILE_LINES, max_size=6))
    data = draw(st.sampled_from([b"\n", b"\r\n"])).join(lines)
    return draw(mutated_bytes(data)) if draw(st.booleans()) else data


TEXT_FILES = st.one_of(st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass")),
                       st.binary(max_size=200), JUNK)


def valid_parquet() -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table({"text": DOCS, "id": list(range(len(DOCS)))}), sink)
    return sink.getvalue().to_pybytes()


VALID_PARQUET = valid_parquet()
FILE_KINDS = {"text": TEXT_FILES, "jsonl": hostile_jsonl(),
              "parquet": hostile_parquet(VALID_PARQUET, ["text", "body", "id"])}
READER_CONFIGS = st.builds(
    PreprocessConfig, workers=st.just(1), text_field=st.sampled_from(["text", "body"]),
    invalid_utf8=st.sampled_from(["reject", "replace"]), min_doc_chars=st.sampled_from([1, 16]),
    max_doc_chars=st.sampled_from([8, 16_000_000]), max_line_bytes=st.sampled_from([64, 1 << 20]),
    max_json_depth=st.sampled_from([2, 32]), max_file_bytes=st.sampled_from([200, 1 << 20]))


def kept_texts(result: FileResult) -> list[str]:
    texts, offset = [], 0
    for digest, size, chars in result.docs:
        data = result.blob[offset:offset + size]
        offset += size
        assert sha256_bytes(data) == digest
        texts.append(data.decode("utf-8"))
        assert len(texts[-1]) == chars
    assert offset == len(result.blob)
    return texts


@budget(1.0)
@given(data=st.data())
def test_readers_never_raise_and_keep_only_clean_text(scratch, data):
    kind = data.draw(st.sampled_from(sorted(FILE_KINDS)))
    config = data.draw(READER_CONFIGS)
    path = scratch / f"input.{kind}"
    path.write_bytes(data.draw(FILE_KINDS[kind]))
    task = FileTask(str(path), str(scratch), path.name, kind, path.stat().st_size)
    with hang_guard():
        result = read_input_file(task, config)
    assert result.status in ("kept", "rejected")
    assert (result.reason is None) == (result.status == "kept")
    for text in kept_texts(result):
        assert is_safe(text) and unicodedata.is_normalized("NFC", text)
        assert config.min_doc_chars <= len(text)


@budget(0.3)
@given(data=st.data())
def test_preprocess_api_on_one_fuzzed_file(scratch, data):
    kind = data.draw(st.sampled_from(sorted(FILE_KINDS)))
    suffix = {"text": data.draw(st.sampled_from([".txt", ".md"])), "jsonl": ".jsonl",
              "parquet": ".parquet"}[kind]
    config = data.draw(READER_CONFIGS)
    with fresh_dir(scratch) as tmp:
        raw = tmp / "raw"
        raw.mkdir()
        (raw / f"input{suffix}").write_bytes(data.draw(FILE_KINDS[kind]))
        report = refused_or_loaded(raw, run_preprocess, [raw], tmp / "out", config)
        if report is not None:  # what preprocess writes, its own reader must accept
            with hang_guard():
                documents = read_corpus(tmp / "out")
            assert documents and all(is_safe(doc.text) for doc in documents)


# ------------------------------------------------------------------------------ config

STAGE_MODELS = {"preprocess": PreprocessConfig, "tokenizer": TokenizerConfig,
                "model": ModelConfig, "train": TrainConfig, "finetune": FinetuneConfig,
                "generate": GenerateConfig, "chat": ChatConfig,
                "serve": ServeConfig}
assert set(STAGE_MODELS) == set(STAGE_TABLES)

TOML_SCALARS = st.one_of(
    st.booleans(), st.integers(-(1 << 63), (1 << 63) - 1),
    st.sampled_from([0, 1, -1, 2, 255, 256, 262, 8192, 1 << 20, 1 << 32, (1 << 63) - 1]),
    st.floats(), st.text(max_size=12), st.dates(), st.datetimes())
TOML_VALUES = st.recursive(
    TOML_SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=3),
                            st.dictionaries(st.text(max_size=5), inner, max_size=2)),
    max_leaves=6)
RAW_TOML = st.one_of(
    st.integers(4300, 6000).map(lambda n: "9" * n),
    st.integers(1, 3000).map(lambda n: "[" * n + "]" * n),
    st.integers(1, 3000).map(lambda n: "{a=" * n + "1" + "}" * n),
    st.sampled_from(["1e999999", "-1e999999", "inf", "nan", "+nan", "0x7fffffffffffffffffff",
                     "0o777", "0b1", '"\\ud800"', '"\\U0010ffff"', "1979-05-27T07:32:00Z",
                     "07:32:00", "{ a = 1, a = 2 }", "1_000", "01", "'''\n'''", '""']))


def toml_key(key: str) -> str:
    return key if key and key.replace("_", "").replace("-", "").isalnum() and key.isascii() \
        else json.dumps(key)


def toml_value(value: Any) -> str:
    """A tiny TOML writer for generated values (tomllib reads but cannot write)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return {"inf": "inf", "-inf": "-inf", "nan": "nan"}.get(repr(value), repr(value))
    if isinstance(value, str):
        return json.dumps(value)  # JSON escapes are TOML basic-string escapes
    if isinstance(value, list):
        return "[" + ", ".join(map(toml_value, value)) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{toml_key(k)} = {toml_value(v)}" for k, v in value.items()) + "}"
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return str(value)


@st.composite
def toml_documents(draw: st.DrawFn) -> bytes:
    """TOML with stage tables, their real keys and stray ones, values of every type."""
    lines = []
    if draw(st.integers(0, 4)) == 0:  # a stage name as a scalar, not a table
        lines.append(f"{draw(st.sampled_from(STAGE_TABLES))} = {toml_value(draw(TOML_VALUES))}")
    tables = draw(st.lists(st.sampled_from([*STAGE_TABLES, "bogus", "train.extra"]),
                           max_size=3, unique=True))
    for table in tables:
        lines.append(f"[{table}]")
        fields = list(STAGE_MODELS.get(table, PreprocessConfig).model_fields)
        for key in draw(st.lists(st.sampled_from([*fields, "bogus"]), max_size=4, unique=True)):
            value = draw(st.one_of(TOML_VALUES.map(toml_value), RAW_TOML))
            lines.append(f"{toml_key(key)} = {value}")
    data = "\n".join(lines).encode("utf-8", "surrogatepass")
    return draw(st.one_of(st.just(data), mutated_bytes(data), JUNK))


@budget(1.0)
@given(data=st.data())
def test_config_loaders_only_raise_config_errors(scratch, data):
    path = scratch / "config.toml"
    path.write_bytes(data.draw(toml_documents()))
    refused_or_loaded(path, read_config_file, path)
    for table, model in STAGE_MODELS.items():
        refused_or_loaded(path, load_stage_config, model, table, path, {})


# ---------------------------------------------------------------------------- sanitize

ESCAPE_SEQUENCES = ["\x1b[2J", "\x1b[31;1m", "\x1b]52;c;aGk=\x07", "\x1b]8;;http://x\x1b\\",
                    "\x9b31m", "\x1bP1$r\x1b\\", "\x1b(B", "\x1bc", "\x9d8;;u\x9c",
                    "\x1b]0;" + "t" * 1100 + "\x07", "\x1b[" + "1;" * 40 + "m", "\x1b]", "\x1b"]
UNSAFE_ALPHABET = st.sampled_from(
    list("\x1b[]()PX^_\\\x07\x9b\x9c\x90\x9d\x98\x9e\x9f\r\n\t\x00\x7f\x85\x08;:0129?AHJmc7 e")
    + list(FORBIDDEN_BIDI + FORBIDDEN_ZERO_WIDTH)
    + ["\ud800", "\udfff", "\u0301", "\u0327", "\u00e9", "\u2028", "\u00ad", "\ufffd", "\u1100",
       "\u1161"])
HOSTILE_TEXT = st.one_of(
    st.text(),
    st.text(UNSAFE_ALPHABET),
    st.lists(st.one_of(st.text(UNSAFE_ALPHABET, max_size=6), st.sampled_from(ESCAPE_SEQUENCES)),
             max_size=10).map("".join),
)


@budget(2.0)
@given(HOSTILE_TEXT)
def test_sanitize_output_is_safe_and_idempotent(text):
    with hang_guard():
        once = sanitize_output(text)
        assert is_safe(once), ascii(once)
        assert sanitize_output(once) == once


@budget(2.0)
@given(HOSTILE_TEXT)
def test_sanitize_prompt_is_safe_nfc_and_idempotent(text):
    with hang_guard():
        once = sanitize_prompt(text)
        assert is_safe(once) and "\r" not in once, ascii(once)
        assert unicodedata.is_normalized("NFC", once)
        assert sanitize_prompt(once) == once


@budget(2.0)
@given(HOSTILE_TEXT)
def test_strip_and_escape_are_safe(text):
    stripped = strip_unsafe(text)
    assert is_safe(stripped) and strip_unsafe(stripped) == stripped
    shown = escape_for_display(text, max_chars=len(text) + 1)
    assert is_safe(shown) and "\n" not in shown and "\t" not in shown
    assert escape_for_display(shown, max_chars=len(shown) + 1) == shown


@st.composite
def chunkings(draw: st.DrawFn) -> tuple[str, list[str]]:
    """A hostile text and the same text cut into pieces at arbitrary points."""
    text = draw(HOSTILE_TEXT)
    cuts = sorted(draw(st.lists(st.integers(0, len(text)), max_size=8)))
    bounds = [0, *cuts, len(text)]
    return text, [text[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


@budget(2.0)
@given(chunkings())
def test_streaming_sanitizer_equals_one_shot_in_any_chunking(case):
    text, pieces = case
    sanitizer = OutputSanitizer()
    with hang_guard():
        for _ in range(2):  # a flushed sanitizer starts afresh
            shown = [sanitizer.feed(piece) for piece in pieces] + [sanitizer.flush()]
            assert all(is_safe(piece) for piece in shown), ascii(shown)
            assert "".join(shown) == sanitize_output(text)


# ------------------------------------------------ regressions: bugs the fuzzer found


def test_config_number_past_the_int_digit_limit_is_a_config_error(tmp_path):
    # tomllib's int() raised a bare ValueError (Python's 4300-digit limit).
    path = tmp_path / "config.toml"
    path.write_text("[model]\nn_layer = " + "9" * 4301 + "\n")
    with pytest.raises(ConfigError, match="more than 4300 digits"):
        read_config_file(path)


def test_processed_shard_with_invalid_utf8_is_refused_while_reading(processed_template,
                                                                     tmp_path):
    # Parquet does not validate UTF-8: to_pylist raised UnicodeDecodeError mid-stream.
    folder = Path(shutil.copytree(processed_template, tmp_path / "processed"))
    text = pa.array([b"fine text", b"bad \xff byte"], pa.binary()).view(pa.string())
    table = pa.table({"text": text, "source": ["a", "b"], "sha256": ["0" * 64] * 2})
    shard = folder / "shard-00000.parquet"
    pq.write_table(table, shard)
    reseal_processed(folder, shard.read_bytes())
    corpus = ProcessedCorpus.open(folder)
    with pytest.raises(ProcessedDataError, match="row group 0 .*UTF8.*shard-00000"):
        list(corpus.iter_texts())


def test_parquet_input_with_two_text_columns_is_rejected_not_crashed(tmp_path):
    # An ambiguous column name reached pa.types.is_string("ambiguous"): AttributeError.
    table = pa.Table.from_arrays([pa.array(["a" * 20]), pa.array(["b" * 20])],
                                 names=["text", "text"])
    path = tmp_path / "twice.parquet"
    pq.write_table(table, path)
    task = FileTask(str(path), str(tmp_path), path.name, "parquet", path.stat().st_size)
    result = read_input_file(task, PreprocessConfig(workers=1))
    assert (result.status, result.reason) == ("rejected", "parquet-invalid")
    assert "2 columns named 'text'" in result.detail


def test_safetensors_dtype_of_the_wrong_json_type_is_refused(tmp_path):
    # `dtype not in DTYPES` raised TypeError for an unhashable JSON list.
    header = json.dumps({"w": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}})
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header.encode() + b"\0" * 4)
    with pytest.raises(CheckpointError, match="has dtype \\['F32'\\], not one of"):
        read_safetensors_header(path)


@pytest.mark.parametrize(("key", "value"), [("lr", "0.01"), ("betas", {"__tuple__": [0.9]}),
                                            ("eps", None), ("amsgrad", True)])
def test_optimizer_hyperparameter_the_optimizer_cannot_use_is_refused(
        checkpoint_template, tmp_path, key, value):
    # These loaded, then the resumed run's first step raised TypeError/ValueError/KeyError.
    folder = Path(shutil.copytree(checkpoint_template, tmp_path / "run" / "step-0000001"))
    path = folder / OPTIMIZER_FILE
    header, body = split_safetensors(path.read_bytes())
    layout = json.loads(header["__metadata__"]["layout"])
    layout["param_groups"][0][key] = value
    header["__metadata__"]["layout"] = json.dumps(layout)
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + body)
    reseal(folder)
    checkpoint = load_checkpoint(folder)
    model, opt = tiny_model_and_optimizer()
    with pytest.raises(CheckpointError, match=f"param group 0 .* has {key} = "):
        checkpoint.load_optimizer_into(opt)


KEY = "a\nb\x1b[2J"  # a key name from a hostile file: a newline and a terminal escape


def hostile_key_cases(tmp_path: Path, checkpoint: Path, processed: Path,
                      tokens: Path) -> dict[str, tuple[Path, Callable[[], Any]]]:
    """One hostile key per loader that names pydantic error locations in its message."""
    config = tmp_path / "config.toml"
    config.write_text(f"[model]\n{json.dumps(KEY)} = 1\n[{json.dumps(KEY)}]\n")
    tokenizer = tmp_path / "tokenizer.json"
    tokenizer.write_text(json.dumps({**TOKENIZER_DOC, "special_tokens": {KEY: "x"}}))
    step = Path(shutil.copytree(checkpoint, tmp_path / "run" / "step-0000001"))
    manifest = json.loads((step / MANIFEST_FILE).read_text())
    manifest["files"][KEY] = manifest["files"].pop(CONFIG_FILE)
    (step / MANIFEST_FILE).write_text(json.dumps(manifest))
    folder = Path(shutil.copytree(processed, tmp_path / "processed"))
    doc = json.loads((folder / MANIFEST_NAME).read_text())
    (folder / MANIFEST_NAME).write_text(json.dumps({**doc, "counts": {**doc["counts"], KEY: 1}}))
    shards = Path(shutil.copytree(tokens, tmp_path / "tokens"))
    doc = json.loads((shards / TOKENS_MANIFEST).read_text())
    (shards / TOKENS_MANIFEST).write_text(json.dumps({**doc, "train": {**doc["train"], KEY: 1}}))
    return {"config": (config, lambda: load_stage_config(ModelConfig, "model", config, {})),
            "config table": (config, lambda: read_config_file(config)),
            "tokenizer": (tokenizer, lambda: Tokenizer.load(tokenizer)),
            "checkpoint": (step, lambda: load_checkpoint(step)),
            "processed": (folder, lambda: ProcessedCorpus.open(folder)),
            "tokens": (shards, lambda: TokenShards.open(shards))}


@pytest.mark.parametrize("case", ["config", "config table", "tokenizer", "checkpoint",
                                  "processed", "tokens"])
def test_key_names_from_a_file_keep_the_message_one_escaped_line(
        case, tmp_path, checkpoint_template, processed_template, tokens_template):
    # A key holding a newline and ESC came back raw inside a pydantic location.
    where, load = hostile_key_cases(tmp_path, checkpoint_template, processed_template,
                                    tokens_template)[case]
    with pytest.raises(FragmentError) as info:
        load()
    message = info.value.message
    assert "a\\x0ab\\x1b[2J" in message and is_safe(message) and "\n" not in message
    assert str(where) in message


def test_hang_guard_turns_a_hang_into_a_failure():
    with pytest.raises(HangError), hang_guard(0.05):
        while True:
            pass


def raiser(exc: Exception) -> Callable[[], None]:
    def load() -> None:
        raise exc

    return load


def test_refused_or_loaded_passes_only_one_line_fragment_errors_naming_the_file():
    assert refused_or_loaded("f.toml", raiser(ConfigError("bad key, in f.toml"))) is None
    with pytest.raises(KeyError):
        refused_or_loaded("f.toml", raiser(KeyError("format")))
    with pytest.raises(AssertionError):
        refused_or_loaded("f.toml", raiser(ProcessedDataError("two\nlines, in f.toml")))
    with pytest.raises(AssertionError):
        refused_or_loaded("f.toml", raiser(ConfigError("bad key, somewhere")))
