"""The model card is made from the runs' own logs and the eval's JSON (no torch needed)."""
import json

from converters.model_card import card, goals, main


def _stage(run, stage, steps, first, last, seconds):
    run.mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"stage": stage, "steps": steps, "batch": 4, "seq_len": 32,
                                              "lr": 1e-3, "schedule": "wsd", "corpus": ["wiki:en"],
                                              "dict_max_chars": 1000}))
    rows = ["step,tokens,loss,lr,seconds,stage"]
    for s in range(1, steps + 1):
        loss = first + (last - first) * (s - 1) / max(steps - 1, 1)
        rows.append(f"{s},{128 * s},{loss},0.001,{seconds * s / steps},{stage}")
    (run / "loss.csv").write_text("\n".join(rows) + "\n")
    (run / "train.log").write_text(f"x {stage}: default model, 1 parameters, 1,234 training items, "
                                   f"1 process(es) on cpu, bf16 off\n")


def _res(f1_none, f1_mem, f1_rag, tt_mem, tt_rag):
    mode = lambda f1, tt: {"exact_match": 0.0, "f1": f1, "ttft_ms": tt, "decode_tokens_per_s": 100.0}
    return {"model": "tiny", "fingerprint": "ab", "bank": "b", "articles": 3, "questions": 6, "max_tokens": 8,
            "modes": {"none": mode(f1_none, 1.0), "memory": mode(f1_mem, tt_mem), "rag": mode(f1_rag, tt_rag)},
            "recall_at_5": {"lexical": 1.0, "dense": 0.5, "bm25": 1.0},
            "perplexity": {"none": 10.0, "memory": 9.0, "tokens": 100, "summaries": 3},
            "examples": [{"question": "What is X?", "answer": "a thing", "predictions": {"none": "", "memory": "a"}}]}


def test_card_has_the_runs_figures_and_the_goals(tiny_model_dir, tmp_path):
    runs = tmp_path / "runs"
    _stage(runs / "warmup", "warmup", 20, 9.0, 5.0, 600)
    _stage(runs / "memory", "memory", 10, 5.0, 4.5, 300)
    model = tiny_model_dir()
    text, png = card(runs, model, _res(0.1, 0.25, 0.3, 5.0, 20.0))
    assert png.startswith(b"\x89PNG")
    assert "| warmup | plain language modelling, no memory | 20 | 4 x 32 |" in text
    assert "| 2,560 | 0:10:00 | 9.000 -> " in text  # tokens and wall time from loss.csv
    assert "Total: 3,840 tokens in 0:15:00 on 1 x cpu" in text
    assert "| mode | EM % | F1 % |" in text and "What is X?" in text
    assert "sft" not in text.split("## Training")[1].split("Total")[0]  # a stage that did not run is absent
    g = "\n".join(goals(_res(0.1, 0.25, 0.3, 5.0, 20.0)))
    assert g.count("- met") == 3
    g = "\n".join(goals(_res(0.1, 0.15, 0.3, 15.0, 20.0)))
    assert g.count("**not met**") == 3 and "ratio 1.50" in g


def test_cli_writes_card_and_chart(tiny_model_dir, tmp_path, capsys):
    runs = tmp_path / "runs"
    _stage(runs / "warmup", "warmup", 5, 9.0, 8.0, 10)
    model = tiny_model_dir()
    ev = tmp_path / "eval.json"
    ev.write_text(json.dumps(_res(0.1, 0.25, 0.3, 5.0, 20.0)))
    import shutil
    out = tmp_path / "m"
    shutil.copytree(model, out)
    assert main(["--runs", str(runs), "--model", str(out), "--eval", str(ev)]) == 0
    assert (out / "MODEL_CARD.md").read_text().startswith("# m3lite default model")
    assert (out / "loss.png").read_bytes().startswith(b"\x89PNG")
    assert main(["--runs", str(runs), "--model", str(tmp_path / "nothing")]) == 2
