"""An app with a periodic job every second, for worker processes in the schedule tests."""

from __future__ import annotations

from pgqueue import App

app = App()


@app.periodic("@every 1s", name="every-second")
@app.task(name="tick")
def tick() -> str:
    return "tock"
