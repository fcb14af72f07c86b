"""PTB tokenisation of captions in Python, matching coco-caption's Java ``PTBTokenizer``.

coco-caption runs Stanford CoreNLP 3.4.1's ``PTBTokenizer -preserveLines -lowerCase`` and then
drops the tokens in :data:`PUNCTUATIONS`. This module reproduces that output without Java: a small
longest-match lexer (the rule that matches the most characters wins, ties go to the earlier rule,
as in JFlex) over each caption, with the same normalisations (quotes, brackets to ``-lrb-``,
dashes, ellipses, currency, contractions such as ``is n't`` and ``gon na``). Lower-casing happens
before the punctuation filter, so ``-lrb-`` survives exactly as it does in coco-caption.

Covered: what occurs in Flickr8k/COCO-style captions (words, hyphenated words, numbers, dates,
fractions, abbreviations, contractions, quotes, brackets, symbols, simple emoticons, URLs,
e-mail, hashtags), checked token for token against the Java tokeniser. Not reproduced: SGML
tags and phone numbers (rare in captions; tokenised piecewise here).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from functools import lru_cache
from typing import TypeVar

__all__ = ["PUNCTUATIONS", "ptb_tokenize_lines", "tokenize", "tokenize_captions", "tokenize_lines"]

K = TypeVar("K")

# Tokens coco-caption's ptbtokenizer.py drops after PTB tokenisation (its list, verbatim order).
PUNCTUATIONS = frozenset(
    ["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-"]
    + [".", "?", "!", ",", ":", "-", "--", "...", ";"]
)

_L = r"[^\W\d_]"  # a letter
_AL = r"[^\W_]"  # a letter or digit
_APOS = "['\u2019\u0092]"
_APOSX = "['\u2019\u0092`\u2018\u201b\u0091]"
_WORD = rf"{_L}{_AL}*(?:[.!?]{_L}{_AL}*)*"
_ACRO = r"[A-Za-z](?:\.[A-Za-z])+"
_HTHING = rf"[A-Za-z0-9][A-Za-z0-9.,]*(?:-(?:{_ACRO}\.|[A-Za-z0-9]+))+"
_THING = (
    rf"(?:[dDoOlL]{_APOSX}{_AL})?{_AL}+(?:[-_\u058a\u2010\u2011](?:[dDoOlL]{_APOSX}{_AL})?{_AL}+)*"
)
_THINGA = r"[A-Z]+(?:[+&][A-Z]+)+"
_SPACE = "[ \t\u00a0\u2000-\u200a\u3000]"
_FRAC_JOIN = "\x00"  # stands for the space inside "3 1/2" while a caption is split into chunks
_ABBREV1 = (
    "jan|feb|mar|apr|jun|jul|aug|sep|sept|oct|nov|dec|mon|tue|tues|wed|thu|thurs|fri"
    "|ala|ariz|ark|calif|colo|conn|dak|del|fla|ga|ill|ind|kans?|ky|la|mass|md|mich|minn|miss"
    "|mo|mont|neb|nev|okla|ore|pa|penn|tenn|tex|va|vt|wash|wisc?|wyo"
    "|inc|cos?|corp|pp?tys?|ltd|plc|bancorp|dept|bhd|assn|univ|intl|sys"
    "|ph|tel|est|ext|sq|ft|jr|sr|bros|(?:ed|ph)\\.d|blvd|rd|esq|etc|al|seq"
)
_TITLES = (
    "mr|mrs|ms|miss|drs?|profs?|sens?|reps?|attys?|lt|col|gen|messrs|govs?|adm|rev|maj|sgt"
    "|cpl|pvt|mt|capt|ste?|ave|pres|lieut|hon|brig|co?mdr|pfc|spc|supts?|det"
    "|vs|alex|wm|jos|cie|a\\.k\\.a|cf|treas|invt|elec|natl|m[ft]g"
)
# Words after which a one-letter "A." is split into "a" "." (case-sensitive first letter).
_STARTER_WORDS = (
    "About According Additionally After An A As At But Earlier He Her Here However If In It "
    "Last Many More Mr. Ms. Now Once One Other Our She Since So Some Such That The Their "
    "Then There These They This We When While What Yet You"
)
_SENT_STARTERS = "|".join(w[0] + "(?i:" + re.escape(w[1:]) + ")" for w in _STARTER_WORDS.split())
_AFTER_ACRONYM = rf"(?:{_SPACE}|\n)+(?:{_SENT_STARTERS})(?:{_SPACE}|\n)"
_MISC_SYMBOLS = (
    "+%&~^|\\\\\u00a6\u00a7\u00a8\u00a9\u00ac\u00ae\u00af\u00b0-\u00ba\u00d7\u00f7"
    "\u2020-\u2023\u2030-\u2038\u2044\u207a-\u207f\u2100-\u214f\u2190-\u21ff\u2200-\u22ff"
    "\u2300-\u23ff\u2500-\u27bf\u3012\u30fb"
)
_QUOTE_MAP = (
    ("[\u0091\u2018\u201b\u2039]", "`"),
    ("[\u0092\u2019\u203a]", "'"),
    ("[\u0093\u201c\u00ab]", "``"),
    ("[\u0094\u201d\u00bb]", "''"),
)
_BRACKETS = {"(": "-LRB-", ")": "-RRB-", "[": "-LSB-", "]": "-RSB-", "{": "-LCB-", "}": "-RCB-"}
_CURRENCY = {
    "\u00a2": "cents",
    "\u00a3": "#",
    "\u00a4": "$",
    "\u0080": "$",
    "\u20a0": "$",
    "\u20ac": "$",
}
_FRACTIONS = {"\u00bc": "1/4", "\u00bd": "1/2", "\u00be": "3/4", "\u2153": "1/3", "\u2154": "2/3"}


def _quotes(left: bool) -> Callable[[str], str]:
    """Latex-style quote normalisation; ``left`` says whether the quote probably opens."""

    def convert(tok: str) -> str:
        tok = tok.replace("'", "`" if left else "'").replace('"', "``" if left else "''")
        for pattern, repl in _QUOTE_MAP:
            tok = re.sub(pattern, repl, tok)
        return tok

    return convert


def _same(tok: str) -> str:
    return tok


def _dashes(tok: str) -> str:
    return "--" if 3 <= len(tok) <= 4 else tok


def _frac(tok: str) -> str:
    return tok.replace(_FRAC_JOIN, "\u00a0").replace(" ", "\u00a0")


def _smiley(tok: str) -> str:
    return tok.replace("(", "-LRB-").replace(")", "-RRB-")


# (pattern, transform). A pattern's group "t" (or "t2" in a second alternative) is the token;
# text matched after it is trailing context: it counts for the longest match but is lexed again
# (JFlex's r1/r2 rules and yypushback).
_RULES: list[tuple[str, Callable[[str], str]]] = [
    (r"(?P<t>(?i:can))(?i:not)|(?P<t2>(?i:'t))(?i:was)", _same),
    (
        r"(?P<t>(?i:'t))(?i:is)"
        r"|(?P<t2>(?i:gon(?=na)|got(?=ta)|lem(?=me)|gim(?=me)|wan(?=na)))(?i:na|ta|me)",
        _same,
    ),
    ("(?P<t>[\u2013\u2014\u2015])", lambda _: "--"),
    (rf"(?P<t>{_WORD}){_APOS}(?i:[msd]|re|ve|ll)", _same),
    (rf"(?P<t>[^\W\d_]*[A-MO-Za-mo-z])(?i:n){_APOSX}(?i:t)", _same),
    (rf"(?P<t>{_WORD})", _same),
    (
        rf"(?P<t>(?i:{_APOS}n{_APOS}?|[ldj]{_APOS}|ol{_APOS}|dunkin{_APOS}|somethin{_APOS}"
        rf"|{_APOS}em|[a-hj-xzn]{_APOSX}{_L}{{2,}}|{_APOS}[2-9]0s|{_APOS}till?|{_L}+[aeiouy]{_APOSX}[aeiou]{_L}*|{_APOS}cause"
        rf"|cont'd\.?|nor'easter|c'mon|e'er|s'mores|ev'ry|li'l|nat'l))",
        _quotes(False),
    ),
    (rf"(?P<t>(?i:y{_APOS})){_L}", _same),
    (r"(?P<t>(?i:https?)://[^\s\"<>|()]*[^\s\"<>|.!?(){},-])", _same),
    (
        r"(?P<t>(?:(?i:www)\.(?:[^\s\"<>|.!?(){},]+\.)+[a-zA-Z]{2,4}"
        r"|(?:[^\s\"`'<>|.!?(){},\-_$]+\.)+(?i:com|net|org|edu))"
        r"(?:/[^\s\"<>|()]*[^\s\"<>|.!?(){},-])?)",
        _same,
    ),
    (
        r"(?P<t>[a-zA-Z0-9][^\s\"<>|(){}\u00a0]*@(?:[^\s\"<>|(){}.\u00a0]+\.)*"
        r"[^\s\"<>|(){}\[\].,;:\u00a0]+)",
        _same,
    ),
    (rf"(?P<t>@[a-zA-Z_][a-zA-Z_0-9]*|#{_L}[^\W]*[^\W_])", _same),
    (rf"(?P<t>{_APOS}(?i:[msd]|re|ve|ll))[^A-Za-z]", _quotes(False)),
    (rf"(?P<t>(?i:n){_APOSX}(?i:t))[^A-Za-z]", _quotes(False)),
    (r"(?P<t>\d{1,2}[-/]\d{1,2}[-/]\d{2,4})", _same),
    (r"(?P<t>[-+]?\d*(?:[.:,]\d+)+)", _same),
    (r"(?P<t>[-+]?\d+)", _same),
    (rf"(?P<t>(?:\d{{1,4}}[-{_FRAC_JOIN}\u00a0])?\d{{1,4}}\\?/\d{{1,4}})", _frac),
    ("(?P<t>[\u00bc\u00bd\u00be\u2153\u2154])", lambda t: _FRACTIONS[t]),
    (
        r"(?P<t>-(?i:rrb|lrb|rcb|lcb|rsb|lsb)-|(?i:c\.d\.s|pro-|anti-|s&p-500|s&ls)"
        rf"|(?i:cap){_APOS}(?i:n)|(?i:c){_APOS}(?i:est))",
        _same,
    ),
    (r"(?P<t>[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}(?:\\?/[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}){1,2})", _same),
    (r"(?P<t>[A-Z]*\$|#)", _same),
    ("(?P<t>[\u00a2\u00a3\u00a4\u00a5\u0080\u20a0\u20ac])", lambda t: _CURRENCY.get(t, t)),
    (rf"(?P<t>[A-Za-z])\.{_AFTER_ACRONYM}|(?P<t2>{_ACRO}\.){_AFTER_ACRONYM}", _same),
    (r"(?P<t>(?i:ca|figs?|prop|nos?|art|bldg|pp|op)\.)" + _SPACE + r"?\d", _same),
    (rf"(?P<t>(?i:{_ABBREV1})\.)[\s\S]{{0,2}}", _same),
    (rf"(?P<t>(?:{_ACRO}|(?i:{_TITLES})|[A-Za-z])\.)", _same),
    (rf"(?P<t>(?:{_WORD}|{_HTHING}|{_THING}|{_THINGA})\.)[,;:]", _same),
    (r"(?P<t>\")(?:[^\W_]|\$)|(?P<t2>\")", _quotes(True)),
    (r"(?P<t>[<>]?[:;=][-o*']?[()DPdpO\\{@|\[\]])[\W_]", _smiley),
    (r"(?P<t>[<\[\]>(){}])", lambda t: _BRACKETS.get(t, "-LRB-" if t == "<" else "-RRB-")),
    (r"(?P<t>-+)", _dashes),
    (r"(?P<t>\.{3,5}|[\u0085\u2026])", lambda _: "..."),
    (r"(?P<t>@+|#+|_+|\*+)", _same),
    (r"(?P<t>[,;:]|[?!]+|[.\u00a1\u00bf=/])", _same),
    (rf"(?P<t>{_HTHING})", _same),
    (rf"(?P<t>{_THING})", _quotes(False)),
    (rf"(?P<t>{_THINGA})", _same),
    (r"(?P<t>')[A-Za-z][^ \t\n\r\u00a0]", _quotes(True)),
    (
        "(?P<t>''|[`\u2018\u2019\u201a\u201b\u201c\u201d\u0091-\u0094"
        "\u201e\u201f\u2039\u203a\u00ab\u00bb]{1,2}|['\u2019\u0092])",
        _quotes(False),
    ),
    (f"(?P<t>[{_MISC_SYMBOLS}])", _same),
]
_COMPILED = [(re.compile(p), f) for p, f in _RULES]
_CHUNK_SPLIT = re.compile(f"{_SPACE}+|[\r\n\u2028\u2029\u000b\u000c\u0085]+")
_FRAC_SPACE = re.compile(r"(?<![^\W_])(\d{1,4}) (?=\d{1,4}\\?/\d{1,4})")


def _match(chunk: str, pos: int) -> tuple[int, str] | None:
    """Longest match at ``pos``: (end of the token, normalised token); None if nothing fits."""
    best_len, best = 0, None
    for regex, convert in _COMPILED:
        m = regex.match(chunk, pos)
        if m is None or m.end() - pos <= best_len:
            continue
        group = "t" if m.group("t") is not None else "t2"
        best_len, best = m.end() - pos, (m.end(group), convert(m.group(group)))
    return best


@lru_cache(maxsize=200_000)
def _lex_chunk(chunk: str, follow: str) -> tuple[str, ...]:
    """PTB tokens of one whitespace-free chunk; ``follow`` is the text after it (context only)."""
    text, pos, out = chunk + follow, 0, []
    while pos < len(chunk):
        found = _match(text, pos)
        if found is None:  # untokenizable character: PTBTokenizer deletes it
            pos += 1
            continue
        pos, tok = found
        out.append(tok)
    return tuple(out)


def _chunks(line: str) -> list[str]:
    """Whitespace-free pieces of a caption; a space inside "3 1/2" is kept, as PTBLexer does."""
    return [c for c in _CHUNK_SPLIT.split(_FRAC_SPACE.sub(rf"\1{_FRAC_JOIN}", line)) if c]


def _follow(chunk: str, sep: str, rest: list[str]) -> str:
    """Text after a chunk that rules look at: a character, or a whole word after a period."""
    if not rest:
        return "\n"
    if chunk.endswith("."):
        return sep + rest[0] + (" " if len(rest) > 1 else "\n")
    return sep + rest[0][:1]


def ptb_tokenize_lines(lines: Sequence[str]) -> list[list[str]]:
    """Lower-cased PTB tokens per line, before punctuation removal.

    The lines are lexed as one text, like coco-caption's single Java call: a caption ending in
    "A." before one starting with "The" gives "a" and "." there, so order matters in rare cases.
    """
    per_line = [_chunks(line.replace("\n", " ")) for line in lines]
    flat = [(i, c) for i, chunks in enumerate(per_line) for c in chunks]
    out: list[list[str]] = [[] for _ in lines]
    for k, (i, chunk) in enumerate(flat):
        rest = [c for _, c in flat[k + 1 : k + 3]]
        sep = " " if k + 1 < len(flat) and flat[k + 1][0] == i else "\n"
        out[i].extend(t.lower() for t in _lex_chunk(chunk, _follow(chunk, sep, rest)))
    return out


def tokenize_lines(lines: Sequence[str]) -> list[str]:
    """Captions as coco-caption tokenises them: PTB tokens, lower case, punctuation dropped."""
    return [
        " ".join(t for t in toks if t not in PUNCTUATIONS) for toks in ptb_tokenize_lines(lines)
    ]


def tokenize(caption: str) -> str:
    """One caption tokenised on its own (see :func:`tokenize_lines` for batches)."""
    return tokenize_lines([caption])[0]


def tokenize_captions(captions: Mapping[K, Sequence[str]]) -> dict[K, list[str]]:
    """``{image_id: [caption, ...]}`` tokenised in one pass, in coco-caption's order."""
    flat = tokenize_lines([c for caps in captions.values() for c in caps])
    out, start = {}, 0
    for key, caps in captions.items():
        out[key], start = flat[start : start + len(caps)], start + len(caps)
    return out
