"""SDXL text conditioning: both CLIP encoders' penultimate hidden states, concatenated, and the second
encoder's pooled projection; prompts longer than 77 tokens as kohya and A1111 do them.

Long prompts: the caption's tokens (without BOS/EOS) are split into 75-token windows; each window is wrapped in
BOS ... EOS and padded to 77 with the tokenizer's pad token, encoded on its own, and the windows' hidden states
are concatenated along the sequence (n windows -> n*77 positions). The pooled embedding is the first window's.
"""
from __future__ import annotations

from typing import Any, Sequence

from shared.formats.samples import WINDOW_TOKENS

WINDOW = WINDOW_TOKENS - 2  # caption tokens per window, BOS and EOS excluded


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


def tokenize_pair(model: Any, caption: str, max_windows: int | None = None) -> tuple[list, list, bool]:
    """Windows of both tokenizers for one caption (equal counts), and whether `max_windows` cut it short.

    Both tokenizers window the same text; should they disagree on the window count (they share a vocabulary,
    so only an odd tokenizer would), the shorter is padded with its empty window."""
    w1 = tokenize(model.tokenizer, caption)
    w2 = tokenize(model.tokenizer_2, caption)
    n = max(len(w1), len(w2))
    w1 += tokenize(model.tokenizer, "") * (n - len(w1))
    w2 += tokenize(model.tokenizer_2, "") * (n - len(w2))
    cut = max_windows is not None and n > max_windows
    return (w1[:max_windows], w2[:max_windows], cut) if cut else (w1, w2, False)


def encode_captions(model: Any, captions: list[str], max_windows: int | None = None) -> list[dict]:
    """Several captions at once: all their windows go through each encoder as one batch (windows are
    independent, so batching does not change any window's states). Per caption: `hidden` [n*77, d1+d2],
    `pooled` [d_proj], `ids` [2, n*77] (both tokenizers), `windows` n, `truncated`."""
    import torch

    pairs = [tokenize_pair(model, c, max_windows) for c in captions]
    flat1 = [w for w1, _, _ in pairs for w in w1]
    flat2 = [w for _, w2, _ in pairs for w in w2]
    with torch.no_grad():
        hidden, pooled = encode_windows(model.text_encoder, model.text_encoder_2, torch.tensor(flat1),
                                        torch.tensor(flat2))
    results, start = [], 0
    for w1, w2, cut in pairs:
        n = len(w1)
        results.append({"hidden": hidden[start:start + n].reshape(n * WINDOW_TOKENS, -1), "pooled": pooled[start],
                        "ids": torch.tensor([sum(w1, []), sum(w2, [])], dtype=torch.int32),
                        "windows": n, "truncated": cut})
        start += n
    return results


def encode_windows(text_encoder: Any, text_encoder_2: Any, ids1: Any, ids2: Any) -> tuple[Any, Any]:
    """77-token windows [N, 77] of each tokenizer through its encoder: (hidden [N, 77, d1+d2], the penultimate
    layers' states concatenated; pooled [N, d_proj], encoder 2's projection). What encode stores and what train
    computes when it trains the text encoders (under autograd there)."""
    import torch

    h1 = text_encoder(ids1.to(text_encoder.device, torch.long), output_hidden_states=True).hidden_states[-2]
    out2 = text_encoder_2(ids2.to(text_encoder_2.device, torch.long), output_hidden_states=True)
    h2, pooled = out2.hidden_states[-2], out2.text_embeds
    return torch.cat([h1, h2.to(h1.device, h1.dtype)], dim=-1), pooled


def encode_caption(model: Any, caption: str, max_windows: int | None = None) -> tuple[Any, Any]:
    """(hidden [n*77, d1+d2], pooled [d_proj]) for one caption with both SDXL text encoders (the tests' reference
    of what encode stores for a caption)."""
    (one,) = encode_captions(model, [caption], max_windows)
    return one["hidden"], one["pooled"]


def time_ids(original_hw: tuple[int, int], crop_top_left: tuple[int, int], target_hw: tuple[int, int]) -> list[float]:
    """SDXL micro-conditioning: [orig_h, orig_w, crop_top, crop_left, target_h, target_w] (heights first)."""
    return [float(original_hw[0]), float(original_hw[1]), float(crop_top_left[0]), float(crop_top_left[1]),
            float(target_hw[0]), float(target_hw[1])]
