#!/usr/bin/env python3
"""`make docs`: the collection's documentation, linted and rendered to HTML, offline.

    python .ci/docs.py lint   antsibull-docs lint-collection-docs --plugin-docs (in make test)
    python .ci/docs.py html   build/docs/html/index.html, warnings are errors
    python .ci/docs.py        both

The HTML holds the reference antsibull-docs generates from the modules', filters' and roles'
own documentation (DOCUMENTATION/EXAMPLES/RETURN, filter .yml files, meta/argument_specs.yml),
next to README.md (the front page), docs/*.md and roles/*/README.md, read as Markdown by
myst-parser with their relative links kept. Sphinx's settings are .ci/docs/conf.py; nothing
is fetched (no intersphinx), so it builds with what requirements-dev.txt installs from PyPI.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONF = os.path.join(ROOT, ".ci", "docs")
OUT = os.path.join(ROOT, "build", "docs")
BIN = os.path.dirname(sys.executable)
LINK = re.compile(r"\]\((?!https?:|mailto:|#)([^)#\s]+)(#[^)\s]*)?\)")


def repository_url():
    """galaxy.yml's repository, for links to the checkout's files that are not pages."""
    with open(os.path.join(ROOT, "galaxy.yml"), encoding="utf-8") as f:
        match = re.search(r"^repository:\s*(\S+)", f.read(), re.M)
    return match.group(1).rstrip("/") if match else None


def copy_page(path, dest, repo):
    """Copy a Markdown page; a link to a file that is not a page goes to the repository instead."""
    with open(path, encoding="utf-8") as f:
        text = f.read()

    def rewrite(match):
        target = os.path.normpath(os.path.join(os.path.dirname(path), match.group(1)))
        if target.endswith(".md") or not repo or not os.path.exists(target):
            return match.group(0)
        kind = "tree" if os.path.isdir(target) else "blob"
        return f"]({repo}/{kind}/main/{os.path.relpath(target, ROOT)}{match.group(2) or ''})"

    os.makedirs(os.path.dirname(dest), exist_ok=True)
    with open(dest, "w", encoding="utf-8") as f:
        f.write(LINK.sub(rewrite, text))
    return dest


def env():
    """antsibull-docs runs `ansible-doc` and `ansible-galaxy`: the venv's, finding this tree."""
    e = dict(os.environ)
    e["PATH"] = BIN + os.pathsep + e.get("PATH", "")
    e["ANSIBLE_CONFIG"] = os.path.join(ROOT, "ansible.cfg")
    e["ANSIBLE_COLLECTIONS_PATH"] = os.path.join(ROOT, "collections")
    return e


def run(cmd, **kwargs):
    print("+ " + " ".join(cmd), flush=True)
    return subprocess.call(cmd, env=env(), **kwargs)


def lint():
    print("==> antsibull-docs lint-collection-docs --plugin-docs", flush=True)
    return run([os.path.join(BIN, "antsibull-docs"), "lint-collection-docs", "--plugin-docs", ROOT])


def guide_order():
    """docs/*.md in the order README.md's links name them, then the pages it does not link."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        linked = re.findall(r"\]\(docs/([^)#]+)\.md[#)]", f.read())
    pages = [os.path.splitext(os.path.basename(p))[0] for p in sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))]
    order = [p for p in dict.fromkeys(linked) if p in pages]
    return ["docs/" + p for p in order + [p for p in pages if p not in order]]


def toctree(caption, pages):
    return f"\n\n```{{toctree}}\n:hidden:\n:caption: {caption}\n:maxdepth: 2\n\n" + "\n".join(pages) + "\n```\n"


def front_page(readme):
    """README.md with the tables of contents of the sidebar (its own links stay as they are)."""
    roles = [os.path.relpath(os.path.splitext(p)[0], ROOT) for p in sorted(glob.glob(os.path.join(ROOT, "roles", "*", "README.md")))]
    return (readme + toctree("Guides", guide_order()) + toctree("Reference", ["reference/index"])
            + toctree("Roles, in depth", roles))


def retitle_reference(ref):
    """antsibull-docs titles the collection's index "Rkllm.Fleet": say what the page holds."""
    index = os.path.join(ref, "index.rst")
    with open(index, encoding="utf-8") as f:
        text = f.read()
    title = "Modules, filters and roles"
    text = re.sub(r"^Rkllm\.Fleet\n=+\n", f"{title}\n{'=' * len(title)}\n", text, count=1, flags=re.M)
    with open(index, "w", encoding="utf-8") as f:
        f.write(text)


def stage(src):
    """Sphinx's source tree: the Markdown pages where the checkout has them, the reference beside."""
    if os.path.isdir(src):
        shutil.rmtree(src)
    repo = repository_url()
    index = copy_page(os.path.join(ROOT, "README.md"), os.path.join(src, "index.md"), repo)
    with open(index, encoding="utf-8") as f:
        readme = f.read()
    with open(index, "w", encoding="utf-8") as f:
        f.write(front_page(readme))
    pages = glob.glob(os.path.join(ROOT, "docs", "*.md")) + glob.glob(os.path.join(ROOT, "roles", "*", "README.md"))
    for page in pages:
        copy_page(page, os.path.join(src, os.path.relpath(page, ROOT)), repo)
    ref = os.path.join(src, "reference")
    os.makedirs(ref, mode=0o700)  # antsibull-docs writes only into a directory no one else can
    rc = run([os.path.join(BIN, "antsibull-docs"), "--config-file", os.path.join(CONF, "antsibull-docs.cfg"),
              "collection", "--use-current", "--squash-hierarchy", "--fail-on-error",
              "--dest-dir", ref, "rkllm.fleet"])
    if not rc:
        retitle_reference(ref)
    return rc


def html():
    print("==> HTML documentation (antsibull-docs, Sphinx)", flush=True)
    src = os.path.join(OUT, "src")
    os.makedirs(OUT, exist_ok=True)
    rc = stage(src)
    if rc:
        return rc
    dest = os.path.join(OUT, "html")
    if os.path.isdir(dest):
        shutil.rmtree(dest)
    rc = run([os.path.join(BIN, "sphinx-build"), "-b", "html", "-q", "-W", "--keep-going", "-n",
              "-c", CONF, src, dest])
    if not rc:
        print(f"==> {os.path.relpath(os.path.join(dest, 'index.html'), ROOT)}", flush=True)
    return rc


def main():
    what = sys.argv[1:] or ["lint", "html"]
    for step in what:
        rc = {"lint": lint, "html": html}[step]()
        if rc:
            sys.exit(rc)


if __name__ == "__main__":
    main()
