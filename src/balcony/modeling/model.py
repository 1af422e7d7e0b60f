"""`BalconyModel`: a frozen Hugging Face causal LM plus Balcony exits.

The forward pass is the base model's own, run layer by layer with its own
modules, mask functions and cache; an exit at layer j stops after j layers and
hands the hidden state to its Balcony module, norm and the shared LM head.
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.utils.checkpoint
from torch import nn
from transformers import DynamicCache, masking_utils

from ..inference.engine import generate as engine_generate
from ..inference.options import (
    DRAFT_FIELDS,
    POLICY_FIELDS,
    DecodeOptions,
    DraftOptions,
    ExitPolicy,
)
from ..inference.quantize import quantize_model
from ..inference.speculative import speculative_generate
from ..inference.token_exits import AUTO_EXIT, token_exit_generate
from .arch import (
    BalconyExit,
    architecture_summary,
    build_exit,
    find_parts,
    fingerprint,
    set_cache_slot,
)
from .config import BalconyConfig
from .cost import count_parameters
from .distill import DistillPasses
from .saving import ExitsCheckpoint, _name_of

Exit = int | str | None
"""A budget: a budget name (``"S"``), an exit layer (``14``), or None / the full model."""


@dataclass
class BalconyOutput:
    """What `BalconyModel.forward` returns.

    Attributes:
        logits: (B, T', V) next-token logits at the chosen budget (T' = T or logits_to_keep).
        hidden_states: (B, T, H) the normed state fed to the LM head.
        cache: the KV cache (when `use_cache`), holding only the layers this budget ran.
        exit_layer: the exit layer that produced the logits (N for the full model).
    """

    logits: torch.Tensor | None
    hidden_states: torch.Tensor
    cache: DynamicCache | None
    exit_layer: int


def _cache_kwarg(fn) -> str:
    """transformers renamed `past_key_values` to `cache` during 5.x; speak whichever this version takes."""
    params = inspect.signature(fn).parameters
    return "cache" if "cache" in params else "past_key_values"


class BalconyModel(DistillPasses, ExitsCheckpoint, nn.Module):
    """A base causal LM with Balcony exits: one model, several compute budgets.

    The base model and its LM head are frozen; only the exits train. The full
    budget runs the base model unchanged.

    Args:
        base: A Hugging Face decoder-only causal LM (Llama, Mistral, Qwen2/3, Phi3, Gemma, ...).
        config: The exits to attach. Fields describing the base (layer count,
            fingerprint, name) are filled in from `base`.

    Example:
        >>> from balcony import BalconyModel, BalconyConfig, default_model
        >>> base, tok = default_model()
        >>> model = BalconyModel(base, BalconyConfig(exit_layers=[14, 17, 20]))
        >>> ids = tok("The capital of France is", return_tensors="pt").input_ids
        >>> model(ids, exit="S").logits.shape
        torch.Size([1, 6, 49152])
    """

    def __init__(self, base: nn.Module, config: BalconyConfig):
        super().__init__()
        self.base = base
        self.parts = find_parts(base)
        n = self.parts.num_layers
        summary = architecture_summary(base.config)
        summary["num_hidden_layers"] = n
        self.config = replace(
            config,
            num_hidden_layers=n,
            model_type=getattr(base.config, "model_type", None),
            base_model_name_or_path=config.base_model_name_or_path or _name_of(base),
            base_model_revision=config.base_model_revision or getattr(base.config, "_commit_hash", None),
            base_config_fingerprint=fingerprint(summary),
            base_architecture=summary,
        )
        self._layer_kw = _cache_kwarg(self.parts.layers[0].forward)
        # Training: recompute each exit layer's activations in backward instead of keeping them.
        self.checkpoint_exits = False
        self._mask_kw = _cache_kwarg(masking_utils.create_causal_mask)
        base.requires_grad_(False)
        base.eval()
        self.base_trainable = False
        self.exits = nn.ModuleDict()
        for j in self.config.exit_layers:
            self.exits[str(j)] = self._new_exit(self.config)
        self._assign_slots()

    # ------------------------------------------------------------------ exits
    @property
    def num_layers(self) -> int:
        """N, the base model's decoder-layer count."""
        return self.parts.num_layers

    @property
    def exit_layers(self) -> list[int]:
        return list(self.config.exit_layers)

    @property
    def budgets(self) -> dict[str, int]:
        """Budget name -> exit layer (the full model maps to N)."""
        names = self.config.budget_names or []
        return dict(zip(names, self.config.exit_layers + [self.num_layers]))

    def _new_exit(self, config: BalconyConfig) -> BalconyExit:
        module = build_exit(self.base, self.parts, config, slot=self.num_layers)
        ref = next(self.base.parameters())
        return module.to(device=ref.device, dtype=ref.dtype)

    def _assign_slots(self) -> None:
        # Each exit owns the cache slot after the base's layers, in depth order.
        for k, j in enumerate(self.config.exit_layers):
            set_cache_slot(self.exits[str(j)], self.num_layers + k)

    def add_exit(self, layer: int, budget_name: str | None = None) -> None:
        """Attach one more exit; the existing exits are left untouched.

        Args:
            layer: The new exit layer (1..N, not already an exit).
            budget_name: Its budget name; by default ``"E{layer}"``.
        """
        if layer in self.config.exit_layers:
            raise ValueError(f"exit layer {layer} already exists: exits are {self.config.exit_layers}")
        names = dict(zip(self.config.exit_layers, self.config.budget_names[:-1]))
        names[layer] = budget_name or f"E{layer}"
        layers = sorted(names)
        self.config = replace(
            self.config, exit_layers=layers, budget_names=[names[j] for j in layers] + [self.config.full_budget]
        )
        self.exits[str(layer)] = self._new_exit(self.config)
        self._assign_slots()

    def resolve_exit(self, exit: Exit) -> int:
        """Turn a budget name, exit layer or None into an exit layer (N = full model).

        Raises:
            ValueError: unknown budget name, or a layer that has no exit; the
                message lists what is accepted.
        """
        n = self.num_layers
        if exit is None:
            return n
        if isinstance(exit, str):
            key = exit.strip()
            if key.lower() in ("full", "none"):
                return n
            for name, j in self.budgets.items():
                if name.lower() == key.lower():
                    return j
            if key.lstrip("-").isdigit():
                exit = int(key)
            elif key.lower() == AUTO_EXIT:
                raise ValueError(
                    "exit='auto' is token-level exits, a decoding mode: use model.generate(ids, exit='auto', threshold=0.8) "
                    f"(or `balcony generate --budget auto --threshold 0.8`); a forward pass needs a fixed budget: {self._accepted()}"
                )
            else:
                raise ValueError(f"unknown budget {exit!r}: {self._accepted()}")
        if isinstance(exit, bool) or not isinstance(exit, int):
            raise ValueError(f"exit={exit!r} is neither a budget name nor a layer: {self._accepted()}")
        if exit in self.config.exit_layers:
            return exit
        if exit == n:
            return n
        if not 1 <= exit <= n:
            raise ValueError(f"exit layer {exit} is out of range: the base model has {n} layers; {self._accepted()}")
        raise ValueError(f"exit layer {exit} has no Balcony module: {self._accepted()}")

    def _accepted(self) -> str:
        budgets = ", ".join(f"{name} (layer {j})" for name, j in self.budgets.items())
        return f"budgets are {budgets}; exit layers are {', '.join(map(str, self.config.exit_layers))} or {self.num_layers} (full)"

    # ----------------------------------------------------------------- params
    def count_parameters(self, exit: Exit = None, *, embeddings: bool = False) -> int:
        """Parameters a budget runs: layers 1..j, its exit module and norm (+ embeddings/head if asked); see `balcony.modeling.cost`."""
        return count_parameters(self, exit, embeddings=embeddings)

    def trainable_parameters(self) -> tuple[int, int]:
        """(trainable, total) parameter counts, each tensor counted once."""
        seen: dict[int, nn.Parameter] = {id(p): p for p in self.parameters()}
        total = sum(p.numel() for p in seen.values())
        trainable = sum(p.numel() for p in seen.values() if p.requires_grad)
        return trainable, total

    def print_trainable_parameters(self) -> str:
        """Print (and return) the PEFT-style line, plus each exit's share of the base."""
        trainable, total = self.trainable_parameters()
        base_total = sum(p.numel() for p in self.base.parameters())
        line = f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}"
        per_exit = ", ".join(
            f"{self.config.budget_of(j)}@{j}: {100 * sum(p.numel() for p in self.exits[str(j)].parameters()) / base_total:.2f}%"
            for j in self.config.exit_layers
        )
        line += f"\nper exit (% of base): {per_exit}"
        print(line)
        return line

    def train(self, mode: bool = True) -> "BalconyModel":
        """Set exits to `mode`; a frozen base stays in eval mode (no dropout in the teacher)."""
        super().train(mode)
        if not self.base_trainable:
            self.base.eval()
        return self

    def unfreeze_base(self) -> None:
        """Make the base trainable too (the 'unfrozen' and Sorted fine-tuning recipes)."""
        self.base_trainable = True
        self.base.requires_grad_(True)
        self.base.train(self.training)

    # ---------------------------------------------------------------- caching
    def new_cache(self) -> DynamicCache:
        """An empty KV cache with one slot per base layer and per exit.

        Slots are filled lazily, so a cache used at exit j only ever holds
        layers 1..j and that exit's own layer.
        """
        cache = DynamicCache(config=self.base.config)
        if len(cache.layers) != self.num_layers:  # lazily-grown cache (no per-layer types)
            return cache
        for _ in self.config.exit_layers:
            cache.layers.append(copy.deepcopy(cache.layers[-1]))
        return cache

    # ---------------------------------------------------------------- forward
    def _prepare(
        self,
        input_ids: torch.Tensor | None,
        inputs_embeds: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        cache: DynamicCache | None,
    ) -> tuple[torch.Tensor, dict, torch.Tensor]:
        """Embeddings, per-layer-type masks and shared layer kwargs, as the base computes them."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            if input_ids.dim() != 2 or input_ids.shape[1] == 0:
                raise ValueError(f"input_ids must be (batch, seq_len) with seq_len >= 1, got shape {tuple(input_ids.shape)}")
            inputs_embeds = self.parts.embed_tokens(input_ids)
        past = cache.get_seq_length() if cache is not None else 0
        seq_len = inputs_embeds.shape[1]
        if position_ids is None:
            if attention_mask is not None and attention_mask.dim() == 2:
                # Left padding: count only real tokens, as HF generate does.
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -seq_len:]
            else:
                position_ids = torch.arange(past, past + seq_len, device=inputs_embeds.device).unsqueeze(0)
        mask_args = {
            "config": self.base.config,
            "inputs_embeds": inputs_embeds,
            "attention_mask": attention_mask,
            self._mask_kw: cache,
            "position_ids": position_ids,
        }
        masks = {}
        for kind in set(self.parts.layer_types):
            fn = masking_utils.create_sliding_window_causal_mask if kind == "sliding_attention" else masking_utils.create_causal_mask
            masks[kind] = fn(**mask_args)
        layer_kwargs = {
            "position_ids": position_ids,
            "position_embeddings": self.parts.rotary_emb(inputs_embeds, position_ids),
        }
        return inputs_embeds, masks, layer_kwargs

    def _run_layer(self, i: int, hidden: torch.Tensor, masks: dict, layer_kwargs: dict, cache, use_cache: bool) -> torch.Tensor:
        out = self.parts.layers[i](
            hidden,
            attention_mask=masks[self.parts.layer_types[i]],
            use_cache=use_cache,
            **{self._layer_kw: cache},
            **layer_kwargs,
        )
        return out[0] if isinstance(out, tuple) else out

    def _run_exit(self, j: int, hidden: torch.Tensor, masks: dict, layer_kwargs: dict, cache, use_cache: bool) -> torch.Tensor:
        # The exit layer is a copy of the last layer, so it takes the last layer's mask type.
        module = self.exits[str(j)]
        kwargs = {"attention_mask": masks[self.parts.layer_types[-1]], "use_cache": use_cache, self._layer_kw: cache, **layer_kwargs}
        if self.checkpoint_exits and torch.is_grad_enabled() and not use_cache and any(p.requires_grad for p in module.parameters()):
            # Keep only the exit's input; recompute its activations in backward. An exit layer is
            # ~3% of a training step's FLOPs (the LM head dominates), but its activations are most
            # of what each extra exit adds to peak memory.
            return torch.utils.checkpoint.checkpoint(lambda h: module(h, **kwargs), hidden, use_reentrant=False)
        return module(hidden, **kwargs)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        *,
        exit: Exit = None,
        cache: DynamicCache | None = None,
        use_cache: bool = False,
        inputs_embeds: torch.Tensor | None = None,
        logits_to_keep: int = 0,
    ) -> BalconyOutput:
        """Run the model at one budget: layers 1..j, then the exit's module, norm and head.

        Args:
            input_ids: (B, T) token ids.
            attention_mask: (B, T_past + T) 1 for real tokens, 0 for (left) padding.
            position_ids: (B, T); by default from the mask (or the cache length).
            exit: budget name, exit layer, or None for the full model.
            cache: a cache from an earlier call at the same budget (or `new_cache()`).
            use_cache: build/extend a KV cache and return it.
            logits_to_keep: if > 0, only the last this-many positions get logits.

        Returns:
            BalconyOutput with logits (B, T', V).
        """
        j = self.resolve_exit(exit)
        if use_cache and cache is None:
            cache = self.new_cache()
        if cache is not None:
            filled_at = getattr(cache, "balcony_exit", None)
            if filled_at is not None and filled_at != j and cache.get_seq_length() > 0:
                raise ValueError(
                    f"this cache was filled at exit layer {filled_at}, not {j}: start a new cache "
                    "(model.new_cache()) to switch budget"
                )
            cache.balcony_exit = j
        hidden, masks, layer_kwargs = self._prepare(input_ids, inputs_embeds, attention_mask, position_ids, cache)
        for i in range(j):
            hidden = self._run_layer(i, hidden, masks, layer_kwargs, cache, use_cache)
        if str(j) in self.exits:
            hidden = self._run_exit(j, hidden, masks, layer_kwargs, cache, use_cache)
        else:
            hidden = self.parts.norm(hidden)
        kept = hidden[:, -logits_to_keep:] if logits_to_keep else hidden
        logits = self.parts.lm_head(kept)
        return BalconyOutput(logits=logits, hidden_states=hidden, cache=cache if use_cache else None, exit_layer=j)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        exit: Exit = None,
        speculative: bool = False,
        return_stats: bool = False,
        options: DecodeOptions | None = None,
        draft: DraftOptions | None = None,
        policy: ExitPolicy | None = None,
        **kwargs: Any,
    ):
        """Generate at one budget, with token-level exits (``exit="auto"``), or self-speculatively.

        Args:
            input_ids: (B, T) prompt ids, left-padded when lengths differ.
            attention_mask: (B, T) 1 for real tokens, 0 for padding.
            exit: The budget to decode at; ``"auto"`` for token-level exits (each token leaves at the first
                exit whose confidence is above ``threshold``, `balcony.inference.token_exits`); with
                ``speculative=True``, the draft budget (the output is then the full model's).
            speculative: Draft at `exit`, verify with the remaining layers only.
            return_stats: Also return the `SpeculativeStats` (speculative) or `TokenExitStats` (``exit="auto"``).
            options: How to decode (`balcony.DecodeOptions`).
            draft: How to draft (`balcony.DraftOptions`; speculative only).
            policy: Where tokens leave (`balcony.ExitPolicy`: threshold, exits, confidence_vocab; ``exit="auto"`` only).
            **kwargs: `DecodeOptions` fields (max_new_tokens, do_sample, temperature, top_k, top_p,
                eos_token_id, pad_token_id, stop_strings, tokenizer, generator, compile) and, with
                ``speculative=True``, `DraftOptions` fields (draft_length, draft_threshold, draft_vocab, draft_width);
                with ``exit="auto"``, `ExitPolicy` fields (threshold, exits, confidence_vocab).

        Returns:
            (B, T + new) ids; with ``return_stats=True`` a pair (ids, stats).

        Example:
            >>> out = model.generate(ids, exit="S", max_new_tokens=16)  # doctest: +SKIP
            >>> out, stats = model.generate(ids, exit="S", speculative=True, draft_length=4, return_stats=True)  # doctest: +SKIP
            >>> out = model.generate(ids, exit="auto", threshold=0.8, max_new_tokens=16)  # doctest: +SKIP
        """
        if isinstance(exit, str) and exit.strip().lower() == AUTO_EXIT:
            if speculative:
                raise ValueError("exit='auto' (token-level exits) and speculative=True are two decoding modes: pick one")
            out, stats = token_exit_generate(self, input_ids, attention_mask, options=options, policy=policy, **kwargs)
            return (out, stats) if return_stats else out
        if policy is not None or POLICY_FIELDS & set(kwargs):
            named = sorted(POLICY_FIELDS & set(kwargs)) or ["policy"]
            raise ValueError(f"{', '.join(named)} need(s) exit='auto' (token-level exits), not exit={exit!r}")
        if speculative:
            out, stats = speculative_generate(self, input_ids, attention_mask, exit=exit, options=options, draft=draft, **kwargs)
            return (out, stats) if return_stats else out
        if return_stats:
            raise ValueError("return_stats=True needs speculative=True: plain decoding has no acceptance statistics")
        drafting = sorted(k for k in kwargs if k in DRAFT_FIELDS) + (["draft"] if draft is not None else [])
        if drafting:
            raise ValueError(f"{', '.join(drafting)} need(s) speculative=True: plain decoding does not draft")
        return engine_generate(self, input_ids, attention_mask, exit=exit, options=options, **kwargs)

    def quantize(self, mode: str = "int8") -> "BalconyModel":
        """Quantize the weights in place for decoding (inference only); returns the model.

        Weight-only, gpt-fast style: the linear layers of the base's decoder layers,
        of the exits and the LM head (a tied head gets its own copy; the embedding
        stays float). See `balcony.inference.quantize`.

        Args:
            mode: "int8" (per-output-channel scales) or "int4" (groups of 32 input
                channels; "int4-64", "int4-128" pick the group size; the head stays int8).

        Example:
            >>> model.quantize("int8").generate(ids, max_new_tokens=16)  # doctest: +SKIP
        """
        quantize_model(self, mode)
        return self
