"""The BPE tokenizer: round trips, exactness against HF `tokenizers`, speed shape, CLI.

Tokenizers here are trained in-process on the bundled sample (data/raw) with small
vocabularies, so the whole file runs in seconds.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from fragment_llm.cli.app import cli
from fragment_llm.cli.common import FLAGS
from fragment_llm.config import TokenizerConfig
from fragment_llm.errors import TokenizerError
from fragment_llm.export.hf_tokenizer import to_hf_dict
from fragment_llm.tokenizer import bpe, chunk_count
from fragment_llm.tokenizer.bpe import BYTES, Merger, train_merges
from fragment_llm.tokenizer.chunk_count import count_block, count_chunks
from fragment_llm.tokenizer.pretokenize import _ASCII_PATTERNS, NAMED_PATTERNS, Splitter
from fragment_llm.tokenizer.tokenizer import EOT, SPECIAL_TOKENS, StreamDecoder, Tokenizer
from fragment_llm.tokenizer.train import Holdout
from tests.helpers import SAMPLE

# Valid Unicode text: everything but lone surrogates (they cannot be UTF-8 encoded).
UNICODE_TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=200)
# Text that exercises the split patterns hard: spaces, newlines, digits, apostrophes.
TRICKY_TEXT = st.text(st.sampled_from(list("aZé漢 \t\n\r\x0b\x0c\x1c\xa0\u2028'sSdtlLvre019!.,?-_"
                                            "\u0085\U0001f600")), max_size=120)
ASCII_TEXT = st.text(st.characters(max_codepoint=127), max_size=200)
PROPERTY = settings(max_examples=150, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


def sample_texts(max_chars: int = 400_000) -> list[str]:
    texts, size = [], 0
    for path in sorted(SAMPLE.glob("*.txt")):
        text = path.read_text(encoding="utf-8")[:max_chars - size]
        texts.append(text)
        size += len(text)
        if size >= max_chars:
            break
    return texts


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return sample_texts()


@pytest.fixture(scope="module")
def tok(texts) -> Tokenizer:
    return Tokenizer.train(texts, TokenizerConfig(vocab_size=512, workers=1))


@pytest.fixture(scope="module")
def tok_gpt2(texts) -> Tokenizer:
    return Tokenizer.train(texts, TokenizerConfig(vocab_size=400, pattern="gpt2", workers=1))


@pytest.fixture(scope="module")
def hf_for():
    tokenizers = pytest.importorskip("tokenizers")
    built: dict[str, object] = {}

    def build(tok: Tokenizer):
        if tok.sha256 not in built:
            hf = tokenizers.Tokenizer.from_str(json.dumps(to_hf_dict(tok)))
            hf.encode_special_tokens = True  # keep special-token text as text, as we do
            built[tok.sha256] = hf
        return built[tok.sha256]

    return build


# ------------------------------------------------------------------------- round trips


@PROPERTY
@given(text=UNICODE_TEXT)
@example(text="")
@example(text="<|endoftext|>\r\n\r\n   \t")
def test_decode_encode_round_trips_any_text(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert all(0 <= i < tok.vocab_size - len(SPECIAL_TOKENS) for i in ids)


@PROPERTY
@given(text=TRICKY_TEXT)
def test_round_trip_gpt2_pattern(tok_gpt2, text):
    assert tok_gpt2.decode(tok_gpt2.encode(text)) == text


def test_ids_in_the_surrogate_range_work(hf_for):
    # All 65,536 byte pairs as merges: ids 256..65791 cover 0xD800-0xDFFF, which are held
    # internally as surrogate code points. "\u05c0" is bytes D7 80: id 256 + 0xD780.
    tok = Tokenizer.from_merges([(a, b) for a in range(256) for b in range(256)])
    assert tok.encode("\u05c0") == [256 + 0xD780] and 0xD800 <= 256 + 0xD780 <= 0xDFFF
    text = "\u05c0\u05c1 mixed ASCII and \u05d0\u05d1!"
    assert tok.decode(tok.encode(text)) == text
    assert tok.encode(text) == hf_for(tok).encode(text).ids


def test_lone_surrogate_is_encoded_as_replacement_character(tok):
    assert tok.decode(tok.encode("a\ud800b")) == "a\ufffdb"


def test_special_token_text_stays_text(tok):
    text = "".join(SPECIAL_TOKENS) + " <|endoftext|>"
    ids = tok.encode(text)
    assert not any(tok.is_special(i) for i in ids)
    assert tok.decode(ids) == text
    assert tok.encode_special(EOT) == [tok.eot_id] == [tok.special_id(EOT)]
    assert tok.decode(tok.encode_special("<|user|>") + tok.encode("hi")) == "<|user|>hi"


def test_special_ids_follow_the_merges(tok):
    n_base = BYTES + len(tok.merges)
    assert [tok.special_id(name) for name in SPECIAL_TOKENS] == list(range(n_base, n_base + 5))
    assert tok.vocab_size == n_base + 5 == 512
    with pytest.raises(TokenizerError, match="unknown special token"):
        tok.special_id("<|nope|>")


def test_token_bytes_are_unique_and_compose(tok):
    table = [tok.token_bytes(i) for i in range(tok.vocab_size)]
    assert len(set(table)) == len(table)
    for k, (a, b) in enumerate(tok.merges):
        assert table[BYTES + k] == table[a] + table[b]


@pytest.mark.parametrize("ids", [[-1], [512], [1.5], ["a"], [None]])
def test_decode_refuses_ids_outside_the_vocabulary(tok, ids):
    with pytest.raises(TokenizerError, match=r"token ids must be integers in \[0, 512\)"):
        tok.decode(ids)


def test_encode_refuses_non_text(tok):
    with pytest.raises(TokenizerError, match="encode takes a str"):
        tok.encode(b"bytes")  # type: ignore[arg-type]


# --------------------------------------------------------------------- stream decoder


@PROPERTY
@given(data=st.data())
def test_stream_decoder_equals_decode_however_ids_are_split(tok, data):
    # Single bytes, including lone UTF-8 lead/continuation bytes, plus merged tokens.
    ids = data.draw(st.lists(st.integers(0, tok.vocab_size - 1), max_size=40))
    cuts = sorted(data.draw(st.lists(st.integers(0, len(ids)), max_size=8)))
    decoder = tok.stream_decoder()
    pieces, start = [], 0
    for cut in [*cuts, len(ids)]:
        pieces.append(decoder.feed(ids[start:cut]))
        start = cut
    assert "".join(pieces) + decoder.flush() == tok.decode(ids)


def test_stream_decoder_never_splits_a_character(tok):
    ids = tok.encode("é漢\U0001f600")
    decoder = StreamDecoder(tok)
    for token_id in ids:
        assert "\ufffd" not in decoder.feed(token_id)
    assert decoder.flush() == ""


# ------------------------------------------------------------------ HF equivalence


def test_same_ids_as_hf_tokenizers_on_real_text(tok, tok_gpt2, hf_for):
    for model in (tok, tok_gpt2):
        hf = hf_for(model)
        for path in sorted(SAMPLE.glob("*.txt")):
            text = path.read_text(encoding="utf-8")
            assert model.encode(text) == hf.encode(text).ids, path.name


@PROPERTY
@given(text=st.one_of(UNICODE_TEXT, TRICKY_TEXT))
def test_same_ids_as_hf_tokenizers_on_random_unicode(tok, tok_gpt2, hf_for, text):
    for model in (tok, tok_gpt2):
        assert model.encode(text) == hf_for(model).encode(text).ids


@pytest.mark.slow
def test_same_ids_as_hf_for_every_code_point(tok, tok_gpt2, hf_for):
    # regex's and Oniguruma's Unicode tables must agree on \p{L}, \p{N} and \s.
    text = "\n".join(f"a{c}b 1{c}2 {c}{c}" for c in map(chr, range(0x20, 0x110000))
                     if not 0xD800 <= ord(c) <= 0xDFFF)
    for model in (tok, tok_gpt2):
        assert model.encode(text) == hf_for(model).encode(text).ids


def test_same_ids_as_hf_on_long_chunks(tok, hf_for):
    hf = hf_for(tok)
    for text in ["a" * 5000, "the" * 3000, " " * 4000 + "x", "!?" * 3000, "1" * 999,
                 "thethe thee" * 400, "\n" * 3000 + "z"]:
        assert tok.encode(text) == hf.encode(text).ids


@PROPERTY
@given(word=st.text(st.sampled_from("aeht srn"), min_size=0, max_size=300))
def test_long_chunk_path_equals_short_path(tok, word):
    merger = Merger(tok.merges)
    symbols = word.encode("utf-8").decode("latin-1")
    assert merger._merge_long(symbols) == merger._merge_short(symbols)


# ------------------------------------------------------------------ split patterns


@PROPERTY
@given(text=st.one_of(ASCII_TEXT, st.text(st.sampled_from(list(" \t\n\r\x0b\x0c\x1c\x1f'sSaZ09!")),
                                          max_size=80)))
@pytest.mark.parametrize("name", sorted(NAMED_PATTERNS))
def test_ascii_fast_path_splits_like_regex(name, text):
    splitter = Splitter.named(name)
    assert splitter._ascii is not None and _ASCII_PATTERNS[name] == splitter._ascii.pattern
    assert splitter._ascii.findall(text) == splitter._guarded.findall(text)


@PROPERTY
@given(text=st.one_of(UNICODE_TEXT, TRICKY_TEXT))
@pytest.mark.parametrize("name", sorted(NAMED_PATTERNS))
def test_named_patterns_cover_every_character(name, text):
    assert "".join(Splitter.named(name).split(text)) == text


def test_gpt4_split_example():
    chunks = Splitter.named("gpt4").split("Hello world's 12345!!\n")
    assert chunks == ["Hello", " world", "'s", " ", "123", "45", "!!\n"]


def test_custom_pattern_trains_and_round_trips(texts, hf_for):
    config = TokenizerConfig(vocab_size=300, pattern="custom",
                             custom_pattern=r"\w+|\s+|[^\w\s]+", workers=1)
    tok = Tokenizer.train(texts[:1], config)
    text = "Custom, patterns: work!\n\t ok"
    assert tok.decode(tok.encode(text)) == text
    assert tok.encode(text) == hf_for(tok).encode(text).ids


@pytest.mark.parametrize(("pattern", "rule"), [
    (r"\w+", "does not match every character"),
    (r"\w*|\s", "matches the empty string"),
    (r"(?:a|aa)+b|[\s\S]", "pathological-input probe"),
    (r"(unclosed", "does not compile"),
    (r"a{100000000}|[\s\S]", "counted repeats"),
])
def test_unsafe_custom_patterns_are_refused_before_training(pattern, rule):
    config = TokenizerConfig(vocab_size=300, pattern="custom", custom_pattern=pattern)
    with pytest.raises(TokenizerError, match=rule):
        Tokenizer.train(iter(pytest.fail, None), config)  # never reads the texts


def test_pattern_settings_are_checked():
    with pytest.raises(TokenizerError, match="needs custom_pattern"):
        Tokenizer.train([], TokenizerConfig(pattern="custom"))
    with pytest.raises(TokenizerError, match="only used with pattern = 'custom'"):
        Tokenizer.train([], TokenizerConfig(pattern="gpt4", custom_pattern=r"\S+|\s+"))
    with pytest.raises(TokenizerError, match="unknown split pattern"):
        Tokenizer.train([], TokenizerConfig(pattern="gpt5"))


# --------------------------------------------------------------------------- training


def test_training_is_deterministic_byte_for_byte(texts, tmp_path):
    config = TokenizerConfig(vocab_size=400, workers=1)
    Tokenizer.train(texts, config).save(tmp_path / "a.json")
    Tokenizer.train(list(reversed(texts)), config).save(tmp_path / "b.json")
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()


def test_parallel_counting_equals_inline_counting(texts, monkeypatch):
    splitter = Splitter.named("gpt4")
    inline = count_chunks(texts, splitter, max_chunk_chars=64, workers=1)
    monkeypatch.setattr(chunk_count, "INLINE_CHARS", 1)
    monkeypatch.setattr(chunk_count, "BLOCK_CHARS", 20_000)
    pooled = count_chunks(texts, splitter, max_chunk_chars=64, workers=3)
    assert pooled.counts == inline.counts
    assert (pooled.chars, pooled.documents) == (inline.chars, inline.documents)


@pytest.fixture
def many_blocks(monkeypatch):
    """Make even the small sample go through helper processes."""
    monkeypatch.setattr(chunk_count, "INLINE_CHARS", 1)
    monkeypatch.setattr(chunk_count, "SLOW_START_CHARS", 1)
    monkeypatch.setattr(chunk_count, "BLOCK_CHARS", 20_000)


@pytest.mark.parametrize(("method", "goal", "inline"), [
    (None, 10**9, None), ("fork", None, chunk_count.INLINE_CHARS),
    ("fork", 1000, chunk_count.INLINE_CHARS), ("forkserver", None, chunk_count.INLINE_CHARS),
    ("forkserver", 1 << 20, None), ("forkserver", 50 << 20, chunk_count.INLINE_CHARS),
])
def test_helpers_start_only_when_worth_it(method, goal, inline):
    context = None if method is None else chunk_count.multiprocessing.get_context(method)
    assert chunk_count._inline_chars(context, goal) == inline


def test_counting_helpers_also_work_under_forkserver(texts, many_blocks, monkeypatch):
    # A process with threads (the CLI's progress bar) must not fork: forkserver is used.
    forkserver = chunk_count.multiprocessing.get_context("forkserver")
    monkeypatch.setattr(chunk_count, "worker_context", lambda: forkserver)
    splitter = Splitter.named("gpt4")
    pooled = count_chunks(texts[:2], splitter, max_chunk_chars=64, workers=2)
    assert pooled.counts == count_chunks(texts[:2], splitter, max_chunk_chars=64).counts


def _fail_in_helpers(monkeypatch, action):
    """Make helper processes (forked, so they see this patch) run `action` when they split."""
    fork = chunk_count.multiprocessing.get_context("fork")
    monkeypatch.setattr(chunk_count, "worker_context", lambda: fork)
    parent, split = os.getpid(), Splitter.split

    def split_or_fail(self, text):
        if os.getpid() != parent:
            action()
        return split(self, text)

    monkeypatch.setattr(Splitter, "split", split_or_fail)


def test_a_helper_error_is_raised_not_hung(texts, many_blocks, monkeypatch):
    def fail():
        raise TokenizerError("helper failed on purpose")

    _fail_in_helpers(monkeypatch, fail)
    with pytest.raises(TokenizerError, match="helper failed on purpose"):
        count_chunks(texts, Splitter.named("gpt4"), max_chunk_chars=64, workers=2)


def test_a_dead_helper_is_reported_not_hung(texts, many_blocks, monkeypatch):
    _fail_in_helpers(monkeypatch, lambda: os._exit(3))
    with pytest.raises(TokenizerError, match="worker process died"):
        count_chunks(texts, Splitter.named("gpt4"), max_chunk_chars=64, workers=2)


def test_merges_follow_the_tie_break_rule():
    # "aa" sits at two positions (count 4); then "ab" and (256, 97) tie at 2: smaller wins.
    result = train_merges(Counter({"aaab": 2}), 2, min_frequency=1)
    assert result.merges == [(97, 97), (97, 98)]


def test_training_stops_below_min_frequency():
    result = train_merges(Counter({"abc": 3, "xyz": 1}), 10, min_frequency=2)
    assert result.merges == [(97, 98), (256, 99)]
    assert result.stop_reason == "no pair occurs min_frequency times"


def test_a_merge_recreating_existing_bytes_is_skipped():
    # Global merges cannot make duplicates on their own (docs/tokenizer.md), so plant one.
    trainer = bpe._MergeTrainer(Counter({"ab": 5, "cd": 3}), 1)
    trainer.known.add(b"ab")
    result = trainer.run(5, lambda *args: None)
    assert result.merges == [(99, 100)] and result.skipped_duplicates == 1


def test_max_chars_caps_what_is_counted():
    tok = Tokenizer.train(["abcd" * 100, "efgh" * 100], TokenizerConfig(
        vocab_size=300, max_chars=50, workers=1, min_frequency=1))
    assert tok.training is not None and tok.training.chars == 50
    assert tok.training.documents == 1


def test_long_chunks_are_cut_for_training():
    counts = count_block(Splitter.named("gpt4"), 8, [" " * 20 + "x"])
    assert max(map(len, counts)) <= 8 and sum(len(c) * n for c, n in counts.items()) == 21


def test_progress_reports_counting_then_merging(texts):
    calls: list[tuple[str, int, int | None]] = []
    Tokenizer.train(texts[:1], TokenizerConfig(vocab_size=300, workers=1),
                    lambda *args: calls.append(args))
    phases = [phase for phase, _, _ in calls]
    assert phases[0] == "counting" and phases[-1] == "merging"
    assert calls[-1][1] == calls[-1][2] == 300 - 261


# --------------------------------------------------------------------------- encoding


def test_encode_batch_equals_encode_on_two_workers(tok, texts, monkeypatch):
    monkeypatch.setattr(bpe, "MIN_PARALLEL_CHARS", 0)
    docs = [text[:20_000] for text in texts] + ["", "x"]
    assert tok.encode_batch(docs, workers=2) == [tok.encode(doc) for doc in docs]


def test_cache_is_bounded_and_keeps_results_exact(tok, texts):
    small = Tokenizer.from_merges(tok.merges)
    small._encoder.cache._max_entries = 64
    assert small.encode(texts[0]) == tok.encode(texts[0])
    assert len(small._encoder.cache) <= 64


def cold_encode_seconds(merges, text: str) -> float:
    fresh = Tokenizer.from_merges(merges)  # an empty cache
    started = time.perf_counter()
    ids = fresh.encode(text)
    elapsed = time.perf_counter() - started
    assert fresh.decode(ids) == text
    return elapsed


@pytest.fixture(scope="module")
def normal_mb_seconds(tok, texts) -> float:
    return cold_encode_seconds(tok.merges, ("".join(texts) * 3)[:1 << 20])


@pytest.mark.parametrize("unit", [" ", "\n", "a", "0123456789", "!", "ab "])
def test_pathological_inputs_encode_in_near_linear_time(tok, normal_mb_seconds, unit):
    text = (unit * (1 << 20))[:1 << 20]
    assert cold_encode_seconds(tok.merges, text) < 10 * normal_mb_seconds + 0.5


# ------------------------------------------------------------------- save and load


def test_save_load_round_trip_keeps_everything(tok, tmp_path):
    path = tmp_path / "tok.json"
    tok.save(path)
    loaded = Tokenizer.load(path)
    assert loaded.merges == tok.merges and loaded.pattern == tok.pattern
    assert loaded.sha256 == tok.sha256 == bpe_sha(path)
    assert loaded.training == tok.training
    doc = json.loads(path.read_text())
    assert (doc["format"], doc["version"], doc["vocab_size"]) == ("fragment-bpe", 1, 512)
    assert doc["special_tokens"] == tok.special_tokens
    assert doc["merges"][0] == list(tok.merges[0])


def bpe_sha(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_export_hf_round_trip(tok, tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    tok.save(tmp_path / "tok.json")
    result = run_cli(["export-tokenizer", "--format", "hf", "--in", str(tmp_path / "tok.json"),
                      "--out", str(tmp_path / "hf.json")])
    assert result.exit_code == 0, result.stderr
    hf = tokenizers.Tokenizer.from_file(str(tmp_path / "hf.json"))
    text = sample_texts(50_000)[0] + " café 漢字 \U0001f600"
    assert hf.encode(text).ids == tok.encode(text)
    assert hf.decode(tok.encode(text)) == text
    assert hf.encode(EOT).ids == [tok.eot_id]  # HF matches specials unless told not to


# ------------------------------------------------------------------------ the stage


@pytest.mark.parametrize(("documents", "fraction", "held"), [
    (10, 0.2, [4, 9]), (10, 0.0, []), (1, 0.5, []), (3, 0.01, [2]),
    (100, 0.05, [19, 39, 59, 79, 99]),
])
def test_holdout_spreads_documents_evenly(documents, fraction, held):
    holdout = Holdout(documents, fraction)
    assert [i for i in range(documents) if holdout.is_held(i)] == held
    assert holdout.count == len(held)


def test_holdout_keeps_its_sample_and_finishes_it_after_an_early_stop():
    texts = [f"doc {i}" for i in range(10)]
    holdout = Holdout(10, 0.2)
    trained = []
    for text in holdout.training_texts(texts):
        trained.append(text)
        if len(trained) == 3:
            break  # as when max_chars stops counting
    holdout.finish_sample(texts)
    assert trained == ["doc 0", "doc 1", "doc 2"] and holdout.sample == ["doc 4", "doc 9"]


# ------------------------------------------------------------------------------- CLI


def run_cli(args: list[str]):
    FLAGS.debug = FLAGS.quiet = False
    return CliRunner().invoke(cli, args)


def assert_refused(result, text: str) -> None:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    first = result.stderr.splitlines()[0]
    assert first.startswith("error: ") and text in first, result.stderr


def test_train_tokenizer_cli_end_to_end(shakespeare, tmp_path):
    processed, out = shakespeare.processed, tmp_path / "tok.json"
    result = run_cli(["train-tokenizer", "--data", str(processed), "--out", str(out),
                      "--vocab-size", "300", "--workers", "1"])
    assert result.exit_code == 0, result.output
    assert "bytes per token" in result.stderr and "Traceback" not in result.output
    tok = Tokenizer.load(out)
    manifest_sha = bpe_sha(processed / "manifest.json")
    assert tok.vocab_size == 300 and tok.training.corpus_sha256 == manifest_sha


def test_train_tokenizer_refuses_existing_output_before_any_work(tmp_path):
    out = tmp_path / "tok.json"
    out.write_text("keep me")
    result = run_cli(["train-tokenizer", "--data", str(tmp_path / "missing"), "--out", str(out)])
    assert_refused(result, "output already exists")
    assert out.read_text() == "keep me"


def test_train_tokenizer_reports_a_missing_corpus(tmp_path):
    result = run_cli(["train-tokenizer", "--data", str(tmp_path / "nope"),
                      "--out", str(tmp_path / "tok.json")])
    assert_refused(result, "processed folder not found")
    assert not (tmp_path / "tok.json").exists()


def test_train_tokenizer_refuses_a_bad_config(shakespeare, tmp_path):
    processed, config = shakespeare.processed, tmp_path / "c.toml"
    config.write_text('[tokenizer]\npattern = "custom"\n'
                      'custom_pattern = "(?:a|aa)+b|[\\\\s\\\\S]"\n')
    result = run_cli(["train-tokenizer", "--data", str(processed), "--config", str(config),
                      "--out", str(tmp_path / "tok.json")])
    assert_refused(result, "custom split pattern")
    assert not (tmp_path / "tok.json").exists()


def test_export_refuses_existing_output_and_hostile_input(tmp_path, tok):
    tok.save(tmp_path / "tok.json")
    (tmp_path / "hf.json").write_text("keep")
    result = run_cli(["export-tokenizer", "--in", str(tmp_path / "tok.json"),
                      "--out", str(tmp_path / "hf.json")])
    assert_refused(result, "output already exists")
    (tmp_path / "bad.json").write_text("[" * 100_000)
    result = run_cli(["export-tokenizer", "--in", str(tmp_path / "bad.json"),
                      "--out", str(tmp_path / "new.json")])
    assert_refused(result, "nested deeper")
    assert (tmp_path / "hf.json").read_text() == "keep" and not (tmp_path / "new.json").exists()
