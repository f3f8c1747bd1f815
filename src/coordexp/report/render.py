"""The report as a list of blocks (headings, paragraphs, bullet lists, tables, images) and its two
renderings: GitHub markdown and one self-contained HTML page (inline CSS, images beside it)."""

from __future__ import annotations

import html
import re
from dataclasses import dataclass


@dataclass
class Heading:
    level: int
    text: str


@dataclass
class Para:
    text: str  # may hold `code` and **bold**


@dataclass
class Bullets:
    items: list[str]


@dataclass
class Table:
    headers: list[str]
    rows: list[list[str]]

    def __post_init__(self):
        assert all(len(r) == len(self.headers) for r in self.rows), "ragged table"


@dataclass
class Figure:
    path: str  # relative to the report folder
    caption: str


Block = Heading | Para | Bullets | Table | Figure


# -- markdown --------------------------------------------------------------------------------
def _md_cell(text: str) -> str:
    return str(text).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


NUMERIC = re.compile(r"[+-]?\d[\d.,]*(e[+-]?\d+)?%?|n/a|[+-]?inf|nan|\d+ / \d+")


def numeric_columns(table: Table) -> list[bool]:
    """Columns whose every cell is a number (or n/a): right-aligned."""
    return [bool(table.rows) and all(NUMERIC.fullmatch(row[i]) for row in table.rows)
            for i in range(len(table.headers))]


def table_markdown(table: Table) -> str:
    """A GitHub table: numeric columns right-aligned, text columns left-aligned."""
    align = ["---:" if num else ":---" for num in numeric_columns(table)]
    lines = ["| " + " | ".join(_md_cell(h) for h in table.headers) + " |",
             "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in table.rows]
    return "\n".join(lines)


def to_markdown(blocks: list[Block]) -> str:
    parts = []
    for block in blocks:
        match block:
            case Heading(level, text):
                parts.append("#" * level + " " + text)
            case Para(text):
                parts.append(text)
            case Bullets(items):
                parts.append("\n".join(f"- {item}" for item in items))
            case Table():
                parts.append(table_markdown(block))
            case Figure(path, caption):
                parts.append(f"![{caption}]({path})\n\n*{caption}*")
    return "\n\n".join(parts) + "\n"


# -- HTML ------------------------------------------------------------------------------------
CSS = """
body { font: 14px/1.45 -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; color: #222;
       max-width: 1180px; margin: 24px auto; padding: 0 16px; }
h1 { font-size: 24px; border-bottom: 2px solid #ddd; padding-bottom: 6px; }
h2 { font-size: 19px; margin-top: 32px; border-bottom: 1px solid #eee; } h3 { font-size: 15px; }
.wide { overflow-x: auto; } table { border-collapse: collapse; margin: 10px 0; font-size: 13px; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: left; }
th.num, td.num { text-align: right; font-variant-numeric: tabular-nums; }
th { background: #f2f2f2; } tr:nth-child(even) td { background: #fafafa; }
code { background: #f3f3f3; padding: 0 3px; border-radius: 3px; font-size: 12px; }
figure { margin: 14px 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #555; font-size: 12px; }
"""


def _inline_html(text: str) -> str:
    out = html.escape(text)
    out = re.sub(r"`([^`]+)`", r"<code>\1</code>", out)
    return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", out)


def table_html(table: Table) -> str:
    cls = [' class="num"' if num else "" for num in numeric_columns(table)]
    # <wbr> lets long metric names break at underscores instead of widening the page
    head = "".join(f"<th{c}>{html.escape(h).replace('_', '_<wbr>')}</th>"
                   for c, h in zip(cls, table.headers, strict=True))
    body = "".join("<tr>" + "".join(f"<td{c}>{html.escape(str(v))}</td>"
                                    for c, v in zip(cls, row, strict=True)) + "</tr>"
                   for row in table.rows)
    return (f'<div class="wide"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody>'
            "</table></div>")


def _block_html(block: Block) -> str:
    match block:
        case Heading(level, text):
            return f"<h{level}>{_inline_html(text)}</h{level}>"
        case Para(text):
            return f"<p>{_inline_html(text)}</p>"
        case Bullets(items):
            return "<ul>" + "".join(f"<li>{_inline_html(i)}</li>" for i in items) + "</ul>"
        case Table():
            return table_html(block)
        case Figure(path, caption):
            src = html.escape(path, quote=True)
            return (f'<figure><img src="{src}" alt="{html.escape(caption, quote=True)}">'
                    f"<figcaption>{_inline_html(caption)}</figcaption></figure>")
    raise AssertionError(f"unknown block {block!r}")


def to_html(blocks: list[Block], title: str) -> str:
    body = "\n".join(_block_html(b) for b in blocks)
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{html.escape(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
            f"{body}\n</body>\n</html>\n")

