"""Captions table reader: wide and long layouts, separators, matching by name, and bad tables."""
import logging

import numpy as np
import pytest

from pipeline.common_format import captions_array
from pipeline.errors import UserError
from prepare_data.captions_table import load_captions_table, lookup_captions


def test_wide_csv_with_quotes_and_empty_cells(tmp_path):
    p = tmp_path / "caps.csv"
    p.write_text(
        'image_name,caption1,caption2,other\n'
        'a.jpg,"one, with comma","two\nlines",x\n'
        'b.jpg,only one,,y\n',
        encoding="utf-8",
    )
    assert load_captions_table(p) == {"a.jpg": ["one, with comma", "two\nlines"], "b.jpg": ["only one"]}


def test_long_tsv_keeps_row_order_and_merges_repeated_names(tmp_path):
    p = tmp_path / "caps.tsv"
    p.write_text("Image\tCaption\nn01_1\tfirst\nn02_2\tsolo\nn01_1\tsecond\nn01_1\tNA\n", encoding="utf-8")
    # 'NA' is a caption, not a missing value; column names are case-insensitive
    assert load_captions_table(p) == {"n01_1": ["first", "second", "NA"], "n02_2": ["solo"]}


def test_unknown_suffix_is_sniffed_and_bom_ignored(tmp_path):
    tab = tmp_path / "caps.txt"
    tab.write_text("\ufeffstimulus\tcaption_1\tcaption_2\ndog_12s\ta dog\ta brown dog\n", encoding="utf-8")
    comma = tmp_path / "caps.dat"
    comma.write_text("name,caption\ncat,a cat\n", encoding="utf-8")
    assert load_captions_table(tab) == {"dog_12s": ["a dog", "a brown dog"]}
    assert load_captions_table(comma) == {"cat": ["a cat"]}


def test_round_trip_through_common_format(tmp_path):
    table = {"img_a": ["x", "y", "z"], "img_b": ["only"]}
    p = tmp_path / "c.csv"
    p.write_text("image,caption1,caption2,caption3\nimg_a,x,y,z\nimg_b,only,,\n", encoding="utf-8")
    loaded = load_captions_table(p)
    assert loaded == table
    rows, missing = lookup_captions(loaded, ["img_b", "img_a"])
    arr = captions_array(rows)
    assert missing == []
    assert arr.tolist() == [["only", "", ""], ["x", "y", "z"]]


def test_lookup_matches_with_or_without_extension_and_warns_for_missing(caplog):
    table = {"dog_12s.jpg": ["a dog"], "n01518878_5958": ["an ostrich"]}
    with caplog.at_level(logging.WARNING):
        rows, missing = lookup_captions(table, ["dog_12s", "n01518878_5958.JPEG", "nothing"], source="t.csv")
    assert rows == [["a dog"], ["an ostrich"], []]
    assert missing == ["nothing"]
    assert "1 of 3" in caplog.text and "nothing" in caplog.text


def test_no_table_gives_empty_captions_and_a_warning(caplog):
    with caplog.at_level(logging.WARNING):
        rows, missing = lookup_captions(None, ["a", "b"])
    assert rows == [[], []] and missing == ["a", "b"]
    assert captions_array(rows).tolist() == [[""], [""]]
    assert "no captions table" in caplog.text


@pytest.mark.parametrize(
    "text, needle",
    [
        ("picture,caption\na,x\n", "no image-name column"),
        ("image,description\na,x\n", "no caption column"),
        ("image,caption\n,x\n", "line 2"),
    ],
)
def test_bad_tables_raise_user_error_naming_the_file(tmp_path, text, needle):
    p = tmp_path / "bad.csv"
    p.write_text(text, encoding="utf-8")
    with pytest.raises(UserError, match=needle) as err:
        load_captions_table(p)
    assert str(p) in str(err.value)


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_captions_table(tmp_path / "nope.tsv")


def test_captions_array_dtype_is_unicode():
    rows, _ = lookup_captions({"a": ["é ü"]}, ["a"])
    arr = captions_array(rows)
    assert arr.dtype.kind == "U" and arr[0, 0] == "é ü"
    assert np.asarray(arr).shape == (1, 1)
