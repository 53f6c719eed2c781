"""Loss-curve picture for the DIP Trainer node (PIL only: no plotting library needed)."""
from __future__ import annotations

import numpy as np

COLORS = {"total": (255, 255, 255), "noise": (80, 160, 255), "loc": (255, 170, 60), "id": (90, 220, 120)}


def loss_curve(records: list[dict], width: int = 640, height: int = 320) -> np.ndarray:
    """H x W x 3 uint8: each loss term over the steps, each scaled to its own range (the
    terms differ by orders of magnitude), named with its last value."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (width, height), (24, 24, 28))
    draw = ImageDraw.Draw(img)
    pad, top = 10, 18
    if not records:
        draw.text((pad, pad), "no training steps logged yet", fill=(200, 200, 200))
        return np.array(img)
    steps = [r["step"] for r in records]
    s0, s1 = min(steps), max(max(steps), min(steps) + 1)
    legend_x = pad
    for name, color in COLORS.items():
        points = [(r["step"], r[name]) for r in records if isinstance(r.get(name), (int, float))]
        if not points:
            continue
        values = np.array([v for _, v in points], dtype=np.float64)
        lo, hi = float(values.min()), float(values.max())
        span = hi - lo or 1.0
        xy = [(pad + (s - s0) / (s1 - s0) * (width - 2 * pad),
               height - pad - (v - lo) / span * (height - top - 2 * pad)) for s, v in points]
        if len(xy) > 1:
            draw.line(xy, fill=color, width=2)
        else:
            draw.ellipse([xy[0][0] - 2, xy[0][1] - 2, xy[0][0] + 2, xy[0][1] + 2], fill=color)
        label = f"{name} {values[-1]:.4g}"
        draw.text((legend_x, 4), label, fill=color)
        legend_x += 8 * len(label) + 12
    draw.text((width - 120, height - 14), f"steps {s0}-{max(steps)}", fill=(160, 160, 160))
    return np.array(img)
