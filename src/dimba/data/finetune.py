"""Fine-tuning data: JSON lines of prompts with responses, preferences or checkable answers (or a built-in task),
tokenised into variable-length rows whose prompt stays clean and whose response alone is scored.

Row layout (`TokenRows`): ``prompt + response + EOS``, then what the model's family generates after a prompt: a
diffusion family denoises the whole context after the prompt (`dimba.families.Family.canvas_length`), so its rows
are filled with EOS to the context and those EOS are scored as part of the response (the model learns where an
answer ends inside its canvas, as in LLaDA's SFT); an ar model generates exactly the tokens asked for, so its rows
end at the EOS. Rows shorter than the longest of a batch are padded with [PAD]; ``lengths`` tells the backbone
where each row ends (padding never changes real outputs) and padding is never scored.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from dimba.data.packing import BlockBatches, micro_batches
from dimba.data.tasks import TASK_PREFIX, preference_rows, problems, sft_rows, task_of
from dimba.errors import DataError
from dimba.special_tokens import EOS_ID, PAD_ID

# the fields of a row of each kind of file, in the order they are read
KINDS = {"sft": ("prompt", "response"), "preference": ("prompt", "chosen", "rejected"), "answer": ("prompt", "answer")}


@dataclass
class TokenRows:
    """A batch of fine-tuning rows.

    ids (B, L): prompt, response, EOS (and the EOS fill of a diffusion canvas), then [PAD];
    prompt (B, L) bool: the clean prompt; scored (B, L) bool: the response positions whose likelihood is scored;
    lengths (B,): real tokens per row (the rest is padding).
    """

    ids: torch.Tensor
    prompt: torch.Tensor
    scored: torch.Tensor
    lengths: torch.Tensor

    def to(self, device) -> "TokenRows":
        """The rows on ``device``."""
        return TokenRows(*(t.to(device) for t in (self.ids, self.prompt, self.scored, self.lengths)))

    def __getitem__(self, index) -> "TokenRows":
        return TokenRows(self.ids[index], self.prompt[index], self.scored[index], self.lengths[index])

    def __len__(self) -> int:
        return self.ids.shape[0]


def cat_rows(parts: list[TokenRows]) -> TokenRows:
    """Rows of several batches in one, padded to the longest."""
    width = max(p.ids.shape[1] for p in parts)

    def pad(t: torch.Tensor, value) -> torch.Tensor:
        return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)

    return TokenRows(torch.cat([pad(p.ids, PAD_ID) for p in parts]), torch.cat([pad(p.prompt, False) for p in parts]),
                     torch.cat([pad(p.scored, False) for p in parts]), torch.cat([p.lengths for p in parts]))


def build_rows(prompts: list[list[int]], responses: list[list[int]], family, context: int) -> TokenRows:
    """`TokenRows` of prompt and response ids (without EOS) for a model of ``family`` and ``context`` tokens."""
    rows, prompt_lens, ends = [], [], []
    for i, (prompt, response) in enumerate(zip(prompts, responses)):
        need = len(prompt) + len(response) + 1
        if need > context or not prompt:
            why = "an empty prompt" if not prompt else f"{need} tokens with its EOS, more than the context of {context}"
            raise DataError(f"row {i + 1} has {why}: give every row a prompt and keep prompt + response within the "
                            "model context (or train the base model with a larger data.seq_len)")
        end = len(prompt) + family.canvas_length(context, len(prompt), len(response) + 1)
        rows.append(prompt + response + [EOS_ID] * (end - len(prompt) - len(response)))
        prompt_lens.append(len(prompt))
        ends.append(end)
    width = max(ends)
    ids = torch.full((len(rows), width), PAD_ID, dtype=torch.long)  # (B, L)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(row)
    pos = torch.arange(width)[None]  # (1, L)
    lengths = torch.tensor(ends)  # (B,)
    prompt = pos < torch.tensor(prompt_lens)[:, None]  # (B, L)
    return TokenRows(ids, prompt, ~prompt & (pos < lengths[:, None]), lengths)


def _check_row(record, kind: str, where: str) -> dict[str, str]:
    fields = KINDS[kind]
    if not isinstance(record, dict):
        raise DataError(f"{where} is not a JSON object: write one {{{', '.join(repr(f) for f in fields)}}} per line")
    for name in fields:
        if not isinstance(record.get(name), str):
            raise DataError(f'{where} has no string "{name}" field: a {kind} file holds '
                            f"{{{', '.join(repr(f) for f in fields)}}} on every line")
    if not record["prompt"]:
        raise DataError(f"{where} has an empty prompt: every row needs a prompt that conditions the response")
    return {name: record[name] for name in fields}


def read_jsonl_rows(path: str | Path, kind: str) -> list[dict[str, str]]:
    """The rows of a JSON-lines file of ``kind`` (sft: prompt + response; preference: prompt + chosen + rejected;
    answer: prompt + answer), each checked; a one-line `DataError` names the first bad line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"fine-tuning data {str(path)!r} not found: pass a .jsonl file or "
                        f"{TASK_PREFIX}NAME (a built-in task)")
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise DataError(f"cannot read {str(path)!r} ({exc.strerror}): check the file's permissions") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{str(path)!r} is not valid UTF-8 (byte {exc.start}): convert it to UTF-8") from None
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{str(path)!r} line {number} is not valid JSON ({exc.msg}): fix or remove that line") from None
        rows.append(_check_row(record, kind, f"{str(path)!r} line {number}"))
    if not rows:
        raise DataError(f"{str(path)!r} holds no rows: write one JSON object per line")
    return rows


def task_rows(spec: str, kind: str, n: int, seed: int, split: str = "train") -> list[dict[str, str]]:
    """Rows of ``kind`` from the built-in task ``spec`` (``task:NAME``): ``n`` problems of ``split``."""
    task = task_of(spec)
    if split == "test" or kind == "answer":
        return problems(task, n, seed, split)
    return sft_rows(task, n, seed) if kind == "sft" else preference_rows(task, n, seed)


def load_rows(spec: str, kind: str, n: int, seed: int) -> list[dict[str, str]]:
    """Rows of ``kind`` from a JSON-lines file or a built-in task (``n`` of its training problems)."""
    if task_of(spec) is not None:
        return task_rows(spec, kind, n, seed)
    return read_jsonl_rows(spec, kind)


def apply_template(rows: list[dict[str, str]], template: str) -> list[dict[str, str]]:
    """The rows with their prompt written into ``template`` (a chat template: ``{prompt}`` marks where it goes)."""
    if "{prompt}" not in template:
        raise DataError(f"the chat template {template!r} has no {{prompt}}: write e.g. 'User: {{prompt}}\\nAssistant: '")
    if template == "{prompt}":
        return rows
    return [{**row, "prompt": template.replace("{prompt}", row["prompt"])} for row in rows]


def encode_rows(rows: list[dict[str, str]], tokenizer) -> list[dict[str, list[int] | str]]:
    """The rows with every text field but an answer (compared as text) encoded to ids."""
    return [{k: (v if k == "answer" else tokenizer.encode(v)) for k, v in row.items()} for row in rows]


def rows_of(encoded: list[dict], kind: str, family, context: int) -> TokenRows:
    """`TokenRows` of encoded sft rows, or of preference rows: the chosen rows then the rejected ones (2B rows)."""
    prompts = [r["prompt"] for r in encoded]
    if kind == "preference":
        return build_rows(prompts + prompts, [r["chosen"] for r in encoded] + [r["rejected"] for r in encoded],
                          family, context)
    return build_rows(prompts, [r["response"] for r in encoded], family, context)



class FinetuneData:
    """The data of a fine-tuning run, with the interface of `dimba.data.open_data`'s: ``.tokenizer``, ``.val`` (the
    last ``val_rows`` rows, held out), ``.resume_position`` and ``.batches`` (seeded micro-batches of rows, the same
    after a resume). A batch is `TokenRows` (sft; preference: chosen rows then rejected rows) or, for ``answer``
    rows, a list of ``{"prompt": ids, "answer": text}``."""

    def __init__(self, fc, kind: str, tokenizer, family, context: int, seed: int):
        rows = apply_template(load_rows(fc.data, kind, fc.task_rows + fc.val_rows, seed), fc.template)
        if len(rows) <= fc.val_rows:
            raise DataError(f"fine-tuning data {fc.data!r} has {len(rows)} rows, not more than finetune.val_rows="
                            f"{fc.val_rows} held out for validation: add rows or lower finetune.val_rows")
        self.tokenizer, self.kind, self.family, self.context = tokenizer, kind, family, context
        encoded = encode_rows(rows, tokenizer)
        self.train = encoded[:-fc.val_rows]
        self.val = self.collate(encoded[-fc.val_rows:])
        self.collate(self.train)  # every row checked now, not at the step that first draws it

    def collate(self, encoded: list[dict]):
        """A batch of encoded rows."""
        return encoded if self.kind == "answer" else rows_of(encoded, self.kind, self.family, self.context)

    def resume_position(self, state: dict | None, micro_steps: int) -> int:
        """The micro-batches already taken (the seeded shuffle makes the position a count)."""
        return micro_steps

    def batches(self, batch_size: int, seed: int, rank: int = 0, world_size: int = 1, position: int = 0):
        """Endless micro-batches of ``rank`` from micro-batch ``position``."""
        index = torch.arange(len(self.train))[:, None]  # (N, 1)
        picks = micro_batches(index, batch_size, seed, position, rank, world_size)
        return BlockBatches(self.collate([self.train[i] for i in block[:, 0].tolist()]) for block in picks)
