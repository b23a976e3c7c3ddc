"""``progress=True``: a rich progress bar of a call's Results (done, failed, rate, ETA), on
stderr, in a terminal or a notebook alike."""

from __future__ import annotations

from typing import Awaitable, Callable, Iterable

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, ProgressColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.progress import Progress as RichProgress
from rich.text import Text

from .result import Result


class _Rate(ProgressColumn):
    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("" if speed is None else f"{speed:,.0f}/s", style="progress.data.speed")


class Progress:
    """A bar for ``total`` Results (None: unknown) of a call named ``what``; ``update(results)``
    counts them in, ``recorder(record)`` wraps a map's batch writer to do so, ``close()``
    leaves the bar at its last state."""

    def __init__(self, what: str, total: int | None, console: Console | None = None):
        self.failed = 0
        self._bar = RichProgress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("[red]{task.fields[failed]} failed"), _Rate(), TimeElapsedColumn(),
                                 TextColumn("eta"), TimeRemainingColumn(),
                                 console=console or Console(stderr=True), transient=False)
        self._task = self._bar.add_task(what, total=total, failed=0)
        self._bar.start()

    def update(self, results: Iterable[Result]) -> None:
        n = bad = 0
        for r in results:
            n += 1
            bad += not r.ok
        self.failed += bad
        self._bar.update(self._task, advance=n, failed=self.failed)

    def recorder(self, record: Callable[[list[Result]], Awaitable[None]] | None
                 ) -> Callable[[list[Result]], Awaitable[None]]:
        async def counted(batch: list[Result]) -> None:
            if record is not None:
                await record(batch)
            self.update(batch)

        return counted

    def close(self) -> None:
        self._bar.stop()
