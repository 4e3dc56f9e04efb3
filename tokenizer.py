"""Tokenizers through the libraries made for them, chat templates from the checkpoint, streaming.

load_tokenizer(checkpoint_dir) looks at what the directory holds, never at its name:
  tokenizer.json   any Hugging Face tokenizer, run by the `tokenizers` library (what transformers
                   runs) and streamed with its DecodeStream.
  tokenizer.model  (used when there is no tokenizer.json) a SentencePiece protobuf (Llama-2,
                   Mistral v0.1), run by `sentencepiece`, or Meta's Llama-3 tiktoken file
                   ("base64-token rank" lines), run by `tiktoken`; told apart by content.
  tokenizer_config.json, special_tokens_map.json (optional): bos/eos tokens, add_bos_token and
                   the chat template (chat_template.jinja holds it in newer checkpoints).

Chat: a checkpoint's jinja chat template is rendered the way transformers renders it (sandboxed
jinja2) and the text is encoded with its special tokens, as transformers' apply_chat_template
does (so special-token text inside a message becomes a special token there too). Checkpoints
that ship no template get a hand-written format picked from the vocabulary (Llama-3, ChatML,
Llama-2).

encode() treats special-token text in user input as plain text; only chat formatting (and
encode_special, for template text) produces special ids.
"""

import base64
import datetime
import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Optional

from errors import FastgenError, first_line


class TokenizerError(FastgenError):
    """A tokenizer file is missing, corrupt, unsupported, or does not fit the model."""


class NotPrefixStable(TokenizerError):
    """The chat template rewrites earlier turns when a message is added, so a turn's ids cannot
    simply be appended to what the KV cache holds (generate.py's --chat re-renders such a chat whole)."""


# Pre-tokenizer regexes of Llama-3 (Meta's tiktoken file; GGUF "llama-bpe") and Qwen2 (GGUF "qwen2").
LLAMA3_PATTERN = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""  # noqa: E501
QWEN2_PATTERN = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""  # noqa: E501

# Meta's Llama-3 special tokens follow the 128000 BPE ranks, in this order; reserved ones fill to 256.
LLAMA3_SPECIALS = [
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
LLAMA3_NUM_SPECIALS = 256

# Tokens that end a turn or the text, in any of the chat formats we know.
STOP_TOKENS = ["<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<|im_end|>", "<|endoftext|>"]

# Hand-written formats, for checkpoints without a chat template; "template" is the checkpoint's own.
CHAT_FORMATS = ("llama2", "llama3", "chatml", "mistral")
B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"

# What a template renders in place of the turns already in the KV cache when the caller does not
# pass them (see Tokenizer.encode_chat_turn).
STAND_IN_HISTORY = [{"role": "user", "content": "Hello."}, {"role": "assistant", "content": "Hello! How can I help?"}]


def _fix_surrogates(text: str) -> str:
    """Lone surrogates cannot be UTF-8 encoded: replace each with U+FFFD (valid pairs are joined).

    This is what tiktoken does internally; doing it for every backend gives them all the same
    behaviour (the tokenizers library refuses such strings), and decode(encode(s)) == _fix_surrogates(s).
    """
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def _token_content(tok) -> str | None:
    """tokenizer_config.json writes tokens as a string or as {"content": ...}."""
    if isinstance(tok, dict):
        return tok.get("content")
    return tok if isinstance(tok, str) else None


class Tokenizer:
    """The common interface. Subclasses implement _encode_text, encode_special, decode, token lookups."""

    path: Path  # the file the vocabulary came from
    bos_id: int | None
    eos_id: int | None
    stop_ids: set
    vocab_size: int  # number of ids this tokenizer can produce, specials included
    max_id: int
    add_bos: bool  # whether a plain prompt should start with bos
    chat_format: str | None = None  # "template", one of CHAT_FORMATS, or None
    chat_template: Optional["ChatTemplate"] = None

    # ---- backend hooks
    def _encode_text(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode_special(self, text: str) -> list[int]:
        """Encode template text in which special-token strings become special ids."""
        raise NotImplementedError

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    def token_to_id(self, token: str) -> int | None:
        raise NotImplementedError

    def id_to_token(self, token_id: int) -> str | None:
        raise NotImplementedError

    # ---- common
    def vocab_fits(self, model_vocab_size: int) -> bool:
        """True when every id this tokenizer can produce indexes the model's embedding."""
        return self.max_id < model_vocab_size

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Plain text -> ids. Special-token text inside `text` is encoded as ordinary text."""
        ids = self._encode_text(_fix_surrogates(text))
        if bos:
            if self.bos_id is None:
                raise TokenizerError(f"{self.path}: this tokenizer has no bos token")
            ids = [self.bos_id] + ids
        if eos:
            ids = ids + [self.eos_id]
        return ids

    def _finish_init(self, config: dict):
        """Apply tokenizer_config.json's bos/eos/add_bos_token, then derive the stop ids."""
        for key in ("bos_token", "eos_token"):
            content = _token_content(config.get(key))
            if content is not None:
                tid = self.token_to_id(content)
                if tid is None:
                    raise TokenizerError(
                        f"{self.path}: tokenizer_config.json {key} {content!r} is not in the vocabulary"
                    )
                setattr(self, key[:3] + "_id", tid)
        if "add_bos_token" in config:
            self.add_bos = bool(config["add_bos_token"])
        stops = {self.eos_id} if self.eos_id is not None else set()
        for tok in STOP_TOKENS:
            tid = self.token_to_id(tok)
            if tid is not None:
                stops.add(tid)
        self.stop_ids = stops

    def _special(self, token: str) -> int:
        tid = self.token_to_id(token)
        if tid is None:
            raise TokenizerError(f"{self.path}: chat format {self.chat_format} needs {token!r}, not in the vocabulary")
        return tid

    # ---- chat
    # The KV cache of a chat holds, turn after turn, the ids encode_chat_turn returns and the
    # ids the model generated, up to and including the stop token. encode_dialog of the same
    # transcript gives the same ids (the tests prove it for every format and template we know).
    def encode_dialog(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> list[int]:
        """A whole conversation [{"role": "system"|"user"|"assistant", "content": str}, ...].

        A dialog that ends with an assistant message ends at that reply's stop token: what a
        template puts after it (ChatML's "\\n", Llama-2's "<s>") is never generated, so it
        starts the next turn's ids instead.
        """
        if self.chat_template is None:
            return self._format_dialog(messages, add_generation_prompt)
        ids = self.encode_special(self.chat_template.render(messages, add_generation_prompt))
        if messages and messages[-1]["role"] == "assistant" and not add_generation_prompt:
            stops = [i for i, t in enumerate(ids) if t in self.stop_ids]
            if stops:
                ids = ids[: stops[-1] + 1]
        return ids

    def encode_chat_turn(
        self, user_text: str, system: str | None = None, first_turn: bool = True, history: Sequence[dict] | None = None
    ) -> list[int]:
        """The ids to append to the KV cache for a new user turn, ending with the assistant prompt.

        first_turn=False: the cache already ends with a reply's stop token. With a template the
        new ids are what rendering the transcript with the new message adds to rendering it
        without. `history` is that transcript (user and assistant messages ending with a reply,
        no system); when it is not given, a one-exchange stand-in takes its place, which gives
        the same ids for templates that render a turn the same whatever came before it (the
        tests check that ours do).
        """
        if self.chat_template is None:
            return self._format_chat_turn(user_text, system, first_turn)
        if history is None:
            history = [] if first_turn else STAND_IN_HISTORY
        before = ([{"role": "system", "content": system}] if system is not None else []) + list(history)
        after = before + [{"role": "user", "content": user_text}]
        if not history:
            return self.encode_dialog(after)
        # The cache holds the last turn as it was asked, then the reply generated after it; the
        # transcript with the reply must extend the former, the one with the new turn the latter
        # (earlier turns were checked when they were added).
        asked = self.encode_dialog(before[:-1])
        answered = self.encode_dialog(before, add_generation_prompt=False)
        self._suffix(asked, answered)
        return self._suffix(answered, self.encode_dialog(after))

    def appends_turns(self, system: str | None = None) -> bool:
        """Whether a chat can append each turn's ids to the KV cache: a new turn leaves the ids of the
        conversation before it as they were (checked on the stand-in history), and a reply renders
        as its own text, which is what the cache holds of it. Not so for templates that rewrite
        earlier turns: Mistral v0.3's system prompt moves into the last user message; Qwen3's
        drops the reasoning of replies before the last question, DeepSeek-R1's of every reply."""
        if self.chat_template is None:
            return True
        try:
            self.encode_chat_turn("Hello again.", system, first_turn=False)
        except NotPrefixStable:
            return False
        reply = "<think>\nA greeting.\n</think>\n\nHello! How can I help?"
        exchange = [STAND_IN_HISTORY[0], {"role": "assistant", "content": reply}]
        return reply in self.chat_template.render(exchange, add_generation_prompt=False)

    def encode_reply(self, text: str) -> list[int]:
        """An assistant reply as it sits in the KV cache after generation: its ids, then the stop token."""
        if self.chat_template is None:
            return self.encode(text) + [self._stop_for_reply()]
        prompt = STAND_IN_HISTORY[:1]
        reply = self._suffix(
            self.encode_dialog(prompt),
            self.encode_dialog(prompt + [{"role": "assistant", "content": text}], add_generation_prompt=False),
        )
        if not reply or reply[-1] not in self.stop_ids:
            raise TokenizerError(
                f"{self.chat_template.path}: the chat template does not end an assistant reply with "
                f"a stop token ({sorted(self.stop_ids)}), so a generated reply would not match it"
            )
        return reply

    def _suffix(self, prefix: list[int], ids: list[int]) -> list[int]:
        # A template whose rendering of a longer conversation changes the ids of the shorter one
        # (say, one that moves the system prompt to the last user message) cannot be kept in a
        # KV cache turn by turn: each turn needs the whole transcript again (--chat does that for
        # templates that fail appends_turns).
        if ids[: len(prefix)] != prefix:
            raise NotPrefixStable(
                f"{self.chat_template.path}: the chat template is not prefix-stable (adding a message "
                f"changes the ids of the messages before it): it can render one-turn prompts, not a "
                f"chat kept in the KV cache turn by turn"
            )
        return ids[len(prefix) :]

    # ---- hand-written formats (checkpoints that ship no chat template)
    # Every piece is encoded separately, at the same boundaries where special tokens or the
    # model's own generation split the text. An assistant reply is encoded on its own and
    # followed by the stop token, because that is what the KV cache holds after generation.
    def _stop_for_reply(self) -> int:
        if self.chat_format == "llama3":
            return self._special("<|eot_id|>")
        if self.chat_format == "chatml":
            return self._special("<|im_end|>")
        return self.eos_id

    def _format_chat_turn(self, user_text: str, system: str | None, first_turn: bool) -> list[int]:
        fmt = self.chat_format
        if fmt == "llama3":
            ids = [self.bos_id] if first_turn else []
            if first_turn and system:
                ids += self._llama3_message("system", system)
            return ids + self._llama3_message("user", user_text) + self._llama3_header("assistant")
        if fmt == "chatml":
            ids = [] if first_turn else self.encode("\n")  # the "\n" after the previous <|im_end|>
            if first_turn and system is not None:
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

    def _format_dialog(self, messages: Sequence[dict], add_generation_prompt: bool) -> list[int]:
        msgs = list(messages)
        system = None
        if msgs and msgs[0]["role"] == "system":
            system = msgs.pop(0)["content"]
        ids: list[int] = []
        first = True
        for i, m in enumerate(msgs):
            role, content = m["role"], m["content"]
            if role == "user":
                turn = self._format_chat_turn(content, system, first)
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

    def _assistant_prompt(self) -> list[int]:
        if self.chat_format == "llama3":
            return self._llama3_header("assistant")
        if self.chat_format == "chatml":
            return self._chatml_header("assistant")
        return []  # [INST] formats: the prompt ends with [/INST], nothing to strip

    def _llama3_header(self, role: str) -> list[int]:
        return (
            [self._special("<|start_header_id|>")]
            + self.encode(role)
            + [self._special("<|end_header_id|>")]
            + self.encode("\n\n")
        )

    def _llama3_message(self, role: str, content: str) -> list[int]:
        return self._llama3_header(role) + self.encode(content.strip()) + [self._special("<|eot_id|>")]

    def _chatml_header(self, role: str) -> list[int]:
        return [self._special("<|im_start|>")] + self.encode(role + "\n")

    def _chatml_message(self, role: str, content: str) -> list[int]:
        # "<|im_start|>role\ncontent<|im_end|>\n"; text between specials is one piece.
        return (
            [self._special("<|im_start|>")]
            + self.encode(role + "\n" + content)
            + [self._special("<|im_end|>")]
            + self.encode("\n")
        )


def _detect_chat_format(tok: Tokenizer) -> str | None:
    """The hand-written format for a tokenizer without a chat template, from its special tokens."""
    if tok.token_to_id("<|start_header_id|>") is not None and tok.token_to_id("<|eot_id|>") is not None:
        return "llama3"
    if tok.token_to_id("<|im_start|>") is not None and tok.token_to_id("<|im_end|>") is not None:
        return "chatml"
    if isinstance(tok, SentencePieceTokenizer):
        return "llama2"
    return None


# ---------------------------------------------------------------------------- chat templates


def _raise_exception(message):
    import jinja2

    raise jinja2.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # jinja2's own tojson escapes <, >, & and ' for HTML, which would change what the model reads.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _generation_tag_extension():
    """`{% generation %}...{% endgeneration %}`: transformers' tag that marks an assistant reply's
    text (for training masks). Rendering for generation, its body is output unchanged."""
    from jinja2.ext import Extension

    class GenerationTag(Extension):
        tags = {"generation"}

        def parse(self, parser):
            next(parser.stream)  # the tag's name
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    return GenerationTag


# The names a template's render gives itself: --chat-template-kwargs cannot set them.
CHAT_TEMPLATE_RESERVED = ("messages", "add_generation_prompt", "tools", "documents")


class ChatTemplate:
    """A checkpoint's jinja chat template, rendered with what transformers gives templates.

    Templates are code from the checkpoint, so they run in jinja2's immutable sandbox. Like
    transformers: blocks trim their newlines, raise_exception() and strftime_now() exist, tojson
    keeps non-ASCII text, {% generation %} blocks render their body, and bos_token / eos_token /
    tools / documents are defined.
    """

    def __init__(self, source: str, path: Path, special_tokens: dict[str, str]):
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols", _generation_tag_extension()]
        )
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
        env.filters["tojson"] = _tojson
        self.path = path
        self.special_tokens = special_tokens
        # what the user passes the template (generate.py --chat-template-kwargs, like transformers'
        # apply_chat_template(**kwargs)): Qwen3's enable_thinking, say
        self.variables: dict = {}
        try:
            self.template = env.from_string(source)
        except jinja2.TemplateError as e:
            raise TokenizerError(f"{path}: the chat template does not parse ({first_line(e)})") from None

    def render(self, messages: Sequence[dict], add_generation_prompt: bool) -> str:
        import jinja2

        try:
            return self.template.render(
                messages=list(messages),
                add_generation_prompt=add_generation_prompt,
                tools=None,
                documents=None,
                **{**self.special_tokens, **self.variables},
            )
        except (jinja2.TemplateError, TypeError) as e:  # raise_exception(), a sandbox violation, bad messages
            raise TokenizerError(f"{self.path}: chat template: {first_line(e)}") from None


def _chat_template_source(config: dict, path: Path) -> str | None:
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        if "default" not in named:
            raise TokenizerError(f"{path}: chat_template names {sorted(map(str, named))} but no 'default'")
        template = named["default"]
    if template is not None and not isinstance(template, str):
        raise TokenizerError(f"{path}: chat_template is neither a string nor a list of named templates")
    return template or None


# ---------------------------------------------------------------------------- backends


class HFTokenizer(Tokenizer):
    """A Hugging Face tokenizer.json, run by the `tokenizers` library."""

    def __init__(self, path: Path, config: dict):
        from tokenizers import Tokenizer as Backend

        self.path = path
        try:
            self.backend = Backend.from_file(str(path))
        except Exception as e:  # the library raises a plain Exception for bad JSON or unknown models
            raise TokenizerError(f"{path}: the tokenizers library cannot read it ({first_line(e)})") from None
        vocab = self.backend.get_vocab(with_added_tokens=True)
        if not vocab:
            raise TokenizerError(f"{path}: empty vocabulary")
        self.max_id = max(vocab.values())
        self.vocab_size = self.max_id + 1
        # A post-processor that puts a token before every text (Llama's <s>, <|begin_of_text|>) is
        # how a tokenizer.json says "start with bos"; tokenizer_config.json may override both.
        plain = self.backend.encode("a", add_special_tokens=False).ids
        full = self.backend.encode("a", add_special_tokens=True).ids
        self.add_bos = len(full) > len(plain) and full[1 : 1 + len(plain)] == plain
        self.bos_id = full[0] if self.add_bos else None
        self.eos_id = self.backend.token_to_id("<|endoftext|>")  # GPT-2 style vocabularies end text with it
        self._finish_init(config)

    def token_to_id(self, token):
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id):
        return self.backend.id_to_token(token_id)

    def _encode_text(self, text):
        # encode_special_tokens=True: the library reads special-token text as plain text.
        self.backend.encode_special_tokens = True
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_special(self, text):
        self.backend.encode_special_tokens = False
        return self.backend.encode(_fix_surrogates(text), add_special_tokens=False).ids

    def decode(self, ids):
        return self.backend.decode(list(ids), skip_special_tokens=False)


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece tokenizer.model, run by `sentencepiece`."""

    def __init__(self, path: Path, config: dict):
        import sentencepiece as spm

        self.path = path
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.LoadFromSerializedProto(path.read_bytes())
        except Exception as e:  # sentencepiece raises RuntimeError / OSError on bad protos
            raise TokenizerError(f"{path}: corrupt SentencePiece model ({first_line(e)})") from None
        n = self.sp.get_piece_size()
        if n == 0:
            raise TokenizerError(f"{path}: SentencePiece model with an empty vocabulary")
        self.vocab_size = n
        self.max_id = n - 1
        self.bos_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else None
        self.eos_id = self.sp.eos_id() if self.sp.eos_id() >= 0 else None
        self.add_bos = self.bos_id is not None
        self._controls = {self.sp.id_to_piece(i): i for i in range(n) if self.sp.is_control(i)}
        self._finish_init(config)

    def token_to_id(self, token):
        tid = self.sp.piece_to_id(token)
        return tid if self.sp.id_to_piece(tid) == token else None

    def id_to_token(self, token_id):
        return self.sp.id_to_piece(token_id)

    def _encode_text(self, text):
        return self.sp.encode(text)

    def encode_special(self, text):
        # Control pieces ("<s>", "</s>") become their ids; each text run between them is
        # encoded on its own (so it gets SentencePiece's dummy-prefix space), as Meta's Llama-2
        # chat code and transformers' SentencePiece Llama tokenizer do.
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
    """Meta's Llama-3 tokenizer.model (base64 token, rank per line), run by `tiktoken`."""

    def __init__(self, path: Path, data: bytes, config: dict):
        import tiktoken

        self.path = path
        ranks = {}
        try:
            for lineno, line in enumerate(data.splitlines(), 1):  # noqa: B007 - the error below names it
                if line.strip():
                    token, rank = line.split()
                    ranks[base64.b64decode(token, validate=True)] = int(rank)
        except Exception:
            raise TokenizerError(f"{path}: corrupt tiktoken BPE file (bad line {lineno})") from None
        n = len(ranks)
        if sorted(ranks.values()) != list(range(n)):
            raise TokenizerError(f"{path}: corrupt tiktoken BPE file (ranks are not 0..{n - 1})")
        names = LLAMA3_SPECIALS + [
            f"<|reserved_special_token_{i}|>" for i in range(2, 2 + LLAMA3_NUM_SPECIALS - len(LLAMA3_SPECIALS))
        ]
        self.special_tokens = {name: n + i for i, name in enumerate(names)}
        self._id_to_special = {v: k for k, v in self.special_tokens.items()}
        self._ranks = ranks
        self.enc = tiktoken.Encoding(
            name=path.name, pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks, special_tokens=self.special_tokens
        )
        self.vocab_size = n + len(names)
        self.max_id = self.vocab_size - 1
        self.bos_id = self.special_tokens["<|begin_of_text|>"]
        self.eos_id = self.special_tokens["<|end_of_text|>"]
        self.add_bos = True
        self._finish_init(config)

    def token_to_id(self, token):
        if token in self.special_tokens:
            return self.special_tokens[token]
        return self._ranks.get(token.encode("utf-8"))

    def id_to_token(self, token_id):
        return self._id_to_special.get(token_id)

    def _encode_text(self, text):
        return self.enc.encode_ordinary(text)

    def encode_special(self, text):
        return self.enc.encode(_fix_surrogates(text), allowed_special="all")

    def decode(self, ids):
        return self.enc.decode_bytes(list(ids)).decode("utf-8", errors="replace")


# ---------------------------------------------------------------------------- loading


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerError(f"{path}: corrupt JSON ({type(e).__name__}: {first_line(e)})") from None


def _looks_like_tiktoken(data: bytes) -> bool:
    first = data.split(b"\n", 1)[0].strip()
    return re.fullmatch(rb"[A-Za-z0-9+/]+=* \d+", first) is not None


def load_tokenizer(checkpoint_dir, chat_format: str | None = None) -> Tokenizer:
    """Load the tokenizer a checkpoint directory holds (see the module docstring).

    chat_format: one of CHAT_FORMATS to use that hand-written format even where the checkpoint
    has a chat template; None: the checkpoint's template, else a format fitting the vocabulary.
    """
    d = Path(checkpoint_dir)
    config, template_path = {}, d / "tokenizer_config.json"
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the latter wins
        if (d / name).is_file():
            config.update(_read_json(d / name))
    if not config.get("chat_template") and (d / "chat_template.jinja").is_file():
        template_path = d / "chat_template.jinja"
        config["chat_template"] = template_path.read_text(encoding="utf-8")

    json_path, model_path = d / "tokenizer.json", d / "tokenizer.model"
    if json_path.is_file():
        tok = HFTokenizer(json_path, config)
    elif model_path.is_file():
        try:
            data = model_path.read_bytes()
        except OSError as e:
            raise TokenizerError(f"{model_path}: cannot read ({e.strerror})") from None
        tok = (
            TiktokenTokenizer(model_path, data, config)
            if _looks_like_tiktoken(data)
            else SentencePieceTokenizer(model_path, config)
        )
    else:
        raise TokenizerError(
            f"no tokenizer in {d}: looked for tokenizer.json (Hugging Face) and "
            f"tokenizer.model (SentencePiece or tiktoken)"
        )

    source = _chat_template_source(config, template_path)
    if chat_format is None and source is not None:
        specials = {
            key: tok.id_to_token(tid)
            for key, tid in (("bos_token", tok.bos_id), ("eos_token", tok.eos_id))
            if tid is not None
        }
        tok.chat_template = ChatTemplate(source, template_path, specials)
        tok.chat_format = "template"
    else:
        tok.chat_format = chat_format or _detect_chat_format(tok)
        if tok.chat_format is not None and tok.chat_format not in CHAT_FORMATS:
            raise TokenizerError(f"unknown chat format {tok.chat_format!r}; expected one of {CHAT_FORMATS}")
    return tok


def check_vocab(tokenizer: Tokenizer, model_vocab_size: int, path=None) -> None:
    """A tokenizer that can produce an id >= the model's vocab size would index out of the embedding."""
    if not tokenizer.vocab_fits(model_vocab_size):
        raise TokenizerError(
            f"{path or tokenizer.path}: tokenizer has ids up to {tokenizer.max_id} "
            f"but the model's vocab_size is {model_vocab_size}"
        )


# ---------------------------------------------------------------------------- streaming


class StreamDecoder:
    """Turn generated ids into text pieces as they come; the pieces plus flush() equal decode(ids).

    A tokenizer.json streams through its library's DecodeStream. For SentencePiece and tiktoken
    we keep a small window of ids: `prefix` (already shown, kept for context) and the ids after
    it; each push decodes the window and emits what is new beyond the prefix's text. Decoding
    the window rather than single ids keeps SentencePiece's leading "▁" as a space; holding back
    text that ends in U+FFFD never splits a UTF-8 character.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tok = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # window start
        self.read = 0  # ids[prefix:read] have been emitted
        self.stream = None
        self.shown = 0  # characters the library's stream has emitted
        if isinstance(tokenizer, HFTokenizer):
            from tokenizers.decoders import DecodeStream

            self.stream = DecodeStream(skip_special_tokens=False)

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        if self.stream is not None:
            text = self.stream.step(self.tok.backend, int(token_id)) or ""  # None: a character is incomplete
            self.shown += len(text)
            return text
        prefix_text = self.tok.decode(self.ids[self.prefix : self.read])
        text = self.tok.decode(self.ids[self.prefix :])
        if len(text) > len(prefix_text) and not text.endswith("\ufffd"):
            new = text[len(prefix_text) :]
            self.prefix, self.read = self.read, len(self.ids)
            self._trim()
            return new
        return ""

    def flush(self) -> str:
        """What is still held back (an incomplete character comes out as U+FFFD); then start over."""
        if self.stream is not None:
            rest = self.tok.decode(self.ids)[self.shown :]
            self.__init__(self.tok)
            return rest
        prefix_text = self.tok.decode(self.ids[self.prefix : self.read])
        text = self.tok.decode(self.ids[self.prefix :])
        self.ids, self.prefix, self.read = [], 0, 0
        return text[len(prefix_text) :]

    def _trim(self):
        if self.prefix > 64:  # drop ids that are no longer part of the window
            del self.ids[: self.prefix]
            self.read -= self.prefix
            self.prefix = 0


class StopStrings:
    """Cut streamed text at the first stop string, wherever token boundaries fall.

    push() takes decoded text pieces (StreamDecoder's) and returns the part that is safe to show:
    text that holds no stop string and cannot be the start of one. A tail that could still grow
    into a stop string is held back until the next piece settles it (flush() releases it when
    generation ends). As soon as a piece completes a stop string, `fired` names it, `text` ends
    just before it, and nothing more is shown. When one piece completes several, the one that
    starts earliest wins (the first listed, when two start at the same character).
    """

    def __init__(self, stops: Sequence[str] = ()):
        if any(not s for s in stops):
            raise ValueError("a stop string must not be empty")
        self.stops = list(stops)
        self.text = ""  # everything pushed so far; after a stop fires, the text before it
        self.shown = 0  # characters of text already returned
        self.fired: str | None = None

    def push(self, piece: str) -> str:
        if self.fired is not None:
            return ""
        self.text += piece
        # No stop can start before `shown`: everything before it was checked, and a stop that
        # began there and ran past the end would have been held back.
        hits = [(i, n) for n, s in enumerate(self.stops) if (i := self.text.find(s, self.shown)) >= 0]
        if hits:
            cut, which = min(hits)
            self.fired = self.stops[which]
            self.text = self.text[:cut]
            return self._show(cut)
        return self._show(len(self.text) - self._held_back())

    def flush(self) -> str:
        """The held-back tail, once no more text will come."""
        return self._show(len(self.text))

    def _held_back(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of some stop string."""
        longest = min(max((len(s) for s in self.stops), default=1) - 1, len(self.text) - self.shown)
        for n in range(longest, 0, -1):
            tail = self.text[-n:]
            if any(s.startswith(tail) for s in self.stops):
                return n
        return 0

    def _show(self, end: int) -> str:
        new, self.shown = self.text[self.shown : end], end
        return new


# ---------------------------------------------------------------------------- GGUF

# A GGUF holds a vocabulary, merges and a pre-tokenizer name, not a tokenizer.json; we write the
# tokenizer.json that the model's own Hugging Face repo has. (transformers' GGUF loader ignores
# "smollm"'s digit splitting and tokenizes "Section  2." unlike SmolLM2's tokenizer.json.)
_BYTELEVEL_REGEX = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
_BYTELEVEL_NOREGEX = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}


def _split_then_bytelevel(pattern):
    split = {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False}
    return {"type": "Sequence", "pretokenizers": [split, _BYTELEVEL_NOREGEX]}


# GGUF tokenizer.ggml.pre -> Hugging Face pre_tokenizer JSON.
GGUF_PRE_TOKENIZERS = {
    "gpt-2": _BYTELEVEL_REGEX,
    "smollm": {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, _BYTELEVEL_REGEX]},
    "llama-bpe": _split_then_bytelevel(LLAMA3_PATTERN),
    "llama3": _split_then_bytelevel(LLAMA3_PATTERN),
    "qwen2": _split_then_bytelevel(QWEN2_PATTERN),
}


def _bytes_to_unicode() -> dict[int, str]:
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


def _gguf_tokenizer_config(reader) -> dict:
    """tokenizer_config.json's add_bos_token and chat template from GGUF metadata (bos/eos ids
    are the caller's: they differ between the two vocabulary kinds)."""
    config = {"add_bos_token": bool(_gguf_value(reader, "tokenizer.ggml.add_bos_token", False))}
    template = _gguf_value(reader, "tokenizer.chat_template")
    if template:
        config["chat_template"] = template
    return config


def _gguf_sentencepiece_files(reader, name: str) -> dict:
    """tokenizer.model (+ tokenizer_config.json) for a SentencePiece ("llama") GGUF vocabulary:
    llama.cpp stores the model's pieces, scores and types; they are written back as the
    SentencePiece model proto they came from, so sentencepiece itself does the tokenizing."""
    try:
        from sentencepiece import sentencepiece_model_pb2 as sp_model
    except ImportError as e:  # the generated module needs protobuf
        raise TokenizerError(
            f"{name}: a SentencePiece GGUF vocabulary needs protobuf ({first_line(e)}); pip install protobuf"
        ) from None
    tokens = _gguf_value(reader, "tokenizer.ggml.tokens")
    scores = _gguf_value(reader, "tokenizer.ggml.scores")
    types = _gguf_value(reader, "tokenizer.ggml.token_type") or [1] * len(tokens or [])
    if not tokens or not scores or len(scores) != len(tokens) or len(types) != len(tokens):
        raise TokenizerError(f"{name}: SentencePiece GGUF vocabulary lacks tokens, scores or token types")
    proto = sp_model.ModelProto()
    for piece, score, kind in zip(tokens, scores, types):
        # llama.cpp's token types are SentencePiece's (1 normal .. 6 byte)
        proto.pieces.add(piece=piece, score=score, type=kind if 1 <= kind <= 6 else 1)
    spec = proto.trainer_spec
    spec.model_type = sp_model.TrainerSpec.BPE
    spec.vocab_size = len(tokens)
    spec.byte_fallback = 6 in types  # <0x00>..<0xFF> pieces: text outside the vocab goes to bytes
    for field, key in (("unk_id", "unknown"), ("bos_id", "bos"), ("eos_id", "eos"), ("pad_id", "padding")):
        tid = _gguf_value(reader, f"tokenizer.ggml.{key}_token_id")
        setattr(spec, field, tid if tid is not None and 0 <= tid < len(tokens) else -1)
    if spec.unk_id < 0:  # sentencepiece requires one; llama.cpp's converter always has it
        unknown = [i for i, kind in enumerate(types) if kind == 2]
        if not unknown:
            raise TokenizerError(f"{name}: SentencePiece GGUF vocabulary has no unknown token")
        spec.unk_id = unknown[0]
    # The Llama-2 / Mistral normalizer: text as is, "▁" for spaces, one put before the text
    norm = proto.normalizer_spec
    norm.name = "identity"
    norm.add_dummy_prefix = bool(_gguf_value(reader, "tokenizer.ggml.add_space_prefix", True))
    norm.remove_extra_whitespaces = False
    norm.escape_whitespaces = True
    config = _gguf_tokenizer_config(reader)
    if "tokenizer.ggml.add_bos_token" not in reader.fields:
        config["add_bos_token"] = spec.bos_id >= 0  # SentencePiece Llamas start with <s>
    return {"tokenizer.model": proto.SerializeToString(), "tokenizer_config.json": json.dumps(config, indent=2)}


def gguf_tokenizer_files(reader) -> dict:
    """The tokenizer files for the tokenizer embedded in a GGUF file: tokenizer.json +
    tokenizer_config.json for byte-level BPE ("gpt2"), tokenizer.model + tokenizer_config.json
    for SentencePiece ("llama"). `reader` is a gguf.GGUFReader."""
    name = getattr(getattr(reader, "data", None), "filename", None) or "GGUF file"
    model = _gguf_value(reader, "tokenizer.ggml.model")
    if model is None:
        raise TokenizerError(f"{name}: no tokenizer.ggml.model in GGUF metadata")
    if model == "llama":
        return _gguf_sentencepiece_files(reader, name)
    if model != "gpt2":
        raise TokenizerError(
            f"{name}: GGUF tokenizer model {model!r} is not supported; "
            f"only byte-level BPE ('gpt2') and SentencePiece ('llama')"
        )
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
    added = [
        {
            "id": i,
            "content": t,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": ty == _GGUF_CONTROL,
        }
        for i, (t, ty) in enumerate(zip(tokens, types))
        if ty in (_GGUF_CONTROL, _GGUF_USER_DEFINED)
    ]
    tokenizer_json = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": {"type": "NFC"} if pre == "qwen2" else None,
        "pre_tokenizer": GGUF_PRE_TOKENIZERS[pre],
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "vocab": {t: i for i, t in enumerate(tokens)},
            "merges": list(merges),
        },
    }
    config = _gguf_tokenizer_config(reader)
    for key, field in (("bos_token", "tokenizer.ggml.bos_token_id"), ("eos_token", "tokenizer.ggml.eos_token_id")):
        tid = _gguf_value(reader, field)
        if tid is not None and 0 <= tid < len(tokens):
            tok = tokens[tid]
            if types[tid] not in (_GGUF_CONTROL, _GGUF_USER_DEFINED):  # a normal token: config holds its text
                tok = bytes(_UNICODE_TO_BYTE[c] for c in tok).decode("utf-8", errors="replace")
            config[key] = tok
    return {
        "tokenizer.json": json.dumps(tokenizer_json, ensure_ascii=False),
        "tokenizer_config.json": json.dumps(config, ensure_ascii=False, indent=2),
    }
