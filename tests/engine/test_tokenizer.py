"""Tulu chat template, prompt files, and the shipped tiny tokenizer."""

import json

import pytest

from engine.config import ModelConfig
from engine.tokenizer import (
    TINY_PROMPTS,
    encode_chat,
    format_chat,
    load_prompts,
    load_tokenizer,
    read_prompt_file,
)


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


def test_jinja_template_matches_python_format(tok):
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "x"},
        {"role": "assistant", "content": "y"},
        {"role": "user", "content": "z z"},
    ]
    rendered = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert rendered == format_chat(msgs, tok.eos_token)


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
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    convs = read_prompt_file(p)
    assert convs[0] == [{"role": "user", "content": "one"}]
    assert convs[1] == [{"role": "user", "content": "two"}]
    assert [m["content"] for m in convs[2]] == ["q1", "a1", "q2"]  # up to the last user turn


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
        ('{"prompt": "ok"}\n{"prompt": "bad"\n', r"p\.jsonl:2: malformed JSON"),
        ('{"text": "x"}\n', r"p\.jsonl:1: needs a 'prompt' string"),
        ('{"messages": [{"role": "assistant", "content": "x"}]}\n', "no user turn"),
        ('{"messages": [{"role": "robot", "content": "x"}]}\n', "each message needs a role"),
        ('{"prompt": "   "}\n', "empty prompt"),
    ],
)
def test_prompt_file_errors(tmp_path, content, message):
    p = tmp_path / "p.jsonl"
    p.write_text(content)
    with pytest.raises(ValueError, match=message):
        read_prompt_file(p)


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
