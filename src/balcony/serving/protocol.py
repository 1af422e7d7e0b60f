"""The OpenAI request protocol: validating completion and chat bodies into `Plan`s."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .chat import ChatEncoder
from .config import AUTO, ServeConfig
from .errors import ApiError
from .scheduler import GREEDY, Sampling

if TYPE_CHECKING:  # heavy imports stay lazy: the CLI imports this module on every run

    from ..modeling.model import BalconyModel


log = logging.getLogger("balcony.serving")


_MISSING = object()


_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "a boolean", list: "an array", dict: "an object"}


def _type_name(value: Any) -> str:
    return _TYPE_NAMES.get(type(value), "null" if value is None else type(value).__name__)


def _show(value: Any, limit: int = 60) -> str:
    """A value for an error message, cut short (a 4000-digit integer is not worth quoting)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _get(body: dict, name: str, kinds: tuple[type, ...], default: Any) -> Any:
    """Read an optional field, checking its JSON type (None/absent -> default) and that a number is finite."""
    value = body.get(name, _MISSING)
    if value is _MISSING or value is None:
        return default
    ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
    if not ok:
        expected = " or ".join(_TYPE_NAMES.get(k, k.__name__) for k in kinds)
        raise ApiError(400, f"Invalid type for '{name}': expected {expected}, but got {_type_name(value)} instead.", param=name, code="invalid_type")
    if isinstance(value, float) and not math.isfinite(value):  # Python's json reads NaN, Infinity and 1e999
        raise ApiError(400, f"Invalid '{name}': {value!r} is not a finite number.", param=name, code="invalid_value")
    return float(value) if float in kinds and int not in kinds and not isinstance(value, bool) else value


def _in_range(name: str, value: float, lo: float, hi: float, *, lo_open: bool = False) -> None:
    if (isinstance(value, float) and math.isnan(value)) or value < lo or value > hi or (lo_open and value == lo):
        bound = f"({lo:g}" if lo_open else f"[{lo:g}"
        raise ApiError(400, f"Invalid '{name}': {_show(value)} is outside the range {bound}, {hi:g}].", param=name, code="invalid_value")


MAX_STOP = 4
"""Stop sequences per request (OpenAI's limit)."""


MAX_STOP_CHARS = 1024
"""Characters per stop sequence."""


SEED_RANGE = (-(2**63), 2**63 - 1)
"""Seeds are 64-bit signed integers (OpenAI's int64; the seed of choice k is seed + k)."""


COMMON_FIELDS = {
    "model", "stream", "stream_options", "max_tokens", "temperature", "top_p", "top_k", "n", "stop", "seed",
    "presence_penalty", "frequency_penalty", "logit_bias", "logprobs", "user", "budget", "speculative", "threshold",
}


IGNORED_FIELDS = {"user", "store", "metadata", "service_tier", "parallel_tool_calls"}


COMPLETION_FIELDS = COMMON_FIELDS | IGNORED_FIELDS | {"prompt", "echo", "best_of", "suffix"}


CHAT_FIELDS = COMMON_FIELDS | IGNORED_FIELDS | {"messages", "max_completion_tokens", "top_logprobs", "tools", "tool_choice", "response_format"}


def token_budget(threshold: float) -> str:
    """The budget label of token-level exits at `threshold` (what the response names), e.g. ``auto@0.8``."""
    return f"auto@{threshold:g}"


@dataclass
class Plan:
    """A validated request, ready to become jobs."""

    kind: str
    budget: str | None
    speculative: bool
    prompts: list[list[int]]
    prompt_texts: list[str]
    n: int
    max_tokens: int
    sampling: Sampling
    seed: int | None
    stop: list[str]
    stream: bool
    include_usage: bool
    echo: bool
    threshold: float | None = None


class Frontend:
    """Turns HTTP bodies into `Plan`s and model output into OpenAI JSON.

    Args:
        model: The Balcony model (for budgets and layers).
        tokenizer: Its tokenizer.
        config: Server settings.
    """

    def __init__(self, model: "BalconyModel", tokenizer, config: ServeConfig):
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.name = config.model_name
        self.budgets = dict(model.budgets)  # name -> layer, shallowest first
        self.layer_to_budget = {j: b for b, j in self.budgets.items()}
        base_ctx = getattr(model.base.config, "max_position_embeddings", None)
        self.context_length = int(config.context_length or base_ctx or 2048)
        self.vocab_size = len(tokenizer)
        # A prompt of more characters than the context times the longest token cannot fit: refuse it before
        # tokenising (a 20 MB prompt once took the event loop 21 s to find out). Byte-level vocabularies spell
        # each byte as one character, so this bounds UTF-8 bytes and hence characters.
        longest = max((len(t) for t in tokenizer.get_vocab()), default=1) if hasattr(tokenizer, "get_vocab") else 64
        self.max_prompt_chars = self.context_length * max(longest, 1)
        self.chat = ChatEncoder(tokenizer, special_in_content=config.chat_special_tokens)
        self.chat_template = self.chat.has_template
        if not self.chat_template:
            log.warning("the tokenizer has no chat template: /v1/chat/completions uses a plain 'role: content' format")
        default = config.default_budget
        try:
            self.default_budget = None if default.lower() == AUTO else self.budget_name(default, param="default_budget")
        except ApiError as e:
            raise ValueError(f"default budget: {e.message}") from None

    # ------------------------------------------------------------ budgets
    def model_ids(self) -> list[tuple[str, str | None]]:
        """(id, budget) for each served model id; the bare name first (budget None = its default)."""
        return [(self.name, None)] + [(f"{self.name}:{b}", b) for b in self.budgets]

    def model_card(self, model_id: str, budget: str | None) -> dict:
        """The /v1/models entry of `model_id`: a budget's exit layer, or (budget None) the bare name's default and budgets."""
        card = {"id": model_id, "object": "model", "created": 0, "owned_by": "balcony", "context_length": self.context_length}
        if budget is None:
            card.update(budget=self.default_budget or AUTO, budgets=list(self.budgets))
        else:
            card.update(budget=budget, exit_layer=self.budgets[budget], num_layers=self.model.num_layers)
        return card

    def budget_name(self, value: str | int, param: str = "budget") -> str:
        """Canonical budget name for a name or exit layer.

        Raises:
            ApiError: 400 for an unknown budget, listing the accepted ones.
        """
        try:
            return self.layer_to_budget[self.model.resolve_exit(value)]
        except ValueError as e:
            raise ApiError(400, f"{e}; or 'auto'", param=param, code="invalid_budget") from None

    def resolve_model(self, name: Any) -> tuple[str | None, bool]:
        """Model id -> (budget or None for auto, whether the id named a budget).

        Raises:
            ApiError: 400 when missing or not a string, 404 `model_not_found` when unknown.
        """
        if name is None or name == "":
            raise ApiError(400, "You must provide a model parameter.", param="model", code="missing_required_parameter")
        if not isinstance(name, str):
            raise ApiError(400, f"Invalid type for 'model': expected a string, but got {_type_name(name)} instead.", param="model", code="invalid_type")
        if name.lower() == self.name.lower():
            return self.default_budget, False
        base, sep, suffix = name.rpartition(":")
        if sep and base.lower() == self.name.lower():
            if suffix.lower() == AUTO:
                return None, True
            for b in self.budgets:
                if b.lower() == suffix.lower():
                    return b, True
        available = ", ".join(i for i, _ in self.model_ids()) + f", {self.name}:auto"
        raise ApiError(404, f"The model `{name[:200]}` does not exist. Available models: {available}.", param="model", code="model_not_found")

    # ------------------------------------------------------------ parsing
    def parse(self, body: Any, kind: str) -> Plan:
        """Validate a completions (`kind="completions"`) or chat (`"chat"`) body.

        Raises:
            ApiError: 400 / 404 with OpenAI's error shape.
        """
        if not isinstance(body, dict):
            raise ApiError(400, f"The request body must be a JSON object, not {_type_name(body)}.", code="invalid_body")
        known = COMPLETION_FIELDS if kind == "completions" else CHAT_FIELDS
        for key in body:
            if key not in known:
                raise ApiError(400, f"Unrecognized request argument supplied: {key[:200]}", param=key[:200], code="unknown_parameter")
        budget, named = self.resolve_model(body.get("model"))
        field_budget = body.get("budget")
        if field_budget is not None:
            if not isinstance(field_budget, (str, int)) or isinstance(field_budget, bool):
                raise ApiError(400, f"Invalid type for 'budget': expected a string, but got {_type_name(field_budget)} instead.", param="budget", code="invalid_type")
            chosen = None if str(field_budget).lower() == AUTO else self.budget_name(field_budget)
            if named and chosen != budget:
                raise ApiError(
                    400, f"The model id `{body['model']}` asks for budget {budget or AUTO} but 'budget' asks for {chosen or AUTO}; give one.",
                    param="budget", code="conflicting_budget",
                )
            budget = chosen
        speculative = _get(body, "speculative", (bool,), False)
        if speculative and budget is not None and self.budgets[budget] >= self.model.num_layers:
            raise ApiError(
                400, f"Speculative decoding drafts with a smaller budget and verifies with the full model: "
                f"choose a draft budget below {budget} (e.g. {next(iter(self.budgets))}).",
                param="speculative", code="invalid_value",
            )
        threshold = _get(body, "threshold", (int, float), None)
        if threshold is not None:
            _in_range("threshold", threshold, 0.0, 1.0)
            if field_budget is not None or named:
                raise ApiError(
                    400, "'threshold' asks for token-level exits (each token leaves at the first exit confident enough), "
                    "which choose the depth per token: do not also name a budget (use the bare model id).",
                    param="threshold", code="conflicting_budget",
                )
            if speculative:
                raise ApiError(400, "'threshold' (token-level exits) and 'speculative' are two decoding modes: pick one.",
                               param="threshold", code="invalid_value")
            budget = token_budget(float(threshold))
        stream = _get(body, "stream", (bool,), False)
        stream_options = _get(body, "stream_options", (dict,), {})
        include_usage = bool(stream_options.get("include_usage", False))
        n = _get(body, "n", (int,), 1)
        _in_range("n", n, 1, 16)
        temperature = _get(body, "temperature", (int, float), 1.0)
        _in_range("temperature", temperature, 0.0, 2.0)
        top_p = _get(body, "top_p", (int, float), 1.0)
        _in_range("top_p", top_p, 0.0, 1.0, lo_open=True)
        top_k = _get(body, "top_k", (int,), None)
        if top_k is not None:
            _in_range("top_k", top_k, 0, 1 << 30)
        seed = _get(body, "seed", (int,), None)
        if seed is not None and not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
            raise ApiError(400, f"Invalid 'seed': {_show(seed)} is not a 64-bit signed integer (from -2**63 to 2**63 - 1).", param="seed", code="invalid_value")
        for name in ("presence_penalty", "frequency_penalty"):
            value = _get(body, name, (int, float), 0.0)
            _in_range(name, value, -2.0, 2.0)
            if value:
                raise ApiError(400, f"'{name}' is not supported by this server (only 0).", param=name, code="unsupported_parameter")
        if _get(body, "logit_bias", (dict,), {}):
            raise ApiError(400, "'logit_bias' is not supported by this server.", param="logit_bias", code="unsupported_parameter")
        stop = self._stop(body)
        if kind == "completions":
            prompts, texts = self._completion_prompts(body, n)
            echo = _get(body, "echo", (bool,), False)
            if _get(body, "logprobs", (int,), 0):
                raise ApiError(400, "'logprobs' is not supported by this server.", param="logprobs", code="unsupported_parameter")
            if _get(body, "best_of", (int,), 1) != 1:
                raise ApiError(400, "'best_of' other than 1 is not supported by this server.", param="best_of", code="unsupported_parameter")
            if _get(body, "suffix", (str,), ""):
                raise ApiError(400, "'suffix' is not supported by this server.", param="suffix", code="unsupported_parameter")
            max_tokens = _get(body, "max_tokens", (int,), 16)
            max_param = "max_tokens"
        else:
            prompts, texts = self._chat_prompt(body)
            echo = False
            if _get(body, "logprobs", (bool,), False) or _get(body, "top_logprobs", (int,), 0):
                raise ApiError(400, "'logprobs' is not supported by this server.", param="logprobs", code="unsupported_parameter")
            if _get(body, "tools", (list,), []):
                raise ApiError(400, "'tools' are not supported by this server.", param="tools", code="unsupported_parameter")
            fmt = _get(body, "response_format", (dict,), {"type": "text"})
            if fmt.get("type", "text") != "text":
                raise ApiError(400, "Only response_format {'type': 'text'} is supported.", param="response_format", code="unsupported_parameter")
            max_param = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
            max_tokens = _get(body, max_param, (int,), None)
            if max_tokens is None:
                max_tokens = max(1, min(self.config.max_tokens_limit, self.context_length - max(map(len, prompts))))
        longest = max(map(len, prompts))
        if longest >= self.context_length:
            raise ApiError(
                400, f"This model's maximum context length is {self.context_length} tokens. However, your prompt is {longest} tokens long.",
                param="prompt" if kind == "completions" else "messages", code="context_length_exceeded",
            )
        if max_tokens < 1 or max_tokens > self.config.max_tokens_limit:
            raise ApiError(400, f"Invalid '{max_param}': {_show(max_tokens)} is outside the range [1, {self.config.max_tokens_limit}].", param=max_param, code="invalid_value")
        if longest + max_tokens > self.context_length:
            raise ApiError(
                400,
                f"This model's maximum context length is {self.context_length} tokens. However, you requested "
                f"{longest + max_tokens} tokens ({longest} in the prompt, {max_tokens} in the completion). "
                f"Please reduce the prompt or the completion length.",
                param=max_param, code="context_length_exceeded",
            )
        if len(prompts) * n > self.config.queue_capacity:
            raise ApiError(400, f"This request asks for {len(prompts) * n} completions; the server takes at most {self.config.queue_capacity}.", param="n", code="invalid_value")
        sampling: Sampling = GREEDY if temperature == 0 else (True, float(temperature), top_k or None, float(top_p))
        return Plan(kind, budget, speculative, prompts, texts, n, max_tokens, sampling, seed, stop, stream, include_usage, echo,
                    None if threshold is None else float(threshold))

    def _stop(self, body: dict) -> list[str]:
        stop = body.get("stop")
        if stop is None:
            return []
        stops = [stop] if isinstance(stop, str) else stop
        if not (isinstance(stops, list) and len(stops) <= MAX_STOP and all(isinstance(s, str) for s in stops)):
            raise ApiError(400, f"Invalid 'stop': expected a string or an array of at most {MAX_STOP} strings.", param="stop", code="invalid_value")
        for i, s in enumerate(stops):
            if len(s) > MAX_STOP_CHARS:
                which = "'stop'" if isinstance(stop, str) else f"'stop[{i}]'"
                raise ApiError(
                    400, f"Invalid {which}: {len(s)} characters; a stop sequence may have at most {MAX_STOP_CHARS}.",
                    param="stop", code="invalid_value",
                )
        return list(stops)

    def _too_long(self, chars: int, param: str) -> ApiError:
        return ApiError(
            400, f"This model's maximum context length is {self.context_length} tokens. However, your prompt has {chars} "
            f"characters, more than that many tokens can hold (no token is longer than {self.max_prompt_chars // self.context_length}).",
            param=param, code="context_length_exceeded",
        )

    def _encode(self, text: str, special: bool = True) -> list[int]:
        ids = self.tokenizer(text, add_special_tokens=special)["input_ids"]
        if not ids and self.tokenizer.bos_token_id is not None:
            ids = [self.tokenizer.bos_token_id]
        return list(ids)

    def _completion_prompts(self, body: dict, n: int) -> tuple[list[list[int]], list[str]]:
        prompt = body.get("prompt", _MISSING)
        if prompt is _MISSING or prompt is None:
            raise ApiError(400, "You must provide a prompt parameter.", param="prompt", code="missing_required_parameter")
        vocab = self.vocab_size
        def is_ids(x: Any) -> bool:
            return isinstance(x, list) and bool(x) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)
        if isinstance(prompt, str):
            items: list = [prompt]
        elif is_ids(prompt):
            items = [prompt]
        elif isinstance(prompt, list) and prompt and all(isinstance(p, str) or is_ids(p) for p in prompt):
            items = prompt
        else:
            raise ApiError(400, "Invalid 'prompt': expected a string, an array of strings, an array of token ids, or an array of such arrays.", param="prompt", code="invalid_type")
        if len(items) * n > self.config.queue_capacity:  # before tokenising any of them
            raise ApiError(400, f"This request asks for {len(items) * n} completions; the server takes at most {self.config.queue_capacity}.", param="n", code="invalid_value")
        for item in items:
            if len(item) > (self.max_prompt_chars if isinstance(item, str) else self.context_length):
                raise self._too_long(len(item), "prompt") if isinstance(item, str) else ApiError(
                    400, f"This model's maximum context length is {self.context_length} tokens. However, your prompt is {len(item)} tokens long.",
                    param="prompt", code="context_length_exceeded",
                )
        prompts, texts = [], []
        for item in items:
            if isinstance(item, str):
                ids = self._encode(item)
                texts.append(item)
            else:
                if any(not 0 <= t < vocab for t in item):
                    raise ApiError(400, f"Invalid 'prompt': token ids must be in [0, {vocab}).", param="prompt", code="invalid_value")
                ids = list(item)
                texts.append(self.tokenizer.decode(ids))
            if not ids:
                raise ApiError(400, "The prompt is empty and the tokenizer has no BOS token to start from.", param="prompt", code="invalid_value")
            prompts.append(ids)
        return prompts, texts

    def _chat_prompt(self, body: dict) -> tuple[list[list[int]], list[str]]:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ApiError(400, "'messages' must be a non-empty array of {role, content} objects.", param="messages", code="invalid_value")
        clean = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise ApiError(400, f"Invalid 'messages[{i}]': expected an object with a string 'role'.", param=f"messages[{i}]", code="invalid_value")
            role = m["role"]
            if role not in ("system", "developer", "user", "assistant", "tool"):
                raise ApiError(400, f"Invalid 'messages[{i}].role': {role!r} is not one of system, developer, user, assistant, tool.", param=f"messages[{i}].role", code="invalid_value")
            content = m.get("content")
            if content is None:
                content = ""
            elif isinstance(content, list):
                parts = []
                for part in content:
                    if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                        raise ApiError(400, f"Invalid 'messages[{i}].content': only text parts are supported.", param=f"messages[{i}].content", code="invalid_value")
                    parts.append(part["text"])
                content = "".join(parts)
            elif not isinstance(content, str):
                raise ApiError(400, f"Invalid type for 'messages[{i}].content': expected a string or an array of text parts, but got {_type_name(content)} instead.", param=f"messages[{i}].content", code="invalid_type")
            clean.append({"role": "system" if role == "developer" else role, "content": content})
        chars = sum(len(m["content"]) for m in clean)
        if chars > self.max_prompt_chars:
            raise self._too_long(chars, "messages")
        try:
            ids, text = self.chat.encode(clean)
        except ValueError as e:  # the template rejected the conversation (e.g. role order)
            raise ApiError(400, f"The chat template rejected these messages: {e}", param="messages", code="invalid_value") from None
        if not ids and self.tokenizer.bos_token_id is not None:
            ids = [self.tokenizer.bos_token_id]
        return [ids], [text]
