"""lm-evaluation-harness adapter: a Balcony model at one compute budget, registered as ``balcony``.

`BalconyLM` subclasses the harness's own `HFLM`, so tokenisation, batching,
request ordering and metrics are the harness's; only the two model calls are
replaced: `_model_call` (loglikelihood and rolling loglikelihood) runs
`BalconyModel` at the chosen budget, and `_model_generate` (``generate_until``)
decodes at that budget with balcony's KV cache.

lm-eval 0.4.13 finds models only through its registry (it has no entry-point
group for plug-ins), so this module must be imported before the harness looks
``balcony`` up. From Python, ``import balcony.eval.lm_eval_model`` is enough; from the
shell use the wrapper, which takes exactly the ``lm_eval`` arguments::

    python -m balcony.eval.lm_eval_model --model balcony \\
        --model_args pretrained=default,exits=my-exits,budget=S --tasks piqa --device cpu

Model arguments (``--model_args`` / ``simple_evaluate(model_args=...)``):
    pretrained: base model hub id or local path; empty / ``default``: the embedded SmolLM2-135M-Instruct.
    exits: directory (or hub id) of trained exits. Without it, freshly initialised
        (untrained) exits are attached, with a warning.
    budget: budget name (``S``, ``M``, ``L``, ``XL``) or exit layer (``14``); default the full model.
    exit_kind: ``norm`` for the plain early-exit baseline (final norm + LM head) at
        the same layers as `exits` (or the default layers); otherwise the exits' own kind.
    exit_layers: exit layers when no `exits` are given, separated by ``;`` (``14;17;20``).
    dtype, device, batch_size, max_length, ...: as for the harness's ``hf`` model.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from ..inference.engine import generate_stream
from ..modeling.loading import pick_device
from ..modeling.model import BalconyModel
from .variants import Variant, exit_hidden_states, load_balcony

logger = logging.getLogger(__name__)

__all__ = ["BalconyLM", "SharedBudgetsLM", "main"]


def _parse_layers(value: Any) -> list[int] | None:
    """``"14;17;20"`` / ``14`` / ``[14, 17]`` -> [14, 17, 20] (commas separate harness model_args)."""
    if value is None or value == "":
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value]
    parts = [p for p in re.split(r"[;:/|\s]+", str(value).strip()) if p]
    try:
        return [int(p) for p in parts]
    except ValueError:
        raise ValueError(f"exit_layers={value!r} is not a list of layer numbers; separate them with ';' (e.g. 14;17;20)") from None


@register_model("balcony")
class BalconyLM(HFLM):
    """The harness's HF model, answering at one Balcony budget.

    Args:
        pretrained: Base model (hub id or local path; None, ``""`` or ``"default"``:
            the embedded default), an already-built `BalconyModel`, or a loaded HF model.
        exits: Trained exits directory or hub id (not with a `BalconyModel`).
        budget: Budget name or exit layer; None (or ``full``) for the full model.
        exit_kind: None (the exits' own kind, ``decoder`` when fresh) or ``norm``
            for plain early exit at the same layers.
        exit_layers: Layers for fresh exits (``"14;17;20"``) when `exits` is not given.
        tokenizer: Tokenizer (object, hub id or path); default: the base model's.
        dtype: Weights dtype when loading the base (``auto``: float32).
        device: ``cpu``, ``cuda``, ``cuda:1``, ...; default CUDA when available.
        batch_size: As for ``hf`` (an int, or ``auto``).
        **kwargs: Passed to `HFLM` (``max_length``, ``add_bos_token``, ``truncation``, ...).

    Raises:
        ValueError: `budget` is not one of the model's budgets (the message lists them),
            or the arguments contradict each other.

    Example:
        >>> import lm_eval, balcony.lm_eval_model  # doctest: +SKIP
        >>> lm_eval.simple_evaluate(model="balcony", model_args="exits=my-exits,budget=S", tasks=["piqa"])  # doctest: +SKIP
    """

    def __init__(
        self,
        pretrained: Any = None,
        exits: str | None = None,
        budget: str | int | None = None,
        exit_kind: str | None = None,
        exit_layers: Any = None,
        tokenizer: Any = None,
        dtype: str | torch.dtype = "float32",
        device: str | None = None,
        batch_size: int | str = 1,
        **kwargs: Any,
    ) -> None:
        exits = exits or None
        if dtype in ("auto", None):
            dtype = "float32"
        if isinstance(pretrained, BalconyModel):
            if exits is not None or exit_kind is not None:
                raise ValueError("pass exits / exit_kind only with a base model, not with a ready BalconyModel")
            if tokenizer is None:
                raise ValueError("a BalconyModel passed as `pretrained` needs its `tokenizer`")
            model, trained = pretrained, True
        else:
            model, tok, trained = load_balcony(
                pretrained,
                exits,
                exit_kind=exit_kind,
                exit_layers=_parse_layers(exit_layers),
                dtype=dtype,
                device=pick_device(device),
            )
            tokenizer = tokenizer or tok
        kwargs.pop("backend", None)
        super().__init__(pretrained=model.base, tokenizer=tokenizer, batch_size=batch_size, backend="causal", **kwargs)
        self.balcony: BalconyModel = model
        self.exits_source = exits
        self.trained_exits = trained
        self._exit_layer = model.num_layers
        self.set_budget(budget)

    # ------------------------------------------------------------------ budget
    def set_budget(self, budget: str | int | None, model: BalconyModel | None = None) -> None:
        """Answer at `budget` from now on (optionally with another `BalconyModel`).

        The other model may sit on another base (e.g. a baseline whose base was trained
        too) as long as it reads the same tokens: the same vocabulary size.

        Raises:
            ValueError: unknown budget (the message lists the model's budgets), or a
                model with another vocabulary size.
        """
        if model is not None:
            mine, theirs = self.balcony.parts.lm_head.weight.shape[0], model.parts.lm_head.weight.shape[0]
            if model.base is not self.balcony.base and mine != theirs:
                raise ValueError(f"set_budget: the new BalconyModel has {theirs} vocabulary entries, this adapter's model {mine}")
            self.balcony = model
        self._exit_layer = self.balcony.resolve_exit(budget)

    @property
    def exit_layer(self) -> int:
        """The layer this adapter exits at (N for the full model)."""
        return self._exit_layer

    @property
    def budget_name(self) -> str:
        """The budget name of `exit_layer` (its number when the budget is unnamed)."""
        return next((n for n, j in self.balcony.budgets.items() if j == self._exit_layer), str(self._exit_layer))

    # ------------------------------------------------------------ model calls
    def _model_call(self, inps: torch.Tensor, attn_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) ids -> (B, T, V) logits at the chosen budget."""
        if labels is not None:
            raise ValueError("balcony models are decoder-only: seq2seq calls (labels) are not supported")
        with (
            torch.no_grad(),
            torch.autocast(
                device_type=self.device.type,
                dtype=self.mixed_precision_dtype,
                enabled=self.mixed_precision_dtype is not None,
            ),
        ):
            return self.balcony(inps, attn_mask, exit=self._exit_layer).logits

    def _model_generate(self, context: torch.Tensor, max_length: int, stop: list[str], **generation_kwargs: Any) -> torch.Tensor:
        """Greedy (or sampled) decoding at the chosen budget; (B, T) -> (B, T + new) ids."""
        attention_mask = generation_kwargs.pop("attention_mask", None)
        temperature = float(generation_kwargs.pop("temperature", 0.0) or 0.0)
        do_sample = generation_kwargs.pop("do_sample", None)
        do_sample = temperature > 0.0 if do_sample is None else bool(do_sample)
        top_k = generation_kwargs.pop("top_k", None)
        top_p = float(generation_kwargs.pop("top_p", 1.0) or 1.0)
        generation_kwargs.pop("use_cache", None)
        if generation_kwargs:
            logger.warning("balcony: ignoring generation arguments %s", sorted(generation_kwargs))
        max_new = max_length - context.shape[1]
        if max_new < 1:
            return context
        stopper = _StopStrings(self.tokenizer, stop, context.shape[0], self.eot_token_id)
        tokens = list(
            generate_stream(
                self.balcony,
                context,
                attention_mask,
                exit=self._exit_layer,
                max_new_tokens=max_new,
                do_sample=do_sample,
                temperature=temperature if do_sample and temperature > 0 else 1.0,
                top_k=int(top_k) if top_k else None,
                top_p=top_p,
                eos_token_id=self.eot_token_id,
                stop=stopper,
            )
        )
        return torch.cat([context, torch.stack(tokens, dim=1)], dim=1)

    def get_model_info(self) -> dict:
        """What the harness records about the model (no hub look-ups)."""
        cfg = self.balcony.config
        return {
            "model_num_parameters": self.balcony.count_parameters(self.exit_layer, embeddings=True),
            "model_dtype": str(next(self.balcony.base.parameters()).dtype),
            "model_revision": cfg.base_model_revision,
            "model_sha": "",
            "balcony_base": cfg.base_model_name_or_path,
            "balcony_exits": self.exits_source,
            "balcony_exit_kind": cfg.exit_kind,
            "balcony_budget": self.budget_name,
            "balcony_exit_layer": self.exit_layer,
        }


class _StopStrings:
    """`generate_stream` stop callback: True once every row has produced EOS or a stop string."""

    def __init__(self, tokenizer, stop: list[str] | None, batch: int, eos_token_id: int | None):
        self.tokenizer = tokenizer
        self.stop = [s for s in (stop or []) if s]
        self.eos = eos_token_id
        self.tokens: list[list[int]] = [[] for _ in range(batch)]
        self.done = [False] * batch

    def __call__(self, token: torch.Tensor) -> bool:
        for i, t in enumerate(token.tolist()):
            if self.done[i]:
                continue
            self.tokens[i].append(t)
            if t == self.eos:
                self.done[i] = True
            elif self.stop:
                text = self.tokenizer.decode(self.tokens[i], skip_special_tokens=False)
                self.done[i] = any(s in text for s in self.stop)
        return all(self.done)


class SharedBudgetsLM(BalconyLM):
    """A `BalconyLM` over several variants that scores loglikelihoods for all of them at once.

    The first time a request is seen, one pass of the shared base feeds every
    variant (`balcony.eval.variants.exit_hidden_states`), the LM head is applied only
    to the continuation positions, and (loglikelihood, is_greedy) is cached for
    every variant; running the harness again at another variant (`select`) then
    costs no forward passes. Generation runs per variant as usual. The
    truncation and results match `HFLM._loglikelihood_tokens`.

    Args:
        variants: What to score (one base pass per distinct base model feeds its variants).
        tokenizer: The base model's tokenizer.
        batch_size: Sequences per forward pass.
        shared: False scores each variant with the plain `BalconyLM` path (the harness's own loop).
        chunk_tokens: Continuation positions per LM-head chunk.
        **kwargs: Passed to `HFLM`.
    """

    def __init__(self, variants: list[Variant], tokenizer: Any, batch_size: int = 8, *, shared: bool = True, chunk_tokens: int = 512, **kwargs: Any):
        if not variants:
            raise ValueError("SharedBudgetsLM needs at least one variant")
        self.variants = {v.key: v for v in variants}
        self.shared = shared
        self.chunk_tokens = chunk_tokens
        self._cache: dict[tuple, dict[str, tuple[float, bool]]] = {}
        self.forward_passes = 0
        super().__init__(variants[0].model, tokenizer=tokenizer, batch_size=batch_size, **kwargs)
        self.active = variants[0]
        self.select(variants[0].key)

    def select(self, key: str) -> None:
        """Answer as variant `key` (``"full"``, ``"balcony/S"``, ``"early-exit/S"``, ...)."""
        if key not in self.variants:
            raise ValueError(f"unknown variant {key!r}: variants are {', '.join(self.variants)}")
        v = self.variants[key]
        self.active = v
        self.set_budget(None if v.full else v.layer, model=v.model)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
        if not self.shared:
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
        keys = [(tuple(ctx), tuple(cont)) for _, ctx, cont in requests]
        todo = sorted({k for k in keys if k not in self._cache}, key=lambda k: -(len(k[0]) + len(k[1])))
        if todo:
            self._score(todo, disable_tqdm or self.rank != 0)
        out = []
        for (cache_key, _, _), key in zip(requests, keys):
            answer = self._cache[key][self.active.key]
            if cache_key is not None:
                self.cache_hook.add_partial("loglikelihood", cache_key, answer)
            out.append(answer)
        return out

    @torch.no_grad()
    def _score(self, todo: list[tuple[tuple[int, ...], tuple[int, ...]]], disable_tqdm: bool) -> None:
        from tqdm.auto import tqdm

        bs = self.batch_size if isinstance(self.batch_size, int) and self.batch_size > 0 else 8
        bar = tqdm(total=len(todo), disable=disable_tqdm, desc=f"Scoring {len(self.variants)} variants at once")
        for start in range(0, len(todo), bs):
            batch = todo[start : start + bs]
            rows, spans = [], []
            for ctx, cont in batch:
                # As HFLM: the last max_length + 1 tokens, minus the final one, predict the continuation.
                inp = list(ctx + cont)[-(self.max_length + 1) :][:-1]
                rows.append(inp)
                spans.append((len(inp) - len(cont), len(inp)))
            width = max(len(r) for r in rows)
            ids = torch.zeros(len(rows), width, dtype=torch.long, device=self.device)
            for i, r in enumerate(rows):
                ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            hidden = exit_hidden_states(list(self.variants.values()), ids)
            self.forward_passes += 1
            b_idx = torch.cat([torch.full((e - s,), i, dtype=torch.long) for i, (s, e) in enumerate(spans)]).to(self.device)
            t_idx = torch.cat([torch.arange(s, e) for s, e in spans]).to(self.device)
            target = torch.cat([torch.tensor(cont[-(e - s) :], dtype=torch.long) for (_, cont), (s, e) in zip(batch, spans)]).to(self.device)
            seg = torch.repeat_interleave(torch.arange(len(batch)), torch.tensor([e - s for s, e in spans])).to(self.device)
            results: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
            for key, h in hidden.items():
                head = self.variants[key].model.parts.lm_head  # a baseline with its own trained base has its own head
                states = h[b_idx, t_idx]
                ll = torch.empty(len(t_idx), dtype=torch.float32, device=self.device)
                greedy = torch.empty(len(t_idx), dtype=torch.bool, device=self.device)
                for c in range(0, len(t_idx), self.chunk_tokens):
                    logp = torch.log_softmax(head(states[c : c + self.chunk_tokens]).float(), dim=-1)
                    tgt = target[c : c + self.chunk_tokens]
                    ll[c : c + self.chunk_tokens] = logp.gather(-1, tgt[:, None])[:, 0]
                    greedy[c : c + self.chunk_tokens] = logp.argmax(-1) == tgt
                sums = torch.zeros(len(batch), dtype=torch.float32, device=self.device).index_add_(0, seg, ll)
                misses = torch.zeros(len(batch), dtype=torch.long, device=self.device).index_add_(0, seg, (~greedy).long())
                results[key] = (sums.cpu(), misses.cpu() == 0)
            for i, k in enumerate(batch):
                self._cache[k] = {key: (float(s[i]), bool(g[i])) for key, (s, g) in results.items()}
            bar.update(len(batch))
        bar.close()


def main(argv: list[str] | None = None) -> None:
    """``python -m balcony.eval.lm_eval_model ...``: the ``lm_eval`` command line with ``balcony`` registered."""
    import sys

    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
