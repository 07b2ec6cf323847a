"""What `memgen train` shows while it runs: the total number of optimizer
steps up front, then a progress bar with the latest loss and the ETA (tqdm,
on stderr), and each step's record appended to train_log.jsonl. A first run
on a CPU takes minutes to hours; without the total and an ETA a user cannot
tell a slow run from a stuck one.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Callable


class StepLogger:
    """Callable per step record: log line to train_log.jsonl, bar update,
    and `on_record(record)` (e.g. periodic checkpoints). Call start(total)
    before the first step, close() at the end."""

    def __init__(self, log_path: Path, quiet: bool = False, on_record: Callable[[dict], None] | None = None,
                 stream=None):
        self.log = open(log_path, "a", encoding="utf-8")
        self.quiet = quiet
        self.on_record = on_record
        self.stream = stream or sys.stderr
        self.bar = None

    def start(self, total_steps: int, what: str = "") -> None:
        """Announce the run's optimizer steps and open the bar."""
        print(f"memgen train: {total_steps} optimizer steps{' (' + what + ')' if what else ''}", file=self.stream,
              flush=True)
        if self.quiet:
            return
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total_steps, unit="step", file=self.stream, dynamic_ncols=True,
                        bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]")

    def __call__(self, record: dict) -> None:
        self.log.write(json.dumps(record) + "\n")
        self.log.flush()
        if self.bar is not None:
            postfix = {"loss": f"{record['loss']:.4f}", "lr": f"{record['lr']:.1e}"}
            if "reward_mean" in record:
                postfix.update(reward=f"{record['reward_mean']:.3f}", ins=f"{record['insertion_rate']:.2f}")
            self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(1)
        if self.on_record is not None:
            self.on_record(record)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        self.log.close()
