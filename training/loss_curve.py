"""The loss-curve image a training node outputs: per-step loss and its moving average.

Per-step diffusion losses are noisy (each step draws its own timestep), so the curve shows the
raw values faintly and an exponential moving average on top; the prior term, when trained, is a
second line. Pure numpy + PIL; returns a ComfyUI IMAGE tensor [1, H, W, 3] in [0, 1].
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

WIDTH, HEIGHT, MARGIN = 640, 360, 48
SUBJECT, SUBJECT_FAINT = (31, 119, 180), (174, 199, 232)
PRIOR, PRIOR_FAINT = (214, 39, 40), (255, 187, 187)


def moving_average(values: list[float], smoothing: float = 0.9) -> list[float]:
    """Bias-corrected exponential moving average (as TensorBoard's smoothing)."""
    out, average = [], 0.0
    for i, v in enumerate(values, start=1):
        average = smoothing * average + (1 - smoothing) * v
        out.append(average / (1 - smoothing**i))
    return out


def loss_curve_image(subject: list[float], prior: list[float] | None = None, title: str = "training loss") -> torch.Tensor:
    image = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    series = [(subject, SUBJECT, SUBJECT_FAINT, "subject" if prior else "loss")]
    if prior:
        series.append((prior, PRIOR, PRIOR_FAINT, "prior (unweighted)"))
    values = [v for s, *_ in series for v in s if np.isfinite(v)]
    low, high = (min(values), max(values)) if values else (0.0, 1.0)
    if high - low < 1e-12:
        low, high = low - 0.5, high + 0.5
    left, top, right, bottom = MARGIN, 28, WIDTH - MARGIN // 2, HEIGHT - 28
    steps = max(len(subject), 2)

    def point(i: int, v: float) -> tuple[float, float]:
        return (left + (right - left) * i / (steps - 1), bottom - (bottom - top) * (v - low) / (high - low))

    draw.rectangle([left, top, right, bottom], outline=(120, 120, 120))
    for values_, strong, faint, _ in series:
        for line, colour, width in ((values_, faint, 1), (moving_average(values_), strong, 2)):
            points = [point(i, v) for i, v in enumerate(line) if np.isfinite(v)]
            if len(points) > 1:
                draw.line(points, fill=colour, width=width)
    draw.text((4, top), f"{high:.4g}", fill="black", font=font)
    draw.text((4, bottom - 10), f"{low:.4g}", fill="black", font=font)
    draw.text((left, bottom + 8), "step 1", fill="black", font=font)
    draw.text((right - 60, bottom + 8), f"step {len(subject)}", fill="black", font=font)
    draw.text((left, 8), title, fill="black", font=font)
    x = left + 8 * len(title) + 24
    for _, strong, _, name in series:  # the legend: each series' name in its colour
        draw.line([(x, 14), (x + 20, 14)], fill=strong, width=3)
        draw.text((x + 26, 8), name, fill=strong, font=font)
        x += 26 + 7 * len(name) + 24
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)[None]
