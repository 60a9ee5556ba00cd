"""The text encoders in the training step: which of them train (a LoRA on each, or all their weights, as the
run's `method` says), and the per-step caption augmentation done on the stored token ids.

When the text encoders train (or tags are shuffled / dropped per step), encode's stored states are not used:
the batch carries both tokenizers' ids and the step encodes them exactly as encode did
(shared.models.text.encode_windows: penultimate states of both encoders concatenated, encoder 2's pooled
projection of the first window). Tag shuffling, keep-first-N and tag dropout work on the caption's own tokens,
split on the tokenizer's comma token, and are windowed again as shared.models.text.token_windows does.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch

from shared.formats.samples import WINDOW_TOKENS
from shared.models import lora, loading as models
from shared.models.text import encode_windows, token_windows
from shared.core.config import opt
from shared.core.groups import borrowed, derived
from stages.train import model as M

TRAIN = ("none", "te1", "te2", "both")
COMPONENTS = {"te1": "text_encoder", "te2": "text_encoder_2"}


@dataclass(frozen=True, kw_only=True)
class TextConfig:
    """Which text encoders train and the per-step caption augmentation: options of `sdxl train` (config.py
    composes them)."""
    model: str = borrowed()
    method: str = borrowed()
    adapter: lora.LoraSpec | None = derived()
    train_text_encoder: str = opt("none", "Also train the text encoders: te1 (CLIP ViT-L), te2 (OpenCLIP ViT-bigG), "
                                          "or both, as `method` says (a LoRA on their q/k/v/out_proj and fc1/fc2 "
                                          "with the UNet's rank and alpha, or all their weights). They then run "
                                          "in the step from the token ids encode stored (sdxl encode "
                                          "--token-ids). Not with fused_backward, blocks_to_swap or parallel "
                                          "fsdp.", choices=TRAIN)
    weights_dtype: str = borrowed()
    gradient_checkpointing: bool = borrowed()
    seed: int = borrowed()
    shuffle_tags: bool = opt(False, "Shuffle the caption's comma-separated tags every step (on its token ids; the "
                                    "text encoders run in the step, trained or not; needs sdxl encode "
                                    "--token-ids).")
    keep_tags: int = opt(1, "Leading tags kept in place by shuffle_tags and tag_dropout.", ge=0)
    tag_dropout: float = opt(0.0, "Probability of dropping each tag after the first keep_tags, every step (on the "
                                  "token ids, as shuffle_tags).", ge=0, le=1)

    @property
    def trained(self) -> tuple[str, ...]:
        """Component names of the trained encoders."""
        return tuple(COMPONENTS[k] for k in ("te1", "te2") if self.train_text_encoder in (k, "both"))

    @property
    def in_step(self) -> bool:
        """The step encodes the captions itself (and needs token ids in the shards)."""
        return bool(self.trained) or self.shuffle_tags or self.tag_dropout > 0


@dataclass(frozen=True)
class Tokens:
    """One tokenizer's special ids and its comma (the tag separator)."""
    bos: int
    eos: int
    pad: int
    comma: int

    @classmethod
    def of(cls, tokenizer: Any) -> "Tokens":
        (comma,) = tokenizer(",", add_special_tokens=False).input_ids
        return cls(tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, comma)


def caption_tokens(ids: np.ndarray, windows: int, tok: Tokens) -> list[int]:
    """The caption's own tokens from its stored windows (each window's BOS, its EOS and padding dropped)."""
    out: list[int] = []
    for w in range(windows):
        body = [int(x) for x in ids[w * WINDOW_TOKENS + 1:(w + 1) * WINDOW_TOKENS]]
        out += body[:body.index(tok.eos)] if tok.eos in body else body
    return out


def split_tags(tokens: list[int], comma: int) -> list[list[int]]:
    groups: list[list[int]] = [[]]
    for t in tokens:
        if t == comma:
            groups.append([])
        else:
            groups[-1].append(t)
    return groups


def augment(tokens: list[int], comma: int, keep: int, order: torch.Tensor | None, kept: torch.Tensor | None
            ) -> list[int]:
    """Tags (comma-separated token groups) after the first `keep`: those with `kept` true, in `order`."""
    groups = split_tags(tokens, comma)
    head, tail = groups[:keep], groups[keep:]
    if order is not None:
        tail = [tail[int(i)] for i in order]
    if kept is not None:
        tail = [t for t, k in zip(tail, kept.tolist()) if k]
    out: list[int] = []
    for i, g in enumerate(head + tail):
        out += ([comma] if i else []) + g
    return out


def draw_tags(count: int, keep: int, shuffle: bool, dropout: float, g: torch.Generator
              ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """This step's order and kept-mask of a caption's `count` tags (those after the first `keep`)."""
    n = max(count - keep, 0)
    order = torch.randperm(n, generator=g) if shuffle else None
    kept = torch.rand(n, generator=g) >= dropout if dropout > 0 else None
    return order, kept


def step_ids(ids: np.ndarray, windows: int, toks: tuple[Tokens, Tokens], cfg: TextConfig, g: torch.Generator
             ) -> np.ndarray:
    """A stored variant's ids [2, ≥ windows*77] as this step trains them: tags shuffled / dropped (one draw for
    both tokenizers when they split the caption into as many tags), windowed again; [2, n*77] int64."""
    per: list[list[list[int]]] = []
    draws: dict[int, tuple] = {}
    for row, tok in zip(ids, toks):
        tokens = caption_tokens(row, windows, tok)
        if cfg.shuffle_tags or cfg.tag_dropout > 0:
            count = len(split_tags(tokens, tok.comma))
            if count not in draws:
                draws[count] = draw_tags(count, cfg.keep_tags, cfg.shuffle_tags, cfg.tag_dropout, g)
            tokens = augment(tokens, tok.comma, cfg.keep_tags, *draws[count])
        per.append(token_windows(tokens, tok.bos, tok.eos, tok.pad, windows))
    n = max(len(w) for w in per)
    for w, tok in zip(per, toks):   # equal window counts (as encode's tokenize_pair pads them)
        w += token_windows([], tok.bos, tok.eos, tok.pad) * (n - len(w))
    return np.array([sum(w, []) for w in per], np.int64)


class TextEncoders:
    """Both CLIP text encoders on the device: the trained ones with a LoRA or fully trainable (train mode), the
    others frozen (eval mode). They run in the step, from the batch's token ids."""

    def __init__(self, cfg: TextConfig, device: torch.device, encoders: dict[str, Any] | None = None):
        """`encoders`: both, already built (the memory planner's, on the meta device; then no tokenizers), else
        loaded from `cfg.model`."""
        self.cfg = cfg
        self.tokens: tuple[Tokens, Tokens] | None = None
        if encoders is None:
            model = models.load_model(cfg.model, ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"))
            self.tokens = (Tokens.of(model.tokenizer), Tokens.of(model.tokenizer_2))
            encoders = {"text_encoder": model.text_encoder, "text_encoder_2": model.text_encoder_2}
        self.encoders = encoders
        for name, encoder in self.encoders.items():
            encoder.to(device, getattr(torch, cfg.weights_dtype))
            if name in cfg.trained:
                self._prepare(encoder)
            else:
                encoder.requires_grad_(False).eval()

    def _prepare(self, encoder: Any) -> None:
        cfg = self.cfg
        M.make_trainable(encoder, cfg.method, cfg.adapter, cfg.seed,
                         lora.text_encoder_targets(encoder) if cfg.method == "lora" else None)
        if cfg.gradient_checkpointing:
            if hasattr(encoder, "activation_checkpointing_enable"):   # transformers 5.x's name
                encoder.activation_checkpointing_enable({"use_reentrant": False})
            else:
                encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        encoder.train()

    @property
    def trained(self) -> dict[str, Any]:
        return {name: self.encoders[name] for name in self.cfg.trained}

    def groups(self) -> dict[str, list[torch.nn.Parameter]]:
        """Parameter groups `te1_adapter` / `te2_adapter` (LoRA) or `te1` / `te2` (full), each with its own LR."""
        suffix = "_adapter" if self.cfg.method == "lora" else ""
        short = {v: k for k, v in COMPONENTS.items()}
        return {short[name] + suffix: [p for p in enc.parameters() if p.requires_grad]
                for name, enc in self.trained.items()}

    def encode(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids [B, 2, n*77] -> (states [B, n*77, d1+d2], pooled [B, P] of each caption's first window);
        under autograd (a frozen encoder records nothing)."""
        b, _, length = ids.shape
        n = length // WINDOW_TOKENS
        windows = ids.reshape(b, 2, n, WINDOW_TOKENS).transpose(0, 1).reshape(2, b * n, WINDOW_TOKENS)
        with contextlib.nullcontext() if self.cfg.trained else torch.no_grad():
            hidden, pooled = encode_windows(self.encoders["text_encoder"], self.encoders["text_encoder_2"],
                                            windows[0], windows[1])
        return hidden.reshape(b, length, -1), pooled.reshape(b, n, -1)[:, 0]

    @contextlib.contextmanager
    def evaluating(self) -> Iterator[None]:
        """Eval mode (no LoRA dropout) for the evaluation's forward passes."""
        modes = {name: enc.training for name, enc in self.encoders.items()}
        for enc in self.encoders.values():
            enc.eval()
        try:
            yield
        finally:
            for name, enc in self.encoders.items():
                enc.train(modes[name])
