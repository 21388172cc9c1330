"""The walls of the package: no import cycle (imports inside functions included), no family-name comparison
outside dimba.families, and a new family added from outside the library that trains, generates, evaluates and
exports through the same code paths as the CLI."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import dimba
from dimba.cli import main
from dimba.families import (Family, Generation, LikelihoodEstimate, family_names, register_family,
                            unregister_family)
from dimba.samplers.categorical import sample_tokens
from dimba.samplers.state import ModelOutput, SamplerState

SRC = Path(dimba.__file__).parent


def _modules() -> dict[str, Path]:
    """Dotted name -> file of every module of the package."""
    out = {}
    for path in SRC.rglob("*.py"):
        parts = path.relative_to(SRC.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that ``name`` imports anywhere in its file (inside functions too)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            module = ".".join(p for p in (base, node.module or "") if p)
            targets = [f"{module}.{alias.name}" if f"{module}.{alias.name}" in modules else module
                       for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # a name inside a module: that module
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def test_no_import_cycles_counting_imports_inside_functions():
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt):] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert len(graph) > 40 and graph["dimba.model"] >= {"dimba.families", "dimba.backbones"}  # the walk saw the package


def _family_literals(node: ast.AST, names: set[str]) -> bool:
    """Whether ``node`` is a family name as a string constant, or a tuple / list / set of such constants."""
    if isinstance(node, ast.Constant):
        return node.value in names
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return any(_family_literals(e, names) for e in node.elts)
    return False


def test_no_code_outside_the_families_compares_a_family_name():
    names = set(family_names())
    offenders = []
    for path in SRC.rglob("*.py"):
        if path.parent.name == "families":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare) and any(_family_literals(n, names)
                                                      for n in [node.left, *node.comparators]):
                offenders.append(f"{path.relative_to(SRC)}:{node.lineno}")
            if isinstance(node, ast.Dict) and sum(_family_literals(k, names) for k in node.keys if k) >= 2:
                offenders.append(f"{path.relative_to(SRC)}:{node.lineno} (a table keyed by family)")
    assert not offenders, offenders


# ----- a family defined here alone ------------------------------------------------------------------------------
class OneLevelSampler:
    """Fills every [MASK] at once: one step, tokens drawn from the logits."""

    def __init__(self, mask_id: int, temperature: float):
        self.mask_id, self.temperature, self.timesteps = mask_id, temperature, [1.0]

    num_steps = 1

    def set_timesteps(self, num_steps: int, state: SamplerState) -> None:
        pass

    def step(self, state, output, i, generator=None):
        drawn = sample_tokens(output.logits, self.temperature, generator=generator)  # (N, L)
        x = torch.where(state.x == self.mask_id, drawn, state.x)
        return state.replace(x=x, done=True)


class OneLevelGeneration(Generation):
    def __init__(self, model, prompt, seq_len, settings):
        fill = torch.full((prompt.shape[0], seq_len), model.mask_id, dtype=torch.long)
        state = SamplerState(torch.cat([prompt, fill], dim=1), gen_start=prompt.shape[1])
        super().__init__(OneLevelSampler(model.mask_id, settings.temperature), state)
        self.model = model

    def predict(self, state, i):
        logits = self.model.token_logits(state.x)  # (N, L, V)
        logits[..., self.model.mask_id] = float("-inf")
        return ModelOutput(logits=logits)


class OneLevelFamily(Family):
    """A toy: token cross-entropy at one noise level (half of the tokens masked), one-step generation, and as its
    'likelihood' the cross-entropy of every token with all tokens masked (a context-free NLL)."""

    name = "toy-one-level"
    description = "A toy one-level masked language model"
    metrics = ("loss", "ce", "acc", "masked_fraction")

    def loss(self, model, input_ids, dc, t=None, prompt_mask=None, drop_cond=False, self_cond_prob=None, noise=None,
             generator=None):
        masked = torch.rand(input_ids.shape, generator=generator, device=input_ids.device) < 0.5  # (B, L)
        logits = model.token_logits(input_ids.masked_fill(masked, model.mask_id))  # (B, L, V)
        ce = F.cross_entropy(logits[masked], input_ids[masked])
        acc = (logits[masked].argmax(-1) == input_ids[masked]).float().mean()
        return ce, {"loss": ce.detach(), "ce": ce.detach(), "acc": acc.detach(),
                    "masked_fraction": masked.float().mean()}

    def predict_token_logits(self, model, input_ids, t=None, **kwargs):
        return model.token_logits(input_ids)

    def generation(self, model, prompt, seq_len, settings, generator, eos_id, use_cache):
        return OneLevelGeneration(model, prompt, seq_len, settings)

    def likelihood(self, model, blocks, mc_samples, batch_size, generator, progress, calibration_blocks=None):
        logits = model.token_logits(torch.full_like(blocks, model.mask_id)).double()  # (N, L, V)
        nll = F.cross_entropy(logits.flatten(0, 1), blocks.flatten(), reduction="sum")
        return LikelihoodEstimate(float(nll), 0.0, blocks)

    def model_card(self, cfg) -> str:
        return "\nOne noise level: half of the tokens masked.\n"


@pytest.fixture
def toy_family():
    family = register_family(OneLevelFamily())
    yield family
    unregister_family(family.name)
    assert family.name not in family_names()


def test_a_family_defined_outside_the_library_trains_generates_and_evaluates(toy_family, corpus, tmp_path, tiny,
                                                                             metrics, capsys):
    run, exported = tmp_path / "run", tmp_path / "exported"
    assert main(["train", "--family", toy_family.name, "--data", str(corpus), "--max-steps", "20", "--out", str(run),
                 "--quiet", *tiny]) == 0
    val = metrics(run, "val_ce")
    assert val[-1] < val[0] - 0.5  # it learned
    assert 0.3 < metrics(run, "masked_fraction")[-1] < 0.7  # its own metric, logged in its own column
    capsys.readouterr()
    assert main(["generate", str(run), "--prompt", "ROMEO:", "--length", "10", "--seed", "0"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("ROMEO:") and len(text.strip()) > len("ROMEO:")
    assert main(["eval", str(run), "--data", str(corpus), "--json", "--max-tokens", "64"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["family"] == toy_family.name and r["is_bound"] and r["tokens"] == 64 and 0 < r["bits_per_byte"] < 20
    assert main(["eval", str(run), "--data", str(corpus), "--t0", "0.5"]) == 2  # an option it does not take
    assert "does not apply to the toy-one-level family" in capsys.readouterr().err
    assert main(["export", str(run), "--out", str(exported)]) == 0
    card = (exported / "README.md").read_text()
    assert "A toy one-level masked language model" in card and "half of the tokens masked" in card
    capsys.readouterr()
    assert main(["generate", str(exported), "--prompt", "ROMEO:", "--length", "10", "--seed", "0"]) == 0
    assert capsys.readouterr().out == text
