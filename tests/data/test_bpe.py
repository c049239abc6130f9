"""Byte-level BPE: both trainers (incremental and naive) against hand-worked answers, the incremental one
against the naive one, encoding against tiktoken (on our own ranks and on GPT-2's), special tokens,
save/load and bad input.

All comparisons are exact (token ids are integers; there is no tolerance to choose)."""
import functools
import json
import os
import shutil
import warnings
from pathlib import Path

import pytest
import regex
import tiktoken
from hypothesis import HealthCheck, given, settings, strategies as st

from minilife.data.bpe import EOT, GPT2_PATTERN, Tokenizer, TokenizerFileError
from minilife.data.bpe_train import read_text_file, train_bpe

# ------------------------------------------------------------------ a small fixed training text
_TEXT = ("The quick brown fox jumps over the lazy dog. Isn't it? We'll see: 1234 + 5678 = 6912!\n"
         "Café naïve façade — “quoted” text, 東京 and 北京, emoji 🙂🙂 and tabs\tand  double  spaces.\n"
         "the there their then them these those theory thermal   \n\n") * 8


@functools.lru_cache(maxsize=None)
def small_tokenizer() -> Tokenizer:
    """Trained once per session: 256 bytes + 140 merges + 2 specials."""
    return train_bpe(398, text=_TEXT, special_tokens=(EOT, "<|pad|>"))


def learned_tokens(tok: Tokenizer) -> list[bytes]:
    return [t for t, r in sorted(tok.mergeable_ranks.items(), key=lambda kv: kv[1]) if r >= 256]


# ------------------------------------------------------------------ training: known answers
@pytest.mark.parametrize("naive", [False, True])
def test_known_answer_worked_by_hand(naive):
    # Documents (each is one pre-token, no spaces): hug x10, pug x5, pun x12, bun x4, hugs x5.
    # Pair counts:  (h,u)=10+5=15  (u,g)=10+5+5=20  (p,u)=5+12=17  (u,n)=12+4=16  (b,u)=4  (g,s)=5
    # merge 1: (u,g)=20            -> "ug".  words: h ug | p ug | p u n | b u n | h ug s
    #   counts: (h,ug)=15 (p,ug)=5 (p,u)=12 (u,n)=16 (b,u)=4 (ug,s)=5
    # merge 2: (u,n)=16            -> "un".  words: h ug | p ug | p un | b un | h ug s
    #   counts: (h,ug)=15 (p,ug)=5 (p,un)=12 (b,un)=4 (ug,s)=5
    # merge 3: (h,ug)=15           -> "hug". counts: (p,ug)=5 (p,un)=12 (b,un)=4 (hug,s)=5
    # merge 4: (p,un)=12           -> "pun". counts: (p,ug)=5 (b,un)=4 (hug,s)=5
    # merge 5: TIE (p,ug)=5 vs (hug,s)=5; as tuples of bytes (b"p", b"ug") > (b"hug", b"s")
    #          because b"p" > b"hug"   -> "pug"   (a smallest-pair rule would pick "hugs" here)
    # merge 6: (hug,s)=5           -> "hugs"
    # merge 7: (b,un)=4            -> "bun"; then no pair is left.
    docs = ["hug"] * 10 + ["pug"] * 5 + ["pun"] * 12 + ["bun"] * 4 + ["hugs"] * 5
    tok = train_bpe(256 + 7 + 1, text=docs, naive=naive)
    assert learned_tokens(tok) == [b"ug", b"un", b"hug", b"pun", b"pug", b"hugs", b"bun"]
    assert tok.special_tokens == {EOT: 263} and tok.eot_id == 263 and tok.vocab_size == 264
    # encoding with these ranks: "pugs" -> p,u,g,s -> (u,g) has the lowest rank -> p,ug,s -> pug,s
    assert tok.encode("hugs") == [261] and tok.encode("pugs") == [260, ord("s")]
    assert tok.encode("hub") == [ord("h"), ord("u"), ord("b")]  # no pair of "hub" was learned


@pytest.mark.parametrize("naive", [False, True])
def test_ties_compare_pairs_as_tuples_not_concatenations(naive):
    # ["ug","un"]: (u,g)=1, (u,n)=1 -> equal first bytes, b"n" > b"g" -> "un" first.
    assert learned_tokens(train_bpe(257 + 1, text=["ug", "un"], naive=naive))[0] == b"un"
    # ab x5, abx x2, ay x2: merge 1 is (a,b)=7. Then (ab,x)=2 ties (a,y)=2. As tuples,
    # (b"ab", b"x") > (b"a", b"y") since b"ab" > b"a"; comparing the concatenations instead would
    # pick b"ay" > b"abx".
    tok = train_bpe(256 + 2 + 1, text=["ab"] * 5 + ["abx"] * 2 + ["ay"] * 2, naive=naive)
    assert learned_tokens(tok) == [b"ab", b"abx"]


@pytest.mark.parametrize("naive", [False, True])
def test_overlapping_pairs_count_every_position_but_merge_left_to_right(naive):
    # aaaa x3, aab x2: (a,a) = 3 positions x 3 + 1 x 2 = 11, (a,b) = 2 -> "aa";
    # aaaa -> [aa, aa] (not [a, aa, a]), aab -> [aa, b]: (aa,aa) = 3, (aa,b) = 2 -> "aaaa", then "aab"
    tok = train_bpe(256 + 3 + 1, text=["aaaa"] * 3 + ["aab"] * 2, naive=naive)
    assert learned_tokens(tok) == [b"aa", b"aaaa", b"aab"]


@given(st.lists(st.text(alphabet="ab c\n'", max_size=12), min_size=1, max_size=12),
       st.integers(1, 25))
def test_incremental_trainer_matches_naive_trainer(docs, n_merges):
    """Incremental counts + lazy heap give exactly the merges of the recount-everything algorithm."""
    if not any(docs):
        for naive in (False, True):
            with pytest.raises(ValueError, match="empty"):
                train_bpe(256 + n_merges + 1, text=docs, naive=naive)
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # corpora that run out of pairs warn; checked elsewhere
        fast, naive = (train_bpe(256 + n_merges + 1, text=docs, naive=n) for n in (False, True))
    assert fast.mergeable_ranks == naive.mergeable_ranks


def test_incremental_trainer_matches_naive_trainer_on_real_text(shared_data):
    text = (shared_data / "corpus.en").read_text(encoding="utf-8")[:20_000]
    fast, naive = (train_bpe(256 + 60 + 1, text=text, naive=n) for n in (False, True))
    assert learned_tokens(fast) == learned_tokens(naive) and len(learned_tokens(fast)) == 60


def test_never_merges_across_pretokens_or_special_tokens():
    text = ("ab cd " * 50 + "x<|endoftext|>y" * 30 + "??!! ") * 3
    tok = train_bpe(256 + 8 + 1, text=text)  # the text has enough pairs for 8 merges (no warning)
    pieces = set()
    for chunk in text.split(EOT):
        pieces.update(p.encode() for p in regex.findall(GPT2_PATTERN, chunk))
    learned = learned_tokens(tok)
    assert learned, "expected some merges"
    for t in learned:  # every token lies inside one pre-token of the training text
        assert any(t in p for p in pieces), t
    assert not any(b"<|" in t or b"|>" in t or b"x<" in t for t in learned)


def test_stops_early_with_warning_when_pairs_run_out():
    with pytest.warns(UserWarning, match="ran out of pairs after 1 merges"):
        tok = train_bpe(300, text=["ab", "ab"])
    assert learned_tokens(tok) == [b"ab"] and tok.vocab_size == 258


def test_progress_bar(capsys):
    train_bpe(300, text=_TEXT, progress=True)
    assert "BPE merges" in capsys.readouterr().err


# ------------------------------------------------------------------ encoding
@given(st.text())
def test_decode_encode_round_trip(s):
    tok = small_tokenizer()
    assert tok.decode(tok.encode(s)) == s
    assert tok.decode(tok.encode_fast(s)) == s


@given(st.lists(st.sampled_from(list("the quick\n\t 0123 '’東京🙂é") + [EOT, "<|pad|>", "<|"]))
       .map("".join),
       st.sampled_from(["none", "all", {EOT}]))
def test_readable_encoder_equals_tiktoken_on_same_ranks(s, allowed):
    tok = small_tokenizer()
    enc = tiktoken.Encoding("ref", pat_str=GPT2_PATTERN, mergeable_ranks=tok.mergeable_ranks,
                            special_tokens=tok.special_tokens)  # tiktoken built from our merges
    expected = enc.encode(s, allowed_special=allowed if allowed != "none" else set(),
                          disallowed_special=())
    assert tok.encode(s, allowed_special=allowed) == expected
    assert tok.encode_fast(s, allowed_special=allowed) == expected


@given(st.text())
def test_readable_encoder_equals_tiktoken_on_arbitrary_unicode(s):
    tok = small_tokenizer()
    assert tok.encode(s) == tok.to_tiktoken().encode_ordinary(s)


def test_encoder_rules_that_random_text_rarely_reaches():
    byte_ranks = {bytes([b]): b for b in range(256)}
    # equal ranks (the same pair twice) merge leftmost: "aaa" -> [aa, a], not [a, aa]
    tok = Tokenizer({**byte_ranks, b"aa": 256}, ())
    ref = tok.to_tiktoken()
    assert tok.encode("aaa") == ref.encode_ordinary("aaa") == [256, ord("a")]
    # a whole pre-token that is a token is taken as is, even when merging could not reach it:
    # "abcd" by merges stops at [a, bc, d]; tiktoken (and we) emit the token "abcd" directly
    tok = Tokenizer({**byte_ranks, b"bc": 256, b"abcd": 257}, ())
    ref = tok.to_tiktoken()
    assert tok.encode("abcd") == ref.encode_ordinary("abcd") == [257]
    assert tok.encode("abcde") == ref.encode_ordinary("abcde") == [ord("a"), 256, ord("d"), ord("e")]


def test_encode_batch_matches_encode():
    tok = small_tokenizer()
    texts = ["", "the quick", _TEXT[:500], "a<|endoftext|>b"]
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]
    assert tok.encode_batch(texts, allowed_special="all") == [tok.encode(t, "all") for t in texts]
    with pytest.raises(TypeError, match="list of texts"):
        tok.encode_batch("one text")
    for encode in (tok.encode, tok.encode_fast):  # not an AttributeError from deep inside
        with pytest.raises(TypeError, match=r"text must be a str, got bytes"):
            encode(b"the quick")


def test_special_tokens():
    tok = small_tokenizer()
    eot, pad = tok.special_tokens[EOT], tok.special_tokens["<|pad|>"]
    text = "the<|endoftext|>fox<|pad|>"
    plain = tok.encode(text)  # default: a special token's spelling inside text is just text
    assert eot not in plain and pad not in plain and tok.decode(plain) == text
    assert tok.encode(text, "all") == tok.encode("the") + [eot] + tok.encode("fox") + [pad]
    assert tok.encode(text, {EOT}) == tok.encode("the") + [eot] + tok.encode("fox<|pad|>")
    assert tok.decode(tok.encode(text, "all")) == text
    for allowed in ("none", "all", {EOT}, ["<|pad|>"]):
        assert tok.encode_fast(text, allowed) == tok.encode(text, allowed)
    with pytest.raises(ValueError, match="not special tokens"):
        tok.encode(text, {"<|bos|>"})
    with pytest.raises(ValueError, match="allowed_special"):
        tok.encode(text, "some")


def test_special_tokens_match_longest_first():
    base = small_tokenizer().mergeable_ranks
    tok = Tokenizer(base, ["<|a|>", "<|a|>b"])
    short, long = tok.special_tokens["<|a|>"], tok.special_tokens["<|a|>b"]
    assert tok.encode("<|a|>b<|a|>", "all") == [long, short]
    assert tok.encode("<|a|>b", {"<|a|>"}) == [short] + tok.encode("b")
    assert tok.encode_fast("<|a|>b<|a|>", "all") == [long, short]


def test_decode_errors_and_invalid_utf8():
    tok = small_tokenizer()
    assert tok.decode_bytes([0xFF]) == b"\xff" and tok.decode([0xFF]) == "\ufffd"
    with pytest.raises(ValueError, match="id 99999 at position 1"):
        tok.decode([65, 99999])


def test_tokenizer_constructor_rejects_bad_tables():
    with pytest.raises(ValueError, match="lacks 1 single bytes"):
        Tokenizer({bytes([b]): b for b in range(255)})
    with pytest.raises(ValueError, match="already taken"):
        Tokenizer({bytes([b]): b for b in range(256)}, {EOT: 5})
    with pytest.raises(ValueError, match="listed twice"):
        Tokenizer({bytes([b]): b for b in range(256)}, [EOT, EOT])


# ------------------------------------------------------------------ GPT-2's ranks vs tiktoken
@functools.lru_cache(maxsize=None)
def _gpt2_pair(cache_dir: str):
    """Loaded once; the ``gpt2`` fixture has set TIKTOKEN_CACHE_DIR to ``cache_dir``."""
    return Tokenizer.gpt2(), tiktoken.get_encoding("gpt2")


@pytest.fixture(scope="session")
def gpt2_cache(shared_data, tmp_path_factory):
    """A private copy of GPT-2's tiktoken cache: tiktoken may write to its cache directory, tests only to tmp."""
    source = shared_data / "tiktoken_gpt2_cache"
    if not source.is_dir():
        pytest.skip(f"{source} absent")
    cache = tmp_path_factory.mktemp("tiktoken_cache")
    for f in source.iterdir():
        shutil.copyfile(f, cache / f.name)  # the contents only, not the read-only mode
    return cache


@pytest.fixture
def gpt2(gpt2_cache, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(gpt2_cache))
    return _gpt2_pair(str(gpt2_cache))


def test_gpt2_ranks_equal_tiktoken_on_real_text(gpt2, shared_data, tmp_path_factory):
    assert tmp_path_factory.getbasetemp() in Path(os.environ["TIKTOKEN_CACHE_DIR"]).parents  # not ../shared
    ours, ref = gpt2
    assert ours.vocab_size == ref.n_vocab == 50257 and ours.eot_id == ref.eot_token == 50256
    for name, n_chars in (("corpus.en", 60_000), ("tinyshakespeare.txt", 60_000)):
        text = (shared_data / name).read_text(encoding="utf-8")[:n_chars]
        assert ours.encode(text) == ref.encode_ordinary(text), name
    assert ours.encode_fast(text) == ref.encode_ordinary(text)


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])  # fixture is read-only
@given(st.text(), st.sampled_from(["", " ", EOT]))
def test_gpt2_ranks_equal_tiktoken_on_hypothesis_text(gpt2, s, sep):
    ours, ref = gpt2
    text = s + sep + s
    assert ours.encode(text, "all") == ref.encode(text, allowed_special="all")
    assert ours.encode(text) == ref.encode_ordinary(text)


def test_gpt2_not_cached_says_how_to_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="TIKTOKEN_CACHE_DIR"):
        Tokenizer.gpt2(cache_dir=tmp_path)


# ------------------------------------------------------------------ save / load
def test_save_load_round_trip(tmp_path):
    tok = small_tokenizer()
    path = tok.save(tmp_path / "tok.json")
    obj = json.loads(path.read_text(encoding="utf-8"))
    assert obj["format"] == "minilife-bpe" and obj["version"] == 1
    assert obj["ranks"][" the"] == tok.mergeable_ranks[b" the"]  # readable: ASCII tokens as text
    back = Tokenizer.load(path)
    assert back.mergeable_ranks == tok.mergeable_ranks
    assert back.special_tokens == tok.special_tokens and back.pattern == tok.pattern
    assert back.vocab_size == tok.vocab_size and back.eot_id == tok.eot_id
    assert back.encode(_TEXT, "all") == tok.encode(_TEXT, "all")
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("content, message", [
    ("{not json", "not valid JSON"),
    ('{"format": "other"}', "not a minilife tokenizer"),
    ('{"format": "minilife-bpe", "version": 99}', "version 99"),
    ('{"format": "minilife-bpe", "version": 1, "pattern": "x", "special_tokens": {}}', "'ranks'"),
    ('{"format": "minilife-bpe", "version": 1, "version": 1}', "appears twice"),
    ('{"format": "minilife-bpe", "version": 1, "pattern": "x", "special_tokens": {},'
     ' "ranks": {"\\u4e00": 0}}', "invalid tokenizer contents"),
])
def test_load_rejects_bad_files_naming_them(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(TokenizerFileError, match=message) as err:
        Tokenizer.load(path)
    assert str(path) in str(err.value)


# ------------------------------------------------------------------ bad training input
def test_bad_training_input():
    with pytest.raises(ValueError, match="empty"):
        train_bpe(300, text="")
    with pytest.raises(ValueError, match="empty"):
        train_bpe(300, text=[EOT, ""])
    with pytest.raises(ValueError, match=r"vocab_size=256 is too small.*257"):
        train_bpe(256, text="hello")
    with pytest.raises(ValueError, match="listed twice"):
        train_bpe(300, text="hello", special_tokens=(EOT, "<|pad|>", EOT))
    with pytest.raises(TypeError, match="vocab_size=300.0 must be an int"):
        train_bpe(300.0, text="hello")
    with pytest.raises(ValueError, match="not a valid regex"):
        train_bpe(300, text="hello", pattern="(unclosed")
    with pytest.raises(TypeError, match="document 1 is bytes"):
        train_bpe(300, text=["ok", b"bytes"])
    with pytest.raises(TypeError, match="text is a bytes"):
        train_bpe(300, text=b"hello")


def test_a_path_is_never_trained_on_as_text(tmp_path):
    """Regression: train_bpe("corpus.txt", ...) trained on the 10 characters of the name, with only a warning."""
    path = tmp_path / "corpus.txt"
    path.write_text(_TEXT, encoding="utf-8")
    from_text = train_bpe(300, text=_TEXT).mergeable_ranks
    assert train_bpe(300, files=str(path)).mergeable_ranks == from_text  # a str path is read, not trained on
    assert train_bpe(300, files=[path]).mergeable_ranks == from_text
    two = train_bpe(300, text=[_TEXT, _TEXT]).mergeable_ranks  # each file is one document
    assert train_bpe(300, files=[path, str(path)]).mergeable_ranks == two
    with pytest.raises(TypeError):
        train_bpe(str(path), 300)  # the old positional form: refused, not trained on "corpus.txt"
    with pytest.raises(TypeError, match="files="):
        train_bpe(300, text=path)
    for kwargs in ({}, {"text": _TEXT, "files": path}):
        with pytest.raises(TypeError, match="exactly one"):
            train_bpe(300, **kwargs)


def test_invalid_utf8_file_names_file_and_offset(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_bytes(b"good line\nbad \xff byte\n\xef\xbf\xbd kept")  # EF BF BD is a real U+FFFD
    with pytest.raises(ValueError, match=r"corpus\.txt: invalid UTF-8 at byte offset 14 \(line 2\)"):
        train_bpe(300, files=path)
    with pytest.warns(UserWarning, match="replaced 1 invalid UTF-8"):
        text = read_text_file(path, errors="replace")
    assert text == "good line\nbad \ufffd byte\n\ufffd kept"
