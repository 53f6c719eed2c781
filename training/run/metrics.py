"""Logging every loss term: one console line per logged step, metrics.jsonl (what the DIP
Trainer node plots and tests read), when asked TensorBoard (optional dependency), and the
progress bar of an interactive run. The attention health (attn/... keys, run/health.py)
goes to metrics.jsonl and TensorBoard in full, and to the console line and the bar in
short; a collapse alarm's text is logged as a warning of its own."""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from portraitbooth_core.optional import require

log = logging.getLogger("portraitbooth.training")


class MetricsLog:
    def __init__(self, folder: str | Path, tensorboard: bool = False, enabled: bool = True):
        self.folder, self.enabled = Path(folder), enabled
        self.writer = None
        if enabled:
            self.folder.mkdir(parents=True, exist_ok=True)
            if tensorboard:
                require("tensorboard", "TensorBoard logging (tensorboard=true)")
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(self.folder / "tensorboard"))

    def log(self, step: int, values: dict, console: bool = True) -> None:
        if not self.enabled:
            return
        # Attention shares keep 6 significant digits: a dead token's 1e-10 is the point, not 0.0.
        record = {"step": step, **{k: (float(f"{v:.6g}") if k.startswith("attn/") else round(float(v), 8))
                                   if isinstance(v, float) else v for k, v in values.items()}}
        with open(self.folder / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)):
                    self.writer.add_scalar(f"train/{k}", v, step)
        if console:
            from .health import ALARM_KEY, compact

            # One line per step, through logging only (a print beside it doubled every line).
            # The attention health in short; the alarm was logged as a warning of its own.
            text = " ".join(f"{k}={v:.5g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items()
                            if not k.startswith("attn/") and k != ALARM_KEY)
            attn = compact(values)
            log.info("step %d %s%s", step, text, f" | attn in face (share/x area): {attn}" if attn else "")

    def image(self, step: int, tag: str, image_hwc) -> None:
        if self.writer is not None:
            self.writer.add_image(tag, image_hwc, step, dataformats="HWC")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def read_metrics(folder: str | Path) -> list[dict]:
    """Records of metrics.jsonl; a resumed run's repeated steps keep their latest value."""
    path = Path(folder) / "metrics.jsonl"
    if not path.is_file():
        return []
    from portraitbooth_core.bounded_json import load_json_bytes
    from portraitbooth_core.paths import BadInputError

    by_step: dict[int, dict] = {}
    # bounded: a run folder under output/ can be written over HTTP (/upload/image type=output)
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if line.strip():
            rec = load_json_bytes(line, f"{path} line {number}", max_bytes=1 << 20)
            if not isinstance(rec, dict) or not isinstance(rec.get("step"), int):
                raise BadInputError(f"{path} line {number} is not a metrics record (no step); delete that line or "
                                    f"the file, or use another run name.")
            by_step[rec["step"]] = rec
    return [by_step[s] for s in sorted(by_step)]


class Progress:
    """A tqdm bar over images on rank 0 of an interactive run: ETA and images/s.

    Off when stderr is not a terminal (a log file or a job scheduler would get a line per
    refresh), when a caller's callback drives its own progress UI (the DIP Trainer node),
    or on ranks other than 0. While it is on, log lines are printed above the bar."""

    def __init__(self, total_steps: int, start_step: int, images_per_step: int, enabled: bool):
        self.bar, self._redirect, self.images_per_step = None, None, images_per_step
        if not enabled:
            return
        try:
            from tqdm import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm
        except ImportError:  # tqdm is optional: the per-step log lines still say everything
            return
        self.bar = tqdm(total=total_steps * images_per_step, initial=start_step * images_per_step, unit="img",
                        unit_scale=True, dynamic_ncols=True, desc="train", smoothing=0.1)
        # The root logger's console handlers (where the training logger propagates) write above the bar.
        self._redirect = logging_redirect_tqdm()
        self._redirect.__enter__()

    def update(self, step: int, values: dict) -> None:
        if self.bar is None:
            return
        self.bar.update(self.images_per_step)
        from .health import token_faces

        postfix = {k: f"{values[k]:.4g}" for k in ("total", "id") if isinstance(values.get(k), float)}
        # Each token's attention in the face (its best layer group): what the collapse alarm reads.
        postfix.update({f"{token[:2]}_face": f"{face:.2g}" for token, face in token_faces(values).items()})
        self.bar.set_postfix(step=step, **postfix, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self._redirect.__exit__(None, None, None)
            self.bar.close()
            self.bar = None


def interactive() -> bool:
    """True when stderr (where the bar draws) is a terminal."""
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stderr
        return False
