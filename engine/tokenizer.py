"""HF tokenizer files, the Tulu chat template, and prompt files (JSONL).

Tulu's chat format (RECIPE.md, newlines matter):
    <|user|>\\n{prompt}\\n<|assistant|>\\n
Earlier assistant turns end with the EOS token and a newline. Prompts longer than the limit are
dropped, never truncated, and the number dropped is reported.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch

from engine.config import parse_json, read_json
from engine.errors import InputError, InvalidInput, MissingInput, first_line, named, unreadable

try:
    from jinja2 import TemplateError  # (what transformers renders chat templates with, and a template raises)

    HAVE_JINJA = True
except ImportError:  # (then no chat template renders at all: apply_chat_template says so)
    TemplateError, HAVE_JINJA = ImportError, False

ASSETS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
TINY_DIR = os.path.join(ASSETS_DIR, "tiny")  # the project's own small BPE tokenizer
TINY_PROMPTS = os.path.join(ASSETS_DIR, "prompts_tiny.jsonl")
TINY_EVAL_PROMPTS = os.path.join(ASSETS_DIR, "prompts_tiny_eval.jsonl")  # held out: none of them is in TINY_PROMPTS

# The same format as a Jinja chat template (with the BOS the engine's prompts start with), stored with tokenizers we
# build: `--chat-template tokenizer` then encodes exactly as the built-in Tulu format does. A saved policy gets the
# variant of it that encodes so with its tokenizer (tulu_chat_template).
TULU_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '<|system|>\n' + message['content'] | trim + '\n' }}"
    "{% elif message['role'] == 'user' %}{{ '<|user|>\n' + message['content'] | trim + '\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ '<|assistant|>\n' + message['content'] | trim + eos_token + '\n' }}"
    "{% endif %}"
    "{% if loop.last and add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
    "{% endfor %}"
)
ROLES = ("system", "user", "assistant")
# How prompts become tokens: "tulu" (the recipe's format above, the tokenizer's BOS first) or "tokenizer" (the
# tokenizer's own chat_template, e.g. Llama 3.1 Instruct's, rendered with the generation prompt and tokenised as
# it is: the template places BOS and every special token, as transformers' apply_chat_template does)
CHAT_TEMPLATES = ("tulu", "tokenizer")
# The date a template that prints one sees (Llama 3.x's "Today Date:"; the fallback their own templates use): today's
# would make the same prompt file other tokens on another day, and a resume or an --eval-only a day later differ
TEMPLATE_DATE = "26 Jul 2024"


# the JSON files transformers reads a tokenizer's settings from beside tokenizer.json (tokenizer_config.json,
# special_tokens_map.json, added_tokens.json, chat_template.json)
TOKENIZER_JSON_FILES = ("tokenizer_config", "special_tokens_map", "added_tokens", "chat_template")


def load_tokenizer(path: str | os.PathLike = TINY_DIR):
    """An HF fast tokenizer from local files (tokenizer.json / tokenizer_config.json); never downloads. A tokenizer.json
    splits text as the file says: where transformers would rebuild its pipeline from the tokenizer's class
    (rebuilt_by_transformers), the file is read as it is (PreTrainedTokenizerFast, tokenizer_config.json's special
    tokens, added tokens and chat template as before)."""
    from transformers import AutoTokenizer

    path = os.fspath(path)
    if not os.path.isdir(path):
        raise MissingInput(f"tokenizer directory {path} does not exist")
    try:
        listed = os.listdir(path)
    except OSError as e:  # (no permission: one line naming the directory)
        raise InvalidInput(f"cannot read the tokenizer directory {path}: {unreadable(path, e)}") from e
    if not {"tokenizer.json", "tokenizer.model", "vocab.json"} & set(listed):
        raise MissingInput(
            f"{path} holds no tokenizer (no tokenizer.json): pass --tokenizer with the directory of the model's "
            "tokenizer files (a checkpoint of this engine has them beside its policy's weights)"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        rebuilt = _REBUILT[_files_key(path)] = rebuilt_by_transformers(tokenizer, path)
        if not rebuilt:
            return tokenizer
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast.from_pretrained(path, local_files_only=True)
    except Exception as e:
        listed = os.listdir(path)
        for fn in sorted(n for n in listed if n.endswith(".json") and n.startswith(TOKENIZER_JSON_FILES)):
            read_json(os.path.join(path, fn))  # (one cut short or mis-edited is named: transformers' error names none)
        if "tokenizer.json" in listed:  # (a damaged one: the tokenizers library's parse error names no file)
            raise InvalidInput(
                f"transformers cannot load the tokenizer in {path} ({type(e).__name__}: {first_line(e)}): is its "
                "tokenizer.json whole?"
            ) from e
        if "tokenizer.model" not in listed:
            if "vocab.json" in listed and "merges.txt" not in listed:  # (transformers' message names neither file)
                raise InvalidInput(
                    f"tokenizer directory {path} has a BPE vocab.json but no merges.txt beside it (a BPE tokenizer "
                    "needs both, or a tokenizer.json): copy the model's merges.txt or tokenizer.json into it"
                ) from e
            raise InvalidInput(
                f"transformers cannot load the tokenizer in {path} ({type(e).__name__}: {first_line(e)})"
            ) from e
        # Only a SentencePiece model: transformers would have to convert it (with sentencepiece and protobuf),
        # and a converted tokenizer can split text differently from the one the model was trained with.
        why = (str(e).strip().splitlines() or [""])[-1]  # (transformers' last line says what is missing)
        raise InvalidInput(
            f"tokenizer directory {path} has tokenizer.model but no tokenizer.json, and transformers could not "
            f"build a fast tokenizer from it ({type(e).__name__}: {why}); copy the "
            "tokenizer.json the model was trained with (Llama-2 checkpoints ship one) into it"
        ) from e


SPLITTING = ("normalizer", "pre_tokenizer", "model")  # the parts of a tokenizer.json that decide the ids of a text


def rebuilt_by_transformers(tokenizer, path: str) -> bool:
    """Whether transformers built `tokenizer` (read from directory `path`) with another normalizer, pre-tokenizer or
    model than `path`'s tokenizer.json has. transformers 5 rebuilds a sentencepiece-style Llama tokenizer (Llama-2's
    tokenizer_class LlamaTokenizer) from its class and the `legacy` flag: '▁' before the string's first piece only,
    where the file, sentencepiece (Meta's and EasyLM's tokenizers) and transformers 4 put one before the text after
    every special token: a multi-turn prompt ('</s>' then the next '<|user|>') or a question quoting '<s>' or '</s>'
    would be other ids than the model was trained on."""
    fn = os.path.join(path, "tokenizer.json")
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not os.path.isfile(fn):
        return False
    shipped, built = read_json(fn), json.loads(backend.to_str())
    return any(shipped.get(k) != built.get(k) for k in SPLITTING)


# rebuilt_by_transformers of a tokenizer directory, as load_tokenizer (or read_as_shipped) found it, per version of
# its files (_files_key): a checkpoint save asks at every save and need not load the tokenizer again
_REBUILT: dict[tuple, bool] = {}


def _files_key(path: str) -> tuple:
    key: list = [os.path.realpath(path)]
    for fn in ("tokenizer.json", *(f"{n}.json" for n in TOKENIZER_JSON_FILES)):
        try:
            st = os.stat(os.path.join(path, fn))
            key.append((fn, st.st_size, st.st_mtime_ns))
        except FileNotFoundError:
            key.append((fn, None))
    return tuple(key)


def read_as_shipped(path: str | os.PathLike) -> bool:
    """Whether directory `path`'s tokenizer must be read as PreTrainedTokenizerFast to split text as its tokenizer.json
    does (rebuilt_by_transformers): what load_tokenizer found reading these very files, else read now."""
    path = os.fspath(path)
    key = _files_key(path)
    if key not in _REBUILT:
        from transformers import AutoTokenizer

        _REBUILT[key] = rebuilt_by_transformers(AutoTokenizer.from_pretrained(path, local_files_only=True), path)
    return _REBUILT[key]


def response_stop_ids(tokenizer, policy_dir: str | os.PathLike | None = None) -> list[int]:
    """The token ids that end a response: the tokenizer's EOS and those of the policy checkpoint's
    generation_config.json (where transformers' generate stops; the generator adds config.json's own)."""
    from engine.checkpoint import generation_eos_ids

    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    return ids + [i for i in generation_eos_ids(policy_dir) if i not in ids]


PROBE = [{"role": "user", "content": "Résumé of 12 tests:\n\tWhy?  ü  — 東京 🙂 def f(x): return x**2"}]


def end_of_turn_warning(tokenizer, stop_ids: list[int], template: str) -> str | None:
    """The warning a run prints where --chat-template tokenizer's template ends an assistant turn with a special token
    (ChatML's <|im_end|>, say) that is not among the response stop ids: a policy tuned on that template ends its
    answers with it and would write on to --max-new-tokens, each response taking the missing-EOS penalty. None where
    the template ends a turn with a stop id, or with no special token the engine can tell."""
    if template != "tokenizer":
        return None
    marker = "Zq7 answer Xv9"
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": marker}]
    try:
        text = tokenizer.apply_chat_template(chat, tokenize=False, date_string=TEMPLATE_DATE)
    except Exception:  # (a template that takes no assistant turn: nothing to tell)
        return None
    if marker not in text:
        return None
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    after = tokenizer(text[text.index(marker) + len(marker) :], add_special_tokens=False)["input_ids"]
    end = next((i for i in after if i in special), None)
    if end is None or end in stop_ids:
        return None
    name = tokenizer.convert_ids_to_tokens(end)
    return (
        f"warning: the chat template ends an assistant turn with {name} (id {end}), which is not among the ids that "
        f"end a response ({stop_ids}): a policy tuned on it would write on to --max-new-tokens and take the "
        f"missing-EOS penalty; add {end} to eos_token_id in the policy's generation_config.json"
    )


def check_vocabularies(tokenizer, tokenizer_dir: str, models: dict[str, tuple[str, int]], prompts) -> list[str]:
    """Refuse, before any weight is read, models that cannot share the run's `tokenizer` (from `tokenizer_dir`):
    `models` maps each role ("policy", "reference", "reward") to (its checkpoint directory, its config's vocab_size);
    `prompts` are the tokenised prompt sets. Every prompt id and the EOS must be in every model's vocabulary; the
    reference and the reward model (the value model's start) must embed every id the policy can sample; and a
    reference or reward checkpoint (not the policy's directory) that ships a tokenizer.json must map every ordinary
    token they share to the same id and split a probe chat alike (the reward model would otherwise score other text
    than the policy wrote, silently); one that ships other tokenizer files (vocab.json and merges.txt, a SentencePiece
    tokenizer.model) must map tokens alike, and one whose files cannot be read is warned of. Special and added tokens
    (renamed reserved tokens, an added pad) are not compared; a different choice of special tokens around a text
    (BOS, an appended EOS) is returned as a warning: the engine feeds every model the run's tokens."""
    policy_dir, policy_vocab = models["policy"]
    for role, (path, vocab) in models.items():
        if role != "policy" and vocab < policy_vocab:
            raise InvalidInput(
                f"the {role} model's vocabulary ({path}: vocab_size {vocab}) is smaller than the policy's "
                f"({policy_vocab}): it could not read every token the policy samples; it needs the policy's tokenizer"
            )
    smallest = min(v for _, v in models.values())
    ids = [max(max(p) for p in ps) for ps in prompts if ps]
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    if ids and max(ids) >= smallest:
        role = min(models, key=lambda r: models[r][1])
        outside = f"outside the {role} model's vocabulary ({models[role][0]}: vocab_size {smallest})"
        if max(ids) == tokenizer.eos_token_id:
            raise InvalidInput(f"the run's tokenizer ({tokenizer_dir}) gives the EOS token id {max(ids)}, {outside}: "
                               "the tokenizer is not this model's")  # fmt: skip
        p, at = next((p, p.index(t)) for ps in prompts for p in ps for t in p if t >= smallest)
        token = tokenizer.convert_ids_to_tokens(p[at])
        added = (
            " (an added token: its text in a prompt is read as it)" if p[at] in tokenizer.added_tokens_decoder else ""
        )
        raise InvalidInput(
            f"the run's tokenizer ({tokenizer_dir}) gives a prompt token id {p[at]} {token!r}{added}, {outside}, in "
            f"the prompt {tokenizer.decode(p[max(0, at - 12) : at + 4])!r}...: the tokenizer is not this model's, or "
            "has tokens the model has no embedding for (remove the prompts that hold their text)"
        )
    warnings, skip = [], {os.path.realpath(tokenizer_dir), os.path.realpath(policy_dir)}
    for role, (path, _) in models.items():
        try:
            files = set(os.listdir(path)) if os.path.isdir(path) else set()
        except OSError:  # (a directory this user may not list: its weights' loading names it)
            files = set()
        if os.path.realpath(path) in skip or not {"tokenizer.json", "tokenizer.model", "vocab.json"} & files:
            continue  # (the run's or the policy's own files, or none)
        try:
            other = load_tokenizer(path)
        except InputError as e:  # (a SentencePiece model transformers cannot convert here, say)
            warnings.append(f"the {role} model's tokenizer files ({path}) cannot be read, so its vocabulary is not "
                            f"compared with the run's: {e}")  # fmt: skip
            continue
        n = min(len(tokenizer), len(other))
        special = {i for t in (tokenizer, other) for i in (*t.all_special_ids, *t.added_tokens_decoder)}
        mine, theirs = tokenizer.convert_ids_to_tokens(range(n)), other.convert_ids_to_tokens(range(n))
        bad = next((i for i in range(n) if mine[i] != theirs[i] and i not in special), None)
        if bad is not None:
            raise InvalidInput(
                f"the {role} model's tokenizer ({path}) maps id {bad} to {theirs[bad]!r} where the run's tokenizer "
                f"({tokenizer_dir}) has {mine[bad]!r}: the models read tokens as different text; use models trained "
                "with one tokenizer (or --tokenizer, if the policy's own files are the wrong ones)"
            )
        text = format_chat(PROBE, tokenizer.eos_token or "")
        a, b = (t(text, add_special_tokens=False)["input_ids"] for t in (tokenizer, other))
        if a != b and "tokenizer.json" not in files:  # (built by transformers from other files: it may split apart)
            at = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            warnings.append(f"the {role} model's tokenizer ({path}), which transformers builds from files other than a "
                            f"tokenizer.json, splits a chat prompt differently from the run's ({tokenizer_dir}): first "
                            f"at token {at} ({b[at : at + 4]} against {a[at : at + 4]}); the engine feeds every model "
                            "the run's tokens, so check that model was trained with them")  # fmt: skip
            continue
        if a != b:
            at = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            raise InvalidInput(
                f"the {role} model's tokenizer ({path}) splits a chat prompt differently from the run's tokenizer "
                f"({tokenizer_dir}): {len(b)} tokens against {len(a)}, first differing at token {at} ({b[at : at + 4]} "
                f"against {a[at : at + 4]}); use models trained with one tokenizer"
            )
        if encode_chat(tokenizer, PROBE) != encode_chat(other, PROBE):
            warnings.append(
                f"the {role} model's tokenizer ({path}) adds other special tokens around a text (BOS, EOS) than the "
                f"run's ({tokenizer_dir}); the engine feeds every model the run's tokens"
            )
    return warnings


def format_chat(messages: list[dict], eos_token: str, add_generation_prompt: bool = True) -> str:
    """Render messages in the Tulu format; ends with '<|assistant|>\\n' for generation. Each turn's text is stripped
    of the whitespace around it, as the code that trained Tulu 2.5 (EasyLM's TuluPromptDataset, and its reward
    models' PreferenceDataset) does: a question ending in a newline is not given a blank line before the answer."""
    parts = []
    for m in messages:
        role, content = m["role"], m["content"].strip()
        if role == "system":
            parts.append(f"<|system|>\n{content}\n")
        elif role == "user":
            parts.append(f"<|user|>\n{content}\n")
        elif role == "assistant":
            parts.append(f"<|assistant|>\n{content}{eos_token}\n")
        else:
            raise InvalidInput(f"unknown chat role {role!r} (expected one of {', '.join(ROLES)})")
    if add_generation_prompt:
        parts.append("<|assistant|>\n")
    return "".join(parts)


def encode_chat(tokenizer, messages: list[dict], template: str = "tulu") -> list[int]:
    """Token ids of a prompt ending where the assistant's answer starts: in the Tulu format with the tokenizer's BOS
    as it adds it, or (template "tokenizer") through the tokenizer's own chat_template (see CHAT_TEMPLATES)."""
    return encode_chat_texts(tokenizer, [render_chat(tokenizer, messages, template)], template)[0]


def render_chat(tokenizer, messages: list[dict], template: str = "tulu") -> str:
    """The text encode_chat tokenises: the Tulu format (without the BOS, which the tokenizer adds), or the tokenizer's
    own chat template's rendering (BOS and special tokens as the template places them)."""
    if template == "tulu":
        return format_chat(messages, tokenizer.eos_token or "")
    check_chat_template(tokenizer, template)
    for m in messages:
        if m.get("role") not in ROLES:
            raise InvalidInput(f"unknown chat role {m.get('role')!r} (expected one of {', '.join(ROLES)})")
    try:
        text = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, date_string=TEMPLATE_DATE
        )
    except (TemplateError, ValueError, KeyError, TypeError) as e:  # (a template's raise_exception, its own errors)
        raise InvalidInput(f"the chat template failed on this prompt: {first_line(e)}") from e
    # (without a user turn, a system prompt alone, there is no question to look for)
    question = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "").strip()
    if question not in text:  # (a template for other keys, ShareGPT's from/value: Jinja prints a missing one as "")
        raise InvalidInput(
            f"the chat template printed this prompt without the text of its last user turn ({question[:40]!r}): "
            "does it read other keys than a message's 'role' and 'content'? (use --chat-template tulu, or a "
            "tokenizer whose template prints them)"
        )
    return text


ENCODE_CHUNK = 1024  # texts per call of the tokenizer (a fast tokenizer encodes a batch on all the host's cores)


def encode_chat_texts(tokenizer, texts: list[str], template: str = "tulu") -> list[list[int]]:
    """Token ids of render_chat's texts, in batches: the Tulu format with the special tokens the tokenizer adds (less
    an EOS it appends, Llama's add_eos_token: the prompt ends at the answer), a chat template's text as it is."""
    tulu = template == "tulu"
    eos = tokenizer.eos_token_id
    out: list[list[int]] = []
    for i in range(0, len(texts), ENCODE_CHUNK):
        enc = tokenizer(texts[i : i + ENCODE_CHUNK], add_special_tokens=tulu, return_attention_mask=False)
        for ids in enc["input_ids"]:
            ids = list(ids)
            if tulu and ids and eos is not None and ids[-1] == eos:
                ids = ids[:-1]
            out.append(ids)
    return out


# Conversations a saved Tulu template is checked on: one turn, and a system turn and an exchange before the question
TEMPLATE_PROBES = (
    [{"role": "user", "content": "Why is the sky blue?"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "  Two words,\n\tplease."},
    ],
)


def template_ids(tokenizer, messages: list[dict], template: str | None = None) -> list[int]:
    """What transformers' apply_chat_template(tokenize=True) gives for a prompt (the tokenizer's own template, or
    `template`): ids in 4.x, a BatchEncoding in 5.x."""
    out = tokenizer.apply_chat_template(
        messages, chat_template=template, add_generation_prompt=True, tokenize=True, date_string=TEMPLATE_DATE
    )
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def tulu_chat_template(tokenizer) -> str | None:
    """The Tulu format as a chat template that apply_chat_template turns into exactly the ids the run's prompts had
    (encode_chat "tulu", checked on TEMPLATE_PROBES), or None when no variant does.

    The template writes the BOS as text and is tokenised without special tokens added: a byte-level BPE (Llama 3's,
    the shipped one) and a sentencepiece-style Llama-2 tokenizer read as its tokenizer.json has it (load_tokenizer)
    then encode the text after the BOS as they encode the start of a string; one that puts '▁' only before the
    string's first piece (transformers 5's rebuilt LlamaTokenizer) would give '<|user|>' after the BOS no '▁': the
    variant with a space there, which becomes that '▁'."""
    if not HAVE_JINJA:  # (then no template can be rendered here, nor checked)
        return None
    want = [encode_chat(tokenizer, m) for m in TEMPLATE_PROBES]
    for lead in ("", " "):
        template = TULU_CHAT_TEMPLATE.replace("{{ bos_token }}", "{{ bos_token }}" + lead, 1)
        try:
            if [template_ids(tokenizer, m, template) for m in TEMPLATE_PROBES] == want:
                return template
        except TemplateError:  # (a template this tokenizer cannot render: not this variant)
            continue
    return None


def check_chat_template(tokenizer, template: str) -> None:
    """Refuse an unknown --chat-template, or "tokenizer" with a tokenizer that has no chat_template."""
    if template not in CHAT_TEMPLATES:
        raise InvalidInput(f"chat template {template!r} is not one of {', '.join(CHAT_TEMPLATES)}")
    if template == "tokenizer" and not getattr(tokenizer, "chat_template", None):
        raise InvalidInput(
            f"--chat-template tokenizer: the tokenizer ({tokenizer.name_or_path}) has no chat_template (in "
            "tokenizer_config.json or chat_template.jinja); use --chat-template tulu or a tokenizer that has one"
        )


def prompt_messages(obj: dict, where: str) -> list[dict]:
    """The conversation up to (and including) the last user turn, from one JSONL object.

    Accepts {"prompt": str}, {"messages": [...]}, a preference pair's {"chosen": [...]} (the whole conversation, the
    answer included) or TRL's conversational {"prompt": [...]} (the turns before the answers). A line with both a
    "prompt" string and a conversation takes the string, unless the conversation holds earlier turns before its last
    user turn, or the string is empty: then the conversation, whose context the string alone would lose.
    """
    if not isinstance(obj, dict):
        raise InvalidInput(f"{where}: expected a JSON object, got {type(obj).__name__}")
    text = obj.get("prompt")
    conv = next((obj[k] for k in ("messages", "prompt", "chosen") if isinstance(obj.get(k), list)), None)
    if isinstance(text, str):
        if conv is not None:
            try:
                turns = _conversation(conv, where)
            except InvalidInput:
                turns = []  # a conversation in some other form: the string is the prompt
            if len(turns) > 1 or (turns and not text.strip()):  # (an empty string: a placeholder)
                return turns
        if not text.strip():
            raise InvalidInput(f"{where}: empty prompt")
        return [{"role": "user", "content": text}]
    if conv is None:
        raise InvalidInput(f"{where}: needs a 'prompt' string or a 'messages' (or 'chosen' or 'prompt') list")
    return _conversation(conv, where)


def _conversation(msgs: list, where: str) -> list[dict]:
    last_user = max((i for i, m in enumerate(msgs) if isinstance(m, dict) and m.get("role") == "user"), default=-1)
    # (the turns after the last user turn are cut off, neither read nor rendered: an answer's tool calls and tool
    # turns pass; without a user turn every role is checked, which names a file of other roles or keys)
    for i, m in enumerate(msgs[: last_user + 1] if last_user >= 0 else msgs):
        role_ok = isinstance(m, dict) and m.get("role") in ROLES
        if not role_ok or (i <= last_user and not isinstance(m.get("content"), str)):
            raise InvalidInput(f"{where}: each message needs a role in {ROLES} and a string content, got {m!r}")
    if last_user < 0:
        raise InvalidInput(f"{where}: the conversation has no user turn")
    if not msgs[last_user]["content"].strip():
        raise InvalidInput(f"{where}: the last user turn is empty")
    return msgs[: last_user + 1]


def _begins_whole(text: str) -> bool:
    """Whether `text` begins with a whole JSON value (text after it is malformed JSON, which parse_json names with its
    column, not an object cut over several lines)."""
    try:
        json.JSONDecoder().raw_decode(text)
    except ValueError:
        return False
    return True


def read_prompt_file(path: str | os.PathLike, lines: list[int] | None = None) -> list[list[dict]]:
    """Conversations (each a list of messages ending with a user turn) from a JSONL prompt file; `lines`, when given,
    gets each one's line number."""
    path = os.fspath(path)
    convs = []
    try:
        f = open(path, "rb")
    except OSError as e:  # (no permission: one line naming the file, not a traceback)
        raise InvalidInput(f"cannot read the prompt file {path}: {unreadable(path, e)}") from e
    with f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")  # (a byte order mark before line 1)
            except UnicodeDecodeError as e:
                what = (
                    "a compressed file" if lineno == 1 and raw[:2] == b"\x1f\x8b" else f"byte {e.start + 1} of the line"
                )
                raise InvalidInput(
                    f"{path}:{lineno}: not UTF-8 text ({what}): a prompt file is JSONL in UTF-8"
                ) from None
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            if not convs and line.lstrip().startswith("["):  # (a .json file of one array, maybe over many lines)
                raise InvalidInput(
                    f"{where}: a JSON array where a JSON object should be: a prompt file is JSON Lines, one object per "
                    "line, not one array of them (datasets' to_json writes JSON Lines)"
                )
            text = line.strip()
            if not convs and text.startswith("{") and not text.endswith("}") and not _begins_whole(text):  # (indent=2)
                raise InvalidInput(
                    f"{where}: a JSON object that does not end on its line (a pretty-printed .json file, or a line "
                    "cut short?): a prompt file is JSON Lines, one object per line (datasets' to_json writes them)"
                )
            obj = parse_json(line, where)
            msgs = prompt_messages(obj, where)
            for m in msgs:
                try:
                    m["content"].encode("utf-8")
                except UnicodeEncodeError as e:  # (json reads an unpaired \\ud83d escape; no tokenizer takes it)
                    half = ord(m["content"][e.start])
                    raise InvalidInput(
                        f"{where}: a {m['role']} turn holds an unpaired surrogate (\\u{half:04x}), which is no Unicode "
                        "text (half of an emoji's escape pair?)"
                    ) from None
            convs.append(msgs)
            if lines is not None:
                lines.append(lineno)
    if not convs:
        raise InvalidInput(f"prompt file {path} is empty")
    return convs


@dataclass
class PromptSet:
    prompts: list[list[int]]  # token ids, each within the limit
    messages: list[list[dict]]
    dropped: int = 0  # prompts over the limit
    lengths: list[int] = field(default_factory=list)

    def hold_out(self, n: int, seed: int) -> tuple[PromptSet, PromptSet]:
        """(the rest, n distinct prompts drawn by a seeded permutation): a held-out evaluation set; the rest keep
        their order, and the same seed draws the same prompts (a resumed run trains on the same set). A prompt the
        file repeats (a preference split's several pairs per question) is held out with every copy: none is left
        to train on."""
        copies: dict[tuple[int, ...], list[int]] = {}  # prompt -> its lines, in the order of first appearance
        for i, p in enumerate(self.prompts):
            copies.setdefault(tuple(p), []).append(i)
        distinct = list(copies.values())
        if not 0 < n < len(distinct):
            repeated = f" ({len(self.prompts)} lines, some repeated)" if len(distinct) < len(self.prompts) else ""
            raise InvalidInput(f"--eval-holdout {n}: cannot hold out {n} of {len(distinct)} prompts{repeated} for "
                               "evaluation (some must be left to train on)")  # fmt: skip
        gen = torch.Generator().manual_seed(seed * 1_000_003 + 7_919)
        drawn = [distinct[k] for k in torch.randperm(len(distinct), generator=gen)[:n].tolist()]
        held = sorted(lines[0] for lines in drawn)
        rest = sorted(set(range(len(self.prompts))) - {i for lines in drawn for i in lines})
        pick = lambda idx: PromptSet([self.prompts[i] for i in idx], [self.messages[i] for i in idx], 0,  # noqa: E731
                                     [len(self.prompts[i]) for i in idx])  # fmt: skip
        return pick(rest), pick(held)


def load_prompts(
    path: str | os.PathLike, tokenizer, max_prompt_len: int = 1024, *, verbose: bool = True, template: str = "tulu"
) -> PromptSet:
    """Tokenise a prompt file with the chat template (CHAT_TEMPLATES), dropping (not truncating) prompts over the
    limit."""
    check_chat_template(tokenizer, template)
    lines: list[int] = []
    convs = read_prompt_file(path, lines)
    texts = []
    for msgs, lineno in zip(convs, lines):
        try:
            texts.append(render_chat(tokenizer, msgs, template))
        except InputError as e:  # (the template's failure on this prompt: an error of ours stays a traceback)
            raise named(e, f"{os.fspath(path)}:{lineno}") from e
    kept, kept_msgs, dropped = [], [], 0
    for msgs, ids in zip(convs, encode_chat_texts(tokenizer, texts, template)):
        if len(ids) > max_prompt_len:
            dropped += 1
            continue
        kept.append(ids)
        kept_msgs.append(msgs)
    if verbose:
        print(f"prompts: {len(kept)} kept, {dropped} dropped as longer than {max_prompt_len} tokens ({path})")
        bos = tokenizer.bos_token_id
        adds_bos = bos is not None and tokenizer("x", add_special_tokens=True)["input_ids"][:1] == [bos]
        if template == "tokenizer" and adds_bos and kept and kept[0][:1] != [bos]:
            print(
                f"warning: the tokenizer's chat template starts a prompt without its BOS ({tokenizer.bos_token}), "
                "which the tokenizer adds to plain text: a model trained with BOS first may want it (the template "
                "decides, as in transformers' apply_chat_template; --chat-template tulu adds it)"
            )
    if not kept:
        raise InvalidInput(f"every prompt in {path} is longer than {max_prompt_len} tokens (--max-prompt-len)")
    return PromptSet(kept, kept_msgs, dropped, [len(p) for p in kept])
