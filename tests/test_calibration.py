import pytest

from se_compress.data.calibration import build_calibration
from se_compress.errors import SECompressError


def test_samples_are_deterministic_and_start_with_bos(tokenizer):
    a = build_calibration(tokenizer, "wikitext2", 6, 32, seed=3)
    b = build_calibration(tokenizer, "wikitext2", 6, 32, seed=3)
    c = build_calibration(tokenizer, "wikitext2", 6, 32, seed=4)
    assert a.input_ids.shape == (6, 32)
    assert a.input_ids.equal(b.input_ids) and not a.input_ids.equal(c.input_ids)
    assert (a.input_ids[:, 0] == tokenizer.bos_token_id).all()
    assert (a.input_ids[:, 1:] != tokenizer.bos_token_id).all()


def test_c4_and_file_sources(tokenizer, tmp_path):
    assert build_calibration(tokenizer, "c4", 2, 16, 0).input_ids.shape == (2, 16)
    f = tmp_path / "my.txt"
    f.write_text("One line of text that is long enough.\nAnother line follows here, also long.\n" * 20)
    assert build_calibration(tokenizer, str(f), 3, 8, 0).describe()["source"] == str(f)


def test_empty_and_missing_calibration(tokenizer, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(SECompressError, match="is empty"):
        build_calibration(tokenizer, str(empty), 2, 8, 0)
    with pytest.raises(SECompressError, match="not found"):
        build_calibration(tokenizer, "no_such_set", 2, 8, 0)
