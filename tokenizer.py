"""SentencePiece and tiktoken behind one interface; chat templates; streaming decode.

load_tokenizer(checkpoint_dir) looks at what the directory holds, never at its name:
  tokenizer.model  SentencePiece protobuf (Llama-2, Mistral v0.1) or a tiktoken BPE file
                   (Llama-3: "base64-token rank" lines), told apart by content.
  tokenizer.json   Hugging Face byte-level BPE (GPT-2 style: SmolLM2, Qwen2, Llama-3 HF),
                   turned into a tiktoken Encoding (rank = token id), so BPE runs in Rust.
  tokenizer_config.json (optional) bos/eos tokens, add_bos_token, chat_template (the
                   template is only looked at to pick the chat format; no jinja is run).

encode() treats special-token text in user input as plain text; only the chat templates
(and encode_special, for template text) produce special ids.
"""
import base64
import json
import re
import unicodedata
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence


class TokenizerError(ValueError):
    """A tokenizer file is missing, corrupt, unsupported, or does not fit the model."""


# Pre-tokenizer regexes (tiktoken / fancy-regex syntax).
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
LLAMA3_PATTERN = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
QWEN2_PATTERN = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
# SmolLM2 (HF: Digits(individual_digits) then ByteLevel's GPT-2 regex; llama.cpp pre="smollm").
# One regex with the same result: every digit is its own piece, and a digit ends a
# whitespace run the way the end of a chunk would (hence the lookahead excludes \p{N}).
SMOLLM_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"""

# GGUF tokenizer.ggml.pre -> Hugging Face pre_tokenizer JSON (written by gguf_tokenizer_files).
_BYTELEVEL_REGEX = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
_BYTELEVEL_NOREGEX = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}


def _split_then_bytelevel(pattern):
    split = {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False}
    return {"type": "Sequence", "pretokenizers": [split, _BYTELEVEL_NOREGEX]}


GGUF_PRE_TOKENIZERS = {
    "gpt-2": _BYTELEVEL_REGEX,
    "smollm": {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True}, _BYTELEVEL_REGEX]},
    "llama-bpe": _split_then_bytelevel(LLAMA3_PATTERN),
    "llama3": _split_then_bytelevel(LLAMA3_PATTERN),
    "qwen2": _split_then_bytelevel(QWEN2_PATTERN),
}

# Meta's Llama-3 special tokens follow the 128000 BPE ranks, in this order; reserved ones fill to 256.
LLAMA3_SPECIALS = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
    "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>",
    "<|python_tag|>", "<|image|>",
]
LLAMA3_NUM_SPECIALS = 256

# Tokens that end a turn or the text, in any of the chat formats we know.
STOP_TOKENS = ["<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<|im_end|>", "<|endoftext|>"]

CHAT_FORMATS = ("llama2", "llama3", "chatml", "mistral")
B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"


def _bytes_to_unicode() -> Dict[int, str]:
    """GPT-2's reversible byte <-> printable character map used by byte-level BPE vocabularies.

    Bytes that are printable (and not space) stand for themselves; the other 68 are
    shifted to code points 256, 257, ... in byte order.
    """
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_UNICODE_TO_BYTE = {c: b for b, c in _bytes_to_unicode().items()}


def _fix_surrogates(text: str) -> str:
    """Lone surrogates cannot be UTF-8 encoded: replace each with U+FFFD (valid pairs are joined).

    This is what tiktoken does internally; doing it here gives SentencePiece the same
    behaviour, and decode(encode(s)) == _fix_surrogates(s) exactly.
    """
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def _token_content(tok) -> Optional[str]:
    """tokenizer_config.json writes tokens as a string or as {"content": ...}."""
    if isinstance(tok, dict):
        return tok.get("content")
    return tok if isinstance(tok, str) else None


class Tokenizer:
    """The common interface. Subclasses implement _encode_text, _decode, piece lookups."""

    path: Path            # the file the vocabulary came from
    bos_id: Optional[int]
    eos_id: Optional[int]
    stop_ids: set
    vocab_size: int       # number of ids this tokenizer can produce, specials included
    chat_format: Optional[str]
    add_bos: bool         # whether a plain prompt should start with bos
    default_system: Optional[str]
    max_id: int

    # ---- backend hooks
    def _encode_text(self, text: str) -> List[int]:
        raise NotImplementedError

    def encode_special(self, text: str) -> List[int]:
        """Encode template text in which special-token strings become special ids."""
        raise NotImplementedError

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    def token_to_id(self, token: str) -> Optional[int]:
        raise NotImplementedError

    # ---- common
    def vocab_fits(self, model_vocab_size: int) -> bool:
        """True when every id this tokenizer can produce indexes the model's embedding."""
        return self.max_id < model_vocab_size

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> List[int]:
        """Plain text -> ids. Special-token text inside `text` is encoded as ordinary text."""
        ids = self._encode_text(_fix_surrogates(text))
        if bos:
            if self.bos_id is None:
                raise TokenizerError(f"{self.path}: this tokenizer has no bos token")
            ids = [self.bos_id] + ids
        if eos:
            ids = ids + [self.eos_id]
        return ids

    def _finish_init(self, config: dict, chat_format: Optional[str]):
        """Apply tokenizer_config.json, then derive stop ids and the chat format."""
        for key in ("bos_token", "eos_token"):
            content = _token_content(config.get(key))
            if content is not None:
                tid = self.token_to_id(content)
                if tid is None:
                    raise TokenizerError(f"{self.path}: tokenizer_config.json {key} {content!r} is not in the vocabulary")
                setattr(self, key[:3] + "_id", tid)
        if "add_bos_token" in config:
            self.add_bos = bool(config["add_bos_token"])
        stops = {self.eos_id} if self.eos_id is not None else set()
        for tok in STOP_TOKENS:
            tid = self.token_to_id(tok)
            if tid is not None:
                stops.add(tid)
        self.stop_ids = stops
        template = config.get("chat_template") or ""
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            template = " ".join(t.get("template", "") for t in template if isinstance(t, dict))
        self.chat_format = chat_format or _detect_chat_format(template, self)
        self.default_system = None
        if self.chat_format == "chatml":
            # A default system prompt spelled out in the template (SmolLM2's "You are a
            # helpful AI assistant named SmolLM, ...") is used when the dialog has none.
            m = re.search(r"<\|im_start\|>system(?:\n|\\n)([^<'\"{}]+?)<\|im_end\|>", template)
            if m:
                self.default_system = m.group(1).replace("\\n", "\n")
        if self.chat_format is not None and self.chat_format not in CHAT_FORMATS:
            raise TokenizerError(f"unknown chat format {self.chat_format!r}; expected one of {CHAT_FORMATS}")

    def _special(self, token: str) -> int:
        tid = self.token_to_id(token)
        if tid is None:
            raise TokenizerError(f"{self.path}: chat format {self.chat_format} needs {token!r}, not in the vocabulary")
        return tid

    # ---- chat templates
    # Every piece is encoded separately, at the same boundaries where special tokens or
    # the model's own generation split the text. An assistant reply is encoded on its own
    # (self.encode(content)) and followed by the stop token, because that is what the KV
    # cache holds after generation. That makes encode_chat_turn exactly incremental.
    def _stop_for_reply(self) -> int:
        if self.chat_format == "llama3":
            return self._special("<|eot_id|>")
        if self.chat_format == "chatml":
            return self._special("<|im_end|>")
        return self.eos_id

    def encode_reply(self, text: str) -> List[int]:
        """An assistant reply as it sits in the KV cache: its text, then the stop token."""
        return self.encode(text) + [self._stop_for_reply()]

    def encode_chat_turn(self, user_text: str, system: Optional[str] = None, first_turn: bool = True) -> List[int]:
        """The ids to append for a new user turn, ending with the assistant prompt.

        first_turn=False: the cache already ends with the previous reply and its stop token;
        the result starts with whatever the template puts after that stop token.
        """
        fmt = self.chat_format
        if fmt == "llama3":
            ids = [self.bos_id] if first_turn else []
            if first_turn and system:
                ids += self._llama3_message("system", system)
            return ids + self._llama3_message("user", user_text) + self._llama3_header("assistant")
        if fmt == "chatml":
            ids = [] if first_turn else self.encode("\n")  # the "\n" after the previous <|im_end|>
            if first_turn:
                system = system if system is not None else self.default_system
                if system is not None:
                    ids += self._chatml_message("system", system)
            return ids + self._chatml_message("user", user_text) + self._chatml_header("assistant")
        if fmt == "llama2":
            # Meta: each [INST] pair is its own <s> ... </s> sequence.
            if first_turn and system:
                user_text = B_SYS + system.strip() + E_SYS + user_text.strip()
            return [self.bos_id] + self.encode(f"{B_INST} {user_text.strip()} {E_INST}")
        if fmt == "mistral":
            # v0.1: one <s> at the start; system prompt prepended to the first user message.
            if first_turn and system:
                user_text = system + "\n\n" + user_text
            return ([self.bos_id] if first_turn else []) + self.encode(f"{B_INST} {user_text} {E_INST}")
        raise TokenizerError(f"{self.path}: no chat format for this tokenizer (no chat_template found)")

    def encode_dialog(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> List[int]:
        """A whole conversation [{"role": "system"|"user"|"assistant", "content": str}, ...].

        Equals the incremental ids: encode_chat_turn for each user turn, and for each
        assistant turn encode_reply (its text encoded on its own, then the stop token).
        A dialog that ends with an assistant message ends at that stop token; what a
        template puts after it (ChatML's "\n", Llama-2's "<s>") starts the next turn.
        """
        msgs = list(messages)
        system = None
        if msgs and msgs[0]["role"] == "system":
            system = msgs.pop(0)["content"]
        ids: List[int] = []
        first = True
        for i, m in enumerate(msgs):
            role, content = m["role"], m["content"]
            if role == "user":
                turn = self.encode_chat_turn(content, system=system, first_turn=first)
                last_user = i == len(msgs) - 1
                if last_user and not add_generation_prompt:
                    turn = turn[: len(turn) - len(self._assistant_prompt())]
                ids += turn
                first = False
            elif role == "assistant":
                if first or msgs[i - 1]["role"] != "user":
                    raise TokenizerError("dialog must alternate user/assistant, starting with user")
                ids += self.encode_reply(content)
            else:
                raise TokenizerError(f"unknown or misplaced role {role!r} in dialog")
        return ids

    def _assistant_prompt(self) -> List[int]:
        if self.chat_format == "llama3":
            return self._llama3_header("assistant")
        if self.chat_format == "chatml":
            return self._chatml_header("assistant")
        return []  # [INST] formats: the prompt ends with [/INST], nothing to strip

    def _llama3_header(self, role: str) -> List[int]:
        return ([self._special("<|start_header_id|>")] + self.encode(role)
                + [self._special("<|end_header_id|>")] + self.encode("\n\n"))

    def _llama3_message(self, role: str, content: str) -> List[int]:
        return self._llama3_header(role) + self.encode(content.strip()) + [self._special("<|eot_id|>")]

    def _chatml_header(self, role: str) -> List[int]:
        return [self._special("<|im_start|>")] + self.encode(role + "\n")

    def _chatml_message(self, role: str, content: str) -> List[int]:
        # HF renders "<|im_start|>role\ncontent<|im_end|>\n"; text between specials is one piece.
        return ([self._special("<|im_start|>")] + self.encode(role + "\n" + content)
                + [self._special("<|im_end|>")] + self.encode("\n"))


def _detect_chat_format(template: str, tok: Tokenizer) -> Optional[str]:
    if "<|im_start|>" in template:
        return "chatml"
    if "<|start_header_id|>" in template:
        return "llama3"
    if "[INST]" in template:
        return "llama2" if "<<SYS>>" in template else "mistral"
    if template:
        return None
    # No template: go by the special tokens the vocabulary has.
    if tok.token_to_id("<|start_header_id|>") is not None and tok.token_to_id("<|eot_id|>") is not None:
        return "llama3"
    if tok.token_to_id("<|im_start|>") is not None and tok.token_to_id("<|im_end|>") is not None:
        return "chatml"
    if isinstance(tok, SentencePieceTokenizer):
        return "llama2"
    return None


class SentencePieceTokenizer(Tokenizer):
    def __init__(self, path: Path, config: dict, chat_format: Optional[str] = None):
        import sentencepiece as spm

        self.path = path
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.LoadFromSerializedProto(path.read_bytes())
        except Exception as e:  # sentencepiece raises RuntimeError / OSError on bad protos
            raise TokenizerError(f"{path}: corrupt SentencePiece model ({str(e).splitlines()[0] if str(e) else type(e).__name__})")
        n = self.sp.get_piece_size()
        if n == 0:
            raise TokenizerError(f"{path}: SentencePiece model with an empty vocabulary")
        self.vocab_size = n
        self.max_id = n - 1
        self.bos_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else None
        self.eos_id = self.sp.eos_id() if self.sp.eos_id() >= 0 else None
        self.add_bos = self.bos_id is not None
        self._controls = {self.sp.id_to_piece(i): i for i in range(n) if self.sp.is_control(i)}
        self._finish_init(config, chat_format)

    def token_to_id(self, token):
        tid = self.sp.piece_to_id(token)
        return tid if self.sp.id_to_piece(tid) == token else None

    def _encode_text(self, text):
        return self.sp.encode(text)

    def encode_special(self, text):
        # Control pieces ("<s>", "</s>") become their ids; each text run between them is
        # encoded on its own (so it gets SentencePiece's dummy-prefix space, as Meta's
        # Llama-2 chat code does for every [INST] segment).
        if not self._controls:
            return self.encode(text)
        pattern = "(" + "|".join(re.escape(c) for c in sorted(self._controls, key=len, reverse=True)) + ")"
        ids = []
        for part in re.split(pattern, text):
            if part in self._controls:
                ids.append(self._controls[part])
            elif part:
                ids += self.encode(part)
        return ids

    def decode(self, ids):
        return self.sp.decode(list(ids))


class TiktokenTokenizer(Tokenizer):
    def __init__(self, path: Path, mergeable_ranks: Dict[bytes, int], pattern: str,
                 special_tokens: Dict[str, int], config: dict, bos: Optional[str], eos: Optional[str],
                 chat_format: Optional[str] = None, normalize: Optional[str] = None, add_bos: bool = True,
                 n_real: Optional[int] = None):
        import tiktoken

        self.path = path
        self.normalize = normalize
        self._n_real = n_real  # ids >= n_real are placeholders for bytes without a token
        ids = list(mergeable_ranks.values()) + list(special_tokens.values())
        self.vocab_size = n_real or max(ids) + 1
        self.max_id = self.vocab_size - 1
        try:
            self.enc = tiktoken.Encoding(name=path.name, pat_str=pattern, mergeable_ranks=mergeable_ranks,
                                         special_tokens=special_tokens)
        except Exception as e:
            raise TokenizerError(f"{path}: cannot build a tiktoken encoding ({str(e).splitlines()[0] if str(e) else type(e).__name__})")
        self.special_tokens = dict(special_tokens)
        self._id_to_special = {v: k for k, v in special_tokens.items()}
        self._vocab = mergeable_ranks
        self.bos_id = special_tokens.get(bos) if bos else None
        self.eos_id = special_tokens.get(eos) if eos else None
        self.add_bos = add_bos and self.bos_id is not None
        self._finish_init(config, chat_format)

    def token_to_id(self, token):
        if token in self.special_tokens:
            return self.special_tokens[token]
        tid = self._vocab.get(token.encode("utf-8"))
        return tid if tid is not None and tid <= self.max_id else None

    def _encode_text(self, text):
        if self.normalize:
            text = unicodedata.normalize(self.normalize, text)
        ids = self.enc.encode_ordinary(text)
        if self._n_real is not None:
            ids = [t for t in ids if t < self._n_real]
        return ids

    def encode_special(self, text):
        text = _fix_surrogates(text)
        if self.normalize:
            text = unicodedata.normalize(self.normalize, text)
        ids = self.enc.encode(text, allowed_special="all")
        if self._n_real is not None:
            ids = [t for t in ids if t < self._n_real]
        return ids

    def decode_bytes(self, ids) -> bytes:
        return self.enc.decode_bytes(list(ids))

    def decode(self, ids):
        return self.enc.decode_bytes(list(ids)).decode("utf-8", errors="replace")


# ---------------------------------------------------------------------------- loading

def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerError(f"{path}: corrupt JSON ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")


def _looks_like_tiktoken(data: bytes) -> bool:
    first = data.split(b"\n", 1)[0].strip()
    return re.fullmatch(rb"[A-Za-z0-9+/]+=* \d+", first) is not None


def _load_tiktoken_file(path: Path, data: bytes, config: dict, chat_format) -> TiktokenTokenizer:
    ranks = {}
    try:
        for lineno, line in enumerate(data.splitlines(), 1):
            if not line.strip():
                continue
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
    except Exception:
        raise TokenizerError(f"{path}: corrupt tiktoken BPE file (bad line {lineno})")
    n = len(ranks)
    if sorted(ranks.values()) != list(range(n)):
        raise TokenizerError(f"{path}: corrupt tiktoken BPE file (ranks are not 0..{n - 1})")
    names = LLAMA3_SPECIALS + [f"<|reserved_special_token_{i}|>"
                               for i in range(2, 2 + LLAMA3_NUM_SPECIALS - len(LLAMA3_SPECIALS))]
    specials = {name: n + i for i, name in enumerate(names)}
    return TiktokenTokenizer(path, ranks, LLAMA3_PATTERN, specials, config,
                             bos="<|begin_of_text|>", eos="<|end_of_text|>", chat_format=chat_format)


def _hf_pattern(path: Path, pre: Optional[dict]) -> str:
    """The single tiktoken regex equivalent to a HF byte-level pre_tokenizer."""
    if not pre:
        raise TokenizerError(f"{path}: no pre_tokenizer; not a byte-level BPE tokenizer.json")
    steps = pre["pretokenizers"] if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        pattern = GPT2_PATTERN
    elif kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        pattern = SMOLLM_PATTERN
    elif kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        split = steps[0]
        regex = split.get("pattern", {}).get("Regex")
        if regex is None or split.get("behavior") != "Isolated" or split.get("invert"):
            raise TokenizerError(f"{path}: unsupported Split pre_tokenizer {json.dumps(split)[:200]}")
        pattern = regex
    else:
        raise TokenizerError(f"{path}: unsupported pre_tokenizer sequence {kinds}")
    if any(s.get("type") == "ByteLevel" and s.get("add_prefix_space") for s in steps):
        raise TokenizerError(f"{path}: ByteLevel add_prefix_space=true is not supported")
    return pattern


def _load_tokenizer_json(path: Path, config: dict, chat_format) -> TiktokenTokenizer:
    tj = _read_json(path)
    model = tj.get("model") or {}
    if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise TokenizerError(f"{path}: only byte-level BPE tokenizer.json is supported (model type {model.get('type')!r})")
    pattern = _hf_pattern(path, tj.get("pre_tokenizer"))
    normalizer = tj.get("normalizer") or None
    normalize = None
    if normalizer:
        if normalizer.get("type") in ("NFC", "NFKC", "NFD", "NFKD"):
            normalize = normalizer["type"]
        else:
            raise TokenizerError(f"{path}: unsupported normalizer {normalizer.get('type')!r}")

    added = {t["content"]: int(t["id"]) for t in tj.get("added_tokens") or []}
    added_ids = set(added.values())
    ranks: Dict[bytes, int] = {}
    for token, tid in model["vocab"].items():
        if tid in added_ids:
            continue  # special tokens live in tiktoken's special map, never in the BPE ranks
        try:
            ranks[bytes(_UNICODE_TO_BYTE[c] for c in token)] = int(tid)
        except KeyError:
            raise TokenizerError(f"{path}: vocab token {token!r} is not byte-level BPE")
    _check_merges(path, ranks, model.get("merges") or [])
    # Some vocabularies lack a few single bytes (SmolLM2: 0x04, 0xc0, 0xf5..0xff, ...).
    # tiktoken needs every byte, so they get placeholder ranks past the last id, and
    # encode drops them, as HF tokenizers does for bytes with no token and no unk.
    n_real = max(list(ranks.values()) + list(added.values())) + 1
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    for i, b in enumerate(missing):
        ranks[bytes([b])] = n_real + len(added) + i
    # tokenizer_config.json, when present, overrides these (in _finish_init). Without it,
    # GPT-2 style vocabularies end text with <|endoftext|>.
    bos, eos = None, ("<|endoftext|>" if "<|endoftext|>" in added else None)
    # add_bos: HF byte-level tokenizers add bos only when the config says so.
    return TiktokenTokenizer(path, ranks, pattern, added, config, bos=bos, eos=eos, chat_format=chat_format,
                             normalize=normalize, add_bos=False, n_real=n_real if missing else None)


def _check_merges(path: Path, ranks: Dict[bytes, int], merges: list):
    """tiktoken merges the adjacent pair whose concatenation has the lowest rank; HF BPE
    applies merges in list order. With rank = id they agree when every merge result is a
    token whose id grows with the merge's position and exceeds both parts' ids."""
    prev = -1
    for i, m in enumerate(merges):
        a, b = m.split(" ", 1) if isinstance(m, str) else m
        try:
            ba = bytes(_UNICODE_TO_BYTE[c] for c in a)
            bb = bytes(_UNICODE_TO_BYTE[c] for c in b)
        except KeyError:
            raise TokenizerError(f"{path}: merge {i} {m!r} is not byte-level")
        r = ranks.get(ba + bb)
        if r is None or ba not in ranks or bb not in ranks:
            raise TokenizerError(f"{path}: merge {i} {m!r} uses or makes a token not in the vocab")
        if r <= prev or r <= ranks[ba] or r <= ranks[bb]:
            raise TokenizerError(f"{path}: token ids do not follow merge order at merge {i} {m!r}; rank=id would not reproduce the merges")
        prev = r


def load_tokenizer(checkpoint_dir, chat_format: Optional[str] = None) -> Tokenizer:
    """Load the tokenizer a checkpoint directory holds (see the module docstring)."""
    d = Path(checkpoint_dir)
    config_path = d / "tokenizer_config.json"
    config = _read_json(config_path) if config_path.is_file() else {}
    model_path, json_path = d / "tokenizer.model", d / "tokenizer.json"
    if model_path.is_file():
        try:
            data = model_path.read_bytes()
        except OSError as e:
            raise TokenizerError(f"{model_path}: cannot read ({e.strerror})")
        if _looks_like_tiktoken(data):
            return _load_tiktoken_file(model_path, data, config, chat_format)
        return SentencePieceTokenizer(model_path, config, chat_format)
    if json_path.is_file():
        return _load_tokenizer_json(json_path, config, chat_format)
    raise TokenizerError(f"no tokenizer in {d}: looked for tokenizer.model (SentencePiece or tiktoken) and tokenizer.json (byte-level BPE)")


def check_vocab(tokenizer: Tokenizer, model_vocab_size: int, path=None) -> None:
    """A tokenizer that can produce an id >= the model's vocab size would index out of the embedding."""
    if not tokenizer.vocab_fits(model_vocab_size):
        raise TokenizerError(f"{path or tokenizer.path}: tokenizer has ids up to {tokenizer.max_id} "
                             f"but the model's vocab_size is {model_vocab_size}")


# ---------------------------------------------------------------------------- streaming

class StreamDecoder:
    """Turn generated ids into text pieces as they come.

    Keeps a small window of ids: `prefix` (already shown, kept for context) and the ids
    after it. Each push decodes the window and emits what is new beyond the prefix's text.
    Decoding the window rather than single ids keeps SentencePiece's leading "▁" as a
    space; holding back text that ends in U+FFFD never splits a UTF-8 character. The
    concatenation of all outputs plus flush() equals tokenizer.decode(all ids).
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tok = tokenizer
        self.ids: List[int] = []
        self.prefix = 0   # window start
        self.read = 0     # ids[prefix:read] have been emitted

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        prefix_text = self.tok.decode(self.ids[self.prefix:self.read])
        text = self.tok.decode(self.ids[self.prefix:])
        if len(text) > len(prefix_text) and not text.endswith("\ufffd"):
            new = text[len(prefix_text):]
            self.prefix, self.read = self.read, len(self.ids)
            self._trim()
            return new
        return ""

    def flush(self) -> str:
        prefix_text = self.tok.decode(self.ids[self.prefix:self.read])
        text = self.tok.decode(self.ids[self.prefix:])
        self.ids, self.prefix, self.read = [], 0, 0
        return text[len(prefix_text):]

    def _trim(self):
        if self.prefix > 64:  # drop ids that are no longer part of the window
            del self.ids[: self.prefix]
            self.read -= self.prefix
            self.prefix = 0


# ---------------------------------------------------------------------------- GGUF

_GGUF_CONTROL, _GGUF_USER_DEFINED = 3, 4


def _gguf_value(reader, key, default=None):
    field = reader.fields.get(key)
    if field is None:
        return default
    parts = [field.parts[i] for i in field.data]
    strings = len(field.types) > 0 and int(field.types[-1]) == 8  # GGUFValueType.STRING
    if len(field.types) > 0 and int(field.types[0]) == 9:  # ARRAY
        if strings:
            return [bytes(p).decode("utf-8") for p in parts]
        return [p.tolist()[0] for p in parts]
    if strings:
        return bytes(parts[0]).decode("utf-8")
    return parts[0].tolist()[0]


def gguf_tokenizer_files(reader) -> Dict[str, str]:
    """tokenizer.json + tokenizer_config.json text for the tokenizer embedded in a GGUF file.

    `reader` is a gguf.GGUFReader. Only byte-level BPE ("gpt2") vocabularies are supported.
    """
    name = getattr(getattr(reader, "data", None), "filename", None) or "GGUF file"
    model = _gguf_value(reader, "tokenizer.ggml.model")
    if model is None:
        raise TokenizerError(f"{name}: no tokenizer.ggml.model in GGUF metadata")
    if model != "gpt2":
        raise TokenizerError(f"{name}: GGUF tokenizer model {model!r} (SentencePiece-style) is not supported yet; "
                             f"only byte-level BPE ('gpt2')")
    pre = _gguf_value(reader, "tokenizer.ggml.pre", "gpt-2")
    if pre == "default":
        pre = "gpt-2"
    if pre not in GGUF_PRE_TOKENIZERS:
        raise TokenizerError(f"{name}: unknown GGUF pre-tokenizer {pre!r}; known: {sorted(GGUF_PRE_TOKENIZERS)}")
    tokens = _gguf_value(reader, "tokenizer.ggml.tokens")
    merges = _gguf_value(reader, "tokenizer.ggml.merges")
    types = _gguf_value(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
    if not tokens or merges is None:
        raise TokenizerError(f"{name}: GGUF tokenizer lacks tokens or merges")
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": ty == _GGUF_CONTROL}
             for i, (t, ty) in enumerate(zip(tokens, types)) if ty in (_GGUF_CONTROL, _GGUF_USER_DEFINED)]
    tokenizer_json = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": {"type": "NFC"} if pre == "qwen2" else None,
        "pre_tokenizer": GGUF_PRE_TOKENIZERS[pre],
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "vocab": {t: i for i, t in enumerate(tokens)}, "merges": list(merges)},
    }
    config = {"add_bos_token": bool(_gguf_value(reader, "tokenizer.ggml.add_bos_token", False))}
    for key, field in (("bos_token", "tokenizer.ggml.bos_token_id"), ("eos_token", "tokenizer.ggml.eos_token_id")):
        tid = _gguf_value(reader, field)
        if tid is not None and 0 <= tid < len(tokens):
            tok = tokens[tid]
            if types[tid] not in (_GGUF_CONTROL, _GGUF_USER_DEFINED):  # a normal token: config holds its text
                tok = bytes(_UNICODE_TO_BYTE[c] for c in tok).decode("utf-8", errors="replace")
            config[key] = tok
    template = _gguf_value(reader, "tokenizer.chat_template")
    if template:
        config["chat_template"] = template
    return {"tokenizer.json": json.dumps(tokenizer_json, ensure_ascii=False),
            "tokenizer_config.json": json.dumps(config, ensure_ascii=False, indent=2)}
