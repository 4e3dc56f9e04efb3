"""tokenizer.py against the real assets (see scripts/assets.py) and independent references:
sentencepiece, tiktoken, tokenizers and transformers (its chat template rendering and tokenizers)."""

import json
import shutil

import pytest

from errors import FastgenError
from scripts.assets import botchan_path, llama3_tiktoken_path, mistral_sp_model_path, smollm2_gguf_path
from tokenizer import StreamDecoder, TokenizerError, check_vocab, gguf_tokenizer_files, load_tokenizer

META_LLAMA3_PATTERN = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
SMOLLM_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

# Text that stresses pre-tokenizers, byte fallback and spacing.
TRICKY = [
    "Hello world",
    "",
    " ",
    "   ",
    "  leading and trailing  ",
    "multiple   spaces\tand\ttabs",
    "line1\nline2\n\n\nline5\n",
    "\r\n windows\r\n",
    "emoji 😀🎉👩‍👩‍👧 done",
    "日本語のテキスト、中文字符。한국어",
    "combining e\u0301 a\u0300\u0301 Z\u0351\u0352",
    "digits 1234567 3.14159 a 12  34   5",
    "x\n\n  45 6",
    "It's they'll WE'VE I'M",
    "<|im_end|> <|eot_id|> </s> <s> [INST]",
    "\u00a0nbsp\u2003em space",
    "ﬁ ligature ½ Ⅻ",
    "tab\t\tend\t",
    "🦙" * 5,
    "mixed中文and English123和数字",
]
# ---------------------------------------------------------------------------- real chat templates (data)
# As published in the models' tokenizer_config.json "chat_template".

# meta-llama/Llama-3.1-8B-Instruct
LLAMA31_TEMPLATE = r"""{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- set date_string = "26 Jul 2024" %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- System message + builtin tools #}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{%- if builtin_tools is defined or tools is not none %}
    {{- "Environment: ipython\n" }}
{%- endif %}
{%- if builtin_tools is defined %}
    {{- "Tools: " + builtin_tools | reject('equalto', 'code_interpreter') | join(", ") + "\n\n"}}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\n" }}
{{- "Today Date: " + date_string + "\n\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}

{#- Custom tools are passed in a user message with some extra guidance #}
{%- if tools_in_user_message and not tools is none %}
    {#- Extract the first user message so we can plug it in here #}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
{%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\n\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\n\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {%- if builtin_tools is defined and tool_call.name in builtin_tools %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
            {{- "<|python_tag|>" + tool_call.name + ".call(" }}
            {%- for arg_name, arg_val in tool_call.arguments | items %}
                {{- arg_name + '="' + arg_val + '"' }}
                {%- if not loop.last %}
                    {{- ", " }}
                {%- endif %}
                {%- endfor %}
            {{- ")" }}
        {%- else  %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
            {{- '{"name": "' + tool_call.name + '", ' }}
            {{- '"parameters": ' }}
            {{- tool_call.arguments | tojson }}
            {{- "}" }}
        {%- endif %}
        {%- if builtin_tools is defined %}
            {#- This means we're in ipython mode #}
            {{- "<|eom_id|>" }}
        {%- else %}
            {{- "<|eot_id|>" }}
        {%- endif %}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\n\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""

# mistralai/Mistral-7B-Instruct-v0.1 (and Mixtral-8x7B-Instruct-v0.1)
MISTRAL_V01_TEMPLATE = r"""{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}

{{- bos_token }}
{%- for message in loop_messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('After the optional system message, conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if message['role'] == 'user' %}
        {%- if loop.first and system_message is defined %}
            {{- ' [INST] ' + system_message + '\n\n' + message['content'] + ' [/INST]' }}
        {%- else %}
            {{- ' [INST] ' + message['content'] + ' [/INST]' }}
        {%- endif %}
    {%- elif message['role'] == 'assistant' %}
        {{- ' ' + message['content'] + eos_token}}
    {%- else %}
        {{- raise_exception('Only user and assistant roles are supported, with the exception of an initial optional system message!') }}
    {%- endif %}
{%- endfor %}
"""

# Qwen/Qwen2.5-7B-Instruct
QWEN25_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def botchan_lines():
    return botchan_path().read_text(encoding="utf-8").splitlines()


def _checkpoint(d, files, config=None):
    """A tokenizer directory: copies of `files` {name: source path or text}, plus tokenizer_config.json."""
    for name, src in files.items():
        if isinstance(src, str):
            (d / name).write_text(src, encoding="utf-8")
        else:
            shutil.copy(src, d / name)
    if config is not None:
        (d / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return d


@pytest.fixture(scope="module")
def mistral(tmp_path_factory):
    """Mistral v0.1's SentencePiece model alone: no template, so the hand-written Llama-2 format."""
    return load_tokenizer(_checkpoint(tmp_path_factory.mktemp("mistral"), {"tokenizer.model": mistral_sp_model_path()}))


@pytest.fixture(scope="module")
def mistral_v01(tmp_path_factory):
    """The same model with Mistral-7B-Instruct-v0.1's tokenizer_config.json (its chat template)."""
    d = _checkpoint(
        tmp_path_factory.mktemp("mistral_v01"),
        {"tokenizer.model": mistral_sp_model_path()},
        {"bos_token": "<s>", "eos_token": "</s>", "chat_template": MISTRAL_V01_TEMPLATE},
    )
    return load_tokenizer(d)


@pytest.fixture(scope="module")
def sp_ref():
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(mistral_sp_model_path()))


@pytest.fixture(scope="module")
def llama3(tmp_path_factory):
    """Meta's Llama-3 tiktoken file alone: the hand-written Llama-3 format."""
    return load_tokenizer(_checkpoint(tmp_path_factory.mktemp("llama3"), {"tokenizer.model": llama3_tiktoken_path()}))


@pytest.fixture(scope="module")
def llama31(tmp_path_factory):
    """The same file with Llama-3.1-8B-Instruct's chat template and special tokens."""
    d = _checkpoint(
        tmp_path_factory.mktemp("llama31"),
        {"tokenizer.model": llama3_tiktoken_path()},
        {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "chat_template": LLAMA31_TEMPLATE},
    )
    return load_tokenizer(d)


@pytest.fixture(scope="module")
def llama3_ref():
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe

    ranks = load_tiktoken_bpe(str(llama3_tiktoken_path()))
    names = [
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|reserved_special_token_0|>",
        "<|reserved_special_token_1|>",
        "<|finetune_right_pad_id|>",
        "<|step_id|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eom_id|>",
        "<|eot_id|>",
        "<|python_tag|>",
        "<|image|>",
    ]
    names += [f"<|reserved_special_token_{2 + i}|>" for i in range(256 - len(names))]
    specials = {n: len(ranks) + i for i, n in enumerate(names)}
    return tiktoken.Encoding("llama3-ref", pat_str=META_LLAMA3_PATTERN, mergeable_ranks=ranks, special_tokens=specials)


@pytest.fixture(scope="module")
def smol_reader():
    import gguf

    return gguf.GGUFReader(smollm2_gguf_path())  # ~4 s: parse once


@pytest.fixture(scope="module")
def smol_files(smol_reader):
    return gguf_tokenizer_files(smol_reader)


@pytest.fixture(scope="module")
def smol_dir(smol_files, tmp_path_factory):
    """What the GGUF converter writes for SmolLM2: tokenizer.json + tokenizer_config.json (its template)."""
    return _checkpoint(tmp_path_factory.mktemp("smollm2"), smol_files)


@pytest.fixture(scope="module")
def smol(smol_dir):
    return load_tokenizer(smol_dir)


@pytest.fixture(scope="module")
def smol_chatml(smol_dir):
    """SmolLM2's vocabulary through the hand-written ChatML format (for checkpoints without a template)."""
    return load_tokenizer(smol_dir, chat_format="chatml")


@pytest.fixture(scope="module")
def qwen25(smol_files, tmp_path_factory):
    """Qwen2.5's chat template and special tokens over SmolLM2's vocabulary (same ChatML specials)."""
    d = _checkpoint(
        tmp_path_factory.mktemp("qwen25"),
        {"tokenizer.json": smol_files["tokenizer.json"]},
        {
            "bos_token": None,
            "eos_token": "<|im_end|>",
            "pad_token": "<|endoftext|>",
            "add_bos_token": False,
            "chat_template": QWEN25_TEMPLATE,
        },
    )
    return load_tokenizer(d)


@pytest.fixture(scope="module")
def smol_ref(smol_reader):
    """HF tokenizers built directly from the GGUF vocab + merges, pre-tokenized like SmolLM2's HF repo."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    f = smol_reader.fields
    tokens = [bytes(f["tokenizer.ggml.tokens"].parts[i]).decode() for i in f["tokenizer.ggml.tokens"].data]
    merges = [
        tuple(bytes(f["tokenizer.ggml.merges"].parts[i]).decode().split(" ", 1))
        for i in f["tokenizer.ggml.merges"].data
    ]
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    return tok


def _transformers_tokenizer(d):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(str(d))


@pytest.fixture(scope="module", params=["mistral", "llama3", "smol"])
def any_tok(request):
    return request.getfixturevalue(request.param)


# ---------------------------------------------------------------------------- parity on botchan


def test_mistral_sentencepiece_parity_botchan(mistral, sp_ref, botchan_lines):
    for line in botchan_lines:
        ids = mistral.encode(line)
        assert ids == sp_ref.encode(line), line
        assert mistral.decode(ids) == sp_ref.decode(ids)
    assert mistral.encode("Hello", bos=True)[0] == sp_ref.bos_id() == 1


def test_llama3_tiktoken_parity_botchan(llama3, llama3_ref, botchan_lines):
    assert llama3.encode("Hello world") == [9906, 1917]
    for line in botchan_lines + TRICKY:
        ids = llama3.encode(line)
        assert ids == llama3_ref.encode(line, disallowed_special=()), line
        assert llama3.decode(ids) == llama3_ref.decode(ids)


def test_smollm2_parity_botchan(smol, smol_ref, botchan_lines):
    """The tokenizer.json the GGUF converter writes tokenizes like SmolLM2's own (digits split one by one)."""
    for line in botchan_lines + TRICKY:
        ids = smol.encode(line)
        assert ids == smol_ref.encode(line, add_special_tokens=False).ids, repr(line)
        assert smol.decode(ids) == smol_ref.decode(ids, skip_special_tokens=False)


def _random_texts(n, seed=0):
    import random

    rng = random.Random(seed)
    alphabet = list("ab Zé日😀0123456789 \n\t\r.,'!-_") + [" ", "  ", "'s", "'LL", "\u0301", "\u00a0", "\n\n", "12 "]
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 24))) for _ in range(n)]


def test_smollm2_parity_random_digits_and_spaces(smol, smol_ref):
    """SmolLM2 splits every digit and ends whitespace runs at digits (what transformers' own GGUF loader misses)."""
    for text in _random_texts(2000):
        assert smol.encode(text) == smol_ref.encode(text, add_special_tokens=False).ids, repr(text)


def test_smollm2_checkpoint_loads_in_transformers(smol, smol_dir, botchan_lines):
    """transformers reading the files the converter writes tokenizes as we do."""
    hf = _transformers_tokenizer(smol_dir)
    plain = [t for t in TRICKY if "<" not in t]  # transformers matches special-token text inside input; we don't
    for line in botchan_lines[:400] + plain:
        assert smol.encode(line) == hf(line, add_special_tokens=False).input_ids, repr(line)
    # A byte with no token in SmolLM2's vocab (0x04) is dropped.
    assert smol.encode("a\x04b") == hf("a\x04b", add_special_tokens=False).input_ids == [81, 82]


def test_tokenizer_json_with_ids_out_of_merge_order(smol, smol_files, tmp_path, botchan_lines):
    """A tokenizer.json whose ids do not follow merge order (refused when we ran BPE as tiktoken with
    rank = id) works: same pieces as SmolLM2 renumbered, and the ids transformers gives."""
    tj = json.loads(smol_files["tokenizer.json"])
    vocab = tj["model"]["vocab"]
    first = len(tj["added_tokens"])  # the special tokens keep their ids; the rest are reversed
    renumber = {i: (i if i < first else len(vocab) - 1 - (i - first)) for i in range(len(vocab))}
    tj["model"]["vocab"] = {t: renumber[i] for t, i in vocab.items()}
    (tmp_path / "tokenizer.json").write_text(json.dumps(tj))
    shuffled, hf = load_tokenizer(tmp_path), _transformers_tokenizer(tmp_path)
    plain = [t for t in TRICKY if "<" not in t]
    for text in botchan_lines[:300] + plain:
        ids = shuffled.encode(text)
        assert ids == [renumber[i] for i in smol.encode(text)] == hf(text, add_special_tokens=False).input_ids, text
        assert shuffled.decode(ids) == smol.decode(smol.encode(text))


def test_tokenizer_json_of_another_model_type(tmp_path):
    """Not only byte-level BPE: a WordPiece tokenizer.json works, as the tokenizers library runs it."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

    vocab = {"[UNK]": 0, "[SEP]": 1, "hello": 2, "world": 3, "wor": 4, "##ld": 5, "!": 6}
    ref = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    ref.normalizer = normalizers.Lowercase()
    ref.pre_tokenizer = pre_tokenizers.Whitespace()
    ref.decoder = decoders.WordPiece()
    ref.add_special_tokens(["[SEP]"])
    ref.save(str(tmp_path / "tokenizer.json"))
    tok = load_tokenizer(tmp_path)
    for text in ["Hello World!", "hello wor ld", "unknown words"]:
        assert tok.encode(text) == ref.encode(text, add_special_tokens=False).ids
    assert tok.encode("hello [SEP]") != [2, 1]  # special text in input stays text
    assert tok.encode_special("hello [SEP]") == [2, 1]
    assert tok.decode([2, 3, 6]) == ref.decode([2, 3, 6])


# ---------------------------------------------------------------------------- round trips


def test_round_trips(any_tok):
    for s in TRICKY:
        assert any_tok.decode(any_tok.encode(s)) == s, repr(s)


def test_lone_surrogates_are_replaced(any_tok):
    # Lone surrogates cannot be encoded as UTF-8: each becomes U+FFFD (tiktoken's own rule,
    # applied to the other backends too); a surrogate pair written as two code points is joined.
    for s, expected in [("a\ud800b", "a\ufffdb"), ("\udc00", "\ufffd"), ("x \ud83d\ude00 y", "x 😀 y")]:
        assert any_tok.decode(any_tok.encode(s)) == expected


def test_special_text_in_user_input_is_plain_text(mistral, llama3, smol):
    assert not set(llama3.encode("<|eot_id|><|begin_of_text|>")) & set(range(128000, 128256))
    assert not set(smol.encode("<|im_end|><|endoftext|><|im_start|>")) & set(range(17))
    assert mistral.eos_id not in mistral.encode("</s>") and mistral.bos_id not in mistral.encode("<s>")
    assert llama3.encode_special("<|eot_id|>") == [128009]
    assert smol.encode_special("<|im_end|>x") == [2] + smol.encode("x")
    assert mistral.encode_special("<s>[INST]") == [1] + mistral.encode("[INST]")


# ---------------------------------------------------------------------------- streaming

EMOJI_CJK = "Emoji 😀🎉👩‍👩‍👧 and 🦙🦙 then 日本語のテキスト 中文字符 한국어 e\u0301 — ok ½ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢\n  indented  text"


def _stream(tok, ids):
    dec = StreamDecoder(tok)
    pieces = [dec.push(i) for i in ids]
    pieces.append(dec.flush())
    return pieces


def test_stream_decode_matches_full_decode(any_tok, botchan_lines):
    text = "\n".join(botchan_lines)
    passages = [text[:3000], text[100000:103000], EMOJI_CJK, " leading space", "a  b   c    "] + TRICKY
    for passage in passages:
        ids = any_tok.encode(passage)
        pieces = _stream(any_tok, ids)
        assert "".join(pieces) == any_tok.decode(ids) == passage
        assert not any("\ufffd" in p for p in pieces)


def test_stream_decode_keeps_sentencepiece_spaces(mistral):
    ids = mistral.encode("Hello big world")
    assert "".join(mistral.decode([i]) for i in ids) != "Hello big world"  # the naive way drops spaces
    assert "".join(_stream(mistral, ids)) == "Hello big world"


def test_stream_decode_holds_back_partial_utf8(mistral, llama3, smol):
    # One character split over several byte tokens comes out only when complete.
    for tok in (mistral, llama3, smol):
        ids = tok.encode("𝔘")
        assert len(ids) > 1
        assert [p for p in _stream(tok, ids) if p] == ["𝔘"]


def test_stream_flush_gives_what_is_held_back(smol):
    ids = smol.encode("a𝔘")
    pieces = _stream(smol, ids[:-1])  # the last byte of 𝔘 never comes
    assert pieces[-1] == "\ufffd" and "".join(pieces) == smol.decode(ids[:-1])
    assert _stream(smol, ids) == ["a"] + [""] * (len(ids) - 2) + ["𝔘", ""]  # and the decoder starts over


# ---------------------------------------------------------------------------- special and stop ids


def test_special_ids(mistral, llama3, smol, llama31, qwen25):
    assert (smol.token_to_id("<|endoftext|>"), smol.token_to_id("<|im_start|>"), smol.token_to_id("<|im_end|>")) == (
        0,
        1,
        2,
    )
    assert smol.eos_id == 2 and smol.bos_id == 1 and smol.add_bos is False
    assert smol.stop_ids == {0, 2} and smol.vocab_size == 49152 and smol.chat_format == "template"
    assert llama3.bos_id == 128000 and llama3.eos_id == 128001
    assert llama3.token_to_id("<|eot_id|>") == 128009 and llama3.token_to_id("<|start_header_id|>") == 128006
    assert llama3.stop_ids == {128001, 128008, 128009}
    assert llama3.vocab_size == 128256 and llama3.chat_format == "llama3"
    assert llama3.token_to_id("<|reserved_special_token_245|>") == 128255
    assert llama31.eos_id == 128009 and llama31.chat_format == "template"
    assert mistral.bos_id == 1 and mistral.eos_id == 2 and mistral.stop_ids == {2}
    assert mistral.vocab_size == 32000 and mistral.chat_format == "llama2"
    assert qwen25.bos_id is None and qwen25.eos_id == 2


def test_bos_from_the_post_processor(smol_files, tmp_path):
    """A tokenizer.json whose post-processor starts every text with a token (Llama's way) asks for bos."""
    tj = json.loads(smol_files["tokenizer.json"])
    tj["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "<|im_start|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<|im_start|>": {"id": "<|im_start|>", "ids": [1], "tokens": ["<|im_start|>"]}},
    }
    (tmp_path / "tokenizer.json").write_text(json.dumps(tj))
    tok = load_tokenizer(tmp_path)
    assert tok.add_bos and tok.bos_id == 1
    assert tok.encode("Hi", bos=True) == _transformers_tokenizer(tmp_path)("Hi").input_ids
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": False}))
    assert not load_tokenizer(tmp_path).add_bos  # the config has the last word


# ---------------------------------------------------------------------------- chat

CONVO = [
    ("What is the capital of France?", "The capital of France is Paris."),
    ("And of Italy?", "Rome is the capital of Italy."),
    ("Thanks!", "You're welcome."),
]
SYSTEM = "You are terse."


def _messages(system, turns):
    msgs = [{"role": "system", "content": system}] if system else []
    for user, reply in turns:
        msgs.append({"role": "user", "content": user})
        if reply is not None:
            msgs.append({"role": "assistant", "content": reply})
    return msgs


def _check_incremental(tok, system):
    """KV-cache-style incremental turns == encoding the whole transcript, token for token.

    Each reply goes into the cache as the model would generate it: its text encoded on its own,
    then a stop token."""
    assert tok.appends_turns(system)  # so --chat appends turns (a template that rewrites them is re-rendered)
    cache, history = [], []
    for turn, (user, reply) in enumerate(CONVO):
        new = tok.encode_chat_turn(user, system=system, first_turn=turn == 0)
        if tok.chat_template is not None:  # the stand-in history gives what the real one gives
            assert new == tok.encode_chat_turn(user, system=system, history=history)
        cache += new
        history.append({"role": "user", "content": user})
        assert cache == tok.encode_dialog(_messages(system, []) + history), f"turn {turn}"
        reply_ids = tok.encode_reply(reply)
        assert reply_ids[:-1] == tok.encode(reply) and reply_ids[-1] in tok.stop_ids
        cache += reply_ids
        history.append({"role": "assistant", "content": reply})
        assert cache == tok.encode_dialog(_messages(system, []) + history, add_generation_prompt=False)
    return cache


CHAT_TOKENIZERS = [
    "smol",
    "qwen25",
    "llama31",
    "mistral_v01",  # the checkpoint's template
    "smol_chatml",
    "llama3",
    "mistral",
]  # hand-written formats


@pytest.mark.parametrize("system", [None, SYSTEM])
@pytest.mark.parametrize("name", CHAT_TOKENIZERS)
def test_chat_is_exactly_incremental(name, system, request):
    _check_incremental(request.getfixturevalue(name), system)


def _transformers_ids_smol_vocab(tok_dir, msgs, add_generation_prompt):
    return _transformers_tokenizer(tok_dir).apply_chat_template(
        msgs, tokenize=True, add_generation_prompt=add_generation_prompt
    )["input_ids"]


def _rendered_by_transformers(template, msgs, add_generation_prompt, **special_tokens):
    from transformers.utils.chat_template_utils import render_jinja_template

    rendered, _ = render_jinja_template(
        [msgs], chat_template=template, add_generation_prompt=add_generation_prompt, **special_tokens
    )
    return rendered[0]


def _sentencepiece_ids(sp_ref, text):
    """What transformers' SentencePiece Llama tokenizer (and Meta's code) does with template text:
    <s> and </s> become their ids, each text run between them is encoded on its own."""
    import re

    ids = []
    for part in re.split(r"(<s>|</s>)", text):
        ids += {"<s>": [1], "</s>": [2]}.get(part) or (sp_ref.encode(part) if part else [])
    return ids


def _through_last_stop(ids, stops):
    return ids[: max(i for i, t in enumerate(ids) if t in stops) + 1]


@pytest.mark.parametrize("system", [None, SYSTEM])
def test_templates_match_transformers(system, smol, smol_dir, qwen25, llama31, llama3_ref, mistral_v01, sp_ref):
    """Multi-turn with and without a system prompt, with the generation prompt: the ids transformers'
    apply_chat_template gives (SmolLM2's template from its GGUF, Qwen2.5's), or the text its template
    rendering gives, encoded by the reference tokenizer (Llama-3.1 with tiktoken, Mistral with sentencepiece)."""
    for n in range(1, len(CONVO) + 1):
        asking = _messages(system, CONVO[: n - 1] + [(CONVO[n - 1][0], None)])
        answered = _messages(system, CONVO[:n])
        for msgs, prompt in ((asking, True), (answered, False)):
            expected = _transformers_ids_smol_vocab(smol_dir, msgs, prompt)
            if not prompt:  # the cache ends at the reply's stop token; the template's "\n" after it is the next turn's
                assert expected[-2:] == smol.encode_special("<|im_end|>\n")
                expected = expected[:-1]
            assert smol.encode_dialog(msgs, prompt) == expected
            qwen_dir = qwen25.path.parent
            expected = _transformers_ids_smol_vocab(qwen_dir, msgs, prompt)
            assert qwen25.encode_dialog(msgs, prompt) == (expected if prompt else expected[:-1])
            text = _rendered_by_transformers(
                LLAMA31_TEMPLATE, msgs, prompt, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>"
            )
            assert llama31.encode_dialog(msgs, prompt) == llama3_ref.encode(text, allowed_special="all")
            text = _rendered_by_transformers(MISTRAL_V01_TEMPLATE, msgs, prompt, bos_token="<s>", eos_token="</s>")
            assert mistral_v01.encode_dialog(msgs, prompt) == _sentencepiece_ids(sp_ref, text)
    # SmolLM2's and Qwen2.5's templates bring their own default system prompt.
    first = [{"role": "user", "content": "Hi"}]
    assert smol.decode(smol.encode_dialog(first)).startswith(f"<|im_start|>system\n{SMOLLM_SYSTEM}<|im_end|>\n")
    assert qwen25.decode(qwen25.encode_dialog(first)).startswith("<|im_start|>system\nYou are Qwen, created by Alibaba")
    assert llama31.decode(llama31.encode_dialog(first)).startswith(
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"
    )


def test_llama3_header_format(llama3, llama3_ref):
    expected = llama3_ref.encode(
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
        allowed_special="all",
    )
    assert llama3.encode_dialog([{"role": "user", "content": "Hi"}]) == expected
    with_sys = llama3.encode_dialog([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    assert with_sys == llama3_ref.encode(
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
        allowed_special="all",
    )


def test_llama2_matches_meta_layout(mistral, sp_ref):
    # Meta's Llama-2 chat: each pair is <s>[INST] user [/INST] answer</s> (Meta's code also
    # encodes a trailing space after the answer; generation does not produce one, so we don't).
    sys_user = "<<SYS>>\nBe brief.\n<</SYS>>\n\n" + CONVO[0][0]
    expected = [1] + sp_ref.encode(f"[INST] {sys_user} [/INST] {CONVO[0][1]}") + [2]
    expected += [1] + sp_ref.encode(f"[INST] {CONVO[1][0]} [/INST]")
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": CONVO[0][0]},
        {"role": "assistant", "content": CONVO[0][1]},
        {"role": "user", "content": CONVO[1][0]},
    ]
    assert mistral.encode_dialog(msgs) == expected


def test_hand_written_mistral_format_on_request(mistral_v01, sp_ref):
    tok = load_tokenizer(mistral_v01.path.parent, chat_format="mistral")
    assert tok.chat_template is None and tok.chat_format == "mistral"
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Bye"},
    ]
    expected = (
        [1]
        + sp_ref.encode("[INST] Be brief.\n\nHi [/INST]")
        + sp_ref.encode("Hello.")
        + [2]
        + sp_ref.encode("[INST] Bye [/INST]")
    )
    assert tok.encode_dialog(msgs) == expected
    _check_incremental(tok, "Be brief.")


def _with_config(src_tok, tmp_path, **config):
    shutil.copy(src_tok.path, tmp_path / src_tok.path.name)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    return tmp_path


def test_template_that_is_not_prefix_stable_is_refused(smol, tmp_path):
    # Mistral v0.3 style: the system prompt goes into the last user message, so every new turn
    # rewrites an earlier one.
    template = (
        "{%- for m in messages if m.role != 'system' %}"
        "{%- if m.role == 'user' %}<|im_start|>{% if loop.last and messages[0].role == 'system' %}"
        "{{ messages[0].content }}\n\n{% endif %}{{ m.content }}<|im_end|>"
        "{%- else %}{{ m.content }}<|im_end|>{% endif %}{% endfor %}"
    )
    tok = load_tokenizer(_with_config(smol, tmp_path, chat_template=template, eos_token="<|im_end|>"))
    tok.encode_chat_turn("Hi", system="Be brief.")  # the first turn is fine
    with pytest.raises(TokenizerError) as e:
        tok.encode_chat_turn("Bye", system="Be brief.", first_turn=False)
    assert "prefix-stable" in _one_line(e) and str(tmp_path / "tokenizer_config.json") in str(e.value)


def test_named_templates_use_default(smol, tmp_path):
    named = [
        {"name": "tool_use", "template": "TOOLS"},
        {"name": "default", "template": "<|im_start|>{{ messages[0].content }}"},
    ]
    tok = load_tokenizer(_with_config(smol, tmp_path, chat_template=named))
    assert tok.encode_dialog([{"role": "user", "content": "Hi"}]) == [1] + smol.encode("Hi")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": named[:1]}))
    with pytest.raises(TokenizerError) as e:
        load_tokenizer(tmp_path)
    assert "default" in _one_line(e)


def test_chat_template_jinja_file(smol, tmp_path):
    """Newer checkpoints keep the template in chat_template.jinja beside tokenizer_config.json."""
    _with_config(smol, tmp_path, eos_token="<|im_end|>")
    (tmp_path / "chat_template.jinja").write_text(QWEN25_TEMPLATE)
    tok = load_tokenizer(tmp_path)
    assert tok.chat_format == "template"
    assert tok.decode(tok.encode_dialog([{"role": "user", "content": "Hi"}])).startswith(
        "<|im_start|>system\nYou are Qwen"
    )


def test_template_errors_are_one_line(mistral_v01, smol, tmp_path):
    with pytest.raises(TokenizerError) as e:  # the template's raise_exception()
        mistral_v01.encode_dialog([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    assert "must alternate" in _one_line(e)
    tok = load_tokenizer(_with_config(smol, tmp_path, chat_template="{{ ''.__class__.__mro__ }}"))
    with pytest.raises(TokenizerError) as e:  # templates run sandboxed
        tok.encode_dialog([{"role": "user", "content": "a"}])
    assert "unsafe" in _one_line(e)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{% for %}"}))
    with pytest.raises(TokenizerError) as e:
        load_tokenizer(tmp_path)
    assert str(tmp_path / "tokenizer_config.json") in _one_line(e)


# ---------------------------------------------------------------------------- bad input


def _one_line(err):
    msg = str(err.value)
    assert "\n" not in msg
    return msg


def test_missing_tokenizer_file(tmp_path):
    with pytest.raises(TokenizerError) as e:
        load_tokenizer(tmp_path)
    msg = _one_line(e)
    assert str(tmp_path) in msg and "tokenizer.model" in msg and "tokenizer.json" in msg
    assert isinstance(e.value, FastgenError)  # what every CLI reports as one line


@pytest.mark.parametrize("content", [b"\x00\x01 not a model at all \xff" * 10, b"", b"\n\n"])
def test_corrupt_sentencepiece_model(tmp_path, content):
    (tmp_path / "tokenizer.model").write_bytes(content)
    with pytest.raises(TokenizerError) as e:
        load_tokenizer(tmp_path)
    assert str(tmp_path / "tokenizer.model") in _one_line(e)


def test_corrupt_tiktoken_file(tmp_path):
    good = llama3_tiktoken_path().read_bytes().splitlines()[:1000]
    (tmp_path / "tokenizer.model").write_bytes(b"\n".join(good + [b"!!notbase64 12"]))
    with pytest.raises(TokenizerError) as e:
        load_tokenizer(tmp_path)
    assert str(tmp_path / "tokenizer.model") in _one_line(e)


@pytest.mark.parametrize("content", ['{"model": {"type": "BPE", "vocab": ', '{"model": {"type": "NoSuchModel"}}'])
def test_corrupt_tokenizer_json(tmp_path, content):
    (tmp_path / "tokenizer.json").write_text(content)
    with pytest.raises(TokenizerError) as e:
        load_tokenizer(tmp_path)
    assert str(tmp_path / "tokenizer.json") in _one_line(e)


def test_vocab_must_fit_model(mistral, llama3, smol):
    check_vocab(mistral, 32000, "ckpt/tokenizer.model")
    check_vocab(smol, 49152)
    check_vocab(llama3, 128256)
    for tok, n in [(mistral, 31999), (llama3, 128000), (smol, 32000)]:
        with pytest.raises(TokenizerError) as e:
            check_vocab(tok, n, tok.path)
        assert str(tok.path) in _one_line(e)


def _tiny_llama_tensors(w, vocab_size, dim=16, n_layers=1, ffn=32):
    """Random weights of a tiny llama (2 heads) in llama.cpp's tensor names, with its metadata."""
    import numpy as np

    for key, value in (("embedding_length", dim), ("block_count", n_layers), ("attention.head_count", 2)):
        w.add_uint32(f"llama.{key}", value)
    w.add_uint32("llama.feed_forward_length", ffn)
    w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    rng = np.random.default_rng(0)
    shapes = {"token_embd.weight": (vocab_size, dim), "output_norm.weight": (dim,)}
    for i in range(n_layers):
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            shapes[f"blk.{i}.{name}.weight"] = (dim, dim)
        shapes.update({f"blk.{i}.ffn_gate.weight": (ffn, dim), f"blk.{i}.ffn_up.weight": (ffn, dim)})
        shapes.update({f"blk.{i}.ffn_down.weight": (dim, ffn), f"blk.{i}.attn_norm.weight": (dim,)})
        shapes[f"blk.{i}.ffn_norm.weight"] = (dim,)
    for name, shape in shapes.items():
        w.add_tensor(name, (rng.standard_normal(shape) * 0.02).astype(np.float32))


def _sentencepiece_gguf(path, sp, with_model=False, **metadata):
    """A GGUF holding sentencepiece model `sp`'s vocabulary the way llama.cpp's converter stores it
    (and, with_model, a tiny random llama to convert)."""
    import gguf

    def kind(i):  # llama.cpp's token types: 1 normal, 2 unknown, 3 control, 5 unused, 6 byte
        return 2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 5 if sp.is_unused(i) else 1

    n = sp.get_piece_size()
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model(metadata.pop("model", "llama"))
    w.add_token_list([sp.id_to_piece(i) for i in range(n)])
    w.add_token_scores([sp.get_score(i) for i in range(n)])
    w.add_token_types([kind(i) for i in range(n)])
    w.add_unk_token_id(sp.unk_id())
    w.add_bos_token_id(sp.bos_id())
    w.add_eos_token_id(sp.eos_id())
    for key, value in metadata.items():
        getattr(w, f"add_{key}")(value)
    if with_model:
        _tiny_llama_tensors(w, n)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_gguf_sentencepiece_vocab_tokenizes_like_the_original(tmp_path, sp_ref, botchan_lines):
    """A SentencePiece ("llama") GGUF vocabulary (Llama-2, Mistral, TinyLlama GGUFs) becomes a
    tokenizer.model again: Mistral's real model, through GGUF and back, encodes and decodes as
    sentencepiece does with the original file."""
    import gguf

    reader = gguf.GGUFReader(_sentencepiece_gguf(tmp_path / "sp.gguf", sp_ref, add_bos_token=True))
    files = gguf_tokenizer_files(reader)
    assert set(files) == {"tokenizer.model", "tokenizer_config.json"}
    for name, content in files.items():
        (tmp_path / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    tok = load_tokenizer(tmp_path)
    assert (tok.bos_id, tok.eos_id, tok.add_bos, tok.vocab_size) == (sp_ref.bos_id(), sp_ref.eos_id(), True, 32000)
    texts = botchan_lines[:300] + ["  two leading spaces", "tabs\tand\nnewlines\n\n", "emoji 🦙 and 日本語 ✓", " ", "x"]
    for text in texts:
        ids = tok.encode(text)
        assert ids == sp_ref.encode(text), text
        assert tok.decode(ids) == sp_ref.decode(ids)
    assert tok.encode("Hello", bos=True) == [sp_ref.bos_id()] + sp_ref.encode("Hello")


def test_sentencepiece_gguf_converts_with_its_tokenizer(tmp_path, sp_ref, botchan_lines):
    """scripts/convert_gguf.py end to end: the checkpoint gets tokenizer.model, and generate.py's
    loader tokenizes with it as the original SentencePiece model does."""
    from scripts.convert_gguf import convert_gguf

    out = convert_gguf(_sentencepiece_gguf(tmp_path / "tiny.gguf", sp_ref, with_model=True), tmp_path / "ckpt")
    assert (out / "tokenizer.model").is_file() and not (out / "tokenizer.json").exists()
    tok = load_tokenizer(out)
    for text in botchan_lines[:50]:
        assert tok.encode(text) == sp_ref.encode(text)
    assert tok.add_bos and tok.bos_id == sp_ref.bos_id()  # SentencePiece Llamas start with <s>
    import generate

    argv = ["--checkpoint", str(out), "--device", "cpu", "--prompt", "Once upon a time", "--max-new-tokens", "3"]
    assert generate.main(argv + ["--temperature", "0"]) == 0  # the converted checkpoint runs


def test_gguf_other_tokenizer_models_are_one_line_errors(tmp_path, sp_ref):
    import gguf

    reader = gguf.GGUFReader(_sentencepiece_gguf(tmp_path / "bert.gguf", sp_ref, model="bert"))
    with pytest.raises(TokenizerError) as e:
        gguf_tokenizer_files(reader)
    assert "'bert' is not supported" in _one_line(e) and "SentencePiece ('llama')" in _one_line(e)


# A ChatML template that marks assistant replies with transformers' {% generation %} tag (as
# templates made for assistant-token training masks do).
GENERATION_TAG_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n"
    "{% if m.role == 'assistant' %}{% generation %}{{ m.content }}<|im_end|>{% endgeneration %}"
    "{% else %}{{ m.content }}<|im_end|>{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_generation_tag_renders_its_body_like_transformers(smol, tmp_path):
    tok = load_tokenizer(_with_config(smol, tmp_path, chat_template=GENERATION_TAG_TEMPLATE, eos_token="<|im_end|>"))
    convo = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Bye"},
    ]
    for n, add_generation_prompt in ((2, True), (3, False), (4, True)):
        ours = tok.chat_template.render(convo[:n], add_generation_prompt)
        assert ours == _rendered_by_transformers(GENERATION_TAG_TEMPLATE, convo[:n], add_generation_prompt)
        assert "generation" not in ours
    assert tok.encode_reply("Fine.")[-1] in tok.stop_ids  # a chat kept in the cache works with it
    unclosed = GENERATION_TAG_TEMPLATE.replace("{% endgeneration %}", "")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": unclosed}))
    with pytest.raises(TokenizerError) as e:
        load_tokenizer(tmp_path)
    assert "does not parse" in _one_line(e)
