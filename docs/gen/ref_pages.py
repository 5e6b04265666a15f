"""Generate one API reference page per module of keras_ee (and tuning), run by mkdocs-gen-files.

The pages follow the package tree as it is at build time, so a module that moves or appears
gets its page without an edit here. Private modules (a leading underscore) are left out.
"""

from pathlib import Path

import mkdocs_gen_files

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("keras_ee", "tuning")

nav = mkdocs_gen_files.Nav()
for package in PACKAGES:
    for path in sorted((ROOT / package).rglob("*.py")):
        module = path.relative_to(ROOT).with_suffix("")
        parts = tuple(module.parts)
        if parts[-1] == "__main__" or any(part.startswith("_") and part != "__init__" for part in parts):
            continue
        if parts[-1] == "__init__":
            parts = parts[:-1]
        doc_path = Path("reference", *parts).with_suffix(".md")
        if path.name == "__init__.py":
            doc_path = Path("reference", *parts, "index.md")
        nav[parts] = doc_path.relative_to("reference").as_posix()
        with mkdocs_gen_files.open(doc_path, "w") as page:
            page.write(f"# `{'.'.join(parts)}`\n\n::: {'.'.join(parts)}\n")
        mkdocs_gen_files.set_edit_path(doc_path, path.relative_to(ROOT))

with mkdocs_gen_files.open("reference/SUMMARY.md", "w") as summary:
    summary.writelines(nav.build_literate_nav())

# The site's home page is the README, its links rewritten from the repository root to docs/.
readme = (ROOT / "README.md").read_text(encoding="utf-8")
with mkdocs_gen_files.open("index.md", "w") as index:
    index.write(readme.replace("](docs/", "]("))
mkdocs_gen_files.set_edit_path("index.md", "README.md")
