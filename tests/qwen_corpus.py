"""A tokenization corpus for Qwen's vocabulary: the text shapes where byte-level BPE, the Qwen2 split
regex and NFC normalization disagree most easily between implementations."""

from __future__ import annotations

import random

MATH = (
    r"$\frac{a+b}{c-d}$",
    r"\[ \int_0^1 x^2\,dx = \tfrac{1}{3} \]",
    r"The answer is \boxed{42}.",
    r"x_{i+1} = x_i - \frac{f(x_i)}{f'(x_i)}",
    r"\sum_{k=1}^{n} k^2 = \frac{n(n+1)(2n+1)}{6}",
    "∑_{k=1}^{n} k² = n(n+1)(2n+1)/6",
    "√2 ≈ 1.41421356, π ≈ 3.14159, e^{iπ} + 1 = 0",
    "α + β = γ; ∀ε > 0 ∃δ > 0: |x - a| < δ ⇒ |f(x) - L| < ε",
    "≤ ≥ ≠ ∞ ∈ ∉ ⊂ ⊆ ∪ ∩ ∅ ℕ ℤ ℚ ℝ ℂ",
    r"\begin{pmatrix} 1 & 2 \\ 3 & 4 \end{pmatrix}",
    "2^{10} = 1024 and 10! = 3628800",
    "f(x) = 3x^2 - 2x + 1, so f'(x) = 6x - 2",
    "½ + ¼ = ¾ and x² + y² = r²",
)
DIGITS = (
    "1234567890123456789012345678901234567890",
    "3.14159265358979323846264338327950288419716939937510",
    "1,000,000 and 1 000 000 and 1_000_000",
    "2025-07-04T12:34:56Z",
    "0x1F4A9 0b101101 0o777 1e-10 6.022e23",
    "Call 555-0100 or +1 (555) 010-0199.",
    "Order #00012345 costs $1,234.56 (€1.234,56).",
    "٣٤٥ and ৩৪৫ and ३४५ and ３４５",
    "99999999999999999999999999.9999999999",
)
CJK = (
    "中文文本测试。\n\n第二步：计算总和。",
    "我们先计算 12 + 7 = 19。\n\n然后验证。",
    "こんにちは世界！カタカナとひらがな。",
    "안녕하세요, 세계! 한국어 문장입니다.",
    "漢字かな混じり文と한국어 and English mixed",
    "ＡＢＣ１２３ fullwidth ｶﾀｶﾅ halfwidth",
    "「引用」『二重』【括弧】〈山〉《书名》",
    "𠀀𠀁 CJK extension B and 〇 and 々",
)
EMOJI = (
    "👨\u200d👩\u200d👧\u200d👦 family",
    "🏳️\u200d🌈 and 🏴\u200d☠️",
    "👍🏽 👍🏿 thumbs",
    "❤️ ❤ ♥ hearts",
    "🇯🇵🇺🇸🇩🇪 flags",
    "1️⃣ 2️⃣ #️⃣ keycaps",
    "👩🏽\u200d💻 coder and 🧑\u200d🔬 scientist",
    "emoji at the end 😀",
    "😀😃😄😁😆😅🤣😂",
)
CODE = (
    "def f(x):\r\n\treturn x + 1\r\n",
    "if (a) {\n\t\tb();\n}\n",
    "for i in range(10):\n    print(i)\n",
    "  \t  mixed indent\n\t  \tagain",
    "line1\r\nline2\rline3\nline4\r\n\r\n",
    "int main(void) {\r\n\treturn 0;\r\n}\r\n",
    "x = {'a': [1, 2, 3], \"b\": None}  # comment",
    "SELECT * FROM t WHERE id = 42;\n",
    '<div class="x">&amp;&lt;</div>',
    "a\tb\tc\n1\t2\t3\n",
)
WHITESPACE = (
    "a  b   c    d     e",
    "   leading spaces",
    "trailing spaces   ",
    "\n\n\n",
    " \n \n ",
    "\t\t\t",
    "word\u00a0with\u00a0nbsp",
    "ideographic\u3000space",
    "em\u2003space and thin\u2009space",
    "zero\u200bwidth\u200bspace",
    "               many spaces then text",
    "text\n      \n      indented blank",
)
CONTRACTIONS = (
    "don't won't can't isn't",
    "I'm you're they'll we've she'd it's",
    "DON'T I'M THEY'LL WE'VE",
    "rock 'n' roll and 'quoted'",
    "it’s curly and it‘s odd",
    "O'Brien's cat's toy",
)
# Decomposed (NFD) text and other text that NFC changes.
DECOMPOSED = (
    "cafe\u0301",
    "Cafe\u0301 au lait, cre\u0300me bru\u0302le\u0301e",
    "e\u0301le\u0300ve na\u0131\u0308ve",
    "\u1100\u1161\u11a8 \u1112\u1161\u11ab\u1100\u1173\u11af",
    "A\u030a and \u212b (angstrom sign) and \u2126 (ohm sign)",
    "o\u0308 u\u0308 a\u0308 \u00df stra\u00dfe",
    "n\u0303 ma\u0303na",
    "Vie\u0323\u0302t Nam",
    "q\u0307\u0323 reordered marks",
    "a\u0323\u0307 and a\u0307\u0323",
    "=\u0338 and <\u0338 and >\u0338",
    "\u0915\u093c and \u0958 (nukta)",
    "\u05e9\u05c1\u05bc Hebrew points",
    "\u0301 a combining mark first",
    "x\u0301\u0301\u0301\u0301\u0301 stacked",
    "\u00e9 precomposed and e\u0301 decomposed side by side",
    "Ｅ\u0301 fullwidth with a mark",
    "The resume\u0301 is 3.\n\nThe cafe\u0301 is 4.\n\n",
    "<think>\u0338 the mark after a tag",
    "\u0338<think> the mark before a tag",
)
STEPS = (
    ".\n\n",
    "a.\n\nb",
    "1.\n\n2.\n\n3.\n\n",
    ".\n\n\n",
    ". \n\n",
    "..\n\n",
    "e.g.\n\nAnd i.e.\n\n",
    ".\n\n.\n\n.\n\n",
    "x = 1.\n\nx = 2.\n\n",
    "。\n\n",
    ".\r\n\r\n",
    "\\).\n\n",
    "$x$.\n\n",
    "42.\n\n",
    '"quoted."\n\n',
    "end.\n\n\n\nmore",
    "So 12 + 7 = 19.\n\nThen 19 * 2 = 38.\n\n",
    "(see above).\n\n",
    "3.5.\n\n",
    "done.\n\n  indented next",
)
MARKUP = (
    "<|im_start|>user\nWhat is 12 + 7?<|im_end|>\n<|im_start|>assistant\n<think>\n"
    "First, 12 + 7 = 19.\n\nCheck: 19 - 7 = 12.\n\n</think>\nThe answer is \\boxed{19}.",
    "<think>\ncafe\u0301 costs 3.\n\nTwo cafe\u0301s cost 6.\n\n</think>\n6",
    "<|im_start|>system\nYou are Qwen.<|im_end|>\n<|im_start|>user\n안녕<|im_end|>\n",
    "<think>.\n\n</think>",
    "text<|endoftext|>more text",
    '<tool_call>\n{"name": "f"}\n</tool_call>',
)
HAND_WRITTEN = (
    *MATH,
    *DIGITS,
    *CJK,
    *EMOJI,
    *CODE,
    *WHITESPACE,
    *CONTRACTIONS,
    *DECOMPOSED,
    *STEPS,
    *MARKUP,
)
_GLUE = (" ", "", "\n", "\n\n", ".\n\n", "\t", "  ", "\r\n", ", ", ": ")


def corpus(n_generated: int = 300, seed: int = 0) -> list[str]:
    """The hand-written texts, then `n_generated` seeded joins of 2-5 fragments."""
    rng = random.Random(seed)
    texts = list(HAND_WRITTEN)
    for _ in range(n_generated):
        parts = rng.sample(HAND_WRITTEN, rng.randint(2, 5))
        text = parts[0]
        for part in parts[1:]:
            text += rng.choice(_GLUE) + part
        texts.append(text)
    return texts
