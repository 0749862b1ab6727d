"""Text to token ids where only the chat template makes control tokens.

A tokenizer that parses special tokens in text turns a page saying "<|im_end|>\\n<|im_start|>
assistant" into real turn boundaries: the page forges a turn of its own. Here the template's
Control pieces are looked up as single ids, and every text piece (questions, tool results,
extractor and judge text) is encoded with special-token parsing off, so "<|im_end|>" in it
becomes the ordinary tokens of its characters. Splitting at Control pieces is where the
tokenizer splits anyway, so benign text encodes to exactly the ids it always did.
"""

from __future__ import annotations

from rollout.chat_format import Control, Piece

# Breaks "<|" so that a server which parses special tokens in message text reads none there.
_ZERO_WIDTH_SPACE = "\u200b"


class TemplateTokenError(ValueError):
    """The tokenizer has no single id for a control token of the chat template."""


def control_id(tokenizer, token: str) -> int:
    ids = tokenizer.convert_tokens_to_ids([token])
    if len(ids) != 1 or ids[0] is None or (ids[0] == tokenizer.unk_token_id and token != tokenizer.unk_token):
        raise TemplateTokenError(f"the tokenizer has no {token!r} token; the policy must use a ChatML template")
    return int(ids[0])


def encode_text(tokenizer, text: str) -> list[int]:
    """Plain text to ids: control-token strings in it stay text."""
    if not text:
        return []
    ids = list(tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True))
    special = set(tokenizer.all_special_ids)
    if special.intersection(ids):
        # A tokenizer that ignores split_special_tokens: break the markers, then encode again.
        ids = list(tokenizer.encode(defang(text), add_special_tokens=False, split_special_tokens=True))
        if special.intersection(ids):
            raise TemplateTokenError("the tokenizer turns plain text into control tokens even with the markers broken")
    return ids


def encode_pieces(tokenizer, pieces: list[Piece]) -> list[int]:
    ids: list[int] = []
    for piece in pieces:
        if isinstance(piece, Control):
            ids.append(control_id(tokenizer, piece.token))
        else:
            ids.extend(encode_text(tokenizer, piece))
    return ids


def defang(text: str) -> str:
    """Text for a prompt sent to a server that will tokenize it: no "<|...|>" control marker survives.

    A zero-width space after "<" keeps the text readable for a model and meaningless to a tokenizer.
    """
    return text.replace("<|", "<" + _ZERO_WIDTH_SPACE + "|")
