"""Render the report: papermill executes the template notebook, which builds a :class:`Document` of tables and
figures and writes it as markdown and HTML."""

from __future__ import annotations

import html
import os
import re
from pathlib import Path

import pandas as pd

from vldistill.io import atomic_path, write_text


def render(template: str | Path, output: str | Path, parameters: dict) -> Path:
    """Execute ``template`` with ``parameters`` into ``output`` (an executed notebook, written atomically)."""
    import papermill as pm

    output = Path(output)
    with atomic_path(output.with_suffix(".ipynb")) as tmp:
        pm.execute_notebook(str(template), str(tmp), parameters=parameters, kernel_name="python3",
                            progress_bar=False, cwd=str(Path.cwd()))
    return output


class Document:
    """The report as it is built: headings, paragraphs, tables and figures, written at the end both as markdown
    (``results.md``) and as a standalone HTML page; links are relative to ``base`` (the folder both live in)."""

    def __init__(self, base: str | Path):
        self.base = Path(base)
        self.md: list[str] = []
        self.html: list[str] = []
        self.figures: list[tuple[str, Path]] = []

    def link(self, path: str | Path, text: str) -> str:
        return f"[{text}]({self._rel(path)})"

    def _rel(self, path: str | Path) -> str:
        return Path(os.path.relpath(Path(path), self.base)).as_posix()

    def heading(self, level: int, text: str) -> None:
        self.md += ["#" * level + " " + text, ""]
        self.html.append(f"<h{level}>{html.escape(text)}</h{level}>")

    def text(self, text: str) -> None:
        if text:
            self.md += [text, ""]
            self.html.append(f"<p>{_inline_html(text)}</p>")

    def table(self, frame) -> None:
        """A pandas table; a plain 0..n-1 index is not shown."""
        index = not isinstance(frame.index, pd.RangeIndex)
        self.md += [frame.to_markdown(disable_numparse=True, index=index), ""]
        self.html.append(frame.to_html(border=0, classes="table", index=index))

    def figure(self, path: str | Path, caption: str) -> None:
        rel = self._rel(path)
        self.figures.append((caption, Path(path)))
        self.md += [f"![{caption}]({rel})", ""]
        self.html.append(f'<figure><img src="{html.escape(rel)}" alt="{html.escape(caption)}">'
                         f"<figcaption>{html.escape(caption)}</figcaption></figure>")

    def write(self, md_path: str | Path, html_path: str | Path) -> None:
        write_text(md_path, "\n".join(self.md))
        write_text(html_path, HTML_PAGE.format(body="\n".join(self.html)))

    def write_index(self, path: str | Path, documents: dict[str, str | Path]) -> None:
        """``reports/README.md``: a link to every document and figure this report wrote or showed."""
        lines = ["# Reports", "", "Written by `dvc repro report` from this run's metrics; do not edit by hand.", ""]
        lines += [f"- {self.link(p, name)}" for name, p in documents.items()]
        lines += ["", "## Figures", ""] + [f"- {self.link(p, caption)}" for caption, p in self.figures]
        write_text(path, "\n".join(lines) + "\n")


def _inline_html(text: str) -> str:
    """Markdown's inline code and emphasis as HTML (the report's paragraphs use no other markup)."""
    escaped = html.escape(text)
    escaped = re.sub(r"`([^`]+)`", r"<code>\1</code>", escaped)
    escaped = re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", escaped)
    return re.sub(r"\*([^*]+)\*", r"<i>\1</i>", escaped)


HTML_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>vldistill results</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto;}}table{{border-collapse:collapse;font-size:90%;}}
td,th{{padding:3px 8px;border-bottom:1px solid #ddd;text-align:left;}}img{{max-width:100%;}}code{{background:#f4f4f4;}}
</style></head><body>
{body}
</body></html>
"""
