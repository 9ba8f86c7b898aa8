"""Memory adaptation of an imported model: explicit memory of an imported (random) model against the PyTorch
reference, the adapter file (merged at import = the merged PyTorch model; damage and misfits refused), and
distillation training (the KL falls; a resumed run equals an uninterrupted one)."""
from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("tokenizers")

from clitools import one_line_error, run  # noqa: E402
from llama_files import write_hf  # noqa: E402

import m3lite  # noqa: E402
from converters import train as T  # noqa: E402
from converters.distill import Items, base_model, init_lora, kl_sum  # noqa: E402
from converters.distill_data import (HARD_LOGP, ITEMS, META, TEACHER, brief_answer, brief_span,  # noqa: E402
                                     cut_at_note_number, load, prepare, teacher_answer)
from converters.lora import add_lora, lora_modules, merge_lora, save_adapter  # noqa: E402
from converters.model import Memory, encode_memory, forward_with_memory  # noqa: E402
from m3lite.adapter import AdapterError, read_adapter  # noqa: E402
from m3lite.importers import import_model  # noqa: E402

TOL = 1e-4


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """A random Hugging Face folder imported with memory at every layer, 4 tokens per KV head."""
    d = tmp_path_factory.mktemp("distill")
    write_hf(d / "hf", seed=5)
    import_model(d / "hf", d / "m", weights="fp32", memory_layers="all", memory_tokens=4)
    return d


def _refs(model, lengths, seed):
    g = np.random.default_rng(seed)
    return [[model.ref_id] + g.integers(3, model.cfg.vocab_size, n - 1).tolist() for n in lengths]


def _encode(model, refs) -> Memory:
    T_ = max(len(r) for r in refs)
    toks = torch.zeros(len(refs), T_, dtype=torch.long)
    for b, r in enumerate(refs):
        toks[b, :len(r)] = torch.tensor(r)
    with torch.no_grad():
        return encode_memory(model, toks, torch.tensor([len(r) for r in refs]))


def test_imported_model_memory_matches_reference(imported):
    """The engine and the PyTorch reference pick the same tokens with the imported model's own reference marker
    (not the <ref> id of models trained here), and give the same logits with those memories."""
    model, files, _ = base_model(imported / "m", T)
    assert model.ref_id == m3lite.load(imported / "m").tokenizer.ref_id != 4
    eng = m3lite.load(imported / "m").new_engine()
    refs = _refs(model, [30, 12, 3, 2], seed=1)
    want = _encode(model, refs)
    keys, values, positions, counts = eng.encode_references(refs)
    np.testing.assert_array_equal(positions, want.positions.numpy())
    np.testing.assert_array_equal(counts, want.counts.numpy())
    assert np.abs(keys - want.keys.numpy()).max() < TOL and np.abs(values - want.values.numpy()).max() < TOL

    prompt = np.random.default_rng(2).integers(3, model.cfg.vocab_size, 20).tolist()
    with torch.no_grad():
        ref_logits = forward_with_memory(model, torch.tensor([prompt]), want)[0].numpy()
    rk, rv = eng.ref_kv()
    eng.reset()
    eng.pos_offset = model.cfg.reference_max_tokens
    for li, layer in enumerate(model.cfg.memory_layer_ids):
        ks = [rk[li]] + [keys[r, li, :, :counts[r, li, 0]] for r in range(len(refs))]
        vs = [rv[li]] + [values[r, li, :, :counts[r, li, 0]] for r in range(len(refs))]
        eng.set_prefix(layer, np.concatenate(ks, axis=1), np.concatenate(vs, axis=1))
    got = eng.prefill(np.array(prompt), all_logits=True)
    assert np.abs(got - ref_logits).max() < TOL
    with torch.no_grad():  # the memories matter
        assert np.abs(ref_logits - forward_with_memory(model, torch.tensor([prompt]), None)[0].numpy()).max() > 1e-2


def _random_adapter(imported, path, rank=4, kinds=("wq", "wv", "w2")):
    model, _, _ = base_model(imported / "m", T)
    add_lora(model, rank, 8.0, kinds, seed=1)
    g = torch.Generator().manual_seed(2)
    for _, _, m in lora_modules(model):
        m.lora_b.data = torch.randn(m.lora_b.shape, generator=g) * 0.05
    save_adapter(model, path, rank, 8.0, "random test model", {"method": "test"}, dtype="float32",
                 retrieval_top_k=2)
    return model


def test_adapter_merged_at_import_equals_merged_reference(imported, tmp_path):
    model = _random_adapter(imported, tmp_path / "a.safetensors")
    ids = [5, 17, 42, 99, 3, 250, 7, 8]
    with torch.no_grad():
        with_lora = model(torch.tensor([ids]))[0].numpy()
        merged = merge_lora(model)(torch.tensor([ids]))[0].numpy()
    assert np.abs(with_lora - merged).max() < TOL
    out = import_model(imported / "hf", tmp_path / "m", weights="fp32", adapter=tmp_path / "a.safetensors")
    m = m3lite.load(out["model"])
    assert np.abs(m.logits(ids) - merged).max() < TOL
    base = m3lite.load(imported / "m")
    assert np.abs(base.logits(ids) - merged).max() > 1e-2  # the adapter changed the model
    # the adapter's memory settings become the model's; the manifest names the adapter; memory is the default mode
    assert m.config.memory_layer_ids == [0, 1] and m.config.memory_tokens_per_head == 4
    assert m.config.retrieval_top_k == 2  # the adapter's references per retrieval
    assert m.files.manifest["adapter"]["sha256"] == read_adapter(tmp_path / "a.safetensors").meta["sha256"]
    assert m.bank_mode == "memory" and base.bank_mode == "rag"
    assert m.fingerprint != base.fingerprint  # a bank built by the base model is refused by the adapted one


def test_damaged_or_foreign_adapter_refused(imported, tmp_path):
    path = tmp_path / "a.safetensors"
    _random_adapter(imported, path)
    raw = bytearray(path.read_bytes())
    raw[-10] ^= 0xFF
    (tmp_path / "bad.safetensors").write_bytes(bytes(raw))
    with pytest.raises(AdapterError, match="damaged"):
        read_adapter(tmp_path / "bad.safetensors")
    hf_weights = next((imported / "hf").glob("*.safetensors"))
    with pytest.raises(AdapterError, match="not an m3lite adapter"):
        read_adapter(hf_weights)
    (tmp_path / "short.safetensors").write_bytes(bytes(raw[:20]))
    with pytest.raises(AdapterError):
        read_adapter(tmp_path / "short.safetensors")
    # CLI: one line, exit 2, nothing written
    for bad, what in ((tmp_path / "bad.safetensors", "damaged"), (hf_weights, "not an m3lite adapter")):
        line = one_line_error(run("import", imported / "hf", "--out", tmp_path / "out", "--adapter", bad,
                                  check=False))
        assert what in line and not (tmp_path / "out").exists()
    line = one_line_error(run("import", imported / "hf", "--out", tmp_path / "out", "--adapter", path,
                              "--memory-layers", "half", check=False))
    assert "adapter brings its own memory settings" in line
    # an adapter for another shape
    meta = read_adapter(path).meta
    other = dict(meta, base=dict(meta["base"], dim=meta["base"]["dim"] * 2))
    from m3lite.adapter import write_adapter

    write_adapter(tmp_path / "other.safetensors", read_adapter(path).pairs, other, dtype="float32")
    line = one_line_error(run("import", imported / "hf", "--out", tmp_path / "out", "--adapter",
                              tmp_path / "other.safetensors", check=False))
    assert "trained for a model with dim" in line and not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def distill_data(imported):
    prepare(imported / "m", imported / "data", n_facts=8, n_wiki=0, refs=3, max_new=4, top=8, keep_wrong=True,
            progress=lambda m: None)
    return imported / "data"


def _train(imported, data, out, *extra):
    args = ["--model", str(imported / "m"), "--data", str(data), "--out", str(out), "--steps", "6", "--batch", "2",
            "--lr", "1e-2", "--rank", "4", "--eval-every", "6", "--eval-items", "4", "--save-every", "3"]
    return T.main(["--stage", "distill", *args, *extra])


@pytest.mark.slow
def test_distillation_lowers_kl_and_resumes_exactly(imported, distill_data, tmp_path):
    assert _train(imported, distill_data, tmp_path / "a") == 0
    assert len(T._rows(tmp_path / "a" / T.EVAL_CSV)) == 2  # step 0 and the end
    # the KL over the training items, without the adapter and with the trained one
    model, files, _ = base_model(imported / "m", T)
    items = Items(str(distill_data), files, T)
    add_lora(model, 4, 32.0)
    batch = items.batch(items.train_ids, model, torch.device("cpu"))
    with torch.no_grad():
        before = kl_sum(model, batch, False)[0].item()
        trained = read_adapter(tmp_path / "a" / "adapter.safetensors")
        for kind, layer, m in lora_modules(model):
            m.lora_a.data, m.lora_b.data = (torch.from_numpy(x) for x in trained.pairs[(kind, layer)])
        after = kl_sum(model, batch, False)[0].item()
    assert after < 0.8 * before
    losses = [float(r["loss"]) for r in T._rows(tmp_path / "a" / T.LOSS_CSV)]
    assert len(losses) == 6 and losses[-1] < losses[0]
    # stopped at step 3 and resumed: the same adapter bit for bit, the same loss log
    assert _train(imported, distill_data, tmp_path / "b", "--stop-at", "3") == 0
    assert T.main(["--resume", "--out", str(tmp_path / "b")]) == 0
    a, b = read_adapter(tmp_path / "a" / "adapter.safetensors"), read_adapter(tmp_path / "b" / "adapter.safetensors")
    assert a.pairs.keys() == b.pairs.keys()
    for k in a.pairs:
        np.testing.assert_array_equal(a.pairs[k][0], b.pairs[k][0])
        np.testing.assert_array_equal(a.pairs[k][1], b.pairs[k][1])
    assert [r["loss"] for r in T._rows(tmp_path / "b" / T.LOSS_CSV)] == [f"{x:.7f}" for x in losses]
    # a resumed run keeps its settings
    assert T.main(["--resume", "--out", str(tmp_path / "b"), "--rank", "8"]) == 2
    run_json = json.loads((tmp_path / "a" / T.RUN_JSON).read_text())
    assert run_json["stage"] == "distill" and run_json["rank"] == 4


def test_teacher_and_student_are_asked_as_the_runtime_asks(imported, distill_data):
    """The data's prompts carry the system message `ask` sends (the model has a chat template), the student's
    prompt is the teacher's without the notes, and the meta says which message it was."""
    from m3lite.chat_template import ANSWER_SYSTEM

    meta, items, *_ = load(distill_data)
    model = m3lite.load(imported / "m")
    assert meta["system"] == ANSWER_SYSTEM
    for it in items:
        assert it["student"] == model.prompt(model.answer_messages(it["question"]))
        assert ANSWER_SYSTEM in model.tokenizer.decode(it["student"])


def test_teacher_answer_cut_before_a_note_number(imported):
    tok = m3lite.load(imported / "m").tokenizer
    for text, kept in [("The loom. [1] In the Datairk", "The loom."), ("[2] Somon Mills", ""),
                       ("No numbers [x] here", "No numbers [x] here"), ("A [12]", "A"), ("", "")]:
        ids = tok.encode(text)
        assert tok.decode(ids[:cut_at_note_number(tok, ids)]).strip() == kept


def test_brief_span_drops_the_opening_and_ends_after_the_first_sentence():
    for text, kept in [("The answer to this question is: \"Paris is the capital.\" More", 'Paris is the capital."'),
                       ("Paris is big. It is old.", "Paris is big."),
                       ("The answer is 42.", "42."),
                       ("Answer: The loom\nNext", "The loom"),
                       ("Dr. Smith lives in the U.S. and", "Dr. Smith lives in the U.S. and"),
                       ("The answer to this question is", "The answer to this question is"),
                       ("The answer lies in the hills. Yes", "The answer lies in the hills.")]:
        start, end = brief_span(text)
        assert text[start:end] == kept, text
    assert brief_span("One sentence only.") == (0, None) and brief_span("Cut sho") == (0, None)


def test_brief_span_keeps_the_sentence_that_holds_the_fact():
    """A made-up fact's answer ends after the sentence holding the fact, however late; None until it is there."""
    text = "The answer to this question is: The Agech bell warns boats of fog. It weighs 222 kilograms. It is old."
    start, end = brief_span(text, "222 kilograms")
    assert text[start:end] == "The Agech bell warns boats of fog. It weighs 222 kilograms."
    assert brief_span(text, "fog")[1] == brief_span(text)[1]  # in the first sentence: as without a fact
    for partial in ("The bell warns of fog. It weighs", "The bell warns of fog. It weighs 222 kilograms"):
        assert brief_span(partial, "222 kilograms")[1] is None
    text = "Penmoor was founded in 1478. More"
    assert text[slice(*brief_span(text, "1478"))] == "Penmoor was founded in 1478."


def _check_targets(new, tops, lps, forced_tops, forced_lps):
    """Each row is the teacher's forced row where its best token is the answer's, else a one-token target."""
    hard = 0
    for i, t in enumerate(new):
        if forced_tops[i, 0] == t:
            np.testing.assert_array_equal(tops[i], forced_tops[i])
            np.testing.assert_array_equal(lps[i], forced_lps[i])
        else:
            hard += 1
            j = int(np.flatnonzero(tops[i] == t)[0])
            assert lps[i, j] == 0 and np.all(np.delete(lps[i], j) == np.float16(HARD_LOGP))
    return hard


def test_brief_answer_forces_the_teacher_through_the_edited_answer(imported):
    model = m3lite.load(imported / "m")
    tok, eng = model.tokenizer, model.engine("numba")
    eng.pos_offset = 0
    eos = tok.eos_ids[0]
    ids = model.prompt(model.answer_messages("Where is the tower?"))
    brief = tok.encode("Paris is big.") + [eos]
    for said in ("The answer to this question is: Paris is big. It is", "Paris is big. It is"):
        answer = tok.encode(said)
        _, tops, lps = teacher_answer(model, eng, ids, 0, 8, forced=answer)
        new, t2, l2, n_hard = brief_answer(model, eng, ids, answer, tops, lps, 8)
        assert new == brief and len(t2) == len(l2) == len(new)
        _, ft, fl = teacher_answer(model, eng, ids, 0, 8, forced=new)
        assert _check_targets(new, t2, l2, ft, fl) == n_hard >= 1  # a random model does not end there itself
    # a made-up fact's answer keeps the sentence that holds the fact
    answer = tok.encode("Paris is big. It is 300 metres tall. It is old.")
    _, tops, lps = teacher_answer(model, eng, ids, 0, 8, forced=answer)
    new, t2, l2, _ = brief_answer(model, eng, ids, answer, tops, lps, 8, fact="300 metres")
    assert new == tok.encode("Paris is big. It is 300 metres tall.") + [eos] and len(t2) == len(new)
    # an answer that is already brief stays as the teacher said it
    answer = tok.encode("Paris is big.") + [eos]
    _, tops, lps = teacher_answer(model, eng, ids, 0, 8, forced=answer)
    new, t2, l2, n_hard = brief_answer(model, eng, ids, answer, tops, lps, 8)
    assert new == answer and n_hard == 0 and np.array_equal(t2, tops)


def test_an_item_without_references_is_the_plain_model(imported, distill_data, tmp_path):
    """A question asked without references (--none) trains the plain model, as `ask --mode none` runs it, beside
    memory items in the same batch."""
    meta, items, offsets, top, logp = load(distill_data)
    items[1] = dict(items[1], kind="none", gold=None, refs=[])
    d = tmp_path / "d"
    d.mkdir()
    (d / ITEMS).write_text("".join(json.dumps(it) + "\n" for it in items))
    for name in (TEACHER, META):
        (d / name).write_bytes((distill_data / name).read_bytes())
    model, files, _ = base_model(imported / "m", T)
    data = Items(str(d), files, T)
    cpu = torch.device("cpu")
    with torch.no_grad():
        kl_both, n_both = kl_sum(model, data.batch(np.array([0, 1]), model, cpu), False)
        kl0, n0 = kl_sum(model, data.batch(np.array([0]), model, cpu), False)
        kl1, n1 = kl_sum(model, data.batch(np.array([1]), model, cpu), False)
        it = data.items[1]
        x = it["student"] + it["answer_ids"][:-1]
        logits = model(torch.tensor([x]))[0]
        start, n = len(it["student"]) - 1, len(it["answer_ids"])
        student = torch.log_softmax(logits[start:start + n].float(), -1).gather(
            1, torch.from_numpy(top[offsets[1]:offsets[2]].astype(np.int64)))
        teacher = torch.log_softmax(torch.from_numpy(logp[offsets[1]:offsets[2]].astype(np.float32)), -1)
        by_hand = float((teacher.exp() * (teacher - student)).sum())
    assert n_both == n0 + n1
    assert abs(float(kl_both) - float(kl0 + kl1)) <= TOL * max(1.0, abs(float(kl_both)))
    assert abs(float(kl1) - by_hand) <= TOL * max(1.0, abs(by_hand))


def test_distill_starts_from_an_adapter(imported, distill_data, tmp_path):
    """--init-adapter: the LoRA starts as the file's pairs (bit for bit), so the held-out KL at step 0 is the
    earlier run's at its end; an adapter of another rank is refused before a run is written."""
    assert _train(imported, distill_data, tmp_path / "a") == 0
    path = tmp_path / "a" / "adapter.safetensors"
    saved = read_adapter(path)
    model, _, _ = base_model(imported / "m", T)
    add_lora(model, 4, 32.0)
    init_lora(model, str(path), {"rank": 4, "alpha": 32.0, "model": str(imported / "m"), "kinds": "all"}, T)
    for kind, layer, m in lora_modules(model):
        np.testing.assert_array_equal(m.lora_a.detach().numpy(), saved.pairs[(kind, layer)][0])
        np.testing.assert_array_equal(m.lora_b.detach().numpy(), saved.pairs[(kind, layer)][1])
    assert _train(imported, distill_data, tmp_path / "b", "--init-adapter", str(path)) == 0
    first = [float(r["eval_loss"]) for r in T._rows(tmp_path / "a" / T.EVAL_CSV)]
    again = [float(r["eval_loss"]) for r in T._rows(tmp_path / "b" / T.EVAL_CSV)]
    assert first[-1] < 0.8 * first[0]  # the first run learned something to start from
    assert abs(again[0] - first[-1]) <= 0.01 * first[-1]  # the adapter is stored float16: not bit for bit
    assert read_adapter(tmp_path / "b" / "adapter.safetensors").meta["training"]["init_adapter"] == path.name
    assert _train(imported, distill_data, tmp_path / "c", "--init-adapter", str(path), "--rank", "8") == 2
    assert _train(imported, distill_data, tmp_path / "d", "--init-adapter", str(tmp_path / "none")) == 2
    assert not (tmp_path / "c" / T.RUN_JSON).exists() and not (tmp_path / "d" / T.RUN_JSON).exists()


def test_distill_needs_matching_data(imported, distill_data, tmp_path):
    write_hf(tmp_path / "hf2", seed=9)
    import_model(tmp_path / "hf2", tmp_path / "m2", weights="fp32")
    rc = T.main(["--stage", "distill", "--model", str(tmp_path / "m2"), "--data", str(distill_data),
                 "--out", str(tmp_path / "r"), "--steps", "2"])
    assert rc == 2


def test_bank_built_with_other_memory_settings_refused(imported, tmp_path):
    notes = tmp_path / "notes.md"
    notes.write_text("Zorbel Quint keeps the lighthouse on Varra. He was born in 1931 in Helmsby.\n")
    run("bank", "build", notes, "--out", tmp_path / "bank", "--model", imported / "m", "--json")
    import_model(imported / "hf", tmp_path / "half8", weights="fp32", memory_layers="half", memory_tokens=8)
    line = one_line_error(run("ask", "Where was Zorbel Quint born?", "--model", tmp_path / "half8", "--bank",
                              tmp_path / "bank", "--mode", "memory", "-n", "2", check=False))
    assert "made by another model" in line and "rebuild" in line
