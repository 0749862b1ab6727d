"""HTML to the readable text of a page, with the standard library's lenient html.parser.

The result feeds passage ranking and the LLM extractor, so what matters is that visible prose
survives with sensible line breaks, and code, styles and markup do not. Malformed HTML (unclosed
tags, a missing </head>, stray end tags) is common on the web and must degrade, never raise.
"""

from __future__ import annotations

from html.parser import HTMLParser

# Content that is never read as text. head is handled apart: its <title> is kept.
SKIP_TAGS = frozenset({"title", "script", "style", "noscript", "svg", "template", "iframe", "object", "math"})
# Tags that may appear in <head>; any other start tag means the browser has left the head, which
# matters for pages that never close it.
HEAD_TAGS = frozenset({"title", "meta", "link", "style", "script", "noscript", "base", "template"})
# HTML tags that end foreign content (svg, math) in browsers; a page that forgets </svg> keeps its text.
FOREIGN_BREAKOUT = frozenset(
    """b big blockquote body br center code dd div dl dt em embed h1 h2 h3 h4 h5 h6 hr i img li
    listing menu meta nobr ol p pre ruby s small span strong strike sub sup table tt u ul var""".split()
)
BLOCK_TAGS = frozenset(
    """address article aside blockquote body br caption center dd details dialog div dl dt fieldset
    figcaption figure footer form h1 h2 h3 h4 h5 h6 header hgroup hr html legend li main nav ol p pre
    section summary table tbody tfoot thead tr ul""".split()
)
CELL_TAGS = frozenset({"td", "th"})


class _TextExtractor(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.lines: list[str] = []
        self._current: list[str] = []
        self._skip: list[str] = []  # open skipped elements, innermost last
        self._in_head = False
        self._title_parts: list[str] | None = None  # collecting while inside <title>
        self.title = ""
        self._pre = 0

    # -- line assembly -------------------------------------------------------------------------

    def _break(self) -> None:
        line = " ".join("".join(self._current).split())
        if line:
            self.lines.append(line)
        self._current = []

    def _text(self, data: str) -> None:
        if self._pre:
            # Inside <pre> the source's line breaks are the content's line breaks.
            first, *rest = data.split("\n")
            self._current.append(first)
            for part in rest:
                self._break()
                self._current.append(part)
        else:
            self._current.append(data)

    # -- parser callbacks ----------------------------------------------------------------------

    def handle_starttag(self, tag: str, attrs) -> None:
        if self._skip:
            if self._skip[-1] in ("svg", "math") and tag in FOREIGN_BREAKOUT:
                while self._skip and self._skip[-1] in ("svg", "math"):
                    self._skip.pop()
            else:
                if tag in SKIP_TAGS:
                    self._skip.append(tag)
                return
        if tag == "head":
            self._in_head = True
            return
        if self._in_head and tag not in HEAD_TAGS:
            self._in_head = False
        if tag == "title":
            if self._title_parts is None and not self.title:
                self._title_parts = []
            else:  # browsers never show a second <title>
                self._skip.append(tag)
            return
        if tag in SKIP_TAGS:
            self._skip.append(tag)
            return
        if self._in_head:
            return
        if tag == "pre":
            self._pre += 1
        if tag in BLOCK_TAGS:
            self._break()
        elif tag in CELL_TAGS:
            self._current.append("\t")

    def handle_startendtag(self, tag: str, attrs) -> None:
        # <br/>, <hr/>, <svg/>: a self-closed tag opens nothing.
        if self._skip or self._in_head:
            return
        if tag in BLOCK_TAGS:
            self._break()

    def handle_endtag(self, tag: str) -> None:
        if self._skip:
            if tag in self._skip:
                while self._skip.pop() != tag:
                    pass
            return
        if tag == "head":
            self._in_head = False
            return
        if tag == "title" and self._title_parts is not None:
            self.title = " ".join("".join(self._title_parts).split())
            self._title_parts = None
            return
        if self._in_head:
            return
        if tag == "pre" and self._pre:
            self._pre -= 1
        if tag in BLOCK_TAGS or tag == "br":
            self._break()
        elif tag in CELL_TAGS:
            self._current.append("\t")

    def handle_data(self, data: str) -> None:
        if self._skip:
            return
        if self._title_parts is not None:
            self._title_parts.append(data)
            return
        if self._in_head:
            if not data.strip():
                return
            self._in_head = False  # text ends the head in browsers, </head> or not
        self._text(data)

    def finish(self) -> tuple[str, str]:
        if self._title_parts is not None:  # <title> never closed
            self.title = " ".join("".join(self._title_parts).split())
        self._break()
        return self.title, "\n".join(self.lines)


def html_to_text(html: str) -> tuple[str, str]:
    """(title, text) of an HTML document: one line per block, whitespace collapsed, entities decoded."""
    parser = _TextExtractor()
    try:
        parser.feed(html)
        parser.close()
    except Exception:  # noqa: BLE001 - html.parser can still assert on odd declarations; keep what was read
        pass
    return parser.finish()
