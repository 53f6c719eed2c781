"""Logging every loss term: console, metrics.jsonl (what the DIP Trainer node plots and
tests read) and, when asked, TensorBoard (optional dependency)."""
from __future__ import annotations

import json
import logging
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
        record = {"step": step, **{k: round(float(v), 8) if isinstance(v, float) else v for k, v in values.items()}}
        with open(self.folder / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)):
                    self.writer.add_scalar(f"train/{k}", v, step)
        if console:
            text = " ".join(f"{k}={v:.5g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())
            log.info("step %d %s", step, text)
            print(f"[train] step {step} {text}", flush=True)

    def image(self, step: int, tag: str, image_hwc) -> None:
        if self.writer is not None:
            self.writer.add_image(tag, image_hwc, step, dataformats="HWC")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_metrics(folder: str | Path) -> list[dict]:
    """Records of metrics.jsonl; a resumed run's repeated steps keep their latest value."""
    path = Path(folder) / "metrics.jsonl"
    if not path.is_file():
        return []
    by_step: dict[int, dict] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            rec = json.loads(line)
            by_step[rec["step"]] = rec
    return [by_step[s] for s in sorted(by_step)]
