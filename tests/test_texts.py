"""The perplexity texts: WikiText-2 test, the default model's held-out books, or a file, reaching eval, ablate and
recipes through `--text`; a bad --text is one line."""
import json

import pytest

from se_compress.cli import main
from se_compress.errors import SECompressError
from se_compress.eval.perplexity import BOOK_FILES, eval_text, text_windows


def test_books_are_the_two_held_out_books_joined_in_file_order(tokenizer):
    books = eval_text("books")
    first, second = (p.read_text(encoding="utf-8").strip() for p in BOOK_FILES)
    assert books.key == "books" and books.text == first + "\n\n" + second
    assert "The Secret Agent" in books.label and "Tale of Two Cities" in books.label
    windows = text_windows(tokenizer, books, 64, 5)
    assert windows.shape == (5, 64) and (windows[:, 0] == tokenizer.bos_token_id).all()  # BOS + 63 text tokens


def test_a_text_file_is_measured_and_bad_texts_are_refused(tmp_path, tokenizer):
    f = tmp_path / "mine.txt"
    f.write_text("One line of my own text.\n" * 50)
    assert eval_text(str(f)).key == "file:mine.txt"
    with pytest.raises(SECompressError, match="neither wikitext2, books nor a text file"):
        eval_text("wikitext3")
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(SECompressError, match="is empty"):
        eval_text(str(tmp_path / "empty.txt"))
    (tmp_path / "bin.txt").write_bytes(bytes(range(256)) * 4)
    with pytest.raises(SECompressError, match="UTF-8"):
        eval_text(str(tmp_path / "bin.txt"))
    short = tmp_path / "short.txt"
    short.write_text("too short")
    with pytest.raises(SECompressError, match="shorter than one window"):
        text_windows(tokenizer, eval_text(str(short)), 64)


def test_eval_measures_the_texts_given(tmp_path, tiny_model, capsys):
    model = tiny_model("qwen3_moe")
    out = tmp_path / "ev"
    assert main(["eval", str(model), "--tasks", "sink", "--text", "books,wikitext2", "--max-windows", "3",
                 "--seqlen", "64", "--out", str(out)]) == 0
    result = json.loads((out / "eval.json").read_text())
    assert list(result["perplexity"]) == ["books", "wikitext2"] and result["settings"]["texts"] == ["books", "wikitext2"]
    assert result["perplexity"]["books"]["ppl"] != result["perplexity"]["wikitext2"]["ppl"]
    assert result["metrics"]["books_ppl"] == result["perplexity"]["books"]["ppl"]
    assert "books:" in (out / "eval.md").read_text() and result["sink"] is not None


@pytest.mark.parametrize("command", ["eval", "ablate"])
def test_a_bad_text_is_one_line_before_any_work(tmp_path, tiny_model, capsys, command):
    model = tiny_model("qwen3_moe")
    out = tmp_path / "out"
    assert main([command, str(model), "--text", "wikitext3", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "wikitext3" in err and "books" in err
    assert not out.exists()


def test_ablate_on_books_records_the_text(tmp_path, tiny_model):
    model = tiny_model("qwen3_moe")
    out = tmp_path / "abl"
    assert main(["ablate", str(model), "--text", "books", "--max-windows", "2", "--eval-seqlen", "64", "--draws", "1",
                 "--samples", "8", "--seqlen", "64", "--out", str(out)]) == 0
    result = json.loads((out / "ablation.json").read_text())
    assert result["eval"]["text"] == "books" and result["eval"]["windows"] == 2
    assert "Secret Agent" in (out / "ablation.md").read_text()


def test_a_recipe_ablates_on_the_text_it_names(tmp_path, tiny_model, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = tiny_model("qwen3_moe")
    recipe = tmp_path / "study.yaml"
    recipe.write_text("name: study\ndetect: {calib: wikitext2, samples: 8, seqlen: 64}\n"
                      "stages:\n  - ablate: {draws: 1, max_windows: 2, text: books}\nevaluate: {tasks: []}\n")
    out = tmp_path / "study-out"
    assert main(["compress", "--recipe", str(recipe), "--model", str(model), "--out", str(out)]) == 0
    assert json.loads((out / "ablation.json").read_text())["eval"]["text"] == "books"
    bad = tmp_path / "bad.yaml"
    bad.write_text(recipe.read_text().replace("text: books", "text: nowhere.txt").replace("name: study", "name: bad"))
    assert main(["compress", "--recipe", str(bad), "--model", str(model), "--out", str(tmp_path / "bad-out")]) == 2
    assert not (tmp_path / "bad-out").exists()
