"""The package's README as an HTML page: the provider's documentation link (Admin > Providers)
points here while the package has no public home page.

Rendered with markdown-it-py (CommonMark + tables), which Airflow installs already (through
rich); raw HTML in the Markdown is escaped, not passed through.
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

from .fmt import esc

DIST_NAME = "airflow-pg-incremental"
SOURCE_ROOT = Path(__file__).resolve().parents[2]   # the checkout, for an editable install
DOCS_DIR = SOURCE_ROOT / "docs"
IMAGE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,100}\.(png|svg|jpg|jpeg|gif)$")
MEDIA_TYPES = {"png": "image/png", "svg": "image/svg+xml", "jpg": "image/jpeg", "jpeg": "image/jpeg",
               "gif": "image/gif"}


def readme_text() -> str:
    """README.md of the checkout when there is one (editable install), else the long description
    in the installed distribution's metadata (the same README, as built into the wheel)."""
    path = SOURCE_ROOT / "README.md"
    if path.is_file() and (SOURCE_ROOT / "airflow_pg_incremental").is_dir():
        return path.read_text(encoding="utf-8")
    from importlib.metadata import PackageNotFoundError, metadata

    try:
        md = metadata(DIST_NAME)
    except PackageNotFoundError:
        return "# airflow-pg-incremental\n\nThe README is not available in this installation."
    return md.get_payload() or md.get("Description") or "# airflow-pg-incremental\n"


def image_path(name: str) -> Path | None:
    """A README image under docs/ (by plain file name only: nothing else is served)."""
    if not IMAGE_RE.match(name):
        return None
    p = DOCS_DIR / name
    return p if p.is_file() else None


def _slug(text: str, seen: dict[str, int]) -> str:
    s = re.sub(r"[^a-z0-9 _-]", "", text.lower()).strip().replace(" ", "-") or "section"
    seen[s] = seen.get(s, 0) + 1
    return s if seen[s] == 1 else f"{s}-{seen[s]}"


def render_markdown(text: str, image_prefix: str) -> tuple[str, list[tuple[int, str, str]]]:
    """(HTML, table of contents [(level, id, title)]). Images written `docs/<file>` point to
    `<image_prefix>/<file>`."""
    from markdown_it import MarkdownIt

    md = MarkdownIt("commonmark", {"html": False}).enable("table")
    tokens = md.parse(text)
    toc, seen = [], {}
    for i, tok in enumerate(tokens):
        if tok.type == "heading_open":
            title = "".join(c.content for c in tokens[i + 1].children or [] if c.type in ("text", "code_inline"))
            hid = _slug(title, seen)
            tok.attrSet("id", hid)
            if tok.tag in ("h2", "h3"):
                toc.append((int(tok.tag[1]), hid, title))
        for child in tok.children or []:
            src = child.attrGet("src") if child.type == "image" else None
            if src and src.startswith("docs/") and IMAGE_RE.match(src[5:]):
                child.attrSet("src", f"{image_prefix}/{src[5:]}")
    return md.renderer.render(tokens, md.options, {}), toc


@lru_cache(maxsize=4)
def _render_cached(text: str, image_prefix: str):
    return render_markdown(text, image_prefix)


def docs_page(image_prefix: str, backups_href: str) -> str:
    body, toc = _render_cached(readme_text(), image_prefix)
    nav = "".join(f'<li class="l{level}"><a href="#{esc(hid)}">{esc(title)}</a></li>' for level, hid, title in toc)
    return ("<!doctype html><html lang=en><head><meta charset=utf-8><title>airflow-pg-incremental · documentation"
            f'</title><meta name="viewport" content="width=device-width, initial-scale=1"><style>{CSS}</style></head>'
            f'<body><nav><p><b>airflow-pg-incremental</b></p><p><a href="{esc(backups_href)}">Backups view</a></p>'
            f"<ul>{nav}</ul></nav><main>{body}</main></body></html>")


CSS = """
body{font:15px/1.55 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1a202c;margin:0;display:flex}
nav{width:260px;flex:none;padding:16px;border-right:1px solid #e2e8f0;height:100vh;overflow:auto;position:sticky;
top:0;font-size:13px;box-sizing:border-box}
nav ul{list-style:none;padding:0;margin:0}nav li.l3{padding-left:12px}nav a{color:#2b6cb0;text-decoration:none}
main{max-width:960px;padding:8px 28px 40px;min-width:0}
pre{background:#f7fafc;border:1px solid #e2e8f0;border-radius:6px;padding:10px 12px;overflow:auto;font-size:13px}
code{font-family:ui-monospace,SFMono-Regular,Menlo,monospace;font-size:.92em}
table{border-collapse:collapse;margin:8px 0}th,td{border:1px solid #e2e8f0;padding:4px 8px;text-align:left}
th{background:#f7fafc}img{max-width:100%;border:1px solid #e2e8f0;border-radius:6px}
h1,h2,h3{line-height:1.25}h2{border-bottom:1px solid #e2e8f0;padding-bottom:4px;margin-top:28px}
"""
