"""mixtral_edu.analysis.display: escaped, coloured token boxes; token alignment."""

import html
import re

import pytest

from mixtral_edu.analysis.display import (
    DIFF_COLORS,
    PALETTE,
    TokenBoxes,
    legend_html,
    token_boxes,
    token_boxes_html,
    token_diff,
    token_diff_html,
    token_diff_size,
    tokens_table,
)

SPAN = re.compile(r'<span style="[^"]*background:([^"]*)" title="([^"]*)">(.*?)</span>')


def boxes(markup):
    """(colour, title, text) of each box, with the HTML entities undone."""
    return [(c, html.unescape(t), html.unescape(x)) for c, t, x in SPAN.findall(markup)]


def test_one_box_per_piece_with_colours_and_titles():
    markup = token_boxes_html(["▁Hi", "!"], colors=["#ff0000", "red"], titles=["id 1", "expert 3 (0.61)"])
    assert boxes(markup) == [("#ff0000", "id 1", "▁Hi"), ("red", "expert 3 (0.61)", "!")]


def test_default_colours_alternate_and_titles_are_indices():
    assert boxes(token_boxes_html(["a", "b", "c"])) == [
        (PALETTE[0], "token 0", "a"), (PALETTE[1], "token 1", "b"), (PALETTE[0], "token 2", "c")
    ]


def test_pieces_and_titles_are_escaped():
    markup = token_boxes_html(["</s>", "<script>alert(1)</script>", '"&'], titles=['"><b>x</b>', "a", "b"])
    assert "<script>" not in markup and "</s><" not in markup and "<b>" not in markup
    assert [text for _, _, text in boxes(markup)] == ["</s>", "<script>alert(1)</script>", '"&']
    assert boxes(markup)[0][1] == '"><b>x</b>'


@pytest.mark.parametrize("color", ["red;position:fixed", 'red" onmouseover="x', "url(x)", "", 3])
def test_colours_must_be_plain_css_colours(color):
    with pytest.raises(ValueError, match="colors\\[1\\]"):
        token_boxes_html(["a", "b"], colors=["red", color])


def test_length_mismatch_is_an_error():
    with pytest.raises(ValueError, match="colors has 1 entries but there are 2 pieces"):
        token_boxes_html(["a", "b"], colors=["red"])
    with pytest.raises(ValueError, match="titles has 3 entries"):
        token_boxes_html(["a", "b"], titles=["x", "y", "z"])
    with pytest.raises(ValueError, match="pieces\\[0\\] must be a str"):
        token_boxes_html([1])


def test_token_boxes_is_displayable_without_ipython():
    view = token_boxes(["▁Hi", "</s>"], legend={"user": "#a8d5f2"})
    assert isinstance(view, TokenBoxes)
    assert view._repr_html_() == token_boxes_html(["▁Hi", "</s>"]) + legend_html({"user": "#a8d5f2"})
    assert repr(view) == "TokenBoxes(▁Hi | </s>)"


def test_token_diff_aligns_and_diff_html_marks_differences():
    ref, cand = [1, 733, 5, 2], [1, 523, 5, 2, 9]
    assert token_diff(ref, cand) == [("equal", 0, 1, 0, 1), ("replace", 1, 2, 1, 2), ("equal", 2, 4, 2, 4),
                                     ("insert", 4, 4, 4, 5)]
    markup = token_diff_html(ref, cand, lambda ids: [f"p{i}" for i in ids], labels=("ref", "<cand>"))
    got = boxes(markup)
    assert [c for c, _, _ in got] == [DIFF_COLORS["equal"], DIFF_COLORS["replace"]] + [DIFF_COLORS["equal"]] * 3 + [
        DIFF_COLORS["replace"], DIFF_COLORS["equal"], DIFF_COLORS["equal"], DIFF_COLORS["insert"]]
    assert [t for _, t, _ in got][:2] == ["id 1", "id 733"]
    assert "<b>&lt;cand&gt;</b> (5 tokens)" in markup


def test_tokens_table_aligns_columns():
    assert tokens_table([1, 13], ["<s>", "\n"]) == "  1 13\n<s> \\n"
    with pytest.raises(ValueError, match="2 ids but 1 pieces"):
        tokens_table([1, 2], ["a"])


def test_token_diff_size_counts_the_longer_side_of_each_difference():
    assert token_diff_size([1, 2, 3], [1, 2, 3]) == 0
    assert token_diff_size([1, 733, 5, 2], [1, 523, 5, 2, 9]) == 2
    assert token_diff_size([1, 2], [1, 7, 8, 9, 2]) == 3
    assert token_diff_size([], [4, 5]) == 2
