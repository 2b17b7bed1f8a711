"""Word-level tokenizers of the real classes (CLIPTokenizer, T5TokenizerFast), built offline.

The toy pipelines and the tests need tokenizers that load with `from_pretrained` exactly like the
real ones, but no vocabulary files can be downloaded here. These builders write a small
vocabulary instead: every given word becomes one token, and single letters (plus a few
punctuation marks) are the fallback, so any lowercase prompt tokenizes without unknown tokens.

- CLIP: byte-pair encoding. A word "cat" is the merges "c a" → "ca", "ca t</w>" → "cat</w>".
- T5: a unigram (sentencepiece-style) model; whole words "▁cat" score higher than letters.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

#: Lowercase letters: the fallback pieces of both tokenizers.
LETTERS: tuple[str, ...] = tuple(chr(c) for c in range(ord("a"), ord("z") + 1))
#: Punctuation given its own token (CLIP's pre-tokenizer splits it off words).
PUNCTUATION: tuple[str, ...] = (":", ",", ".", "!", "-")


def words_of(texts: Iterable[str]) -> list[str]:
    """The distinct lowercase words of `texts`, in order of first appearance."""
    return list(dict.fromkeys(w for text in texts for w in re.findall(r"[a-z]+", text.lower())))


def clip_tokenizer(words: Iterable[str], max_length: int):
    """A `transformers.CLIPTokenizer` with one token per word of `words`, letters as fallback."""
    from transformers import CLIPTokenizer

    vocab: dict[str, int] = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    merges: list[tuple[str, str]] = []
    for token in list(LETTERS) + [c + "</w>" for c in LETTERS + PUNCTUATION] + list(PUNCTUATION):
        vocab.setdefault(token, len(vocab))
    for word in words:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:  # merge left to right into one word token
            merges.append((pieces[0], pieces[1]))
            pieces = [pieces[0] + pieces[1]] + pieces[2:]
            vocab.setdefault(pieces[0], len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=list(dict.fromkeys(merges)), model_max_length=max_length)


def t5_tokenizer(words: Iterable[str], max_length: int):
    """A `transformers.T5TokenizerFast` (unigram) with one piece per word, letters as fallback."""
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [("▁" + word, -1.0) for word in dict.fromkeys(words)]
    pieces += [(c, -3.0) for c in LETTERS + PUNCTUATION] + [("▁" + c, -3.5) for c in LETTERS]
    return T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=max_length)


__all__ = ["LETTERS", "PUNCTUATION", "clip_tokenizer", "t5_tokenizer", "words_of"]
