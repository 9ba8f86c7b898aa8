"""The sentence embedder (all-MiniLM-L6-v2 through onnxruntime), pulled once per run like the default model:
the fp32 graph gives transformers' BertModel vectors (mean pooled, normalised), int8 stays close and ranks the
same, damaged files are refused in one line, empty texts give zero rows and batching changes nothing."""
from __future__ import annotations

import json
import shutil
import zipfile

import numpy as np
import pytest

from m3lite.embedder import (DEFAULT_EMBEDDER, MANIFEST, TOKENIZER, WEIGHTS, SentenceEmbedder, checkpoint_path,
                             convert, default_embedder, default_embedder_ready, embedder_pulled, pull_embedder)
from m3lite.errors import BadArgument, M3Error
from m3lite.pull import PullError

SENTENCES = [
    "The cat sat on the mat.",
    "Rain is expected tomorrow afternoon across the northern valleys.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "She parked the bicycle next to the old bakery and went inside to buy bread.",
    "Is the museum open on Mondays?",
    "The committee postponed its decision until the budget figures were verified by an independent auditor.",
    "Quantum computers use qubits, which can be in superpositions of zero and one.",
    "My grandmother grew tomatoes, beans and courgettes in a small garden behind the house.",
    "Turn left at the second traffic light, then continue straight for about two kilometres.",
    "The stock market fell sharply after the central bank raised interest rates.",
    "He plays the violin in a string quartet every Thursday evening.",
    "Volcanic eruptions can inject sulphur dioxide into the stratosphere and cool the climate for years.",
    "Please remember to water the plants while I'm away.",
    "The recipe calls for two eggs, a cup of flour, and a pinch of salt.",
    "Mount Everest is the highest mountain above sea level.",
    "Whales communicate using complex songs that can travel hundreds of kilometres underwater.",
    "The new software update fixes a bug that caused the app to crash on startup.",
    "Children learn languages faster when they are exposed to them early.",
    "The library will be closed for renovation from June to September.",
    "A triangle has three sides and three angles that add up to 180 degrees.",
    "The detective noticed a faint smell of almonds in the room.",
    "Electric cars are becoming cheaper as battery prices continue to fall.",
    "Our flight was delayed by three hours because of a storm over the Atlantic.",
    "The Roman Empire built roads that connected cities across Europe, North Africa and the Middle East.",
    "Honey never spoils if it is stored in a sealed container.",
    "I can't find my keys anywhere.",
    "The orchestra tuned their instruments before the concert began.",
    "Glaciers in the Alps have lost more than half of their volume since 1900.",
    "The startup raised twelve million dollars in its first funding round.",
    "Wash your hands before eating.",
    "The novel tells the story of a lighthouse keeper who discovers a message in a bottle.",
    "Bees play a crucial role in pollinating crops such as apples, almonds and blueberries.",
    "The marathon route passes through five boroughs of the city.",
    "Insulin regulates the amount of glucose in the blood.",
    "We watched the sunset from the top of the hill while eating sandwiches.",
    "The printer on the third floor is out of toner again.",
    "Ancient Egyptians built pyramids as tombs for their pharaohs.",
    "A good night's sleep improves memory and concentration.",
    "The football match ended in a goalless draw after extra time.",
    "Copper is an excellent conductor of electricity and heat.",
    "The train to Edinburgh leaves from platform nine at half past eight.",
    "Cloud storage lets you access your files from any device with an internet connection.",
    "The painter used bold colours and thick brushstrokes to depict the harbour at dawn.",
    "Coffee beans are the roasted seeds of the Coffea plant.",
    "Why do leaves change colour in autumn?",
    "The government announced new measures to reduce air pollution in large cities.",
    "Penguins cannot fly, but they are excellent swimmers.",
    "Our team meeting has been moved to Wednesday at ten o'clock.",
    "The telescope revealed thousands of galaxies in a tiny patch of sky.",
    "Vaccines train the immune system to recognise and fight specific pathogens.",
    "He apologised for the misunderstanding and offered to pay for the damage.",
    "The desert temperature drops dramatically at night.",
    "Solar panels generate electricity from sunlight without moving parts.",
    "The chess champion sacrificed her queen to win the game in twelve moves.",
    "Saltwater freezes at a lower temperature than fresh water.",
    "The restaurant is famous for its wood-fired pizzas and homemade pasta.",
    "Earthquakes occur when tectonic plates suddenly slip past each other.",
    "I would like to book a table for four people at seven.",
    "The museum's collection includes more than two million artefacts from around the world.",
    "Regular exercise lowers the risk of heart disease.",
    "The bridge was closed after engineers found cracks in its supporting columns.",
    "Octopuses have three hearts and blue blood.",
    "The company plans to open a new factory in the south of the country next year.",
    "Thunder is the sound caused by lightning heating the air very quickly.",
    "She finished the crossword puzzle in under ten minutes.",
    "Deforestation threatens the habitat of orangutans in Borneo and Sumatra.",
    "The password must contain at least eight characters, including a number.",
    "Shakespeare wrote thirty-seven plays and more than one hundred and fifty sonnets.",
    "The baby finally fell asleep after midnight.",
    "Antibiotics do not work against viral infections such as the common cold.",
    "Water boils at one hundred degrees Celsius at sea level.",
    "The farmers market sells fresh vegetables, cheese and flowers every Saturday morning.",
    "The spacecraft entered orbit around Mars after a seven-month journey.",
    "Please send me the report by Friday.",
    "Knitting can be a relaxing hobby that also produces warm scarves and hats.",
    "The river flooded the village after days of heavy rain.",
    "Dolphins sleep with one half of their brain at a time.",
    "The lecture covered the causes and consequences of the French Revolution in great detail, from the "
    "fiscal crisis of the monarchy to the rise of Napoleon.",
    "In 1969, two astronauts walked on the surface of the Moon while a third orbited above them, waiting "
    "to bring them home safely.",
    "To reset the router, hold the small button on the back for ten seconds until the lights flash, then "
    "wait two minutes before reconnecting your devices.",
    "The archaeologists spent three summers excavating the site, carefully cataloguing pottery shards, "
    "coins and the remains of a Bronze Age settlement that had been buried under layers of river silt.",
    "Good software documentation explains not only how to use a function but also why it exists, what "
    "its limitations are, and which alternatives a developer should consider in different situations.",
    "Yes.",
    "Hello!",
    "OK, thanks",
    "Le chat dort sur le canapé depuis ce matin.",
    "Où se trouve la gare la plus proche ?",
    "Mañana iremos a la playa si hace buen tiempo.",
    "El niño comió una manzana y una pera después de la escuela.",
    "Die Kinder spielen im Garten, während es draußen schneit.",
    "Ich möchte gern einen Kaffee mit Milch, bitte.",
    "A crème brûlée és a café au lait são clássicos franceses.",
    "Il ragazzo è andato al mercato per comprare pane e formaggio.",
    "Zürich liegt am nördlichen Ende des Zürichsees.",
    "Čeština má háčky a čárky nad některými písmeny.",
    "The naïve façade of the café hid a surprisingly modern kitchen.",
    "Temperatures reached 42.5 °C on 3 August 2023, a record for the region.",
    "Call +44 20 7946 0958 or email info@example.com for details.",
    "def add(a, b): return a + b",
    "GPU, CPU and RAM prices rose 15% in Q3.",
]
# a long text: truncated at 256 word pieces, as sentence-transformers does
LONG = " ".join(SENTENCES[75:82]) * 2
PAIRS = [  # (query, the passage that answers it)
    ("What is the capital of France?",
     "Paris is the capital and largest city of France."),
    ("How many legs does a spider have?",
     "Spiders are arachnids with eight legs and usually eight eyes."),
    ("When did World War II end?",
     "The Second World War ended in 1945 with the surrender of Germany and Japan."),
    ("What do pandas eat?",
     "Giant pandas feed almost entirely on bamboo shoots and leaves."),
    ("Who painted the Mona Lisa?",
     "Leonardo da Vinci painted the Mona Lisa in the early sixteenth century."),
    ("How do I bake sourdough bread?",
     "Sourdough is leavened with a starter of wild yeast, then shaped, proofed overnight and baked in a hot oven."),
    ("What causes tides?",
     "Ocean tides are caused mainly by the gravitational pull of the Moon."),
    ("Which planet is the largest?",
     "Jupiter is the biggest planet in the solar system, a gas giant."),
    ("How fast is the speed of light?",
     "Light travels through a vacuum at about 300,000 kilometres per second."),
    ("What is the boiling point of water?",
     "At sea level, water boils at 100 degrees Celsius."),
    ("Who wrote Romeo and Juliet?",
     "Romeo and Juliet is a tragedy written by William Shakespeare."),
    ("How can I improve my sleep?",
     "Keeping a regular bedtime and avoiding screens late at night helps people sleep better."),
    ("What language is spoken in Brazil?",
     "Portuguese is the official language of Brazil."),
    ("How do vaccines work?",
     "Vaccines expose the immune system to a harmless part of a pathogen so it learns to fight it."),
    ("Where do kangaroos live?",
     "Kangaroos are marsupials native to Australia."),
    ("What is the tallest mountain?",
     "Mount Everest, in the Himalayas, rises 8,849 metres above sea level."),
    ("How do I reset my password?",
     "To change a forgotten password, click 'Forgot password' on the login page and follow the emailed link."),
    ("What is photosynthesis?",
     "Plants use sunlight, water and carbon dioxide to make sugar and oxygen."),
    ("Why is the sky blue?",
     "Air molecules scatter short blue wavelengths of sunlight more than red ones."),
    ("What instrument has 88 keys?",
     "A standard piano keyboard has eighty-eight black and white keys."),
]


@pytest.fixture(scope="module")
def pulled():
    """The default embedder's directory as pulled into the user's cache (pip's cache is fine)."""
    try:
        return pull_embedder()
    except PullError as e:
        pytest.skip(f"the default embedder cannot be pulled here: {e}")


@pytest.fixture(scope="module")
def fp32(pulled):
    return SentenceEmbedder.load(pulled, weights="fp32")


@pytest.fixture(scope="module")
def default(pulled):
    return SentenceEmbedder.load(pulled)


@pytest.fixture(scope="module")
def folder(pulled, tmp_path_factory):
    """The sentence-transformers folder the embedder was converted from (the checked download, unpacked)."""
    out = tmp_path_factory.mktemp("minilm")
    with zipfile.ZipFile(checkpoint_path()) as z:
        z.extractall(out)
    return out


def _copy(src, dst, files):
    dst.mkdir()
    for f in (MANIFEST, *files):
        shutil.copyfile(src / f, dst / f)
    return dst


def _flip(path, offset):
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x01]))


def _refused(path, what, **kw) -> str:
    with pytest.raises(M3Error) as e:
        SentenceEmbedder.load(path, **kw)
    msg = str(e.value)
    assert "\n" not in msg and what in msg and "pull again" in msg, msg
    return msg


def test_fp32_equals_transformers(fp32, folder):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model = transformers.BertModel.from_pretrained(folder, add_pooling_layer=False).eval()
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    texts = [*SENTENCES, LONG]
    want = []
    for i in range(0, len(texts), 16):  # as sentence-transformers: padded batches, masked mean, normalised
        b = tok(texts[i:i + 16], padding=True, truncation=True, max_length=256, return_tensors="pt")
        with torch.no_grad():
            h = model(**b).last_hidden_state
        m = b["attention_mask"].unsqueeze(-1).float()
        want.append(torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1).numpy())
    want = np.concatenate(want)
    got = fp32(texts)
    assert got.shape == (len(texts), 384) and got.dtype == np.float32
    assert np.allclose(np.linalg.norm(got, axis=1), 1, atol=1e-5)
    assert (1 - (got * want).sum(1)).max() < 1e-3
    assert fp32.tokenize([LONG])[0] == tok(LONG, truncation=True, max_length=256)["input_ids"]
    assert len(fp32.tokenize([LONG])[0]) == fp32.max_tokens == 256


def test_int8_close_to_fp32_and_ranks(default, fp32):
    assert default.weights == "int8" and default.dim == fp32.dim == 384 and default.name == DEFAULT_EMBEDDER
    assert default.fingerprint != fp32.fingerprint and len(default.fingerprint) == 32
    texts = [*SENTENCES, *(q for q, _ in PAIRS), *(p for _, p in PAIRS)]
    cos = (default(texts) * fp32(texts)).sum(1)
    # measured on this set: min 0.9695 ("Yes."), mean 0.9960
    assert cos.min() > 0.95 and cos.mean() > 0.99, (cos.min(), cos.mean())
    for e in (default, fp32):
        q, p = e([q for q, _ in PAIRS]), e([p for _, p in PAIRS])
        assert ((q @ p.T).argmax(1) == np.arange(len(PAIRS))).sum() >= 18


def test_empty_texts_and_batching(default, fp32):
    texts = ["", "   ", "\n\t", *SENTENCES[:40], LONG, "", "Ünïcödé façade"]
    for e in (default, fp32):
        batched = e(texts, batch_size=7)
        single = np.stack([e([t])[0] for t in texts])
        assert np.abs(batched - single).max() < 1e-5
        empty = np.array([not t.strip() for t in texts])
        assert empty.sum() == 4 and not batched[empty].any()  # empty or whitespace-only: zero rows
        assert np.allclose(np.linalg.norm(batched[~empty], axis=1), 1, atol=1e-5)
        assert e([]).shape == (0, 384)
        # beyond max_tokens word pieces nothing more is read
        assert np.abs(e([LONG + " and then something else entirely"]) - e([LONG])).max() < 1e-6
    with pytest.raises(BadArgument):
        default("a single string")
    with pytest.raises(BadArgument):
        default(["text"], batch_size=0)


def test_damaged_files_refused(pulled, tmp_path, monkeypatch):
    monkeypatch.setenv("M3LITE_CACHE", str(tmp_path / "cache"))  # the remembered checksums of these copies
    int8 = WEIGHTS["int8"]
    ok = _copy(pulled, tmp_path / "ok", (int8, TOKENIZER))
    assert SentenceEmbedder.load(ok).weights == "int8"
    for name, offset in ((int8, 5_000_000), (TOKENIZER, 1000)):
        bad = _copy(pulled, tmp_path / f"flip-{name}", (int8, TOKENIZER))
        _flip(bad / name, offset)
        assert "checksum" in _refused(bad, name)
    cut = _copy(pulled, tmp_path / "cut", (int8, TOKENIZER))
    with open(cut / int8, "r+b") as f:
        f.truncate(1 << 20)
    assert "truncated" in _refused(cut, int8)
    _refused(cut, WEIGHTS["fp32"], weights="fp32")  # not copied: missing
    foreign = _copy(pulled, tmp_path / "foreign", (int8, TOKENIZER))
    (foreign / TOKENIZER).write_bytes(b"{}" + b" " * ((pulled / TOKENIZER).stat().st_size - 2))
    _refused(foreign, TOKENIZER)
    man = json.loads((ok / MANIFEST).read_text())
    man["dim"] = 385
    (foreign / MANIFEST).write_text(json.dumps(man))
    _refused(foreign, MANIFEST)  # the manifest checks itself
    (foreign / MANIFEST).write_text("{not json")
    _refused(foreign, MANIFEST)
    _refused(tmp_path / "nothing", MANIFEST)
    with pytest.raises(BadArgument):
        SentenceEmbedder.load(ok, weights="int4")


def test_convert_is_atomic(folder, pulled, tmp_path, monkeypatch):
    import m3lite.embedder as emb

    out = tmp_path / "embedders" / "e"
    stale = tmp_path / "embedders" / ".e.pulling-999999999"  # left by a killed pull (no such process)
    stale.mkdir(parents=True)

    build = emb.build_graph

    def killed(settings, weights, kind="fp32"):
        if kind == "int8":  # after the fp32 graph was written
            raise KeyboardInterrupt
        return build(settings, weights, kind)

    monkeypatch.setattr(emb, "build_graph", killed)
    with pytest.raises(KeyboardInterrupt):
        convert(folder, out, "e")
    assert sorted(p.name for p in out.parent.iterdir()) == []  # nothing half-built left, the stale one gone
    monkeypatch.undo()
    convert(folder, out, "e")
    man = json.loads((out / MANIFEST).read_text())
    assert sorted(man["files"]) == sorted([*WEIGHTS.values(), TOKENIZER])
    assert man["dim"] == 384 and man["max_tokens"] == 256 and man["name"] == "e"
    # the same checkpoint converts to the same files
    assert man["files"] == json.loads((pulled / MANIFEST).read_text())["files"]
    assert sorted(p.name for p in out.parent.iterdir()) == ["e"]


def test_pull_offline_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    for k, v in (("PIP_INDEX_URL", "http://127.0.0.1:9/simple"), ("PIP_NO_INDEX", "1"),
                 ("PIP_FIND_LINKS", str(tmp_path))):
        monkeypatch.setenv(k, v)
    with pytest.raises(PullError) as e:
        pull_embedder(cache=cache)
    assert "\n" not in str(e.value) and "again" in str(e.value)
    assert embedder_pulled(cache=cache) is None
    assert not (cache / "embedders").exists() and not (cache / "checkpoints").exists()
    assert not any((cache / "downloads").iterdir())
    with pytest.raises(BadArgument):
        pull_embedder("no-such-embedder", cache=cache)


def test_default_embedder(pulled, monkeypatch):
    monkeypatch.delenv("M3LITE_EMBEDDER", raising=False)
    assert embedder_pulled() == pulled and default_embedder_ready()
    e = default_embedder()
    assert e is default_embedder() and e.weights == "int8" and e.path == pulled
    monkeypatch.setenv("M3LITE_EMBEDDER", str(pulled))
    assert default_embedder(weights="fp32").weights == "fp32"


def test_foreign_or_truncated_checkpoint_refused(folder, tmp_path):
    from m3lite.importers.checkpoint import CheckpointError

    src = tmp_path / "src"
    shutil.copytree(folder, src, ignore=shutil.ignore_patterns("model.safetensors"))
    with open(folder / "model.safetensors", "rb") as f, open(src / "model.safetensors", "wb") as g:
        g.write(f.read(1 << 20))  # a truncated download
    out = tmp_path / "embedders" / "e"
    with pytest.raises(CheckpointError, match="truncated"):
        convert(src, out, "e")
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    with pytest.raises(CheckpointError, match="BERT"):
        convert(src, out, "e")
    assert not any(out.parent.iterdir())
