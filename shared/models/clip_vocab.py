"""The real CLIP BPE tokenizer, offline.

SDXL's two tokenizers share OpenAI CLIP's 49,408-token BPE vocabulary (they differ only in the pad token:
`<|endoftext|>` for the first, `!` for the second). No hub download is possible here, so the vocabulary comes
from CLIP's own BPE merges file, shipped as package data beside this module (`bpe_simple_vocab_16e6.txt.gz`,
unchanged from OpenAI CLIP and open_clip, MIT-licensed: see `bpe_simple_vocab_16e6.LICENSE`). From the merges
we write the `vocab.json` + `merges.txt` pair that transformers' CLIPTokenizer reads, built exactly as CLIP
builds its encoder: the 256 byte symbols, the same with `</w>`, one token per merge, then the two special tokens.
"""
from __future__ import annotations

import gzip
import json
from importlib import resources
from pathlib import Path

from shared.core.errors import PipelineError

BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
N_MERGES = 49152 - 256 - 2


def bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2's reversible map from bytes to printable unicode symbols."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars = keep[:]
    extra = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(keep, map(chr, chars)))


def read_merges() -> list[tuple[str, str]]:
    """CLIP's 48,894 BPE merges, in rank order, from the vocabulary file shipped with this package."""
    try:
        data = resources.files(__package__).joinpath(BPE_FILE).read_bytes()
    except FileNotFoundError:
        raise PipelineError(f"{BPE_FILE}: the CLIP BPE vocabulary is missing from this install of sdxl-stages "
                            f"(it ships beside {__name__}); reinstall the package") from None
    lines = gzip.decompress(data).decode("utf-8").split("\n")[1:N_MERGES + 1]
    return [tuple(line.split()) for line in lines]


def write_vocab(folder: Path) -> tuple[Path, Path]:
    """Write CLIP's vocab.json and merges.txt into `folder`; returns their paths."""
    merges = read_merges()
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    vocab_file, merges_file = folder / "vocab.json", folder / "merges.txt"
    vocab_file.write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False), encoding="utf-8")
    merges_file.write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8")
    return vocab_file, merges_file


def write_tokenizer(folder: Path, pad_token: str) -> Path:
    """A CLIPTokenizer folder (vocab, merges, config) that `CLIPTokenizer.from_pretrained` loads."""
    write_vocab(folder)
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "bos_token": "<|startoftext|>",
              "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": pad_token,
              "do_lower_case": True, "clean_up_tokenization_spaces": False}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=1), encoding="utf-8")
    return folder

