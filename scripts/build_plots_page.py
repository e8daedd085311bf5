"""Build the page template `dvc plots show` fills: DVC's own page with Vega, Vega-Lite and Vega-Embed inlined from
plots/vendor/ instead of loaded from cdn.jsdelivr.net, so the plots draw on a machine with no internet.

    python scripts/build_plots_page.py     # rewrites the file .dvc/config's plots.html_template names (plots/page.html)

Run it after updating plots/vendor/ (its README has the npm command); tests/test_plots.py checks that the committed
page is what this writes. DVC fills the template with str.replace of `{plot_divs}`, `{scripts}` and `{refresh_tag}`
(dvc_render.html), not str.format, so the libraries' braces are safe; this page has no `{scripts}`, so DVC adds no CDN
<script> tags. Inlined, not linked by a relative path, the page draws wherever DVC writes it (`dvc plots show -o DIR`,
`dvc plots diff`).
"""

from __future__ import annotations

import re
from pathlib import Path

from configobj import ConfigObj

ROOT = Path(__file__).resolve().parent.parent
VENDOR = ROOT / "plots/vendor"
LIBRARIES = ["vega.min.js", "vega-lite.min.js", "vega-embed.min.js"]  # in load order: Vega-Lite and Embed need Vega
PLACEHOLDERS = ["{plot_divs}", "{scripts}", "{refresh_tag}"]  # what DVC replaces anywhere in the page

# What DVC's own page (dvc_render's PAGE_HTML) gets: a charset (the libraries are not pure ASCII), and the libraries
# inlined for `{scripts}`, which DVC would fill with links to a CDN
HEAD = """    <meta charset="utf-8">
    <title>DVC Plot</title>
    <!-- Vega, Vega-Lite, Vega-Embed (BSD-3-Clause, University of Washington Interactive Data Lab), inlined from
         plots/vendor/ by scripts/build_plots_page.py: see plots/vendor/README.md for versions and licenses -->
"""


def inline_script(name: str, source: str) -> str:
    """One library as an inline <script>, without its sourceMappingURL (the map is not vendored)."""
    problems = [f"contains {p!r}, which DVC would replace" for p in PLACEHOLDERS if p in source]
    if re.search(r"</script", source, re.IGNORECASE):
        problems.append("contains '</script', which would end the inline <script> early")
    if problems:
        raise SystemExit(f"plots/vendor/{name}: " + "; ".join(problems))
    source = re.sub(r"\n//# sourceMappingURL=\S+\s*$", "", source)
    return f"    <script>/* {name} */\n{source}\n    </script>"


def page_html(vendor: Path = VENDOR) -> str:
    from dvc_render.html import PAGE_HTML

    scripts = [inline_script(name, (vendor / name).read_text(encoding="utf-8")) for name in LIBRARIES]
    head = "    <title>DVC Plot</title>\n    {scripts}\n"
    if head not in PAGE_HTML:
        raise SystemExit("dvc_render's PAGE_HTML changed: its <title> and {scripts} lines are not where expected")
    return PAGE_HTML.replace(head, HEAD + "\n".join(scripts) + "\n").rstrip("\n") + "\n"


def template_path(root: Path = ROOT) -> Path:
    """Where DVC reads the template: plots.html_template in .dvc/config, relative to .dvc as DVC resolves it."""
    plots = ConfigObj(str(root / ".dvc/config")).get("plots", {})
    if "html_template" not in plots:
        raise SystemExit("no plots.html_template in .dvc/config: dvc config plots.html_template ../plots/page.html")
    return root / ".dvc" / plots["html_template"]


def main() -> None:
    out = template_path()
    out.write_text(page_html(), encoding="utf-8", newline="\n")
    print(f"wrote {out.resolve().relative_to(ROOT)} ({out.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()
