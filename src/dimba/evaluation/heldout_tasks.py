"""The documents of dimba's lm-evaluation-harness tasks (``src/dimba/evaluation/tasks/*.yaml``), built offline from the
held-out (validation) split of a corpus, by default the built-in Shakespeare: nothing is downloaded.

Each document is a passage of the held-out text: ``context`` (the lines before a target line, ending with a
newline), ``target`` (a line of at least 4 words), ``choices`` (the target and 3 other lines of the held-out text,
in a seeded random order), ``label`` (the target's index) and ``passage`` (context, target and the lines after it).

- ``dimba_continuation`` (multiple choice): pick the true next line among the distractors (acc, acc_norm);
- ``dimba_next_line`` (generate_until, stop at a newline): generate the next line (exact match);
- ``dimba_heldout`` (loglikelihood_rolling): the likelihood of the passages (bits per byte, perplexities).

Task options (`lm_eval --metadata '{"corpus": ...}'`): ``corpus`` (a `--data` corpus), ``val_fraction``
(0.05, as training), ``num_docs`` (100), ``doc_seed`` (1234).
"""

from __future__ import annotations

import random

from dimba.data.corpora import load_corpus, split_text
from dimba.errors import DataError

CONTEXT_LINES = 3  # lines before the target
PASSAGE_LINES = 8  # lines after the target in ``passage``
CHOICES = 4


def heldout_documents(corpus: str = "shakespeare", val_fraction: float = 0.05, num_docs: int = 100,
                      doc_seed: int = 1234) -> list[dict]:
    """Up to ``num_docs`` documents (see the module docstring) from the held-out split of ``corpus``, the same for
    the same arguments."""
    _, val = split_text(load_corpus(corpus), val_fraction)
    lines = [line.rstrip() for doc in val for line in doc.split("\n")]
    targets = [i for i in range(CONTEXT_LINES, len(lines)) if len(lines[i].split()) >= 4]
    pool = sorted({lines[i] for i in targets})  # the distractors: every target line of the held-out text
    rng = random.Random(doc_seed)
    docs = []
    for i in sorted(rng.sample(targets, min(num_docs, len(targets)))):
        others = [line for line in rng.sample(pool, min(len(pool), 2 * CHOICES)) if line != lines[i]]
        if len(others) < CHOICES - 1:
            continue
        label = rng.randrange(CHOICES)
        choices = others[:CHOICES - 1]
        choices.insert(label, lines[i])
        context = "\n".join(lines[i - CONTEXT_LINES:i]) + "\n"
        docs.append({"context": context, "target": lines[i], "choices": choices, "label": label,
                     "passage": context + "\n".join(lines[i:i + 1 + PASSAGE_LINES])})
    if not docs:
        raise DataError(f"the held-out split of {corpus!r} has no line of 4 words or more with {CHOICES - 1} other "
                        "such lines to choose from: use a larger corpus or val_fraction")
    return docs


def dataset(corpus: str = "shakespeare", val_fraction: float = 0.05, num_docs: int = 100, doc_seed: int = 1234,
            **_: object):
    """The ``custom_dataset`` of the task YAML files: a `datasets.DatasetDict` with a ``test`` split of
    `heldout_documents`. lm-eval passes the task metadata and the model arguments too; those are ignored."""
    import datasets

    docs = heldout_documents(corpus, float(val_fraction), int(num_docs), int(doc_seed))
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(docs)})
