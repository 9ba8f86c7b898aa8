"""m3lite.chat_template: model chat templates render as transformers' apply_chat_template does; plain prompts
are the SFT format of the models trained here."""
from __future__ import annotations

import pytest

from m3lite.chat_template import (REFERENCES_PROMPT, ChatTemplate, TemplateError, plain_prompt,
                                  with_references)
from m3lite.errors import BadArgument, ModelFileError
from llama_files import smollm2_gguf


# Templates written for these tests in the styles of well-known model families.
CHATML = (
    "{% for m in messages %}"
    "{% if loop.first and m['role'] != 'system' %}<|im_start|>system\nYou are a small helpful model.<|im_end|>\n"
    "{% endif %}"
    "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

LLAMA3 = """{{- bos_token }}
{%- for m in messages %}
    {{- '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + m['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""

LLAMA2 = """{% if messages[0]['role'] == 'system' %}
    {% set system_block = '<<SYS>>\n' + messages[0]['content'] + '\n<</SYS>>\n\n' %}
    {% set turns = messages[1:] %}
{% else %}
    {% set system_block = '' %}
    {% set turns = messages %}
{% endif %}
{% for m in turns %}
    {% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{ raise_exception('Turns must go user, assistant, user, ... after an optional system message.') }}
    {% endif %}
    {% if m['role'] == 'user' %}
        {{- bos_token + '[INST] ' + (system_block if loop.first else '') + m['content'].strip() + ' [/INST]' }}
    {%- else %}
        {{- ' ' + m['content'].strip() + ' ' + eos_token }}
    {%- endif %}
{% endfor %}
"""

ZEPHYR = """{% for m in messages %}
<|{{ m.role }}|>
{{ m.content }}{{ eos_token }}
{% endfor %}
{% if add_generation_prompt %}
<|assistant|>
{% endif %}
"""

# system text folded into the first user turn; uses namespace() and {% continue %} (the loopcontrols extension)
MISTRAL = """{% set ns = namespace(system='', first=true) %}
{% for m in messages if m.role == 'system' %}{% set ns.system = m.content.strip() + '\n\n' %}{% endfor %}
{{- bos_token }}
{%- for m in messages %}
    {% if m.role == 'system' %}{% continue %}{% endif %}
    {% if m.role == 'user' %}
        {{- '[INST] ' + (ns.system if ns.first else '') + m.content + '[/INST]' }}
        {%- set ns.first = false %}
    {%- else %}
        {{- m.content + eos_token }}
    {%- endif %}
{% endfor %}
"""

# tojson (no HTML escaping, non-ASCII kept), dict(), strftime_now and the extra variables
JSONISH = ("{{ dict(n=messages | length, unk=unk_token) | tojson }}{{ dict.fromkeys(['a'], 1) | tojson }}\n"
           "{% for m in messages %}{{ m | tojson }}\n"
           "{% endfor %}{{ tools is none }} {{ documents is none }} {{ strftime_now('%Y') }}"
           "{% if add_generation_prompt %}>>{% endif %}")

TEMPLATES = {"chatml": CHATML, "llama3": LLAMA3, "llama2": LLAMA2, "zephyr": ZEPHYR, "mistral": MISTRAL,
             "jsonish": JSONISH}
TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}

QUESTIONS = ["What is a volcano?", "  Where is Etna, <b>&</b>?  ", "Ça va ? Réponds en « français » ✓"]
ANSWERS = ["A mountain that erupts.", "In Sicily.\n", " Oui, très bien."]


def conversations():
    """(name, messages) for 1-3 turns, with and without a system message, ending with the user's or the
    assistant's message."""
    out = []
    for n in (1, 2, 3):
        for system in ("", " You answer briefly. "):
            msgs = [{"role": "system", "content": system}] if system else []
            for q, a in zip(QUESTIONS[:n - 1], ANSWERS):
                msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
            msgs.append({"role": "user", "content": QUESTIONS[n - 1]})
            tag = f"{n}turns{'-system' if system else ''}"
            out.append((tag, msgs))
            out.append((tag + "-answered", msgs + [{"role": "assistant", "content": ANSWERS[n - 1]}]))
    return out


def hf_tokenizer(source: str, tokens: dict):
    """A transformers tokenizer that renders `source` with `tokens` as its special tokens."""
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers.models import WordLevel

    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens.values()))}
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizers.Tokenizer(WordLevel(vocab, unk_token=tokens["unk_token"])), **tokens)
    tok.chat_template = source
    return tok


def assert_same_as_transformers(source: str, tokens: dict) -> None:
    ours = ChatTemplate(source, bos_token=tokens["bos_token"], eos_token=tokens["eos_token"],
                        extra={k: v for k, v in tokens.items() if k not in ("bos_token", "eos_token")})
    hf = hf_tokenizer(source, tokens)
    for name, msgs in conversations():
        for agp in (True, False):
            want = hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=agp)
            assert ours.render(msgs, add_generation_prompt=agp) == want, (name, agp)


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_matches_transformers(name):
    assert_same_as_transformers(TEMPLATES[name], TOKENS)


@pytest.fixture(scope="module")
def smollm2():
    """(chat template, special tokens) read from the SmolLM2-135M-Instruct GGUF, if present."""
    path = smollm2_gguf()
    gguf = pytest.importorskip("gguf")
    f = gguf.GGUFReader(path).fields
    vocab = f["tokenizer.ggml.tokens"]
    tokens = {k: vocab.contents(int(f[key].contents())) for k, key in (
        ("bos_token", "tokenizer.ggml.bos_token_id"), ("eos_token", "tokenizer.ggml.eos_token_id"),
        ("unk_token", "tokenizer.ggml.unknown_token_id"), ("pad_token", "tokenizer.ggml.padding_token_id"))}
    return f["tokenizer.chat_template"].contents(), tokens


def test_smollm2_template_matches_transformers(smollm2):
    source, tokens = smollm2
    assert_same_as_transformers(source, tokens)
    tpl = ChatTemplate(source, tokens["bos_token"], tokens["eos_token"])
    assert tpl.assistant_suffix() == "<|im_end|>\n"
    assert tpl.render([{"role": "user", "content": "Hi"}]).endswith("<|im_start|>user\nHi<|im_end|>\n"
                                                                     "<|im_start|>assistant\n")


def test_assistant_suffix():
    assert ChatTemplate(CHATML).assistant_suffix() == "<|im_end|>\n"
    assert ChatTemplate(LLAMA3, "<s>", "</s>").assistant_suffix() == "<|eot_id|>"
    assert ChatTemplate(ZEPHYR, "<s>", "</s>").assistant_suffix() == "</s>\n"
    assert ChatTemplate(LLAMA2, "<s>", "</s>").assistant_suffix() == " </s>"


def test_suffix_closes_the_turn_for_a_kept_cache():
    """The prompt of turn 1 + the answer + the suffix is a prefix of the prompt of turn 2."""
    for source in (CHATML, LLAMA3, ZEPHYR, MISTRAL):
        tpl = ChatTemplate(source, "<s>", "</s>")
        first = [{"role": "user", "content": "Hi"}]
        answered = first + [{"role": "assistant", "content": "Hello."}]
        kept = tpl.render(first) + "Hello." + tpl.assistant_suffix()
        assert tpl.render(answered + [{"role": "user", "content": "Bye"}]).startswith(kept), source


def one_line(e) -> str:
    msg = str(e.value)
    assert msg and "\n" not in msg, msg
    return msg


def test_raise_exception_is_a_one_line_bad_argument():
    tpl = ChatTemplate(LLAMA2, "<s>", "</s>")
    with pytest.raises(TemplateError) as e:
        tpl.render([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    assert isinstance(e.value, BadArgument)
    assert "user, assistant, user" in one_line(e)
    with pytest.raises(TemplateError) as e:
        ChatTemplate("{{ raise_exception('two\nlines') }}").render([{"role": "user", "content": "x"}])
    assert "two lines" in one_line(e)


def test_template_failures_while_rendering_are_one_line():
    for source in ("{% set ns = namespace() %}{% set ns._x = 1 %}",  # refused by our namespace()
                   "{{ ''.__class__.__mro__ }}",                      # refused by the sandbox
                   "{{ messages[0]['nope'].upper() }}",
                   "{{ messages[5]['content'] + 1 }}"):
        with pytest.raises(TemplateError) as e:
            ChatTemplate(source).render([{"role": "user", "content": "x"}])
        one_line(e)


@pytest.mark.parametrize("source", ["{% for m in messages %}{{ m.content }}", "{{ messages[0].content ",
                                    "{% if x %}\n\n{% endfor %}", "{{ 1 | no_such_filter }}", "", None])
def test_broken_template_is_a_model_file_error(source):
    with pytest.raises(ModelFileError) as e:
        ChatTemplate(source)
    assert "chat template" in one_line(e)


@pytest.mark.parametrize("messages", [
    None, "hello", [], ["hello"], [{"role": "user"}], [{"content": "x"}], [{"role": "tool", "content": "x"}],
    [{"role": "user", "content": None}], [{"role": "user", "content": [{"type": "text", "text": "x"}]}],
    [{"role": "user", "content": "x"}, 3]])
def test_bad_messages(messages):
    for render in (ChatTemplate(CHATML).render, plain_prompt):
        with pytest.raises(BadArgument) as e:
            render(messages)
        one_line(e)


def test_render_kwargs_and_messages_untouched():
    tpl = ChatTemplate("{{ bos_token }}{{ greeting }}{{ messages[0].content }}", bos_token="<s>",
                       extra={"greeting": "hey "})
    msgs = [{"role": "user", "content": "x"}]
    assert tpl.render(msgs) == "<s>hey x"
    assert tpl.render(msgs, greeting="", bos_token="") == "x"
    assert msgs == [{"role": "user", "content": "x"}]


# ---- plain prompts -----------------------------------------------------------------------------------------

def as_messages(turns, question, system=""):
    """turns: (question, answer, context) triples."""
    msgs = [{"role": "system", "content": system}] if system else []
    for q, a, c in turns:
        msgs.append({"role": "user", "content": q, **({"context": c} if c else {})})
        if a:
            msgs.append({"role": "assistant", "content": a})
    return msgs


# the format the models trained here learned in their SFT stage, written out by hand
@pytest.mark.parametrize("turns,question,context,system,want", [
    ([], "What is a volcano?", "", "", "Question: What is a volcano?\nAnswer:"),
    ([], "  What is a volcano? ", "", "  Be brief.  ", "Be brief.\nQuestion: What is a volcano?\nAnswer:"),
    ([("What is a volcano?", "A mountain.", "")], "Where is Etna?", "", "Be brief.",
     "Be brief.\nQuestion: What is a volcano?\nAnswer: A mountain.\nQuestion: Where is Etna?\nAnswer:"),
    ([("q1", "a1", ""), ("q2", "", ""), (" q3 ", " a3\n", "")], "q4", "", "   ",
     "Question: q1\nAnswer: a1\nQuestion: q2\nAnswer:\nQuestion: q3\nAnswer:  a3\n\nQuestion: q4\nAnswer:"),
    ([("q1", "a1", "Reference: one\n")], "q2", "Reference: two\nReference: three\n", "sys",
     "sys\nReference: one\nQuestion: q1\nAnswer: a1\nReference: two\nReference: three\nQuestion: q2\nAnswer:"),
])
def test_plain_prompt_writes_the_sft_format(turns, question, context, system, want):
    msgs = as_messages(turns, question, system) + [
        {"role": "user", "content": question, **({"context": context} if context else {})}]
    assert plain_prompt(msgs) == want
    # a closed turn continues the same text
    assert plain_prompt(msgs + [{"role": "assistant", "content": "done"}], add_generation_prompt=False) == \
        want + " done"


def test_plain_prompt_refusals():
    with pytest.raises(BadArgument):
        plain_prompt([{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}])
    with pytest.raises(BadArgument):
        plain_prompt([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}])
    with pytest.raises(BadArgument):
        plain_prompt([{"role": "system", "content": "s"}], add_generation_prompt=False)
    with pytest.raises(BadArgument):
        plain_prompt([{"role": "user", "content": "q", "context": 3}])


def test_with_references():
    text = with_references(" Where is Etna? ", ["Etna is in Sicily.\n", "  ", "It erupts often."])
    assert text == ("Use these notes to answer.\n\n[1] Etna is in Sicily.\n[2] It erupts often.\n\n"
                    "Question: Where is Etna?")
    assert text == REFERENCES_PROMPT.format(notes="[1] Etna is in Sicily.\n[2] It erupts often.",
                                            question="Where is Etna?")
    assert with_references("Q?", []) == "Q?"
    # one note goes unnumbered: the adapted default model given "[1] note" went on with "[2] ..." after its answer
    assert with_references("{x}", ["{y}"]) == "Use these notes to answer.\n\n{y}\n\nQuestion: {x}"
    assert with_references("Q?", ["  ", "Etna is in Sicily."]).endswith("\n\nEtna is in Sicily.\n\nQuestion: Q?")
    with pytest.raises(BadArgument):
        with_references("Q?", "not a list")
