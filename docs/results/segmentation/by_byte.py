"""Which bytes of docs/segmentation-text.txt open a slot: for each run NAME, the level map of every
DLA layer over the text (`dla.run.segments.segment_text`, what `dla segments` draws and counts),
and per head the fraction of the tokens of each byte class that open a slot, counted over the
positions that the boundary rate counts (16 and later); and the lengths of the slots that the
memory holds after the text's last token, oldest first. Writes `NAME-bytes.json` beside this
file; `tables.py` formats it.

    python docs/results/segmentation/by_byte.py seg-mamba2-drift-0.6 ...   (from the repository root)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

from dla.run import checkpoint
from dla.run.data import encode
from dla.ops.levels import EMPTY
from dla.run.eval.segmentation import SKIP_FIRST
from dla.run.segments import segment_text

HERE = Path(__file__).resolve().parent
TEXT = Path("docs/segmentation-text.txt")


def classes(tokens: np.ndarray) -> dict[str, np.ndarray]:
    """Boolean masks over the tokens at positions `>= SKIP_FIRST`."""
    b, prev = tokens[SKIP_FIRST:], tokens[SKIP_FIRST - 1:-1]
    letter = ((b >= 65) & (b <= 90)) | ((b >= 97) & (b <= 122))
    return {"same byte as the previous": b == prev, "another byte than the previous": b != prev,
            "newline": b == 10, "space": b == 32, "letter": letter, "other (punctuation, digits)":
            ~letter & (b != 10) & (b != 32), "after a newline": prev == 10}


def measure(name: str) -> dict:
    tokens = encode(TEXT.read_text())
    model, ckpt, state = checkpoint.load_model(f"runs/{name}", device=torch.device("cpu"))
    masks = classes(tokens)
    heads = []
    for record in segment_text(model, tokens):
        level_start, _ = record.pooled()
        T, H = level_start.shape[1], level_start.shape[2]
        opened = (level_start[0, :, :, 0].long() == torch.arange(T)[:, None]).numpy()[SKIP_FIRST:]  # [T-16, H]
        for h in range(H):
            starts = sorted(int(s) for s in level_start[0, T - 1, h] if s != EMPTY)  # oldest first
            heads.append({"layer": record.layer, "head": h, "boundary_rate": float(opened[:, h].mean()),
                          "opened_by_class": {c: [int(opened[m, h].sum()), int(m.sum())] for c, m in masks.items()},
                          "slot_lengths_at_end": [b - a for a, b in zip(starts, starts[1:] + [T])]})
    return {"checkpoint": str(ckpt), "step": int(state["step"]), "text": str(TEXT), "tokens": len(tokens),
            "heads": heads}


if __name__ == "__main__":
    torch.set_num_threads(1)
    for name in sys.argv[1:]:
        (HERE / f"{name}-bytes.json").write_text(json.dumps(measure(name)) + "\n")
