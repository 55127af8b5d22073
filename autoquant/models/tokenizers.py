"""Offline tokenizers for the built-in models, built in memory (no vocabulary files to download).

CLIP slot: a byte-level BPE over the 256 byte characters, their end-of-word forms and the two CLIP
specials, no merges: every prompt tokenizes (one token per character) and every id is below 514,
so it fits any CLIP text encoder whose vocabulary has at least 514 rows. The specials sit at fixed
ids that the shipped text-encoder configs name as bos/eos (CLIP pools at the eos position).

T5 slot: a character-level unigram vocabulary of printable ASCII with T5's pad/eos/unk at 0/1/2,
built with ``T5Tokenizer`` (which transformers 5 also exports as ``T5TokenizerFast``, the class
``FluxPipeline`` declares for ``tokenizer_2``).
"""

from __future__ import annotations

import string
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

CLIP_BOS = "<|startoftext|>"
CLIP_EOS = "<|endoftext|>"
CLIP_BOS_ID = 512
CLIP_EOS_ID = 513
T5_SPECIALS = ("<pad>", "</s>", "<unk>")
# T5's sentencepiece marks a word start with this character.
T5_WORD_START = "▁"


def _byte_characters() -> list[str]:
    """GPT-2/CLIP's reversible map from the 256 byte values to printable unicode characters."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars = {b: chr(b) for b in printable}
    shifted = 256
    for b in range(256):
        if b not in chars:
            chars[b] = chr(shifted)
            shifted += 1
    return [chars[b] for b in range(256)]


def clip_vocab() -> dict[str, int]:
    chars = _byte_characters()
    tokens = [*chars, *(c + "</w>" for c in chars), CLIP_BOS, CLIP_EOS]
    vocab = {token: i for i, token in enumerate(tokens)}
    assert vocab[CLIP_BOS] == CLIP_BOS_ID and vocab[CLIP_EOS] == CLIP_EOS_ID
    return vocab


def t5_vocab() -> list[tuple[str, float]]:
    """Pieces with unigram log-scores: specials, the bare word-start mark, then every printable
    character alone and with the word-start mark (scores equal, so splits go per character)."""
    pieces: list[tuple[str, float]] = [(s, 0.0) for s in T5_SPECIALS]
    pieces.append((T5_WORD_START, -2.0))
    for ch in string.ascii_letters + string.digits + string.punctuation:
        pieces += [(T5_WORD_START + ch, -3.0), (ch, -3.0)]
    return pieces


def build_tokenizer(class_name: str, settings: dict[str, Any]) -> PreTrainedTokenizerBase:
    """The tokenizer for a pipeline slot whose model_index names ``class_name``."""
    from transformers import CLIPTokenizer, T5Tokenizer

    if class_name == "CLIPTokenizer":
        return CLIPTokenizer(vocab=clip_vocab(), merges=[], **settings)
    if class_name in ("T5Tokenizer", "T5TokenizerFast"):
        return T5Tokenizer(vocab=t5_vocab(), extra_ids=0, **settings)
    raise ValueError(f"no offline tokenizer for {class_name}")
