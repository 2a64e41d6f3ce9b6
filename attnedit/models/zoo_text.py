"""Offline tokenizers and tiny text encoders for the model zoo (:mod:`attnedit.models.zoo`).

The hub's tokenizers cannot be downloaded here, so each is generated from a small English word list: a CLIP
byte-level BPE whose merges are learned at build time (common words are one token, unknown words split into
sub-words), and a word-level tokenizer standing in for T5 / UMT5 / Llama.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import tempfile
from collections import Counter

from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import WordLevel
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    LlamaConfig,
    LlamaModel,
    PreTrainedTokenizerFast,
    T5Config,
    T5EncoderModel,
    UMT5Config,
    UMT5EncoderModel,
)

__all__ = ["HUNYUAN_PROMPT_TEMPLATE", "clip_tokenizer", "word_tokenizer"]

# Words that get their own token in every tokenizer (whole-word merges for CLIP, entries for word-level ones).
_WORD_TEXT = """
a an the of and or with on in at to from by for under over near next behind above below between is are
photo picture painting drawing image video scene view close up portrait landscape style background foreground
cat dog bird horse cow fish mouse rabbit lion tiger bear fox wolf monkey elephant person man woman child people
car bus bike boat train plane house tree flower grass sky sea river lake mountain road city street forest beach
table chair cup bowl apple banana orange book lamp hat ball box bottle glass window door clock
circle square triangle star heart shape line dot stripe pattern
red blue green yellow black white orange purple pink brown gray grey gold silver
big small large tiny tall short long round old new young happy sad bright dark soft hard wooden metal
sitting standing running walking flying swimming jumping dancing eating sleeping playing looking holding
sunny rainy snowy night day morning evening light shadow color texture size quantity text water fire snow
describe detailing following aspects main content theme colors shapes sizes textures quantities spatial
relationships objects actions events behaviors temporal physical movement changes environment atmosphere
camera angles movements transitions used user system assistant
"""
_WORDS = _WORD_TEXT.split()

_CLIP_BOS, _CLIP_EOS = "<|startoftext|>", "<|endoftext|>"
_WORD_SPECIALS = ["<pad>", "</s>", "<unk>", "<|begin_of_text|>", "<|end_of_text|>",
                  "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
_PUNCTUATION = list(".,:;!?'\"()-{}[]/")

# HunyuanVideo wraps the prompt into a chat template and crops the template tokens from the Llama hidden states.
# With the word-level tokenizer (which adds <|begin_of_text|>) this prefix is exactly 4 tokens.
HUNYUAN_PROMPT_TEMPLATE = {"template": "<|start_header_id|>user<|end_header_id|> {}<|eot_id|>", "crop_start": 4}


# --------------------------------------------------------------------------------------------- tokenizers
def _byte_alphabet() -> list[str]:
    """GPT-2/CLIP ``bytes_to_unicode``: printable bytes stand for themselves, the others for chr(256 + i)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in keep]
    table = {b: chr(b) for b in keep} | {b: chr(256 + i) for i, b in enumerate(others)}
    return [table[b] for b in range(256)]


def _merge(word: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    out, i = [], 0
    while i < len(word):
        if word[i:i + 2] == pair:
            out.append(pair[0] + pair[1])
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


@functools.lru_cache(maxsize=4)
def _clip_vocab_and_merges(word_list: tuple[str, ...] = tuple(_WORDS)) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Learn BPE merges over ``word_list`` (ties broken by pair order), so each listed word is exactly one token."""
    alphabet = _byte_alphabet()
    vocab = alphabet + [c + "</w>" for c in alphabet]
    words = {tuple(w[:-1]) + (w[-1] + "</w>",) for w in word_list}
    merges: list[tuple[str, str]] = []
    while pairs := Counter(p for w in words for p in itertools.pairwise(w)):
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        vocab.append(best[0] + best[1])
        words = {_merge(w, best) for w in words}
    vocab += [_CLIP_BOS, _CLIP_EOS]
    return {tok: i for i, tok in enumerate(dict.fromkeys(vocab))}, merges


def clip_tokenizer(words: tuple[str, ...] | None = None, max_length: int = 77) -> CLIPTokenizer:
    """CLIPTokenizer loaded from a generated vocab.json + merges.txt (byte-level BPE) whose whole-word tokens are
    ``words`` (default: a small English word list)."""
    vocab, merges = _clip_vocab_and_merges(tuple(words) if words else tuple(_WORDS))
    with tempfile.TemporaryDirectory() as tmp:
        vocab_file, merges_file = os.path.join(tmp, "vocab.json"), os.path.join(tmp, "merges.txt")
        with open(vocab_file, "w", encoding="utf-8") as f:
            json.dump(vocab, f, ensure_ascii=False)
        with open(merges_file, "w", encoding="utf-8") as f:
            f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
        return CLIPTokenizer.from_pretrained(tmp, model_max_length=max_length)


@functools.lru_cache(maxsize=4)
def _word_vocab(words: tuple[str, ...] = tuple(_WORDS)) -> dict[str, int]:
    return {tok: i for i, tok in enumerate(dict.fromkeys(_WORD_SPECIALS + _PUNCTUATION + list(words)))}


def word_tokenizer(flavor: str, words: tuple[str, ...] | None = None) -> PreTrainedTokenizerFast:
    """Word-level stand-in for the T5/UMT5 ("t5": appends </s>) or Llama ("llama": prepends BOS) tokenizers."""
    vocab = _word_vocab(tuple(words) if words else tuple(_WORDS))
    tok = Tokenizer(WordLevel(dict(vocab), unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(_WORD_SPECIALS)
    if flavor == "t5":
        tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", vocab["</s>"])])
        specials = {"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"}
    elif flavor == "llama":
        bos = "<|begin_of_text|>"
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, vocab[bos])])
        specials = {"pad_token": "<pad>", "bos_token": bos, "eos_token": "<|end_of_text|>", "unk_token": "<unk>"}
    else:
        raise ValueError(f"unknown tokenizer flavor {flavor!r}; expected 't5' or 'llama'")
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=512, **specials)


# ---------------------------------------------------------------------------------------- text encoders
def _clip_encoder(hidden: int = 32, projection: int | None = None) -> CLIPTextModel | CLIPTextModelWithProjection:
    vocab, _ = _clip_vocab_and_merges()
    config = CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=77, projection_dim=projection or hidden, hidden_act="gelu",
        bos_token_id=vocab[_CLIP_BOS], eos_token_id=vocab[_CLIP_EOS], pad_token_id=vocab[_CLIP_EOS],
    )
    return CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)


def _t5_encoder(d_model: int = 32, umt5: bool = False) -> T5EncoderModel | UMT5EncoderModel:
    config_cls, model_cls = (UMT5Config, UMT5EncoderModel) if umt5 else (T5Config, T5EncoderModel)
    config = config_cls(vocab_size=len(_word_vocab()), d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=2,
                        num_heads=d_model // 8, relative_attention_num_buckets=8, dropout_rate=0.0,
                        feed_forward_proj="gated-gelu", is_encoder_decoder=False)
    return model_cls(config)


def _llama_encoder(hidden: int = 16) -> LlamaModel:
    vocab = _word_vocab()
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512, hidden_act="silu",
                         pad_token_id=vocab["<pad>"], bos_token_id=vocab["<|begin_of_text|>"],
                         eos_token_id=vocab["<|end_of_text|>"])
    return LlamaModel(config)
