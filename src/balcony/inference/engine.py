"""Decoding at one budget, gpt-fast style: `prefill`, `decode_one_token`, and `generate_stream` looping them.

The decoder layers are the base model's own modules (every supported family
works unchanged, and the full budget reproduces the base). What is replaced is
everything *around* them that costs time per token:

* HF's mask functions, rebuilt from scratch at every step: here a decode step's
  mask is a view of one (B, L) boolean row, or None when nothing is padded
  (`balcony.inference.spans`);
* DynamicCache's `torch.cat` growth: here each layer's K/V live in buffers
  sized once for prompt + new tokens, written in place at a write pointer
  (`balcony.inference.cache`);
* LM-head logits for every prompt position: here only sampled positions get logits;
* `generate`'s logits processors and stopping criteria (`balcony.inference.stopping`);
* on steps of a few tokens of Llama-style layers, HF's per-layer plumbing
  around the ~25 tensor ops of a layer (`balcony.inference.fast_path`, bit-identical).

A decode step (`decode_one_token`) reads its position from a device tensor and
writes the cache at that index; compiled, it attends over the whole pre-sized
cache with a validity mask, so its shapes never change: `torch.compile(fullgraph=True)`
traces it once per budget and batch shape and CUDA graphs can replay it (eager,
it stops at the filled length, which costs nothing to know). The per-token loop
never waits for the device (the only host syncs are the stop checks: every 8
steps on an accelerator).

What is left is the weights: at batch 1 every weight is streamed from memory
once per token (`balcony bench` prints this floor); fewer weight bytes
(`balcony.inference.quantize`), batching and self-speculative decoding
(`balcony.inference.speculative`, which reuses `run_layers`, `run_exit` and the
cache) go further.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Iterator

import torch

from .cache import budget_slots, kv_pool
from .devices import check_generator, execution_device, is_dispatched
from .fast_path import FAST_MAX_TOKENS, _decode_layer
from .options import DecodeOptions, resolve_options
from .sampling import sample
from .spans import DecodeState, Span, make_span, new_state, static_span
from .stopping import StopChecker, check_inputs, check_teacher_tokens

if TYPE_CHECKING:  # types only: inference runs on any model with `parts` and `exits`
    from ..modeling.model import BalconyModel, Exit


def run_layers(model: BalconyModel, state: DecodeState, span: Span, hidden: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """(B, T, H) hidden after layer `start` -> after layer `stop`, through base layers start..stop-1."""
    layers, types = model.parts.layers, model.parts.layer_types
    state.cache.pos, state.cache.index = span.pos, span.index
    fast = state.fast if span.length <= FAST_MAX_TOKENS else None
    kwargs = {model._layer_kw: state.cache, "use_cache": True, "position_ids": span.position_ids, "position_embeddings": span.rope}
    for i in range(start, stop):
        layer, mask = layers[i], span.masks[types[i]]
        if fast and fast.get(id(layer)):
            hidden = _decode_layer(layer, hidden, span, state.cache, mask)
            continue
        out = layer(hidden, attention_mask=mask, **kwargs)
        hidden = out[0] if isinstance(out, tuple) else out
    return hidden


def run_exit(model: BalconyModel, state: DecodeState, span: Span, hidden: torch.Tensor, j: int) -> torch.Tensor:
    """(B, T, H) hidden after layer j -> (B, T, H) normed state for the head: exit j's module, or the final norm."""
    module = model.exits[str(j)] if str(j) in model.exits else None
    if module is None:
        return model.parts.norm(hidden)
    state.cache.pos, state.cache.index = span.pos, span.index
    mask = span.masks[model.parts.layer_types[-1]]  # the exit layer is a copy of the last layer
    if span.length <= FAST_MAX_TOKENS and state.fast and state.fast.get(id(module.layer)) and not module._forward_hooks:
        return module.norm(_decode_layer(module.layer, hidden, span, state.cache, mask))
    return module(
        hidden,
        attention_mask=mask,
        use_cache=True,
        position_ids=span.position_ids,
        position_embeddings=span.rope,
        **{model._layer_kw: state.cache},
    )


def forward_budget(model: BalconyModel, state: DecodeState, tokens: torch.Tensor, j: int, keep: int = 1, position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """(B, T) tokens at positions [state.length, +T) -> (B, keep, V) logits of the last `keep` positions at budget j."""
    hidden = model.parts.embed_tokens(tokens)  # (B, T, H)
    span = make_span(model, state, state.length, tokens.shape[1], hidden, position_ids)
    hidden = run_layers(model, state, span, hidden, 0, j)
    hidden = run_exit(model, state, span, hidden, j)
    state.length += tokens.shape[1]
    return model.parts.lm_head(hidden[:, -keep:])


def prefill(
    model: BalconyModel,
    state: DecodeState,
    input_ids: torch.Tensor,
    j: int,
    attention_mask: torch.Tensor | None = None,
    chunk: int | None = None,
    cancel: Callable[[], bool] | None = None,
) -> torch.Tensor | None:
    """Run the prompt (B, T) at budget j into an empty cache; returns the (B, V) next-token logits.

    Args:
        chunk: Positions per forward pass (None: the whole prompt in one pass). Each chunk attends
            to the cache the earlier ones wrote, so the cache and the logits are the same up to float rounding.
        cancel: Asked before each chunk; when it answers True the prefill stops and returns None
            (the cache is then partial and must not be decoded from).
    """
    position_ids = None
    if state.pad is not None:  # HF's rule for padded prompts: count real tokens (any mask, not only left padding)
        position_ids = (attention_mask.to(state.arange.device).long().cumsum(-1) - 1).clamp(min=0)
    t = input_ids.shape[1]
    step = t if chunk is None else chunk
    for start in range(0, t, step):
        if cancel is not None and cancel():
            return None
        end = min(start + step, t)
        pos = None if position_ids is None else position_ids[:, start:end]
        logits = forward_budget(model, state, input_ids[:, start:end], j, 1, pos)
    return logits[:, -1]


def _static_step(model: BalconyModel, state: DecodeState, token: torch.Tensor, j: int, limit: int | None = None) -> torch.Tensor:
    """(B,) tokens at position `state.pos` -> (B, V) logits: the same shapes at every step (what gets compiled).

    `limit` (eager only): attend to the first `limit` positions instead of the whole cache (`static_span`).
    """
    hidden = model.parts.embed_tokens(token[:, None])  # (B, 1, H)
    span = static_span(model, state, hidden, limit)
    state.cache.limit = limit
    hidden = run_layers(model, state, span, hidden, 0, j)
    hidden = run_exit(model, state, span, hidden, j)
    return model.parts.lm_head(hidden[:, -1])


def decode_one_token(
    model: BalconyModel, state: DecodeState, token: torch.Tensor, j: int, step: Callable | None = None
) -> torch.Tensor:
    """One step: (B,) last tokens -> (B, V) next-token logits, writing one cache position.

    The step reads its position from `state.pos` and writes the cache at that
    device index (`balcony.inference.spans.static_span`); the write pointers
    move here, in Python, around it. A compiled step attends over the whole
    cache with a validity mask (its shapes never change); the eager one stops
    at the filled length, which the host knows for free, so it does no more
    work than it needs (on a CPU at batch 8 attending to the whole cache of a
    128-token generation cost up to 7% of the decode speed).

    Args:
        step: The step function (`compiled_decode(model)` for a compiled one; default: eager).
    """
    slots = budget_slots(model, j)
    state.cache.check_write(slots, state.length)
    if step is None:
        logits = _static_step(model, state, token, j, state.length + 1)
    else:
        logits = step(model, state, token, j)
    state.cache.index = state.cache.limit = None
    state.cache.mark_written(slots, state.length + 1)
    state.length += 1
    return logits


def generate_stream(
    model: BalconyModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    exit: Exit = None,
    options: DecodeOptions | None = None,
    stop: Callable[[torch.Tensor], bool] | None = None,
    cancel: Callable[[], bool] | None = None,
    teacher_tokens: torch.Tensor | None = None,
    **kwargs: Any,
) -> Iterator[torch.Tensor]:
    """Yield (B,) new tokens one step at a time at one budget.

    Finished sequences (EOS or a stop string) keep yielding the fill token
    (`pad_token_id`, else the first EOS id); the stream ends when all are
    finished, after `max_new_tokens` steps, when `stop(token)` is True, or
    when `cancel()` is True. `cancel` is asked before every prefill chunk
    (`DecodeOptions.prefill_chunk`) and every decode step, so a caller can
    abandon a long prompt mid-prefill (a server whose client left or timed out).
    `teacher_tokens` ((B, >= max_new_tokens - 1) ids): feed these after each step instead of the
    chosen tokens (teacher-forced decoding, to time and score decoding along a given text; the stream
    still yields the model's choices). See `generate` for the other arguments.
    """
    opts, _ = resolve_options(options, kwargs)
    check_inputs(input_ids, attention_mask, opts.max_new_tokens)
    cfg = opts.sampling
    j = model.resolve_exit(exit)
    b, t = input_ids.shape
    device = execution_device(model)
    check_generator(opts.generator, device)
    forced = check_teacher_tokens(teacher_tokens, b, opts.max_new_tokens, device)
    step_fn = compiled_decode(model, opts.compile) if opts.compile else None
    max_len = t + opts.max_new_tokens
    if step_fn is not None:  # one traced step serves every length up to the next multiple of 256
        max_len = -(-max_len // COMPILE_LENGTH_STEP) * COMPILE_LENGTH_STEP
    state = new_state(model, budget_slots(model, j), b, max_len, attention_mask, pool=kv_pool(model) if step_fn else None)
    stopper = StopChecker(b, opts.eos_token_id, opts.stop_strings, opts.tokenizer, opts.pad_token_id, device)
    # "Is everyone done?" is a host sync: free on CPU, a pipeline stall on an accelerator, so ask every 8 steps there
    # (a finished batch then emits up to 7 more fill tokens).
    sync_every = 1 if device.type == "cpu" else 8
    try:
        with torch.no_grad():
            logits = prefill(model, state, input_ids, j, attention_mask, opts.prefill_chunk, cancel)
            if logits is None:  # cancelled during the prefill
                return
            for step in range(opts.max_new_tokens):
                token = stopper(sample(logits, cfg, opts.generator))
                yield token
                if step == opts.max_new_tokens - 1 or (stop is not None and stop(token)):
                    return
                if step % sync_every == sync_every - 1 and stopper.all_done():
                    return
                if cancel is not None and cancel():
                    return
                logits = decode_one_token(model, state, token if forced is None else forced[:, step], j, step_fn)
    finally:
        state.cache.release()  # pooled buffers go back for the next generation


def generate(
    model: BalconyModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    exit: Exit = None,
    options: DecodeOptions | None = None,
    **kwargs: Any,
) -> torch.Tensor:
    """Generate at one budget; returns (B, T + new) ids, prompt included.

    Args:
        model: The Balcony model.
        input_ids: (B, T) prompt ids, left-padded when lengths differ.
        attention_mask: (B, T) 1 for real tokens, 0 for padding.
        exit: Budget name, exit layer, or None for the full model.
        options: How to decode (`DecodeOptions`: length, sampling, stopping, compile).
        **kwargs: `DecodeOptions` fields, overriding `options` (``max_new_tokens=16``, ``do_sample=True``, ...).

    Returns:
        (B, T + n) ids, n <= max_new_tokens (fewer when every sequence stopped early).

    Example:
        >>> out = generate(model, ids, exit="S", max_new_tokens=16)  # doctest: +SKIP
    """
    tokens = list(generate_stream(model, input_ids, attention_mask, exit=exit, options=options, **kwargs))
    return torch.cat([input_ids, torch.stack(tokens, dim=1).to(input_ids.dtype)], dim=1)


# Compiled decoding sizes its cache up to a multiple of this, so requests of similar length share one traced step.
COMPILE_LENGTH_STEP = 256


def compiled_decode(model: BalconyModel, backend: bool | str = True) -> Callable:
    """The decode step through `torch.compile(fullgraph=True, dynamic=False)`, built once per model and backend.

    The step's shapes do not change from one token to the next (whole-cache
    attention with a validity mask, positions read from a device tensor), so it
    is traced once per budget and batch shape and never again: no recompilation
    across steps, nor across generations of the same shape (their caches come
    from a pool, `balcony.inference.cache.KVPool`). On CUDA the default inductor
    backend runs in ``mode="reduce-overhead"``: each step is one CUDA graph
    replay. With inductor on CPU the first call pays for compiling (tens of
    seconds to minutes on 2 cores); decode then saves the Python overhead
    around the matmuls.

    Args:
        backend: True for inductor, or a `torch.compile` backend name (``"eager"``
            traces with dynamo only: a quick check that the step compiles).

    Raises:
        ValueError: the base is dispatched by accelerate (``device_map`` / offload): its hooks move
            weights and inputs in Python, which one static graph cannot hold.

    Example:
        >>> step = compiled_decode(model)  # doctest: +SKIP
        >>> generate(model, ids, compile=True)  # uses it  # doctest: +SKIP
    """
    if is_dispatched(model):
        raise ValueError(
            "compile=True needs a base on one device without accelerate hooks; this base was loaded with a "
            "device_map or offload (modules carry _hf_hook). Decode it without compile, or load it with device=... instead"
        )
    name = "inductor" if backend is True else str(backend)
    compiled = model.__dict__.setdefault("_balcony_compiled", {})  # plain attribute: not a submodule, not in state_dict
    if name not in compiled:
        options: dict[str, Any] = {"backend": name, "fullgraph": True, "dynamic": False}
        if name == "inductor" and execution_device(model).type == "cuda":
            options["mode"] = "reduce-overhead"  # CUDA graphs: one replay per token
        # One traced step per budget (and batch shape, and model): room for more than dynamo's default 8.
        cfg = torch._dynamo.config
        limit = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"  # renamed in torch 2.6
        setattr(cfg, limit, max(getattr(cfg, limit), 64))
        step = torch.compile(_static_step, **options)
        if options.get("mode") == "reduce-overhead":
            def step_fn(*args, _step=step):
                torch.compiler.cudagraph_mark_step_begin()  # the previous step's outputs are consumed: reuse their memory
                return _step(*args)

            compiled[name] = step_fn
        else:
            compiled[name] = step
    return compiled[name]
