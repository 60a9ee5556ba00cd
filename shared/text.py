"""SDXL text conditioning: both CLIP encoders' penultimate hidden states, concatenated, and the second
encoder's pooled projection; prompts longer than 77 tokens as kohya and A1111 do them.

Long prompts: the caption's tokens (without BOS/EOS) are split into 75-token windows; each window is wrapped in
BOS ... EOS and padded to 77 with the tokenizer's pad token, encoded on its own, and the windows' hidden states
are concatenated along the sequence (n windows -> n*77 positions). The pooled embedding is the first window's.
"""
from __future__ import annotations

from typing import Any, Sequence

WINDOW = 75  # tokens per window, BOS and EOS excluded


def token_windows(ids: Sequence[int], bos: int, eos: int, pad: int, max_windows: int | None = None) -> list[list[int]]:
    """Token ids (no BOS/EOS) as 77-long windows: [BOS] + up to 75 ids + [EOS] + padding.
    `max_windows` keeps only the first windows (1 = plain 77-token truncation). An empty prompt is one window."""
    windows = [list(ids[i:i + WINDOW]) for i in range(0, len(ids), WINDOW)] or [[]]
    if max_windows is not None:
        windows = windows[:max_windows]
    return [[bos] + w + [eos] + [pad] * (WINDOW - len(w)) for w in windows]


def tokenize(tokenizer: Any, caption: str, max_windows: int | None = None) -> list[list[int]]:
    """A caption as 77-token windows for one tokenizer."""
    ids = tokenizer(caption, add_special_tokens=False, truncation=False, verbose=False).input_ids
    return token_windows(ids, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, max_windows)


def encode_windows(encoder: Any, windows: list[list[int]], with_pooled: bool) -> tuple[Any, Any]:
    """Penultimate hidden states of all windows joined along the sequence ([n*77, d]); and, for the
    projection encoder, the first window's pooled projection ([d_proj])."""
    import torch

    ids = torch.tensor(windows, dtype=torch.long, device=encoder.device)
    out = encoder(ids, output_hidden_states=True)
    hidden = out.hidden_states[-2]
    pooled = out.text_embeds[0] if with_pooled else None
    return hidden.reshape(-1, hidden.shape[-1]), pooled


def encode_caption(model: Any, caption: str, max_windows: int | None = None) -> tuple[Any, Any]:
    """(hidden [n*77, d1+d2], pooled [d_proj]) for one caption with both SDXL text encoders.

    Both tokenizers window the same text; should they disagree on the window count (they share a vocabulary,
    so only an odd tokenizer would), the shorter is padded with its empty window."""
    import torch

    w1 = tokenize(model.tokenizer, caption, max_windows)
    w2 = tokenize(model.tokenizer_2, caption, max_windows)
    n = max(len(w1), len(w2))
    w1 += tokenize(model.tokenizer, "") * (n - len(w1))
    w2 += tokenize(model.tokenizer_2, "") * (n - len(w2))
    with torch.no_grad():
        h1, _ = encode_windows(model.text_encoder, w1, with_pooled=False)
        h2, pooled = encode_windows(model.text_encoder_2, w2, with_pooled=True)
    return torch.cat([h1, h2], dim=-1), pooled


def time_ids(original_hw: tuple[int, int], crop_top_left: tuple[int, int], target_hw: tuple[int, int]) -> list[float]:
    """SDXL micro-conditioning: [orig_h, orig_w, crop_top, crop_left, target_h, target_w] (heights first)."""
    return [float(original_hw[0]), float(original_hw[1]), float(crop_top_left[0]), float(crop_top_left[1]),
            float(target_hw[0]), float(target_hw[1])]
