"""converters.ablation: the table and chart from a results folder, and the small held-out Wikipedia bank."""
from __future__ import annotations

import json

import pytest

from converters import ablation


def _eval(modes: dict) -> dict:
    return {"modes": {m: {"contains": c, "f1": f, "ttft_ms": 100.0, "decode_tokens_per_s": 150.0}
                      for m, (c, f) in modes.items()}}


def _setting(root, name, contains, f1, nbytes, with_baselines=False):
    d = root / name
    d.mkdir()
    extra = {"none": (0.0, 0.1), "rag": (0.7, 0.4)} if with_baselines else {}
    (d / "facts-r1.json").write_text(json.dumps(_eval({"memory": (contains, 0.2), **extra})))
    (d / "wiki-r1.json").write_text(json.dumps(_eval({"memory": (0.0, f1), **extra})))
    (d / "info.json").write_text(json.dumps({"memory_record_bytes": nbytes}))
    (d / "build.json").write_text(json.dumps({"references_per_s": 9.5}))


def test_report_table_and_chart(tmp_path):
    _setting(tmp_path, "half-8-unadapted", 0.0, 0.05, 48336)
    _setting(tmp_path, "half-8-adapted", 0.01, 0.1, 48336)
    _setting(tmp_path, "all-32-adapted", 0.65, 0.331, 386104, with_baselines=True)
    (tmp_path / "all-32-adapted" / "steps.txt").write_text("700\n")
    _setting(tmp_path, "all-32-adapted-int4", 0.64, 0.33, 201784)
    (tmp_path / "notes").mkdir()  # not a setting: ignored
    assert ablation.main(["report", str(tmp_path), "--out", str(tmp_path / "r")]) == 0
    table = (tmp_path / "r.md").read_text()
    lines = table.splitlines()
    assert lines[0].startswith("| memory layers |") and len(lines) == 2 + 4 + 2  # 4 settings, none and rag
    assert lines[2].startswith("| first half | 8 | unadapted |")  # the paper's setting first
    assert "| all | 32 | adapted, 700 steps | int8 | 65.0 | - | 33.1 | 386,104 | 9.5 | 100 | 150 |" in table
    assert "| all | 32 | adapted | int4 | 64.0 |" in table
    assert "| rag (no memory) | | adapted | | 70.0 | - | 40.0 |" in table
    png = (tmp_path / "r.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000


def test_report_refuses_an_empty_or_broken_folder(tmp_path, capsys):
    assert ablation.main(["report", str(tmp_path)]) == 2
    assert "no setting folders" in capsys.readouterr().err
    (tmp_path / "all-8-adapted").mkdir()
    (tmp_path / "all-8-adapted" / "facts-r1.json").write_text("{not json")
    assert ablation.main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "facts-r1.json is not a JSON result" in err and len(err.strip().splitlines()) == 1


def test_wiki_bank_holds_the_articles_eval_asks_about(tiny_model_dir, tmp_path):
    import m3lite
    from m3lite.evaluate import heldout_articles
    from m3lite.heldout import is_held_out
    from m3lite.sources import wiki_articles

    model_dir = tiny_model_dir()
    stats = ablation.wiki_bank(model_dir, tmp_path / "bank", 3)
    want = [t for t, a in wiki_articles("en").items() if is_held_out(t) and a["description"]][:3]
    assert stats["documents"] == 3
    bank = m3lite.Bank.open(tmp_path / "bank")
    assert [a.title for a in heldout_articles(bank)] == want
    with pytest.raises(m3lite.M3Error, match="at least 1"):
        ablation.wiki_bank(model_dir, tmp_path / "b2", 0)
