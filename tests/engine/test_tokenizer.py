"""Tulu chat template, prompt files, and the shipped tiny tokenizer."""

import json
import os
import shutil
from pathlib import Path

import pytest

import engine.tokenizer as tokenizer_mod
from engine.config import ModelConfig
from engine.errors import InputError, InvalidInput
from engine.tokenizer import (
    TEMPLATE_PROBES,
    TINY_DIR,
    TINY_PROMPTS,
    TULU_CHAT_TEMPLATE,
    check_vocabularies,
    encode_chat,
    format_chat,
    load_prompts,
    load_tokenizer,
    read_prompt_file,
    render_chat,
    template_ids,
    tulu_chat_template,
)
from engine.train_ppo import build_tiny_models


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def test_tulu_format_exact_newlines():
    assert format_chat([{"role": "user", "content": "Hi there"}], "</s>") == "<|user|>\nHi there\n<|assistant|>\n"
    multi = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
    ]
    assert format_chat(multi, "</s>") == "<|user|>\na\n<|assistant|>\nb</s>\n<|user|>\nc\n<|assistant|>\n"


def test_each_turn_is_stripped_as_the_recipes_code_does():
    """EasyLM's TuluPromptDataset (the PPO trainer of Tulu 2.5) and its reward models' PreferenceDataset strip every
    turn's text: a question ending in a newline gets no blank line before '<|assistant|>', leading blanks go."""
    msgs = [
        {"role": "system", "content": " Be brief.\n"},
        {"role": "user", "content": "\n\nWhy?  \n"},
        {"role": "assistant", "content": " a1\n"},
        {"role": "user", "content": "\tHow do I reverse a list in Python?\n\n"},
    ]
    assert format_chat(msgs, "</s>") == (
        "<|system|>\nBe brief.\n<|user|>\nWhy?\n<|assistant|>\na1</s>\n<|user|>\nHow do I reverse a list in Python?\n"
        "<|assistant|>\n"
    )


@pytest.mark.parametrize("pad", ["", " \n\t"])
def test_jinja_template_matches_python_format(tok, pad):
    msgs = [
        {"role": "system", "content": "Be brief." + pad},
        {"role": "user", "content": pad + "x"},
        {"role": "assistant", "content": pad + "y" + pad},
        {"role": "user", "content": "z z" + pad},
    ]
    rendered = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert rendered == tok.bos_token + format_chat(msgs, tok.eos_token)


def test_tokenizer_template_encodes_as_the_tulu_format(tok):
    """--chat-template tokenizer on the shipped tokenizer (whose template is Tulu's) gives every shipped prompt the
    very ids of the built-in format, BOS included once."""
    tulu = load_prompts(TINY_PROMPTS, tok, verbose=False)
    own = load_prompts(TINY_PROMPTS, tok, verbose=False, template="tokenizer")
    assert own.prompts == tulu.prompts and all(p[0] == tok.bos_token_id != p[1] for p in own.prompts)


LLAMA3_STYLE = (  # Llama 3.1 Instruct's shape of template: BOS and headers are the template's own text
    "{{ bos_token }}{% for m in messages %}{{ '[' + m['role'] + ']' + m['content'] | trim + eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '[assistant]' }}{% endif %}"
)


def test_tokenizer_template_is_rendered_then_tokenised_as_it_is(tmp_path, tok):
    shutil.copytree(TINY_DIR, tmp_path / "tok")
    (tmp_path / "tok" / "chat_template.jinja").write_text(LLAMA3_STYLE)
    other = load_tokenizer(tmp_path / "tok")
    msgs = [{"role": "system", "content": "Be brief. "}, {"role": "user", "content": "Why is the sky blue?"}]
    ids = encode_chat(other, msgs, "tokenizer")
    text = "<s>[system]Be brief.</s>[user]Why is the sky blue?</s>[assistant]"
    assert ids == other(text, add_special_tokens=False)["input_ids"]
    assert ids.count(other.bos_token_id) == 1 and ids != encode_chat(other, msgs)  # (the Tulu format's)
    with pytest.raises(ValueError, match="unknown chat role 'tool'"):
        encode_chat(other, [{"role": "tool", "content": "x"}], "tokenizer")


def test_chat_template_choice_is_checked(tmp_path, tok):
    from engine.state import RunConfig

    with pytest.raises(ValueError, match="chat_template must be one of tulu, tokenizer, got 'chatml'"):
        RunConfig(chat_template="chatml")
    with pytest.raises(ValueError, match="chat template 'chatml' is not one of"):
        encode_chat(tok, [{"role": "user", "content": "x"}], "chatml")
    shutil.copytree(TINY_DIR, tmp_path / "tok")
    os.remove(tmp_path / "tok" / "chat_template.jinja")
    bare = load_tokenizer(tmp_path / "tok")
    with pytest.raises(ValueError, match="has no chat_template"):
        load_prompts(TINY_PROMPTS, bare, template="tokenizer")


def test_tiny_tokenizer_round_trip(tok):
    assert len(tok) == ModelConfig.named("tiny").vocab_size
    assert (tok.bos_token_id, tok.eos_token_id) == (1, 2)
    ids = encode_chat(tok, [{"role": "user", "content": "Why is the sky blue? ünïcødé ✓"}])
    assert ids[0] == tok.bos_token_id and max(ids) < len(tok)
    assert tok.decode(ids[1:]) == "<|user|>\nWhy is the sky blue? ünïcødé ✓\n<|assistant|>\n"


def test_prompt_file_formats(tmp_path):
    p = tmp_path / "p.jsonl"
    rows = [
        {"prompt": "one"},
        {"messages": [{"role": "user", "content": "two"}]},
        {
            "chosen": [
                {"role": "user", "content": "q1"},
                {"role": "assistant", "content": "a1"},
                {"role": "user", "content": "q2"},
                {"role": "assistant", "content": "a2"},
            ]
        },
    ]
    multi_turn = rows[2]["chosen"]
    rows += [
        # a preference line with both: the conversation when it holds turns before the prompt (else the string
        # alone would lose them), the string when it is single-turn or not a conversation we read
        {"prompt": "q2", "chosen": multi_turn, "rejected": multi_turn[:3] + [{"role": "assistant", "content": "b"}]},
        {"prompt": "single", "chosen": [{"role": "user", "content": "single "}, {"role": "assistant", "content": "a"}]},
        {"prompt": "hh", "chosen": "\n\nHuman: hh\n\nAssistant: a"},
        {"prompt": "odd", "chosen": [{"from": "human", "value": "odd"}]},
        # TRL's conversational preference format: the prompt's turns, the answers apart
        {
            "prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": "trl"}],
            "chosen": [{"role": "assistant", "content": "a"}],
        },
        {"messages": [{"role": "user", "content": "m"}], "prompt": [{"role": "user", "content": "p"}]},
    ]
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    convs = read_prompt_file(p)
    assert convs[0] == [{"role": "user", "content": "one"}]
    assert convs[1] == [{"role": "user", "content": "two"}]
    assert [m["content"] for m in convs[2]] == ["q1", "a1", "q2"]  # up to the last user turn
    assert convs[3] == convs[2]
    assert convs[4:7] == [[{"role": "user", "content": c}] for c in ("single", "hh", "odd")]
    assert [(m["role"], m["content"]) for m in convs[7]] == [("system", "s"), ("user", "trl")]
    assert convs[8] == [{"role": "user", "content": "m"}]


def test_long_prompts_dropped_and_counted(tmp_path, tok, capsys):
    p = tmp_path / "p.jsonl"
    p.write_text(json.dumps({"prompt": "short"}) + "\n" + json.dumps({"prompt": "long " * 400}) + "\n")
    ps = load_prompts(p, tok, max_prompt_len=64)
    assert ps.dropped == 1 and len(ps.prompts) == 1 and len(ps.prompts[0]) <= 64
    assert "1 kept, 1 dropped" in capsys.readouterr().out


def test_shipped_prompts_load(tok):
    ps = load_prompts(TINY_PROMPTS, tok, max_prompt_len=1024, verbose=False)
    assert len(ps.prompts) >= 40 and ps.dropped == 0


@pytest.mark.parametrize(
    "content, message",
    [
        ("", "is empty"),
        (
            '{"prompt": "ok"}\n{"prompt": "bad"\n',
            r"p\.jsonl:2: malformed JSON \(Expecting ',' delimiter at column",
        ),
        ('{"prompt": "a\tb"}\n', r"p\.jsonl:1: malformed JSON \(Invalid control character at column 14\)"),
        (
            '{"prompt": "ok"}\n{"prompt": "x", "id": ' + "9" * 5000 + "}\n",
            r"p\.jsonl:2: JSON holding a value Python's json cannot read \(Exceeds the limit \(4300 digits\)",
        ),
        (
            '{"prompt": "x", "meta": ' + "[" * 100_000 + "]" * 100_000 + "}\n",
            r"p\.jsonl:1: JSON nested too deep for Python's json to read",
        ),
        ('{"text": "x"}\n', r"p\.jsonl:1: needs a 'prompt' string"),
        ('{"messages": [{"role": "assistant", "content": "x"}]}\n', "no user turn"),
        ('{"prompt": [{"role": "assistant", "content": "x"}], "chosen": []}\n', "no user turn"),
        ('{"prompt": 3}\n', r"p\.jsonl:1: needs a 'prompt' string"),
        ('{"messages": [{"role": "robot", "content": "x"}]}\n', "each message needs a role"),
        ('{"prompt": "   "}\n', "empty prompt"),
        ('{"messages": [{"role": "user", "content": " "}]}\n', r"p\.jsonl:1: the last user turn is empty"),
    ],
)
def test_prompt_file_errors(tmp_path, content, message):
    p = tmp_path / "p.jsonl"
    p.write_text(content)
    with pytest.raises(ValueError, match=message):
        read_prompt_file(p)


@pytest.mark.parametrize(
    "data, message",
    [
        (b'{"vocab_size": ' + b"9" * 5000 + b"}", "JSON holding a value Python's json cannot read"),
        (b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "JSON nested too deep for Python's json to read"),
        (b'{"name": "caf\xe9"}', r"not UTF-8 text \(byte 14\)"),
        (b'{"a": 1,}', r"is not valid JSON \(Expecting property name enclosed in double quotes at line 1, column 9\)"),
    ],
)
def test_a_json_file_python_cannot_read_is_named(tmp_path, data, message):
    """A JSON file (config.json, an index, tokenizer_config.json) holding what Python's json cannot read, an integer
    past its digit limit, nesting past the recursion limit, Latin-1 bytes, is an InvalidInput naming the file and why
    (a bare ValueError, RecursionError or UnicodeDecodeError named neither); a BOM before it is read through."""
    from engine.config import read_json

    fn = tmp_path / "config.json"
    fn.write_bytes(data)
    with pytest.raises(InvalidInput, match=rf"^{fn}:? .*{message}"):
        read_json(str(fn))
    fn.write_bytes(b'\xef\xbb\xbf{"a": 1}')
    assert read_json(str(fn)) == {"a": 1}


def test_a_held_out_prompt_leaves_training_with_every_copy():
    """--eval-holdout draws distinct prompts: a prompt the file repeats (a preference split's several pairs per
    question) goes to the evaluation set once and none of its copies stays in training; the draw is seeded."""
    from engine.tokenizer import PromptSet

    prompts = [[q, q + 1] for q in range(20) for _ in range(3)]  # 20 questions, 3 lines each
    rest, held = PromptSet(prompts, [[{"role": "user", "content": str(p)}] for p in prompts]).hold_out(6, seed=1)
    assert len(held.prompts) == len({tuple(p) for p in held.prompts}) == 6
    assert not {tuple(p) for p in held.prompts} & {tuple(p) for p in rest.prompts}
    assert len(rest.prompts) == 60 - 18 and rest.prompts == [p for p in prompts if p not in held.prompts]
    assert held.prompts == PromptSet(prompts, [[]] * 60).hold_out(6, seed=1)[1].prompts  # (the same seed)
    with pytest.raises(ValueError, match=r"cannot hold out 20 of 20 prompts \(60 lines, some repeated\)"):
        PromptSet(prompts, [[]] * 60).hold_out(20, seed=1)


def test_every_prompt_too_long(tmp_path, tok):
    p = tmp_path / "p.jsonl"
    p.write_text(json.dumps({"prompt": "word " * 100}) + "\n")
    with pytest.raises(ValueError, match="every prompt .* longer than 8 tokens"):
        load_prompts(p, tok, max_prompt_len=8, verbose=False)


def test_sentencepiece_only_directory_named(tmp_path):
    """A directory with tokenizer.model and no tokenizer.json (and no converter installed) is named, with the fix."""
    pytest.importorskip("transformers")
    try:
        import sentencepiece  # noqa: F401

        pytest.skip("sentencepiece is installed: transformers converts the model instead")
    except ImportError:
        pass
    (tmp_path / "tokenizer.model").write_bytes(b"not a real model")
    (tmp_path / "tokenizer_config.json").write_text('{"tokenizer_class": "LlamaTokenizer"}')
    with pytest.raises(ValueError, match=r"has tokenizer.model but no tokenizer.json.*copy the tokenizer.json"):
        load_tokenizer(tmp_path)


def _tokenizer_copy(path, edit=None):
    """The shipped tokenizer's files in `path`, tokenizer.json changed by `edit(dict)`."""
    path.mkdir(parents=True, exist_ok=True)
    for name in os.listdir(TINY_DIR):
        shutil.copy(os.path.join(TINY_DIR, name), path / name)
    if edit:
        data = json.loads((path / "tokenizer.json").read_text())
        edit(data)
        (path / "tokenizer.json").write_text(json.dumps(data))
    return str(path)


def _bpe_files_copy(path, edit=None):
    """The tiny tokenizer (edited) as BPE vocab.json + merges.txt and a tokenizer_config.json, no tokenizer.json."""
    from tokenizers import Tokenizer

    data = json.loads(open(os.path.join(TINY_DIR, "tokenizer.json")).read())
    if edit:
        edit(data)
    path.mkdir(parents=True)
    Tokenizer.from_str(json.dumps(data)).model.save(str(path))
    config = {"tokenizer_class": "GPT2Tokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return str(path)


def _swap_vocab(data):  # two ordinary tokens trade ids
    vocab = data["model"]["vocab"]
    vocab["a"], vocab["b"] = vocab["b"], vocab["a"]


def _no_bos(data):  # the same vocabulary, no BOS added
    data["post_processor"] = None


def _merge_dropped(data):  # the same vocabulary, one merge fewer: some text splits into more tokens
    data["model"]["merges"] = data["model"]["merges"][1:]


def _special_renamed(data):  # a special token under another name (as Llama 3.1 renamed reserved tokens)
    vocab = data["model"]["vocab"]
    vocab["<|end|>"] = vocab.pop("</s>")
    for t in data["added_tokens"]:
        t["content"] = "<|end|>" if t["content"] == "</s>" else t["content"]


def test_models_that_cannot_share_the_tokenizer_are_refused(tmp_path, tok):
    """engine.tokenizer.check_vocabularies: what setup() checks before any weight is read (or fetched)."""
    prompts = [load_prompts(TINY_PROMPTS, tok, verbose=False).prompts]
    v = ModelConfig.named("tiny").vocab_size
    same = _tokenizer_copy(tmp_path / "same")  # another directory, the same files: fine
    bare = str(tmp_path / "bare")  # no tokenizer files: nothing to compare
    os.makedirs(bare)
    sentencepiece = str(tmp_path / "sp")  # a tokenizer.model transformers cannot read: not compared, said
    os.makedirs(sentencepiece)
    open(os.path.join(sentencepiece, "tokenizer.model"), "wb").close()
    renamed = _tokenizer_copy(tmp_path / "renamed", _special_renamed)
    assert load_tokenizer(renamed).convert_ids_to_tokens(2) == "<|end|>" != tok.convert_ids_to_tokens(2)
    ok = {"policy": (TINY_DIR, v), "reference": (same, v), "reward": (bare, v + 8)}
    assert check_vocabularies(tok, TINY_DIR, ok, prompts) == []
    assert check_vocabularies(tok, TINY_DIR, {"policy": (TINY_DIR, v), "reward": (renamed, v)}, prompts) == []
    (warning,) = check_vocabularies(tok, TINY_DIR, {"policy": (TINY_DIR, v), "reward": (sentencepiece, v)}, prompts)
    assert warning.startswith(f"the reward model's tokenizer files ({sentencepiece}) cannot be read, so its vocabulary "
                              "is not compared with the run's: ")  # fmt: skip
    no_bos = _tokenizer_copy(tmp_path / "no_bos", _no_bos)  # (the engine gives every model the run's tokens)
    (warning,) = check_vocabularies(tok, TINY_DIR, {"policy": (TINY_DIR, v), "reference": (no_bos, v)}, prompts)
    assert warning.startswith("the reference model's tokenizer (") and "other special tokens" in warning

    swapped = _tokenizer_copy(tmp_path / "swapped", _swap_vocab)
    a, b = tok.convert_tokens_to_ids(["a", "b"])
    with pytest.raises(ValueError, match=rf"reward model's tokenizer \(.*swapped\) maps id {min(a, b)} to"):
        check_vocabularies(tok, TINY_DIR, {"policy": (TINY_DIR, v), "reward": (swapped, v)}, prompts)
    bpe_files = _bpe_files_copy(tmp_path / "bpe_swapped", _swap_vocab)  # (vocab.json + merges.txt, as transformers
    with pytest.raises(ValueError, match=rf"reward model's tokenizer \(.*bpe_swapped\) maps id {min(a, b)} to"):
        check_vocabularies(tok, TINY_DIR, {"policy": (TINY_DIR, v), "reward": (bpe_files, v)}, prompts)  # 4 wrote)
    same_bpe = _bpe_files_copy(tmp_path / "bpe_same")
    (warning,) = check_vocabularies(tok, TINY_DIR, {"policy": (TINY_DIR, v), "reward": (same_bpe, v)}, prompts)
    assert "adds other special tokens around a text" in warning  # (the same tokens; GPT2Tokenizer adds no BOS)
    bpe_merges = _bpe_files_copy(tmp_path / "bpe_merges", _merge_dropped)  # (another split: said as that, no more)
    (warning,) = check_vocabularies(tok, TINY_DIR, {"policy": (TINY_DIR, v), "reward": (bpe_merges, v)}, prompts)
    assert warning.startswith(f"the reward model's tokenizer ({bpe_merges}), which transformers builds from files "
                              "other than a tokenizer.json, splits a chat prompt differently")  # fmt: skip
    merges = _tokenizer_copy(tmp_path / "merges", _merge_dropped)
    with pytest.raises(ValueError, match=r"reward model's tokenizer \(.*merges\) splits a chat prompt differently"):
        check_vocabularies(tok, TINY_DIR, {"policy": (TINY_DIR, v), "reward": (merges, v)}, prompts)
    # --tokenizer: the policy's own files are not compared (the flag overrides them); the others are, with the run's
    assert check_vocabularies(tok, TINY_DIR, {"policy": (swapped, v), "reference": (swapped, v)}, prompts) == []
    with pytest.raises(ValueError, match=r"where the run's tokenizer \("):
        check_vocabularies(tok, TINY_DIR, {"policy": (bare, v), "reward": (swapped, v)}, prompts)
    with pytest.raises(ValueError, match=rf"reward model's vocabulary \(.*vocab_size {v - 1}\) is smaller than the po"):
        check_vocabularies(tok, TINY_DIR, {"policy": (TINY_DIR, v), "reward": (bare, v - 1)}, prompts)
    top = max(max(p) for p in prompts[0])
    with pytest.raises(ValueError, match=rf"gives a prompt token id {top} '.*', outside the policy model's vocabulary"):
        check_vocabularies(tok, TINY_DIR, {"policy": (bare, top), "reward": (bare, top)}, prompts)
    padded = load_tokenizer(TINY_DIR)  # (an added <pad> the model has no row for, as open-instruct adds one)
    padded.add_special_tokens({"pad_token": "<pad>"})
    quoting = [encode_chat(padded, [{"role": "user", "content": "Why does collate_fn insert <pad> here?"}])]
    with pytest.raises(ValueError, match=rf"gives a prompt token id {v} '<pad>' \(an added token: its text in a prompt "
                       rf"is read as it\), outside the policy model's vocabulary \({bare}: vocab_size {v}\), in the "
                       r"prompt '.*insert <pad> here.*'\.\.\.: .*remove the prompts that hold their text"):  # fmt: skip
        check_vocabularies(padded, TINY_DIR, {"policy": (bare, v), "reward": (bare, v)}, prompts + [quoting])
    with pytest.raises(ValueError, match=r"gives the EOS token id 2, outside the policy"):
        check_vocabularies(tok, TINY_DIR, {"policy": (bare, 2), "reward": (bare, 2)}, [])


def test_setup_refuses_a_reward_model_with_another_tokenizer(tmp_path):
    """Through the entry point: the tiny default's reward model given a tokenizer that swaps two tokens."""
    from engine.train_ppo import main

    init = tmp_path / "init"
    build_tiny_models(str(init))
    _tokenizer_copy(init / "reward", _swap_vocab)
    flags = ["--output-dir", str(tmp_path), "--policy", str(init / "policy"), "--reward", str(init / "reward"),
             "--prompts", TINY_PROMPTS, "--max-iterations", "1"]  # fmt: skip
    with pytest.raises(ValueError, match="reward model's tokenizer"):
        main(flags)


def test_a_template_without_bos_is_warned_about(tmp_path, capsys):
    shutil.copytree(TINY_DIR, tmp_path / "tok")
    (tmp_path / "tok" / "chat_template.jinja").write_text(
        "{% for m in messages %}{{ '<|user|>\\n' + m['content'] + '\\n' }}{% endfor %}{{ '<|assistant|>\\n' }}"
    )
    other = load_tokenizer(tmp_path / "tok")
    load_prompts(TINY_PROMPTS, other, template="tokenizer")
    assert "chat template starts a prompt without its BOS (<s>)" in capsys.readouterr().out
    load_prompts(TINY_PROMPTS, load_tokenizer(), template="tokenizer")  # (the shipped one places it)
    assert "warning" not in capsys.readouterr().out


def test_template_dates_are_fixed_and_template_errors_name_the_prompt(tmp_path):
    """A template that prints today's date (Llama 3.x's) gets a fixed one: the same file is the same tokens on any
    day (a resume or --eval-only a day later). A template's own error names the file and line of the prompt."""
    from engine.tokenizer import TEMPLATE_DATE

    shutil.copytree(TINY_DIR, tmp_path / "tok")
    (tmp_path / "tok" / "chat_template.jinja").write_text(
        "{{ bos_token }}{% if not date_string is defined %}{% set date_string = strftime_now('%d %b %Y') %}{% endif %}"
        "Today Date: {{ date_string }}\n{% for m in messages %}"
        "{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
        "{{ m['content'] }}{% endfor %}"
    )
    other = load_tokenizer(tmp_path / "tok")
    ids = encode_chat(other, [{"role": "user", "content": "hi"}], "tokenizer")
    assert other.decode(ids) == f"<s>Today Date: {TEMPLATE_DATE}\nhi"
    p = tmp_path / "p.jsonl"
    rows = [
        {"prompt": "one"},
        {"prompt": "two"},
        {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]},
    ]
    p.write_text("\n".join(json.dumps(r) for r in rows[:2]) + "\n\n" + json.dumps(rows[2]) + "\n")
    with pytest.raises(ValueError, match=r"p.jsonl:4: the chat template failed on this prompt: System role not"):
        load_prompts(p, other, template="tokenizer")


def test_a_template_that_prints_no_prompt_text_is_refused_by_line(tmp_path):
    """A chat template that does not print the conversation's messages (one written for other keys, ShareGPT's
    from/value: Jinja renders a missing key as nothing) is refused at the prompt's line: the run trained on its
    generation prompt alone, silently, or, where the template printed nothing at all, failed on a prompt of no
    tokens with a traceback."""
    shutil.copytree(TINY_DIR, tmp_path / "tok")
    p = tmp_path / "p.jsonl"
    p.write_text(json.dumps({"prompt": "Why is the sky blue?"}) + "\n")
    for template in (
        "{% for m in messages %}{% if m['from'] == 'human' %}{{ 'USER: ' + m['value'] }}{% endif %}{% endfor %}A:",
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }}{% endif %}{% endfor %}",
    ):
        (tmp_path / "tok" / "chat_template.jinja").write_text(template)
        with pytest.raises(ValueError, match=r"p.jsonl:1: the chat template printed this prompt without the text of "
                           r"its last user turn \('Why is the sky blue\?'\)"):  # fmt: skip
            load_prompts(p, load_tokenizer(tmp_path / "tok"), template="tokenizer")
    # a template that trims what it prints (Llama 2's): a question ending in whitespace is printed, and kept
    (tmp_path / "tok" / "chat_template.jinja").write_text(
        "{% for m in messages %}{{ 'USER: ' + m['content'] | trim + ' ' }}{% endfor %}A:"
    )
    p.write_text(json.dumps({"prompt": "Why is the sky blue?\n"}) + "\n")
    assert len(load_prompts(p, load_tokenizer(tmp_path / "tok"), template="tokenizer").prompts) == 1


def test_a_conversation_without_a_user_turn_encodes_through_the_tokenizers_template():
    """encode_chat's check that the template printed the last user turn has nothing to check without one (a system
    prompt alone): the conversation encodes as the Tulu format encodes it, not a bare StopIteration from the check."""
    tok = load_tokenizer()
    tok.chat_template = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + ' ' }}{% endfor %}assistant:"
    ids = encode_chat(tok, [{"role": "system", "content": "Be brief."}], "tokenizer")
    assert tok.decode(ids) == "system: Be brief. assistant:"


def test_a_fault_of_ours_in_encoding_a_prompt_is_not_blamed_on_the_template(tmp_path, monkeypatch):
    """Only the template's rendering is reported as the template's failure (an input error naming the prompt's
    line); the same kinds of error raised by our own formatting or by the tokenizer keep their traceback."""

    tok = load_tokenizer()
    p = tmp_path / "p.jsonl"
    p.write_text(json.dumps({"prompt": "one"}) + "\n")

    def broken(*args, **kwargs):
        raise KeyError("content")

    monkeypatch.setattr(tokenizer_mod, "format_chat", broken)
    with pytest.raises(KeyError) as caught:
        load_prompts(p, tok)
    assert not isinstance(caught.value, InputError)


def test_generation_config_eos_ids_end_responses(tmp_path):
    """generation_config.json's EOS ids (Llama 3 Instruct's <|eot_id|> beside config.json's <|end_of_text|>) end a
    response as transformers' generate stops there; without the file, the tokenizer's EOS alone."""
    from engine.tokenizer import response_stop_ids

    tok = load_tokenizer()
    assert response_stop_ids(tok, tmp_path) == [2]
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7], "temperature": 0.6}))
    assert response_stop_ids(tok, tmp_path) == [2, 7]
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 9}))
    assert response_stop_ids(tok, tmp_path) == [2, 9]


@pytest.mark.parametrize("name", ["tokenizer_config.json", "special_tokens_map.json"])
def test_a_damaged_tokenizer_file_beside_a_whole_tokenizer_json_is_named(tmp_path, name):
    """A tokenizer file cut short or mis-edited (a trailing comma after adding a pad token by hand) is named with
    where it fails: the error blamed tokenizer.json ("is its tokenizer.json whole?"), which was whole."""
    shutil.copytree(TINY_DIR, tmp_path / "tok")
    (tmp_path / "tok" / name).write_text('{"bos_token": "<s>", "pad_token": "</s>",}')
    with pytest.raises(ValueError, match=rf"^{tmp_path}/tok/{name} is not valid JSON \(Expecting property name"):
        load_tokenizer(tmp_path / "tok")

    # a damaged tokenizer.json beside a damaged file transformers does not read for a tokenizer (a checkpoint's
    # weight index): tokenizer.json is asked about, the index not blamed
    shutil.copytree(TINY_DIR, tmp_path / "ckpt")
    (tmp_path / "ckpt" / "tokenizer.json").write_text('{"version": "1.0",')
    (tmp_path / "ckpt" / "model.safetensors.index.json").write_text('{"weight_map": {},')
    with pytest.raises(ValueError, match=r"transformers cannot load the tokenizer in .*: is its tokenizer.json whole"):
        load_tokenizer(tmp_path / "ckpt")


def test_files_that_are_no_tokenizer_or_no_text_are_named(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no tokenizer \\(no tokenizer.json\\)"):
        load_tokenizer(tmp_path / "empty")
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"prompt": "ok"}\n{"prompt": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"latin.jsonl:2: not UTF-8 text \(byte 16 of the line\)"):
        read_prompt_file(latin)
    import gzip

    packed = tmp_path / "p.jsonl.gz"
    packed.write_bytes(gzip.compress(b'{"prompt": "x"}\n' * 50))
    with pytest.raises(ValueError, match=r"p.jsonl.gz:1: not UTF-8 text \(a compressed file\)"):
        read_prompt_file(packed)


def test_a_bpe_vocabulary_without_its_merges_is_named(tmp_path):
    """A directory with a BPE vocab.json and no merges.txt (a copy that missed it): transformers' ValueError names
    neither file; ours names the directory and the missing file, and with the file there it loads."""
    data = json.loads((Path(TINY_DIR) / "tokenizer.json").read_text())
    (tmp_path / "vocab.json").write_text(json.dumps(data["model"]["vocab"]))
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "GPT2Tokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"})
    )
    with pytest.raises(InvalidInput, match=f"{tmp_path} has a BPE vocab.json but no merges.txt"):
        load_tokenizer(tmp_path)
    merges = "".join((" ".join(m) if isinstance(m, list) else m) + "\n" for m in data["model"]["merges"])
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + merges)
    assert load_tokenizer(tmp_path)("hello world")["input_ids"]


def test_a_tokenizer_that_appends_eos_gives_prompts_without_it(tmp_path, tok):
    """A tokenizer whose post-processor appends EOS (Llama's add_eos_token=True) would end every Tulu prompt with EOS,
    so each rollout would start after an end of text: the prompt ends at '<|assistant|>\\n', as the plain one does."""
    d = tmp_path / "eos"
    shutil.copytree(TINY_DIR, d)
    tj = json.loads((d / "tokenizer.json").read_text())
    post = tj["post_processor"]
    post["single"].append({"SpecialToken": {"id": "</s>", "type_id": 0}})
    post["special_tokens"]["</s>"] = {"id": "</s>", "ids": [tok.eos_token_id], "tokens": ["</s>"]}
    (d / "tokenizer.json").write_text(json.dumps(tj))
    eos_tok = load_tokenizer(d)
    assert eos_tok("x")["input_ids"][-1] == tok.eos_token_id  # (it does append EOS)
    assert (
        load_prompts(TINY_PROMPTS, eos_tok, verbose=False).prompts
        == load_prompts(TINY_PROMPTS, tok, verbose=False).prompts
    )


def bpe_tokenizer_files(src, tok):
    """`tok`'s BPE vocabulary written as vocab.json + merges.txt (no tokenizer.json) in a new directory `src`."""
    src.mkdir(parents=True)
    model = json.loads(tok.backend_tokenizer.to_str())["model"]
    (src / "vocab.json").write_text(json.dumps(model["vocab"]))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (src / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (src / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "GPT2Tokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    ))  # fmt: skip
    return src


def test_a_saved_policy_keeps_a_bpe_tokenizers_vocabulary_files(tmp_path, tok):
    """A tokenizer of vocab.json + merges.txt (no tokenizer.json), which the engine loads, is saved with the policy
    whole: transformers' AutoTokenizer on the saved policy encodes as the source does (without merges.txt it
    silently encoded every text to nothing)."""
    from transformers import AutoTokenizer

    from engine.checkpoint import load_pretrained, save_pretrained

    src = bpe_tokenizer_files(tmp_path / "bpe", tok)
    text = "How do I reverse a list in Python?"
    want = load_tokenizer(src)(text)["input_ids"]
    assert len(want) > 3
    policy, _ = build_tiny_models(str(tmp_path / "init"))
    save_pretrained(load_pretrained(policy), str(tmp_path / "saved"), tokenizer_dir=str(src))
    assert {"vocab.json", "merges.txt"} <= set(os.listdir(tmp_path / "saved"))
    assert AutoTokenizer.from_pretrained(tmp_path / "saved")(text)["input_ids"] == want


@pytest.mark.parametrize("layout", ["folder", "list"])
def test_a_saved_policy_keeps_the_tokenizers_named_chat_templates(tmp_path, tok, layout):
    """A tokenizer with named chat templates (transformers 5's additional_chat_templates/NAME.jinja, or transformers
    4's list of them in tokenizer_config.json: a tool_use one, say) keeps them in the saved policy beside the template
    it was trained with: apply_chat_template(chat_template="tool_use") renders with it there as in the source (the
    folder was not copied, and the name was unknown; the list was replaced by the one template)."""
    from transformers import AutoTokenizer

    from engine.checkpoint import load_pretrained, save_pretrained

    src = tmp_path / "tok"
    shutil.copytree(TINY_DIR, src)
    tool = "{% for m in messages %}<tool>{{ m['content'] }}{% endfor %}"
    if layout == "folder":
        (src / "additional_chat_templates").mkdir()
        (src / "additional_chat_templates/tool_use.jinja").write_text(tool)
    else:
        cfg = json.loads((src / "tokenizer_config.json").read_text())
        default = (src / "chat_template.jinja").read_text()
        (src / "chat_template.jinja").unlink()
        cfg["chat_template"] = [{"name": "default", "template": default}, {"name": "tool_use", "template": tool}]
        (src / "tokenizer_config.json").write_text(json.dumps(cfg))
    msgs = [{"role": "user", "content": "Why is the sky blue?"}]
    want = AutoTokenizer.from_pretrained(src).apply_chat_template(msgs, chat_template="tool_use", tokenize=False)
    assert want == "<tool>Why is the sky blue?"
    policy, _ = build_tiny_models(str(tmp_path / "init"))
    save_pretrained(load_pretrained(policy), str(tmp_path / "saved"), tokenizer_dir=str(src), chat_template="{{ 'x' }}")
    saved = AutoTokenizer.from_pretrained(tmp_path / "saved")
    assert saved.apply_chat_template(msgs, chat_template="tool_use", tokenize=False) == want
    assert saved.apply_chat_template(msgs, tokenize=False) == "x"


def test_a_saved_policy_carries_the_chat_template_it_was_trained_with(tmp_path, tok):
    """A policy trained on Tulu-format prompts (--chat-template tulu, the default) is saved with the Tulu template in
    place of its tokenizer's own (Llama 3's here), so transformers' apply_chat_template formats as the model learned;
    with --chat-template tokenizer the tokenizer's own stays."""
    from transformers import AutoTokenizer

    from engine.resume import latest_checkpoint
    from engine.train_ppo import main
    from kernels import dispatch

    other = tmp_path / "tok"
    shutil.copytree(TINY_DIR, other)
    (other / "chat_template.jinja").write_text(LLAMA3_STYLE)
    policy, reward = build_tiny_models(str(tmp_path / "init"))
    msgs = [{"role": "user", "content": "Why is the sky blue?"}]
    rendered = {}
    for template in ("tulu", "tokenizer"):
        out = tmp_path / template
        with dispatch.reference_ops():
            main(["--policy", policy, "--reward", reward, "--prompts", TINY_PROMPTS, "--tokenizer", str(other),
                  "--output-dir", str(out), "--chat-template", template, "--max-iterations", "1",
                  "--rollout-batch-size", "8", "--train-batch-size", "8", "--max-new-tokens", "4", "--max-prompt-len",
                  "128"])  # fmt: skip
        saved = AutoTokenizer.from_pretrained(f"{latest_checkpoint(str(out))}/policy")
        rendered[template] = saved.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert rendered["tulu"] == tok.bos_token + format_chat(msgs, tok.eos_token)
    assert rendered["tokenizer"] == "<s>[user]Why is the sky blue?</s>[assistant]"


def _llama2_style_tokenizer(path, legacy: bool):
    """A sentencepiece-style Llama-2 tokenizer (BPE with byte fallback, '▁' for spaces and before the text), as
    transformers reads Llama-2's files: with `legacy` as its tokenizer_config.json says."""
    from tokenizers import Tokenizer, decoders, models, normalizers, processors, trainers

    from engine.tokenizer import ASSETS_DIR

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    with open(os.path.join(ASSETS_DIR, "corpus.txt"), encoding="utf-8") as f:
        lines = f.read().splitlines() + ["<|user|>\nhello\n<|assistant|>\n", "<|system|>\n"] * 5
    tok.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=600, special_tokens=specials, show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    os.makedirs(path, exist_ok=True)
    tok.save(os.path.join(path, "tokenizer.json"))
    config = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
              "add_bos_token": True, "add_eos_token": False, "legacy": legacy}  # fmt: skip
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump(config, f)
    return str(path)


@pytest.mark.parametrize("kind", ["tiny", "llama2_legacy", "llama2"])
def test_the_saved_tulu_template_encodes_as_the_run_did(tmp_path, kind):
    """A saved policy's tokenizer (its files as save_pretrained writes them: the Tulu template
    (tulu_chat_template), and PreTrainedTokenizerFast named as the class of a tokenizer transformers 5 would rebuild)
    gives, read by transformers' AutoTokenizer itself, through apply_chat_template the very ids its run's prompts
    had, for a byte-level BPE and for sentencepiece-style Llama-2 tokenizers with and without their legacy flag
    (read as LlamaTokenizer, transformers 5 took the '▁' off '<|user|>' after the BOS written as text, and off the
    text after an earlier answer's '</s>')."""
    from transformers import AutoTokenizer

    from engine.checkpoint import save_pretrained
    from engine.config import ModelConfig
    from engine.model import Transformer

    src = TINY_DIR if kind == "tiny" else _llama2_style_tokenizer(tmp_path / "src", legacy=kind == "llama2_legacy")
    tok = load_tokenizer(src)
    template = tulu_chat_template(tok)
    assert template == TULU_CHAT_TEMPLATE
    saved = tmp_path / "saved"
    model = Transformer(ModelConfig.named("tiny")).init_weights(seed=1)
    save_pretrained(model, saved, tokenizer_dir=src, chat_template=template)
    cls = json.loads((saved / "tokenizer_config.json").read_text()).get("tokenizer_class")
    assert (cls == "PreTrainedTokenizerFast") == (kind != "tiny"), cls
    again = AutoTokenizer.from_pretrained(saved, local_files_only=True)
    tulu = load_prompts(TINY_PROMPTS, again, verbose=False)
    own = load_prompts(TINY_PROMPTS, again, verbose=False, template="tokenizer")
    assert own.prompts == tulu.prompts == load_prompts(TINY_PROMPTS, tok, verbose=False).prompts
    for probe in TEMPLATE_PROBES:
        assert template_ids(again, probe) == encode_chat(tok, probe)


def test_a_save_names_the_class_from_what_load_tokenizer_learned(tmp_path, monkeypatch):
    """A checkpoint save does not load its tokenizer again to decide its class (the run's load_tokenizer found it, for
    these very files); files changed since are read again; files transformers cannot read are copied as they are,
    with a warning naming the directory, and the weights are saved all the same."""
    import transformers

    from engine.checkpoint import save_pretrained
    from engine.model import Transformer

    src = _llama2_style_tokenizer(tmp_path / "src", legacy=False)
    load_tokenizer(src)
    model = Transformer(ModelConfig.named("tiny")).init_weights(seed=1)
    real = transformers.AutoTokenizer.from_pretrained
    loads = []
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: loads.append(a) or real(*a, **k))

    def saved_class(name):
        save_pretrained(model, tmp_path / name, tokenizer_dir=src)
        return json.loads((tmp_path / name / "tokenizer_config.json").read_text()).get("tokenizer_class")

    assert saved_class("a") == "PreTrainedTokenizerFast" and loads == []
    cfg_fn = Path(src) / "tokenizer_config.json"  # (now naming the class that reads the file as it is)
    cfg_fn.write_text(json.dumps({**json.loads(cfg_fn.read_text()), "tokenizer_class": "PreTrainedTokenizerFast"}))
    assert saved_class("b") == "PreTrainedTokenizerFast" and len(loads) == 1
    cfg_fn.write_text(json.dumps({**json.loads(cfg_fn.read_text()), "tokenizer_class": "LlamaTokenizer", "pad": 1}))
    (Path(src) / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "Broken"')  # (cut short)
    with pytest.warns(UserWarning, match=f"tokenizer files of {src} were copied as they are"):
        assert saved_class("c") == "LlamaTokenizer"
    assert (tmp_path / "c" / "model.safetensors").is_file()


@pytest.mark.parametrize("legacy", [None, True, False])
def test_a_llama2_tokenizer_splits_text_as_its_tokenizer_json_does(tmp_path, legacy):
    """A sentencepiece-style Llama-2 tokenizer (tokenizer_class LlamaTokenizer; a "legacy" flag of either value, or
    none) splits a prompt as its tokenizer.json does, as sentencepiece (EasyLM's tokenizer) and transformers 4 did:
    '▁' before the text after every special token. transformers 5 rebuilds such a tokenizer (Metaspace, '▁' before
    the string's first piece only): a multi-turn prompt lost the '▁' after the earlier answer's '</s>', and a question
    quoting '<s>old</s>' the ones after those tokens."""
    from tokenizers import Tokenizer

    src = _llama2_style_tokenizer(tmp_path / "src", legacy=legacy)
    if legacy is None:
        cfg = json.loads((tmp_path / "src" / "tokenizer_config.json").read_text())
        del cfg["legacy"]
        (tmp_path / "src" / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = load_tokenizer(src)
    shipped = Tokenizer.from_file(str(tmp_path / "src" / "tokenizer.json"))
    for messages in (
        [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": "why"},
        ],
        [{"role": "user", "content": "Why does <s>old</s> markup render?"}],
    ):
        want = shipped.encode(format_chat(messages, "</s>")).ids
        assert encode_chat(tok, messages) == want, (tok.convert_ids_to_tokens(encode_chat(tok, messages)), want)
    assert (tok.bos_token_id, tok.eos_token_id) == (1, 2)


def test_a_prompt_file_may_start_with_a_byte_order_mark(tmp_path):
    p = tmp_path / "p.jsonl"
    p.write_bytes(b"\xef\xbb\xbf" + json.dumps({"prompt": "one"}).encode() + b"\n" + b'{"prompt": "two"}\n')
    assert [c[0]["content"] for c in read_prompt_file(p)] == ["one", "two"]


def test_a_prompt_of_exactly_the_limit_is_kept(tmp_path):
    """Only prompts longer than --max-prompt-len are dropped."""
    tok = load_tokenizer()
    n = len(encode_chat(tok, [{"role": "user", "content": "exactly"}]))
    p = tmp_path / "p.jsonl"
    p.write_text(json.dumps({"prompt": "exactly"}) + "\n")
    kept = load_prompts(p, tok, max_prompt_len=n, verbose=False)
    assert kept.dropped == 0 and len(kept.prompts[0]) == n
    with pytest.raises(ValueError, match="longer than"):
        load_prompts(p, tok, max_prompt_len=n - 1, verbose=False)


@pytest.mark.parametrize("indent", [None, 2])
def test_a_json_array_file_is_refused_by_name(tmp_path, indent):
    """A .json file holding one array of prompt objects (json.dump, pretty-printed or not) is valid JSON but no JSONL:
    it is refused as an array, not called malformed."""
    p = tmp_path / "p.json"
    p.write_text(json.dumps([{"prompt": "a"}, {"prompt": "b"}], indent=indent))
    with pytest.raises(ValueError, match=r"p\.json:1: a JSON array where a JSON object should be: .* not one array"):
        read_prompt_file(p)


def test_a_pretty_printed_json_object_file_is_refused_by_name(tmp_path):
    """A .json file of one object over several lines (json.dump with indent) is valid JSON but no JSONL: refused as
    such, not called malformed at its line 1; a malformed object on one line is still called malformed."""
    p = tmp_path / "p.json"
    p.write_text(json.dumps({"prompt": "a"}, indent=2))
    with pytest.raises(ValueError, match=r"p\.json:1: a JSON object that does not end on its line \(a pretty-printed "):
        read_prompt_file(p)
    p.write_text('{"prompt": "a",}\n')
    with pytest.raises(ValueError, match=r"p\.json:1: malformed JSON"):
        read_prompt_file(p)
    p.write_text('{"prompt": "a"} x\n')  # (a whole object, then junk: malformed there, no object over many lines)
    with pytest.raises(ValueError, match=r"p\.json:1: malformed JSON \(Extra data.* column 17"):
        read_prompt_file(p)


@pytest.mark.parametrize("template", ["tulu", "tokenizer"])
def test_an_unpaired_surrogate_escape_is_refused_by_line(tmp_path, tok, template):
    """JSON may escape half of a surrogate pair ("\\ud83d" alone: an emoji cut in two); json reads it into a string no
    tokenizer takes. The file and line are named, not a TypeError of the tokenizers library."""
    p = tmp_path / "p.jsonl"
    p.write_text('{"prompt": "fine \\ud83d\\ude42"}\n{"messages": [{"role": "user", "content": "cut \\ud83d"}]}\n')
    with pytest.raises(ValueError, match=r"p\.jsonl:2: a user turn holds an unpaired surrogate \(\\ud83d\)"):
        load_prompts(p, tok, verbose=False, template=template)


def test_the_answer_after_the_last_user_turn_is_not_read(tmp_path):
    """A conversation's answer is cut off, so its content is not checked: an answer of null (a missing value) or of
    parts neither refuses the line nor, beside a "prompt" string, silently loses the turns before the question."""
    turns = [{"role": r, "content": c} for r, c in (("user", "q1"), ("assistant", "a1"), ("user", "q2"))]
    rows = [{"prompt": "q2", "chosen": turns + [{"role": "assistant", "content": None}]}]
    rows += [{"chosen": turns + [{"role": "assistant", "content": [{"type": "text", "text": "a2"}]}]}]
    p = tmp_path / "p.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert read_prompt_file(p) == [turns, turns]


def test_the_turns_after_the_last_user_turn_may_be_of_any_role(tmp_path):
    """An answer that called a tool (an assistant turn with tool_calls, the tool's turn, the final answer) is cut off
    with the rest: its roles do not refuse the line, as they are never rendered. A role before the question still
    does."""
    question = [{"role": "user", "content": "What is 6 x 7?"}]
    call = {"role": "assistant", "content": None, "tool_calls": [{"type": "function", "function": {"name": "calc"}}]}
    answer = [call, {"role": "tool", "content": "42"}, {"role": "assistant", "content": "42."}]
    p = tmp_path / "p.jsonl"
    p.write_text(json.dumps({"messages": question + answer}) + "\n")
    assert read_prompt_file(p) == [question]
    p.write_text(json.dumps({"messages": answer[1:2] + question}) + "\n")
    with pytest.raises(ValueError, match=r"p\.jsonl:1: each message needs a role in .* got \{'role': 'tool'"):
        read_prompt_file(p)


def test_an_empty_prompt_string_beside_a_conversation_takes_the_conversation(tmp_path):
    """A preference line whose "prompt" string is empty (a placeholder) reads its conversation, as a line without the
    string does: not refused as an empty prompt while the question is right there."""
    q = [{"role": "user", "content": "q"}]
    rows = [{"prompt": "", "chosen": q + [{"role": "assistant", "content": "a"}]}, {"prompt": " ", "messages": q}]
    p = tmp_path / "p.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert read_prompt_file(p) == [q, q]


def test_dropped_prompts_take_their_messages_and_lengths_with_them(tmp_path, tok):
    """A prompt dropped as too long leaves the set whole: the kept prompts' messages and lengths are theirs, not the
    file's first lines' (the messages read at a held-out prompt's side would be another prompt's text)."""
    p = tmp_path / "p.jsonl"
    texts = ["long " * 400, "first kept", "long " * 300, "second kept"]
    p.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))
    ps = load_prompts(p, tok, max_prompt_len=64, verbose=False)
    assert ps.dropped == 2 and [m[-1]["content"] for m in ps.messages] == ["first kept", "second kept"]
    assert ps.prompts == [encode_chat(tok, m) for m in ps.messages] and ps.lengths == [len(x) for x in ps.prompts]
    rest, held = ps.hold_out(1, seed=0)
    for part in (rest, held):
        assert part.prompts == [encode_chat(tok, m) for m in part.messages]


def test_prompts_are_tokenised_in_batches_as_one_at_a_time(tmp_path, tok, monkeypatch):
    """load_prompts encodes the rendered prompts in batches (a fast tokenizer spreads a batch over the host's cores):
    each prompt gets the ids the tokenizer gives it alone, across chunk boundaries, with prompts over the limit
    dropped in their place, for both templates."""
    shutil.copytree(TINY_DIR, tmp_path / "tok")
    (tmp_path / "tok" / "chat_template.jinja").write_text(LLAMA3_STYLE)
    other = load_tokenizer(tmp_path / "tok")
    texts = [("word " * n).strip() + f" ünï {n}?" for n in (1, 40, 3, 200, 7, 0, 25, 90)]
    p = tmp_path / "p.jsonl"
    p.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))
    monkeypatch.setattr(tokenizer_mod, "ENCODE_CHUNK", 3)
    for template, special in (("tulu", True), ("tokenizer", False)):
        alone = [
            other(render_chat(other, [{"role": "user", "content": t}], template), add_special_tokens=special)[
                "input_ids"
            ]
            for t in texts
        ]
        assert len({len(a) for a in alone}) == len(texts)  # (lengths that differ: a batch is not padded)
        limit = sorted(len(a) for a in alone)[-3]  # (drops the two longest)
        ps = load_prompts(p, other, max_prompt_len=limit, verbose=False, template=template)
        assert ps.prompts == [a for a in alone if len(a) <= limit] and ps.dropped == 2
        assert [m[-1]["content"] for m in ps.messages] == [t for t, a in zip(texts, alone) if len(a) <= limit]


def test_a_prompt_string_beside_a_system_turn_and_question_keeps_the_system_turn(tmp_path):
    """A line with a "prompt" string and a conversation of a system turn and the question: the conversation (the
    string alone would lose the system turn), as with earlier exchanges."""
    turns = [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "q"}]
    p = tmp_path / "p.jsonl"
    p.write_text(json.dumps({"prompt": "q", "messages": turns}) + "\n")
    assert read_prompt_file(p) == [turns]


@pytest.mark.parametrize("content", [None, [{"type": "text", "text": "q"}], 3])
def test_a_last_user_turn_without_string_content_is_refused_by_line(tmp_path, content):
    """The question itself must be text: a null or a list of parts is named with its line (not an AttributeError
    from inside), while an answer after it is not read."""
    p = tmp_path / "p.jsonl"
    p.write_text(json.dumps({"prompt": "ok"}) + "\n" + json.dumps({"messages": [{"role": "user", "content": content}]}))
    with pytest.raises(ValueError, match=r"p\.jsonl:2: each message needs a role in .* and a string content"):
        read_prompt_file(p)


def test_a_tokenizer_that_adds_no_bos_gets_no_bos_warning(tmp_path, capsys):
    """The missing-BOS warning is for a tokenizer that adds BOS to plain text: one that adds none (its template
    leaving BOS out as well) is not warned about."""
    d = _tokenizer_copy(tmp_path / "no_bos", _no_bos)
    with open(os.path.join(d, "chat_template.jinja"), "w") as f:
        f.write("{% for m in messages %}{{ '<|user|>\\n' + m['content'] + '\\n' }}{% endfor %}{{ '<|assistant|>\\n' }}")
    other = load_tokenizer(d)
    assert other("x")["input_ids"][:1] != [other.bos_token_id]  # (it adds no BOS)
    ps = load_prompts(TINY_PROMPTS, other, template="tokenizer")
    assert ps.prompts[0][0] != other.bos_token_id and "warning" not in capsys.readouterr().out


def test_held_out_prompts_keep_the_files_order():
    """The evaluation set drawn by hold_out is in the file's order, as the rest is (a seeded permutation picks
    which prompts, not their order)."""
    from engine.tokenizer import PromptSet

    prompts = [[q, q + 1] for q in range(30)]
    rest, held = PromptSet(prompts, [[{"role": "user", "content": str(p)}] for p in prompts]).hold_out(10, seed=3)
    assert held.prompts == sorted(held.prompts) and rest.prompts == sorted(rest.prompts)
    assert held.messages == [[{"role": "user", "content": str(p)}] for p in held.prompts]


def test_a_tokenizer_without_eos_stops_at_the_generation_configs_ids_alone(tmp_path):
    """No EOS in the tokenizer: the stop ids are generation_config.json's, with no None among them (the generator
    refuses a stop id that is no token id)."""
    from types import SimpleNamespace

    from engine.tokenizer import response_stop_ids

    no_eos = SimpleNamespace(eos_token_id=None)
    assert response_stop_ids(no_eos, tmp_path) == []
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 9]}))
    assert response_stop_ids(no_eos, tmp_path) == [7, 9]


def test_the_saved_template_without_a_generation_prompt_ends_after_the_last_turn(tok):
    """TULU_CHAT_TEMPLATE (saved with a policy) renders a whole conversation without the trailing '<|assistant|>\\n'
    when asked for no generation prompt (a chat to train on), as format_chat does."""
    msgs = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
    rendered = tok.apply_chat_template(msgs, chat_template=TULU_CHAT_TEMPLATE, tokenize=False)
    assert rendered == tok.bos_token + format_chat(msgs, tok.eos_token, add_generation_prompt=False)
    assert rendered.endswith("y" + tok.eos_token + "\n")


def test_a_tokenizer_template_rendering_that_ends_in_eos_keeps_it(tmp_path):
    """The EOS a tokenizer appends to the Tulu text is dropped (the prompt ends at the answer); a chat template's text
    is tokenised as it is, an EOS it prints at its end included (a template that ignores add_generation_prompt)."""
    shutil.copytree(TINY_DIR, tmp_path / "tok")
    (tmp_path / "tok" / "chat_template.jinja").write_text(LLAMA3_STYLE.split("{% if add_generation_prompt")[0])
    other = load_tokenizer(tmp_path / "tok")
    msgs = [{"role": "user", "content": "hi there"}]
    text = render_chat(other, msgs, "tokenizer")
    assert text.endswith(other.eos_token)
    ids = encode_chat(other, msgs, "tokenizer")
    assert ids == other(text, add_special_tokens=False)["input_ids"] and ids[-1] == other.eos_token_id


def test_unreadable_inputs_are_one_line_naming_the_path(tmp_path, monkeypatch):
    """A prompt file, config.json or tokenizer directory this user may not read: an InvalidInput naming it and why
    ("permission denied" where it is there: safetensors says "No such file" for that), not an OSError traceback,
    and not "no config.json" for a model directory that cannot be listed. (Tests run as root, who may read anything:
    the denial is simulated where a real one cannot be had.)"""
    from engine.config import ModelConfig, read_json
    from engine.errors import unreadable

    with pytest.raises(ValueError, match=rf"^cannot read the prompt file {tmp_path}: Is a directory$"):
        read_prompt_file(tmp_path)
    with pytest.raises(ValueError, match=rf"^cannot read {tmp_path}: Is a directory$"):
        read_json(str(tmp_path))

    def denied(path):
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(os, "listdir", denied)
    with pytest.raises(ValueError, match=rf"^cannot read the tokenizer directory {tmp_path}: Permission denied$"):
        load_tokenizer(tmp_path)
    monkeypatch.undo()
    model = tmp_path / "model"  # (a directory that cannot be searched: its config.json not to be seen)
    model.mkdir()
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    with pytest.raises(ValueError, match=rf"^cannot read the directory {model}: permission denied$"):
        ModelConfig.from_hf(str(model / "config.json"))
    (model / "config.json").write_text("{")  # (readable by name, as in a directory of mode 711: read, not refused)
    with pytest.raises(ValueError, match=r"config\.json is not valid JSON"):
        ModelConfig.from_hf(str(model / "config.json"))
    assert unreadable(str(model / "config.json"), FileNotFoundError(2, "No such file or directory")) == (
        "permission denied"
    )
    assert unreadable(str(tmp_path / "gone"), FileNotFoundError(2, "No such file or directory")) == (
        "No such file or directory"
    )


def test_a_prompt_file_with_no_prompt_within_the_limit_names_the_flag(tok):
    """Every prompt over --max-prompt-len: refused naming the file, the limit and the flag that sets it."""
    with pytest.raises(
        ValueError, match=r"every prompt in .*prompts_tiny\.jsonl is longer than 3 tokens \(--max-prompt"
    ):
        load_prompts(TINY_PROMPTS, tok, max_prompt_len=3, verbose=False)


def test_a_template_whose_turns_end_with_no_stop_id_is_warned_of(tmp_path, tok):
    """--chat-template tokenizer with a ChatML-style template whose assistant turns end with <|im_end|>, an added
    special token the stop ids lack: warned (a policy tuned on it would never stop: every response at the length
    limit, penalized); not where the ids hold it, where the turn ends with the EOS, or for the Tulu format."""
    from engine.tokenizer import end_of_turn_warning, response_stop_ids

    shutil.copytree(TINY_DIR, tmp_path / "tok")
    (tmp_path / "tok" / "chat_template.jinja").write_text(
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    chatml = load_tokenizer(tmp_path / "tok")
    chatml.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    end = chatml.convert_tokens_to_ids("<|im_end|>")
    stops = response_stop_ids(chatml)
    said = end_of_turn_warning(chatml, stops, "tokenizer")
    assert said == (
        f"warning: the chat template ends an assistant turn with <|im_end|> (id {end}), which is not among the ids "
        f"that end a response ({stops}): a policy tuned on it would write on to --max-new-tokens and take the "
        f"missing-EOS penalty; add {end} to eos_token_id in the policy's generation_config.json"
    )
    assert end_of_turn_warning(chatml, [*stops, end], "tokenizer") is None
    assert end_of_turn_warning(chatml, stops, "tulu") is None
    (tmp_path / "tok" / "chat_template.jinja").write_text(LLAMA3_STYLE)  # (turns end with the EOS)
    assert end_of_turn_warning(load_tokenizer(tmp_path / "tok"), response_stop_ids(tok), "tokenizer") is None
