"""train/errors.py: the one-line exception summaries of reports and error messages."""

from train.errors import short_error


def test_short_error_names_the_type_and_collapses_whitespace():
    error = ValueError("first line\n   second\tline  ")
    assert short_error(error) == "ValueError: first line second line"
    assert short_error(error, first_line=True) == "ValueError: first line"
    assert short_error(RuntimeError()) == "RuntimeError:"


def test_short_error_cuts_to_the_limit_with_an_ellipsis():
    text = short_error(OSError("x" * 500), limit=40)
    assert len(text) == 40 and text == "OSError: " + "x" * 28 + "..."
    assert short_error(OSError("x" * 31), limit=40) == "OSError: " + "x" * 31
