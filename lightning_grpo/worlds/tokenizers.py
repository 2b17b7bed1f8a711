"""Word-level tokenizers of the real classes (CLIPTokenizer, T5TokenizerFast), built offline.

The toy pipelines and the tests need tokenizers that load with `from_pretrained` exactly like the
real ones, but no vocabulary files can be downloaded here. These builders write a small
vocabulary instead: every given word becomes one token, and single letters (plus a few
punctuation marks) are the fallback, so any lowercase prompt tokenizes without unknown tokens.

- CLIP: byte-pair encoding. A word "cat" is the merges "c a" → "ca", "ca t</w>" → "cat</w>".
- T5: a unigram (sentencepiece-style) model; whole words "▁cat" score higher than letters.
- Llama (HunyuanVideo's text encoder): byte-level-fallback BPE on "▁"-marked words, with the
  special tokens of the Llama-3 chat template the HunyuanVideo pipelines wrap every prompt in.
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


#: The Llama-3 chat-template tokens HunyuanVideo's prompt template uses (one token each).
LLAMA_SPECIAL_TOKENS: tuple[str, ...] = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")


def word_merges(vocab: dict[str, int], words: Iterable[str]) -> list[tuple[str, str]]:
    """Byte-pair merges that join each word, "▁"-marked, left to right into one token; every
    intermediate piece is added to `vocab` (in place). Distinct merges, in first-use order."""
    merges: list[tuple[str, str]] = []
    for word in dict.fromkeys(words):
        pieces = ["▁", *word]
        while len(pieces) > 1:  # merge left to right into one word token
            merges.append((pieces[0], pieces[1]))
            pieces = [pieces[0] + pieces[1]] + pieces[2:]
            vocab.setdefault(pieces[0], len(vocab))
    return list(dict.fromkeys(merges))


def llama_tokenizer(words: Iterable[str], max_length: int, characters: str = ""):
    """A `transformers.LlamaTokenizerFast` with one token per word of `words` and letters, digits,
    `characters` and bytes (byte fallback) below them; BOS `<|begin_of_text|>` prepended, right
    padding with `<|end_of_text|>` (as HunyuanVideo's tokenizer: its transformer masks the tail).

    Words are "▁"-marked pieces (sentencepiece style; "▁" is prepended to every text segment, so
    the first word of a segment is marked too), and "\\n\\n" is one added token, as it is one token
    in Llama 3. With `words` covering the pipeline's prompt template, the template then
    tokenizes to the number of tokens the pipelines' hard-coded `crop_start` (95) assumes, like the
    real Llama-3 tokenizer (`lightning_grpo.worlds.components.build_video_tokenizers` checks it).
    """
    from tokenizers import AddedToken
    from transformers import LlamaTokenizerFast

    vocab: dict[str, int] = {"<unk>": 0, "<|begin_of_text|>": 1, "<|end_of_text|>": 2}
    vocab.update({f"<0x{b:02X}>": 3 + b for b in range(256)})  # byte fallback pieces
    for char in ["▁", *LETTERS, *(c.upper() for c in LETTERS), *"0123456789", *PUNCTUATION, *characters]:
        vocab.setdefault(char, len(vocab))
    tokenizer = LlamaTokenizerFast(
        vocab=vocab, merges=word_merges(vocab, words), unk_token="<unk>", bos_token="<|begin_of_text|>",
        eos_token="<|end_of_text|>", pad_token="<|end_of_text|>", add_bos_token=True, add_eos_token=False,
        add_prefix_space=True, legacy=True,  # legacy: "▁" before every segment
        padding_side="right", model_max_length=max_length,
    )
    tokenizer.init_kwargs["legacy"] = True  # saved to tokenizer_config.json: `from_pretrained` rebuilds the pre-tokenizer from it
    tokenizer.add_tokens([AddedToken("\n\n", normalized=False, special=False)])
    tokenizer.add_special_tokens({"additional_special_tokens": list(LLAMA_SPECIAL_TOKENS)})
    return tokenizer


__all__ = ["LETTERS", "LLAMA_SPECIAL_TOKENS", "PUNCTUATION", "clip_tokenizer", "llama_tokenizer", "t5_tokenizer", "word_merges", "words_of"]
