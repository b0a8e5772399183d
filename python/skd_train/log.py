"""Run records: a CSV of losses per step, a progress bar (tqdm, or a plain line every few steps) and a
plot of the loss curves and mIoU (matplotlib, skipped with a message when it is not installed)."""
from __future__ import annotations

import csv
import sys
import time
from pathlib import Path
from typing import Optional


class CsvLog:
    """Rows of {step, key: value}; columns grow as new keys appear. On resume, rows after the checkpoint's
    step (logged before a kill, then lost) are dropped so the log matches the resumed run."""

    def __init__(self, path, resume_step: Optional[int] = None):
        self.path = Path(path)
        self.rows: list[dict] = []
        if resume_step is not None and self.path.exists():
            with open(self.path, newline="") as f:
                self.rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
        self.columns = ["step"]
        for row in self.rows:
            self.columns += [k for k in row if k not in self.columns]
        self._write_all()

    def _write_all(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.columns, restval="")
            writer.writeheader()
            writer.writerows(self.rows)

    def has(self, step: int, key: str) -> bool:
        """Whether a row of `step` holds a value for `key`."""
        return any(int(r["step"]) == step and r.get(key) not in (None, "") for r in self.rows)

    def append(self, step: int, values: dict) -> None:
        row = {"step": step, **{k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in values.items()}}
        self.rows.append(row)
        if any(k not in self.columns for k in row):
            self.columns += [k for k in row if k not in self.columns]
            self._write_all()
        else:
            with open(self.path, "a", newline="") as f:
                csv.DictWriter(f, fieldnames=self.columns, restval="").writerow(row)


class Progress:
    """A progress bar per run: tqdm (kept on screen, with rate and ETA) when stderr is a terminal and
    tqdm is installed; otherwise one plain line every ~10 % of the run, readable in a log file (tqdm's
    carriage returns are not)."""

    def __init__(self, total: int, initial: int = 0, desc: str = "", enabled: bool = True):
        self.bar = None
        self.total, self.n, self.start, self.desc, self.enabled = total, initial, initial, desc, enabled
        self.every = max(1, total // 10)
        self.t0 = time.time()
        if enabled and sys.stderr.isatty():
            try:
                from tqdm import tqdm
                self.bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, leave=True,
                                unit="step", file=sys.stderr)
            except ImportError:
                pass

    def update(self, values: dict) -> None:
        self.n += 1
        text = " ".join(f"{k}={v:.3g}" for k, v in values.items())
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=False)
            self.bar.update(1)
        elif self.enabled and (self.n % self.every == 0 or self.n == self.total):
            elapsed = time.time() - self.t0
            per_step = elapsed / max(1, self.n - self.start)
            print(f"{self.desc}: step {self.n}/{self.total}  {per_step:.2f} s/step  "
                  f"elapsed {duration_text(elapsed)}  left {duration_text(per_step * (self.total - self.n))}  {text}",
                  file=sys.stderr, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def duration_text(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def plot_log(csv_path, out_path) -> Optional[Path]:
    """Loss curves (one line per loss column) and mIoU (when evaluated) from the CSV; None if no matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping the plot (pip install matplotlib)", file=sys.stderr)
        return None
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return None
    keys = [k for k in rows[0] if k not in ("step", "lr", "miou")]
    fig, (ax_loss, ax_miou) = plt.subplots(1, 2, figsize=(11, 4))
    for k in keys:
        pts = [(int(r["step"]), float(r[k])) for r in rows if r.get(k)]
        if pts:
            ax_loss.plot(*zip(*pts), label=k)
    ax_loss.set(xlabel="step", ylabel="loss", title="losses")
    ax_loss.legend(fontsize=8)
    pts = [(int(r["step"]), float(r["miou"])) for r in rows if r.get("miou")]
    if pts:
        ax_miou.plot(*zip(*pts), marker="o")
    ax_miou.set(xlabel="step", ylabel="mIoU", title="validation mIoU")
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return Path(out_path)
