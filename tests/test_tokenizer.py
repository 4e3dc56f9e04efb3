"""tokenizer.py against the real assets (see scripts/assets.py) and independent references."""
import json
import shutil

import pytest

from scripts.assets import botchan_path, llama3_tiktoken_path, mistral_sp_model_path, smollm2_gguf_path
from tokenizer import (StreamDecoder, TokenizerError, check_vocab, gguf_tokenizer_files, load_tokenizer)

META_LLAMA3_PATTERN = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
SMOLLM_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

# Text that stresses pre-tokenizers, byte fallback and spacing.
TRICKY = [
    "Hello world", "", " ", "   ", "  leading and trailing  ", "multiple   spaces\tand\ttabs",
    "line1\nline2\n\n\nline5\n", "\r\n windows\r\n", "emoji 😀🎉👩‍👩‍👧 done", "日本語のテキスト、中文字符。한국어",
    "combining e\u0301 a\u0300\u0301 Z\u0351\u0352", "digits 1234567 3.14159 a 12  34   5", "x\n\n  45 6",
    "It's they'll WE'VE I'M", "<|im_end|> <|eot_id|> </s> <s> [INST]", "\u00a0nbsp\u2003em space", "ﬁ ligature ½ Ⅻ",
    "tab\t\tend\t", "🦙" * 5, "mixed中文and English123和数字",
]


# ---------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def botchan_lines():
    return botchan_path().read_text(encoding="utf-8").splitlines()


@pytest.fixture(scope="module")
def mistral(tmp_path_factory):
    d = tmp_path_factory.mktemp("mistral_v01")
    shutil.copy(mistral_sp_model_path(), d / "tokenizer.model")
    return load_tokenizer(d)


@pytest.fixture(scope="module")
def mistral_chat(tmp_path_factory):
    """The same SentencePiece model with a Mistral-v0.1-style tokenizer_config.json."""
    d = tmp_path_factory.mktemp("mistral_v01_chat")
    shutil.copy(mistral_sp_model_path(), d / "tokenizer.model")
    template = ("{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
                "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% else %}{{ message['content'] + eos_token }}"
                "{% endif %}{% endfor %}")
    (d / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True, "chat_template": template}))
    return load_tokenizer(d)


@pytest.fixture(scope="module")
def sp_ref():
    import sentencepiece as spm
    return spm.SentencePieceProcessor(model_file=str(mistral_sp_model_path()))


@pytest.fixture(scope="module")
def llama3(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama3")
    shutil.copy(llama3_tiktoken_path(), d / "tokenizer.model")
    return load_tokenizer(d)


@pytest.fixture(scope="module")
def llama3_ref():
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe
    ranks = load_tiktoken_bpe(str(llama3_tiktoken_path()))
    names = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
             "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>", "<|end_header_id|>",
             "<|eom_id|>", "<|eot_id|>", "<|python_tag|>", "<|image|>"]
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
def smol(smol_files, tmp_path_factory):
    d = tmp_path_factory.mktemp("smollm2")
    for name, text in smol_files.items():
        (d / name).write_text(text, encoding="utf-8")
    return load_tokenizer(d)


@pytest.fixture(scope="module")
def smol_ref(smol_reader):
    """HF tokenizers built directly from the GGUF vocab + merges, pre-tokenized like SmolLM2's HF repo."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    f = smol_reader.fields
    tokens = [bytes(f["tokenizer.ggml.tokens"].parts[i]).decode() for i in f["tokenizer.ggml.tokens"].data]
    merges = [tuple(bytes(f["tokenizer.ggml.merges"].parts[i]).decode().split(" ", 1))
              for i in f["tokenizer.ggml.merges"].data]
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    return tok


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
    """SmolLM2 splits every digit and ends whitespace runs at digits: fuzz the one-regex version."""
    for text in _random_texts(3000):
        assert smol.encode(text) == smol_ref.encode(text, add_special_tokens=False).ids, repr(text)


@pytest.mark.parametrize("pre", ["gpt-2", "llama-bpe", "qwen2"])
def test_other_byte_level_pre_tokenizers(pre, smol_files, tmp_path, botchan_lines):
    """tokenizer.json with GPT-2 / Llama-3 / Qwen2 pre-tokenizers (SmolLM2's vocab as a stand-in)
    encodes like HF tokenizers reading the same file."""
    from tokenizers import Tokenizer
    from tokenizer import GGUF_PRE_TOKENIZERS
    tj = json.loads(smol_files["tokenizer.json"])
    tj["pre_tokenizer"] = GGUF_PRE_TOKENIZERS[pre]
    tj["normalizer"] = {"type": "NFC"} if pre == "qwen2" else None
    (tmp_path / "tokenizer.json").write_text(json.dumps(tj))
    ours, hf = load_tokenizer(tmp_path), Tokenizer.from_str(json.dumps(tj))
    plain = [t for t in TRICKY if "<" not in t]
    for text in botchan_lines[:300] + plain + _random_texts(500, seed=1):
        assert ours.encode(text) == hf.encode(text, add_special_tokens=False).ids, (pre, text)


def test_smollm2_written_tokenizer_json_loads_in_hf(smol, smol_files, botchan_lines):
    """The converter writes these files into checkpoints: HF tokenizers must read them the same way."""
    from tokenizers import Tokenizer
    hf = Tokenizer.from_str(smol_files["tokenizer.json"])
    plain = [t for t in TRICKY if "<" not in t]  # HF matches special-token text inside input; we don't
    for line in botchan_lines[:400] + plain:
        assert smol.encode(line) == hf.encode(line, add_special_tokens=False).ids, repr(line)
    # A byte with no token in SmolLM2's vocab (0x04) is dropped, as HF does.
    assert smol.encode("a\x04b") == hf.encode("a\x04b", add_special_tokens=False).ids == [81, 82]


# ---------------------------------------------------------------------------- round trips

def test_round_trips(any_tok):
    for s in TRICKY:
        assert any_tok.decode(any_tok.encode(s)) == s, repr(s)


def test_lone_surrogates_are_replaced(any_tok):
    # Lone surrogates cannot be encoded as UTF-8: each becomes U+FFFD (tiktoken's own rule,
    # applied to SentencePiece too); a surrogate pair written as two code points is joined.
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


def test_stream_decode_holds_back_partial_utf8(mistral, llama3):
    # One character split over several byte tokens comes out only when complete.
    for tok in (mistral, llama3):
        ids = tok.encode("𝔘")
        assert len(ids) > 1
        assert [p for p in _stream(tok, ids) if p] == ["𝔘"]


# ---------------------------------------------------------------------------- special and stop ids

def test_special_ids(mistral, llama3, smol):
    assert (smol.token_to_id("<|endoftext|>"), smol.token_to_id("<|im_start|>"), smol.token_to_id("<|im_end|>")) == (0, 1, 2)
    assert smol.eos_id == 2 and smol.bos_id == 1 and smol.add_bos is False
    assert smol.stop_ids == {0, 2} and smol.vocab_size == 49152 and smol.chat_format == "chatml"
    assert smol.default_system == SMOLLM_SYSTEM
    assert llama3.bos_id == 128000 and llama3.eos_id == 128001
    assert llama3.token_to_id("<|eot_id|>") == 128009 and llama3.token_to_id("<|start_header_id|>") == 128006
    assert llama3.stop_ids == {128001, 128008, 128009}
    assert llama3.vocab_size == 128256 and llama3.chat_format == "llama3"
    assert llama3.token_to_id("<|reserved_special_token_245|>") == 128255
    assert mistral.bos_id == 1 and mistral.eos_id == 2 and mistral.stop_ids == {2}
    assert mistral.vocab_size == 32000 and mistral.chat_format == "llama2"


# ---------------------------------------------------------------------------- chat templates

CONVO = [("What is the capital of France?", "The capital of France is Paris."),
         ("And of Italy?", "Rome is the capital of Italy."),
         ("Thanks!", "You're welcome.")]


def _check_incremental(tok, stop_id, system):
    """KV-cache-style incremental turns == encoding the whole transcript, token for token."""
    assert stop_id in tok.stop_ids
    msgs = [{"role": "system", "content": system}] if system else []
    cache = []
    for turn, (user, reply) in enumerate(CONVO):
        cache += tok.encode_chat_turn(user, system=system, first_turn=turn == 0)
        msgs.append({"role": "user", "content": user})
        assert cache == tok.encode_dialog(msgs), f"turn {turn}"
        cache += tok.encode(reply) + [stop_id]  # what generation leaves in the cache
        msgs.append({"role": "assistant", "content": reply})
    assert cache == tok.encode_dialog(msgs)
    return cache


@pytest.mark.parametrize("system", [None, "You are terse."])
def test_chat_incremental_llama3(llama3, system):
    _check_incremental(llama3, 128009, system)


@pytest.mark.parametrize("system", [None, "You are terse."])
def test_chat_incremental_chatml(smol, system):
    _check_incremental(smol, 2, system)


@pytest.mark.parametrize("system", [None, "You are terse."])
def test_chat_incremental_llama2(mistral, system):
    _check_incremental(mistral, 2, system)


@pytest.mark.parametrize("system", [None, "You are terse."])
def test_chat_incremental_mistral(mistral_chat, system):
    assert mistral_chat.chat_format == "mistral"
    _check_incremental(mistral_chat, 2, system)


def test_llama3_header_format(llama3, llama3_ref):
    expected = llama3_ref.encode("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
                                 "<|start_header_id|>assistant<|end_header_id|>\n\n", allowed_special="all")
    assert llama3.encode_dialog([{"role": "user", "content": "Hi"}]) == expected
    with_sys = llama3.encode_dialog([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    assert with_sys == llama3_ref.encode(
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
        allowed_special="all")


def test_chatml_matches_hf_template_rendering(smol, smol_files):
    """SmolLM2's own chat_template rendered with jinja2 and tokenized by HF == encode_dialog."""
    import jinja2
    from tokenizers import Tokenizer
    hf = Tokenizer.from_str(smol_files["tokenizer.json"])
    template = jinja2.Environment().from_string(json.loads(smol_files["tokenizer_config.json"])["chat_template"])
    msgs = []
    for user, reply in CONVO:
        msgs.append({"role": "user", "content": user})
        text = template.render(messages=msgs, add_generation_prompt=True)
        assert smol.encode_dialog(msgs) == hf.encode(text, add_special_tokens=False).ids
        msgs.append({"role": "assistant", "content": reply})
    text = template.render(messages=msgs, add_generation_prompt=False)
    # A transcript ending with a reply ends at its stop token (what the KV cache holds);
    # the "\n" the template puts after <|im_end|> belongs to the next turn.
    assert text.endswith("<|im_end|>\n")
    assert smol.encode_dialog(msgs, add_generation_prompt=False) == hf.encode(text[:-1], add_special_tokens=False).ids
    assert text.startswith("<|im_start|>system\n" + SMOLLM_SYSTEM + "<|im_end|>\n")


def test_llama2_matches_meta_layout(mistral, sp_ref):
    # Meta's Llama-2 chat: each pair is <s>[INST] user [/INST] answer</s> (Meta's code also
    # encodes a trailing space after the answer; generation does not produce one, so we don't).
    sys_user = "<<SYS>>\nBe brief.\n<</SYS>>\n\n" + CONVO[0][0]
    expected = [1] + sp_ref.encode(f"[INST] {sys_user} [/INST] {CONVO[0][1]}") + [2]
    expected += [1] + sp_ref.encode(f"[INST] {CONVO[1][0]} [/INST]")
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": CONVO[0][0]},
            {"role": "assistant", "content": CONVO[0][1]}, {"role": "user", "content": CONVO[1][0]}]
    assert mistral.encode_dialog(msgs) == expected


def test_mistral_v01_layout(mistral_chat, sp_ref):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}]
    expected = ([1] + sp_ref.encode("[INST] Be brief.\n\nHi [/INST]") + sp_ref.encode("Hello.") + [2]
                + sp_ref.encode("[INST] Bye [/INST]"))
    assert mistral_chat.encode_dialog(msgs) == expected


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
    assert isinstance(e.value, ValueError)


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


def test_corrupt_tokenizer_json(tmp_path):
    (tmp_path / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": ')
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


def test_gguf_sentencepiece_vocab_not_supported(tmp_path):
    import gguf
    path = tmp_path / "sp.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("llama")
    w.add_token_list(["<unk>", "<s>", "</s>", "▁a"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(TokenizerError) as e:
        gguf_tokenizer_files(gguf.GGUFReader(path))
    assert "not supported" in _one_line(e)


def test_tokenizer_json_merges_must_follow_id_order(smol_files, tmp_path):
    """rank = id is only valid when merge results' ids grow with merge order; otherwise refuse."""
    tj = json.loads(smol_files["tokenizer.json"])
    merges = tj["model"]["merges"]
    merges[10], merges[20] = merges[20], merges[10]
    (tmp_path / "tokenizer.json").write_text(json.dumps(tj))
    with pytest.raises(TokenizerError) as e:
        load_tokenizer(tmp_path)
    assert str(tmp_path / "tokenizer.json") in _one_line(e) and "merge" in str(e.value)


def test_tokenizer_json_not_byte_level(tmp_path):
    tj = {"model": {"type": "WordPiece", "vocab": {"a": 0}}, "pre_tokenizer": None, "added_tokens": []}
    (tmp_path / "tokenizer.json").write_text(json.dumps(tj))
    with pytest.raises(TokenizerError) as e:
        load_tokenizer(tmp_path)
    assert str(tmp_path / "tokenizer.json") in _one_line(e)
