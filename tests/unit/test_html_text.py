from hypothesis import given, settings
from hypothesis import strategies as st

from rollout.tools.html_text import html_to_text


def test_title_and_blocks_become_lines():
    html = """<!DOCTYPE html><html><head><meta charset="utf-8"><title> Velmora &ndash; Atlas </title>
    <link rel="stylesheet" href="x.css"></head>
    <body><h1>Velmora</h1><p>Velmora is a   country
    in the north.</p><p>Its capital is <b>Drennick</b>.</p><ul><li>one</li><li>two</li></ul></body></html>"""
    title, text = html_to_text(html)
    assert title == "Velmora – Atlas"
    assert text.split("\n") == [
        "Velmora",
        "Velmora is a country in the north.",
        "Its capital is Drennick.",
        "one",
        "two",
    ]


def test_script_style_noscript_svg_template_and_comments_are_dropped():
    html = """<body><script>var s = "</div><p>not text</p>"; if (a < b) {}</script>
    <style>p { color: red }</style><noscript><p>Enable JavaScript</p></noscript>
    <svg viewBox="0 0 1 1"><title>icon title</title><text>svg text</text></svg>
    <template><p>hidden template</p></template><!-- a comment --><p>Visible</p></body>"""
    title, text = html_to_text(html)
    assert title == ""
    assert text == "Visible"


def test_svg_title_does_not_become_the_page_title():
    title, _ = html_to_text("<body><svg><title>logo</title></svg><p>x</p></body>")
    assert title == ""
    title, _ = html_to_text("<title>Real</title><body><svg><title>logo</title></svg><title>Second</title>x</body>")
    assert title == "Real"


def test_entities_and_nbsp_are_decoded_and_collapsed():
    title, text = html_to_text("<title>A &amp; B</title><p>caf&eacute;&nbsp;&nbsp;&#x263A; &lt;tag&gt; &#169;</p>")
    assert title == "A & B"
    assert text == "café ☺ <tag> ©"


def test_inline_elements_do_not_split_words_and_br_breaks_lines():
    _, text = html_to_text("<p>foo<b>bar</b><i>baz</i> qux<br>next<br/>line</br>end</p>")
    assert text.split("\n") == ["foobarbaz qux", "next", "line", "end"]


def test_table_cells_are_spaced_and_rows_are_lines():
    _, text = html_to_text(
        "<table><tr><th>Name</th><th>Capital</th></tr><tr><td>Velmora</td><td>Drennick</td></tr></table>"
    )
    assert text.split("\n") == ["Name Capital", "Velmora Drennick"]


def test_pre_keeps_its_line_breaks():
    _, text = html_to_text("<p>code:</p><pre>line one\n  line two\n\nline three</pre><p>after</p>")
    assert text.split("\n") == ["code:", "line one", "line two", "line three", "after"]


def test_unclosed_head_does_not_swallow_the_page():
    title, text = html_to_text("<html><head><title>T</title><meta charset=utf-8><div>Body text</div>")
    assert (title, text) == ("T", "Body text")
    title, text = html_to_text("<head><title>T</title>Loose text after the head")
    assert (title, text) == ("T", "Loose text after the head")


def test_unclosed_svg_ends_at_an_html_block_like_in_browsers():
    _, text = html_to_text("<p>before</p><svg><path d='M0'/><p>after</p>")
    assert text.split("\n") == ["before", "after"]


def test_unclosed_title_and_stray_end_tags_degrade_gracefully():
    title, text = html_to_text("</div></p><title>Only a title")
    assert title == "Only a title"
    assert text == ""
    _, text = html_to_text("<P>Upper <B>case</B></P><DIV>tags</DIV>")
    assert text.split("\n") == ["Upper case", "tags"]


def test_odd_declarations_and_cdata_do_not_raise():
    for html in [
        "<![if !supportLists]>x<![endif]>",
        "<!DOCTYPE>",
        "<![CDATA[x]]>",
        "<?php echo 1 ?>",
        "<<<>>>",
        "<a href='",
    ]:
        html_to_text(html)


def test_plain_text_without_tags_passes_through():
    assert html_to_text("  just   some\ntext  ") == ("", "just some text")


html_pieces = st.sampled_from(
    [
        "<p>",
        "</p>",
        "<div>",
        "</div>",
        "<script>",
        "</script>",
        "<style>",
        "</style>",
        "<svg>",
        "</svg>",
        "<head>",
        "</head>",
        "<title>",
        "</title>",
        "<br>",
        "<pre>",
        "</pre>",
        "<td>",
        "<!--",
        "-->",
        "&amp;",
        "&#0;",
        "&bogus;",
        "<![CDATA[",
        "]]>",
        "<",
        ">",
        "\n",
        "  ",
        "word",
    ]
)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(html_pieces, st.text(max_size=12)), max_size=40).map("".join))
def test_never_raises_and_output_lines_are_clean(html):
    title, text = html_to_text(html)
    assert "\n" not in title and title == title.strip()
    for line in text.split("\n") if text else []:
        assert line and line == line.strip()
        assert "  " not in line
    assert "<script>" not in text.lower() or "<script>" in html.lower()
