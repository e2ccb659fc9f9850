"""Progress output: JSON lines off a terminal (counts only), a rich bar on one."""

from __future__ import annotations

import io
import json

from kmsguard.rotation.progress import Progress


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_json_lines_off_a_terminal() -> None:
    out = io.StringIO()
    progress = Progress("rewrap sqlite:/x.db#t.c", "auto", out)
    assert progress.mode == "json"
    progress.start(1000, done=200)  # 200 done by an earlier run
    progress.advance(500)
    progress.advance(300)
    progress.close()
    last = json.loads(out.getvalue().splitlines()[-1])
    assert last["event"] == "progress" and last["job"] == "rewrap sqlite:/x.db#t.c"
    assert (last["done"], last["total"], last["eta_s"]) == (1000, 1000, 0.0)
    assert set(last) == {"event", "job", "done", "total", "rows_per_s", "eta_s"}


def test_bar_on_a_terminal() -> None:
    out = _Terminal()
    progress = Progress("migrate", "auto", out)
    assert progress.mode == "bar"
    progress.start(100)
    progress.advance(100)
    progress.close()
    text = out.getvalue()
    assert "migrate" in text and "100/100" in text and "rows/s" in text
    assert not text.lstrip().startswith("{")
