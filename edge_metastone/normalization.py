"""The tokenizer's Unicode normalization, applied before llama.cpp sees text (llama.cpp does none).

Hugging Face tokenizers split added tokens (`<|im_end|>`, `<think>`) out of the text first and
normalize only the text between them; so does `normalize` here. A combining mark right after a tag
(`<think>` + U+0338) would otherwise compose with its `>` and the tag would no longer be found.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from collections.abc import Sequence
from typing import Literal, get_args

NormalForm = Literal["NFC", "NFD", "NFKC", "NFKD"]
NORMAL_FORMS: tuple[str, ...] = get_args(NormalForm)


def normalize(text: str, form: NormalForm | None, keep: Sequence[str] = ()) -> str:
    """`text` in normal form `form` (unchanged when None), each occurrence of a `keep` string left
    as it is and the text on either side of it normalized on its own."""
    if form is None or unicodedata.is_normalized(form, text):
        return text  # a substring of normalized text is normalized: no split needed
    pattern = _keep_pattern(tuple(keep))
    if pattern is None:
        return unicodedata.normalize(form, text)
    out, pos = [], 0
    for match in pattern.finditer(text):
        out.append(unicodedata.normalize(form, text[pos : match.start()]))
        out.append(match.group())
        pos = match.end()
    out.append(unicodedata.normalize(form, text[pos:]))
    return "".join(out)


@functools.lru_cache(maxsize=8)
def _keep_pattern(keep: tuple[str, ...]) -> re.Pattern[str] | None:
    """Longest first, as tokenizers match added tokens."""
    texts = sorted({k for k in keep if k}, key=len, reverse=True)
    return re.compile("|".join(re.escape(k) for k in texts)) if texts else None
