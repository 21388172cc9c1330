"""Fine-tuning (issue 18): built-in tasks, rows whose prompt stays clean and whose padding is never scored, the
response likelihood of each family, SFT / DPO / GRPO / LoRA as `fit` from an init run (resume, metrics, hostile
input), exact match and best-of-K."""

import json
import math
import re

import pytest
import torch

from dimba.cli import main
from dimba.config import SampleConfig, load_run_config
from dimba.data.finetune import build_rows, read_jsonl_rows
from dimba.data.tasks import TASKS, is_held_out, pretraining_docs, preference_rows, problems
from dimba.errors import DataError, UsageError
from dimba.evaluation.exact_match import exact_match, likelihood_scores, most_likely
from dimba.evaluation.rewards import exact_match as exact_reward
from dimba.evaluation.rewards import get_reward, numeric
from dimba.families import get_family
from dimba.generation import generate_groups, generate_responses
from dimba.loading import load_for_inference, run_model
from dimba.special_tokens import EOS_ID, PAD_ID
from dimba.training.checkpoint import load_training_state
from dimba.training.finetune import make_objective

TINY = ("model.d_model=32", "model.num_denoiser_layers=2", "model.d_state=8", "model.headdim=16",
        "model.chunk_size=16", "data.seq_len=24", "data.vocab_size=260", "train.batch_size=8", "train.eval_every=5",
        "train.save_every=5", "train.warmup_steps=2", "train.eval_batches=1", "train.log_every=1",
        "train.num_threads=1")
FT = ("train.num_threads=1", "finetune.task_rows=64", "finetune.val_rows=8", "train.batch_size=4",
      "train.eval_every=2", "train.save_every=2", "train.log_every=1")


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """Tiny masked, ar and continuous runs pre-trained for a few steps on the arithmetic mix (24-token context)."""
    out = {}
    for family in ("masked", "ar", "continuous"):
        run = tmp_path_factory.mktemp("base") / family
        assert main(["train", "--family", family, "--data", "task:arithmetic", "--max-steps", "10", "--out", str(run),
                     "--quiet", *TINY]) == 0
        out[family] = run
    return out


def reward_spec(tmp_path, monkeypatch, name: str, expression: str) -> str:
    """The ``--reward`` spec of a module ``name`` in ``tmp_path`` whose reward(text, answer) returns ``expression``."""
    (tmp_path / f"{name}.py").write_text(f"def reward(text, answer):\n    return {expression}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return f"{name}:reward"


# ----- tasks and rows -------------------------------------------------------------------------------------------

def test_tasks_are_deterministic_checkable_and_hold_out_a_fixed_tenth():
    arithmetic = TASKS["arithmetic"]
    train, test = problems(arithmetic, 300, 0), problems(arithmetic, 100, 0, "test")
    assert train == problems(arithmetic, 300, 0) and train != problems(arithmetic, 300, 1)
    assert not any(is_held_out(p["prompt"]) for p in train) and all(is_held_out(p["prompt"]) for p in test)
    assert {p["prompt"] for p in train}.isdisjoint(p["prompt"] for p in problems(arithmetic, 300, 5, "test"))
    for p in train[:50]:
        a, b = p["prompt"].rstrip("=").split("+")
        assert int(p["answer"]) == int(a) + int(b)
    reverse = problems(TASKS["reverse"], 20, 0)
    assert all(p["answer"] == p["prompt"][4:-1][::-1] for p in reverse)
    assert all(r["chosen"] != r["rejected"] for r in preference_rows(arithmetic, 200, 0))
    docs = pretraining_docs(arithmetic, 1000, 0, wrong=0.3)
    wrong = sum(eval(d.split("=")[0]) != int(d.split("=")[1]) for d in docs)
    assert 200 < wrong < 400  # the mix keeps the format, with a share of wrong answers


def test_diffusion_rows_fill_the_canvas_with_scored_eos_and_ar_rows_end_at_eos_with_unscored_padding():
    prompts, responses = [[5, 6, 7], [5, 6]], [[8, 9], [8, 9, 10, 11]]
    masked = build_rows(prompts, responses, get_family("masked"), 10)
    assert masked.ids.tolist()[0] == [5, 6, 7, 8, 9] + [EOS_ID] * 5 and masked.lengths.tolist() == [10, 10]
    assert masked.prompt[0].tolist() == [True] * 3 + [False] * 7 and masked.scored[1].sum() == 8
    ar = build_rows(prompts, responses, get_family("ar"), 10)
    assert ar.ids.tolist() == [[5, 6, 7, 8, 9, EOS_ID, PAD_ID], [5, 6, 8, 9, 10, 11, EOS_ID]]
    assert ar.lengths.tolist() == [6, 7]
    assert ar.scored.tolist()[0] == [False] * 3 + [True] * 3 + [False]  # response + EOS; never the padding
    with pytest.raises(DataError, match="row 1 has 11 tokens"):
        build_rows([[1] * 5], [[2] * 5], get_family("ar"), 10)


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "a"}', 'no string "response" field'),
    ('{"prompt": "a", "response": 3}', 'no string "response" field'),
    ('{"prompt": "", "response": "b"}', "empty prompt"),
    ('{"prompt": "a", "response": "b"', "line 2 is not valid JSON"),
    ('[1, 2]', "not a JSON object"),
])
def test_a_malformed_sft_file_names_its_first_bad_line(tmp_path, line, message):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"prompt": "x", "response": "y"}\n' + line + "\n")
    with pytest.raises(DataError, match=message):
        read_jsonl_rows(path, "sft")


# ----- the likelihood of a response -----------------------------------------------------------------------------

def test_ar_response_nll_is_the_exact_conditional_nll_and_padding_changes_nothing(bases):
    model = run_model(bases["ar"]).eval()
    family = model.family
    short = build_rows([[20, 21, 13]], [[22, 23]], family, 24)
    batch = build_rows([[20, 21, 13], [19, 20, 21, 13, 22, 23, 31]], [[22, 23], [19, 20, 25, 26]], family, 24)
    with torch.no_grad():
        alone = family.response_nll(model, short, None).sum(-1)  # (1,)
        padded = family.response_nll(model, batch, None).sum(-1)  # (2,)
        exact = family.likelihood(model, short.ids, 0, 4, None, False, context=3).total_nats
    assert batch.lengths[0] < batch.ids.shape[1]  # the first row is padded in the batch
    assert float(alone) == pytest.approx(float(padded[0]), abs=1e-5) == pytest.approx(exact, abs=1e-4)


def test_masked_response_nll_averages_to_the_conditional_nelbo_and_never_masks_the_prompt(bases):
    model = run_model(bases["masked"]).eval()
    family = model.family
    rows = build_rows([[20, 21, 13, 22, 31]] * 64, [[19, 20]] * 64, family, 24)
    gen = torch.Generator().manual_seed(0)
    sums = []
    with torch.no_grad():
        for _ in range(8):
            masked, weight = family.response_noise(rows, gen)
            assert not (masked & rows.prompt).any() and (masked.sum(-1) >= 1).all()
            assert torch.allclose(weight, rows.scored.sum(-1) / masked.sum(-1))
            sums.append(family.response_nll(model, rows, (masked, weight)).sum(-1))
        estimate = family.likelihood(model, rows.ids[:1], 512, 64, torch.Generator().manual_seed(1), False, context=5)
    ours = torch.cat(sums).double()
    spread = math.sqrt(float(ours.var()) / len(ours) + estimate.stderr_nats ** 2)
    assert abs(float(ours.mean()) - estimate.total_nats) < 4 * spread


@pytest.mark.parametrize("family, t0", [("continuous", None), ("hybrid", None), ("continuous", 0.6)])
def test_latent_response_nll_averages_to_the_conditional_bound_and_shares_noise(bases, tmp_path, family, t0):
    """One sample per row of the bound stopped at t0 (None: its smallest time) averages to `dimba eval`'s bound with
    that t0 (`finetune.preference_t0`)."""
    if family == "continuous":
        model = run_model(bases["continuous"]).eval()
    else:
        run = tmp_path / family
        assert main(["train", "--family", family, "--data", "task:arithmetic", "--max-steps", "3", "--out", str(run),
                     "--quiet", *TINY]) == 0
        model = run_model(run).eval()
    fam = model.family
    rows = build_rows([[20, 21, 13, 22, 31]] * 128, [[19, 20]] * 128, fam, 24)
    gen = torch.Generator().manual_seed(0)
    sums = []
    with torch.no_grad():
        for _ in range(12):  # the terms are heavy-tailed (most draws land where the model is already sure)
            noise = fam.response_noise(rows, gen, t0=t0)
            terms = fam.response_nll(model, rows, noise)  # (B, L)
            assert not terms[rows.prompt].any() and torch.equal(terms, fam.response_nll(model, rows, noise))
            sums.append(terms.sum(-1))
        other = fam.response_nll(model, rows, fam.response_noise(rows, gen, t0=t0)).sum(-1)
        n = 128  # copies of the row: the reconstruction at t0 (one draw a block) is noisy when t0 is large
        estimate = fam.likelihood(model, rows.ids[:1].expand(n, -1), 12, 128, torch.Generator().manual_seed(1), False,
                                  context=5, t0=t0 or 1e-4, clamp="soft")
        tightest = [fam.response_nll(model, rows, fam.response_noise(rows, gen)).sum(-1)
                    for _ in range(12 if t0 else 0)]
    assert not torch.equal(other, sums[0])  # new noise, another estimate
    ours = torch.cat(sums).double()
    if t0:  # the bound stopped at 0.6 is far less noisy (here 8 nats against 110 per draw)
        assert float(ours.std()) < 0.25 * float(torch.cat(tightest).std())
    spread = math.sqrt(float(ours.var()) / len(ours) + (estimate.stderr_nats / n) ** 2)
    assert abs(float(ours.mean()) - estimate.total_nats / n) < 4 * spread  # t0 = 0.6 lies ~7 nats above 1e-4 here


def test_best_of_k_keeps_the_candidate_the_model_finds_most_likely(bases):
    model, tok = load_for_inference(bases["ar"])
    prompt = tok.encode("12+34=")
    candidates = [tok.encode(a) for a in ("46", "99999", "4", "4646")]
    with torch.no_grad():
            exact = [-model.family.likelihood(model, torch.tensor([prompt + c + [EOS_ID]]), 0, 1, None, False,
                                          context=len(prompt)).total_nats for c in candidates]
    assert most_likely(model, prompt, candidates) == candidates[max(range(4), key=exact.__getitem__)]
    assert likelihood_scores(model, prompt, candidates).tolist() == pytest.approx(exact, abs=1e-4)


@pytest.mark.parametrize("family, default", [("continuous", 16), ("masked", 8)])
def test_best_of_k_ranks_with_the_familys_own_number_of_likelihood_samples(bases, family, default):
    """Without a number, a candidate's score averages the family's ``ranking_mc_samples`` draws: the same scores as
    asking for that many with the same generator, not those of the other family's number."""
    model, tok = load_for_inference(bases[family])
    prompt, candidates = tok.encode("12+34="), [tok.encode(a) for a in ("46", "4", "4646")]

    def scores(mc_samples=None):
        return likelihood_scores(model, prompt, candidates, mc_samples, torch.Generator().manual_seed(0)).tolist()

    assert model.family.ranking_mc_samples == default
    assert scores() == scores(default) != scores(24 - default)


def test_best_of_k_by_a_reward_keeps_the_rewarded_candidate(bases):
    """Each problem's answer is set to the LAST of its 4 candidates: ranking by the exact-match reward finds it."""
    model, tok = load_for_inference(bases["ar"])
    prompts = ["1+2=", "12+34=", "7+8="]
    sample = SampleConfig(num_steps=8, temperature=1.0)
    groups = generate_groups(model, [tok.encode(p) for p in prompts], sample, 4, torch.Generator().manual_seed(3))
    texts = [[tok.decode(c).strip() for c in group] for group in groups]
    assert any(t[-1] != t[0] for t in texts)  # candidates differ, so taking the first would miss
    rows = [{"prompt": p, "answer": t[-1]} for p, t in zip(prompts, texts)]
    assert exact_match(model, tok, rows, sample, best_of=4, seed=3, reward=exact_reward)["accuracy"] == 1.0


def test_groups_batch_the_prompts_of_each_length_and_keep_each_group_with_its_prompt(monkeypatch):
    import dimba.generation as generation

    calls = []

    def echo(model, batch, sample, n, generator, eos_id):  # each row's response: its own prompt, then its row index
        calls.append(batch.shape)
        return [row + [j] for j, row in enumerate(batch.tolist())]

    prompts = [[5, 6], [7, 8, 9], [10, 11], [12], [13, 14, 15]]
    monkeypatch.setattr(generation, "generate_responses", echo)
    groups = generation.generate_groups(None, prompts, SampleConfig(), 2)
    assert sorted(calls) == [(2, 1), (4, 2), (4, 3)]  # one batch per length: prompts x group size rows
    assert all(len(g) == 2 and all(r[:-1] == p for r in g) for p, g in zip(prompts, groups))


@pytest.mark.parametrize("family", ["masked", "ar"])
def test_greedy_groups_are_what_each_prompt_gets_alone(bases, family):
    model, tok = load_for_inference(bases[family])
    prompts = [tok.encode(p) for p in ("1+2=", "123+456=", "7+8=", "45+6=", "321+654=")]
    greedy = SampleConfig(num_steps=8, temperature=0.0)
    groups = generate_groups(model, prompts, greedy, 2, torch.Generator().manual_seed(0))
    assert groups == [generate_responses(model, p, greedy, 2, torch.Generator().manual_seed(0)) for p in prompts]


def test_rewards_check_the_answer_never_overlap():
    assert exact_reward(" 46 ", "46") == 1.0 and exact_reward("460", "46") == 0.0
    assert numeric("the sum is 46.", "46") == 1.0 and numeric("4 and 6", "46") == 0.0
    assert get_reward("dimba.evaluation.rewards:numeric") is numeric
    with pytest.raises(UsageError, match="unknown reward"):
        get_reward("overlap")


# ----- fine-tuning runs ------------------------------------------------------------------------------------------

def _weights(run):
    return load_training_state(run / "checkpoints" / "last.ckpt")["model"]


@pytest.mark.parametrize("family", ["masked", "continuous"])
def test_sft_starts_from_the_init_run_lowers_its_loss_and_logs_metrics(bases, tmp_path, metrics, family):
    run = tmp_path / "sft"
    assert main(["finetune", "sft", "--init", str(bases[family]), "--data", "task:arithmetic", "--out", str(run),
                 "--max-steps", "6", "--lr", "3e-3", "--quiet", *FT]) == 0
    cfg = load_run_config(run / "config.yaml")
    assert cfg.finetune.method == "sft" and cfg.model == load_run_config(bases[family] / "config.yaml").model
    assert (run / "tokenizer.json").read_text() == (bases[family] / "tokenizer.json").read_text()
    val = metrics(run, "val_loss")
    assert len(val) == 4 and val[-1] < val[0]
    assert {"loss", "ce", "grad_norm", "val_ce"} <= set(metrics(run)[0])


@pytest.mark.parametrize("family, likelihood", [("masked", "elbo"), ("continuous", "elbo"),
                                                ("continuous", "one_pass")])
def test_dpo_starts_at_log2_with_shared_noise_and_resumes_bitwise(bases, tmp_path, metrics, family, likelihood):
    whole, part = tmp_path / "whole", tmp_path / "part"
    args = ["--init", str(bases[family]), "--data", "task:arithmetic", "--quiet", *FT,
            f"finetune.preference_likelihood={likelihood}"]
    assert main(["finetune", "dpo", "--out", str(whole), "--max-steps", "4", *args]) == 0
    # policy == reference at step 0, scored with the same masks: every margin is exactly 0, and the DPO term is
    # log 2, plus the chosen NLL at dpo's default weight 1
    assert metrics(whole, "val_loss")[0] == pytest.approx(math.log(2) + metrics(whole, "val_ce")[0], rel=1e-5)
    assert metrics(whole, "val_margin")[0] == 0.0
    objective = make_objective(load_run_config(whole / "config.yaml"), run_model(bases[family]), None,
                               torch.device("cpu"))  # the defaults: the family's bound t0, the NLL at weight 1
    assert objective.t0 == {"masked": None, "continuous": 0.8}[family] and objective.nll_weight == 1.0
    assert main(["finetune", "dpo", "--out", str(part), "--max-steps", "2", *args]) == 0
    assert main(["finetune", "dpo", "--resume", str(part), "--max-steps", "4", "--quiet"]) == 0
    a, b = _weights(whole), _weights(part)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert main(["finetune", "sft", "--resume", str(part), "--quiet"]) == 2  # another method's verb: refused


@pytest.mark.parametrize("scale", ["true", "false"])
def test_grpo_runs_groups_with_rewards_and_kl(bases, tmp_path, metrics, scale):
    run = tmp_path / "grpo"
    assert main(["finetune", "grpo", "--init", str(bases["ar"]), "--data", "task:arithmetic", "--out", str(run),
                 "--max-steps", "2", "--batch-size", "2", "--group-size", "4", "--quiet", *FT,
                 "finetune.val_rows=4", "train.batch_size=2", f"finetune.scale_rewards={scale}"]) == 0
    rows = [r for r in metrics(run) if r["reward"]]
    assert len(rows) == 2 and all(0 <= float(r["reward"]) <= 1 and float(r["kl"]) >= 0 for r in rows)
    assert len(metrics(run, "val_reward")) == 2


@pytest.mark.parametrize("family", ["masked", "ar", "continuous"])
def test_grpo_raises_the_reward_it_is_given(bases, tmp_path, metrics, monkeypatch, family):
    """A barely trained model rarely starts its answer with "1"; GRPO rewarding exactly that makes it the rule."""
    one = reward_spec(tmp_path, monkeypatch, "one_reward", 'float(text[:1] == "1")')
    run = tmp_path / "grpo"
    assert main(["finetune", "grpo", "--init", str(bases[family]), "--data", "task:arithmetic", "--out", str(run),
                 "--max-steps", "45", "--group-size", "8", "--lr", "1e-2", "--reward", one, "--quiet",
                 *FT, "train.eval_every=100", "train.save_every=100"]) == 0
    rewards = [float(r["reward"]) for r in metrics(run) if r["reward"]]  # (45,) the mean reward of each step's groups
    assert len(rewards) == 45
    assert sum(rewards[:5]) / 5 < 0.2 and sum(rewards[-10:]) / 10 > 0.6


@pytest.mark.parametrize("family, likelihood", [("masked", "elbo"), ("continuous", "one_pass"),
                                                ("continuous", "elbo")])
def test_diffusion_grpo_scores_policy_and_reference_with_the_same_noise(bases, tmp_path, metrics, monkeypatch, family,
                                                                      likelihood):
    # a reward that varies within a group, so the first step updates
    parity = reward_spec(tmp_path, monkeypatch, "parity_reward", "float(len(text) % 2)")
    run = tmp_path / "grpo"
    assert main(["finetune", "grpo", "--init", str(bases[family]), "--data", "task:arithmetic", "--out", str(run),
                 "--max-steps", "2", "--group-size", "4", "--lr", "3e-2", "--reward", parity, "--quiet",
                 *FT, "finetune.val_rows=2", "train.batch_size=2", f"finetune.grpo_likelihood={likelihood}"]) == 0
    rows = [r for r in metrics(run) if r["reward"]]
    assert len(rows) == 2 and all(0 <= float(r["reward"]) <= 1 for r in rows)
    assert float(rows[0]["kl"]) == 0.0 < float(rows[1]["kl"])  # the first group is scored before any update


def test_grpo_updates_reuse_each_batch_of_groups_through_the_clipped_ratio_and_resume_bitwise(bases, tmp_path,
                                                                                              metrics, monkeypatch):
    parity = reward_spec(tmp_path, monkeypatch, "parity_reward", "float(len(text) % 2)")  # varies within a group
    args = ["--init", str(bases["masked"]), "--data", "task:arithmetic", "--group-size", "8", "--updates", "2",
            "--lr", "3e-2", "--reward", parity, "--quiet", *FT, "finetune.val_rows=2",
            "train.batch_size=2", "finetune.clip_eps=0.05"]
    whole, part = tmp_path / "whole", tmp_path / "part"
    assert main(["finetune", "grpo", "--out", str(whole), "--max-steps", "4", *args]) == 0
    rows = [r for r in metrics(whole) if r["reward"]]
    # steps 1-2 and 3-4 each read one batch of groups: the same rewards, and only a reuse step can clip
    assert rows[0]["reward"] == rows[1]["reward"] and rows[2]["reward"] == rows[3]["reward"]
    assert float(rows[0]["clipped"]) == 0.0 == float(rows[2]["clipped"])
    assert float(rows[1]["clipped"]) > 0 and float(rows[1]["kl"]) > 0
    assert main(["finetune", "grpo", "--out", str(part), "--max-steps", "2", *args]) == 0
    assert main(["finetune", "grpo", "--resume", str(part), "--max-steps", "4", "--quiet"]) == 0
    a, b = _weights(whole), _weights(part)
    assert all(torch.equal(a[k], b[k]) for k in a)
    bad = tmp_path / "bad"
    assert main(["finetune", "grpo", "--out", str(bad), "--max-steps", "4", *args, "train.save_every=3"]) == 2
    assert not bad.exists()


def test_lora_trains_adapters_only_and_merges_on_load_and_export(bases, tmp_path):
    run = tmp_path / "lora"
    assert main(["finetune", "sft", "--init", str(bases["ar"]), "--data", "task:arithmetic", "--out", str(run),
                 "--max-steps", "2", "--lora-rank", "2", "--lr", "1e-2", "--quiet", *FT]) == 0
    state, init = _weights(run), run_model(bases["ar"]).state_dict()
    adapters = [k for k in state if "lora_B" in k]
    assert adapters and any(state[k].abs().sum() > 0 for k in adapters)  # lora_B starts at 0: it trained
    frozen = {k.replace(".base_layer", ""): v for k, v in state.items() if "lora_" not in k}
    assert frozen.keys() == init.keys() and all(torch.equal(frozen[k], init[k]) for k in init)
    merged = run_model(run)
    assert "lora" not in " ".join(merged.state_dict())
    assert any(not torch.equal(merged.state_dict()[k], init[k]) for k in init)
    assert main(["export", str(run), "--out", str(tmp_path / "export")]) == 0
    exported, _ = load_for_inference(tmp_path / "export")
    ids = torch.tensor([[20, 21, 13, 22, 31]])
    assert torch.allclose(exported.token_logits(ids), merged.eval().token_logits(ids), atol=1e-5)


@pytest.mark.parametrize("content, message", [
    ('{"prompt": "1+1=", "answer": "2"}\n', 'no string "response" field'),
    ("", "holds no rows"),
    (('{"prompt": "1+1=", "response": "' + "9" * 40 + '"}\n') * 80, "more than the context"),
])
def test_hostile_finetuning_data_is_one_line_exit_2_and_leaves_nothing(bases, tmp_path, capsys, content, message):
    data, run = tmp_path / "rows.jsonl", tmp_path / "run"
    data.write_text(content)
    assert main(["finetune", "sft", "--init", str(bases["masked"]), "--data", str(data), "--out", str(run),
                 "--quiet", *FT]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and not run.exists()


def test_finetune_needs_a_run_and_data(bases, tmp_path, capsys):
    assert main(["finetune", "sft", "--data", "task:arithmetic", "--out", str(tmp_path / "x")]) == 2
    assert "needs --init RUN" in capsys.readouterr().err
    assert main(["finetune", "sft", "--init", str(tmp_path), "--data", "task:arithmetic",
                 "--out", str(tmp_path / "y")]) == 2
    assert main(["finetune", "sft", "--init", str(bases["ar"]), "--data", "task:nope", "--out", str(tmp_path / "z"),
                 "--quiet"]) == 2
    assert "unknown built-in task 'nope'" in capsys.readouterr().err


def test_task_cli_writes_rows_and_scores_exact_match(bases, tmp_path, capsys):
    out = tmp_path / "test.jsonl"
    assert main(["task", "write", "arithmetic", "--kind", "answer", "--split", "test", "--n", "5",
                 "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows == problems(TASKS["arithmetic"], 5, 0, "test")
    capsys.readouterr()
    assert main(["task", "eval", str(bases["ar"]), "--task", "arithmetic", "--problems", "6", "--best-of", "2",
                 "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["n"] == 6 and result["best_of"] == 2 and 0 <= result["accuracy"] <= 1
    assert main(["generate", str(bases["masked"]), "--prompt", "1+2=", "--best-of", "3", "--num-samples", "2",
                 "--steps", "4"]) == 0
    assert capsys.readouterr().out.count("1+2=") == 2


def test_task_pairs_rejects_the_model_s_own_wrong_answers(bases, tmp_path, monkeypatch):
    from dimba.generation import generate_responses

    out = tmp_path / "pairs.jsonl"
    args = ["task", "pairs", str(bases["ar"]), "--task", "arithmetic", "--n", "6", "--samples", "1",
            "--temperature", "0"]
    assert main([*args, "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    answers = {p["prompt"]: p["answer"] for p in problems(TASKS["arithmetic"], 6, 0)}
    model, tok = load_for_inference(bases["ar"])
    greedy = SampleConfig(temperature=0.0)
    assert rows and all(r["prompt"] in answers and r["chosen"] == answers[r["prompt"]] for r in rows)
    for r in rows:  # the rejected answer is what the model itself answers, and it is wrong
        own = tok.decode(generate_responses(model, tok.encode(r["prompt"]), greedy, 1, None, tok.eos_id)[0])
        assert r["rejected"] == own and own.strip() != r["chosen"]
    before = out.read_text()
    assert main([*args, "--out", str(out)]) == 2 and out.read_text() == before  # never overwritten
    assert main([*args, "--samples", "0", "--out", str(tmp_path / "zero.jsonl")]) == 2
    assert not (tmp_path / "zero.jsonl").exists()
    lenient = reward_spec(tmp_path, monkeypatch, "lenient", "1.0")  # every answer right: nothing to prefer
    assert main([*args, "--reward", lenient, "--out", str(tmp_path / "none.jsonl")]) == 0
    assert (tmp_path / "none.jsonl").read_text() == ""


def test_task_eval_takes_the_sampler_flags_over_the_run_s_own_settings(bases, capsys, monkeypatch):
    import dimba.evaluation.exact_match as em

    seen = []
    monkeypatch.setattr(em, "exact_match", lambda model, tok, rows, sample, *a: seen.append(sample) or
                        {"accuracy": 0.0, "correct": 0, "n": len(rows), "best_of": 1})
    run = str(bases["continuous"])
    assert main(["task", "eval", run, "--task", "arithmetic", "--problems", "2", "--json"]) == 0
    assert main(["task", "eval", run, "--task", "arithmetic", "--problems", "2", "--commit", "none", "--steps", "3",
                 "--score-temperature", "0.9", "--json"]) == 0
    own = load_run_config(bases["continuous"] / "config.yaml").sample
    assert seen[0] == own and own.commit == "confidence"
    assert seen[1] == own.model_copy(update={"commit": "none", "num_steps": 3, "score_temperature": 0.9})
    assert main(["task", "eval", run, "--task", "arithmetic", "--commit", "sometimes"]) == 2


def test_an_ar_run_adapts_into_a_masked_model_from_its_weights(tmp_path, capsys):
    ar, masked = tmp_path / "ar", tmp_path / "a2d"
    tiny = (*TINY, "model.backbone=transformer", "model.num_heads=2")
    assert main(["train", "--family", "ar", "--data", "task:arithmetic", "--max-steps", "2", "--out", str(ar),
                 "--quiet", *tiny]) == 0
    capsys.readouterr()
    assert main(["train", "--init", str(ar), "--family", "masked", "--max-steps", "1", "--out", str(masked),
                 "--quiet", "train.lr=1e-9", "train.ema_decay=0"]) == 0
    assert "initialised" in capsys.readouterr().err
    cfg = load_run_config(masked / "config.yaml")
    assert cfg.model.family == "masked" and cfg.model.backbone == "transformer" and cfg.finetune.init == str(ar)
    source, adapted = run_model(ar).state_dict(), run_model(masked).state_dict()
    shared = [k for k in source if k in adapted]
    assert len(shared) == len(source)
    for k in (k for k in shared if k != "latent_scale"):  # calibrated anew for the new run, on the loaded embedding
        assert torch.allclose(source[k], adapted[k], atol=1e-6), k


def test_an_ar_mamba_run_adapts_into_a_block_masked_model_with_its_mixers(tmp_path, capsys):
    ar, masked = tmp_path / "ar", tmp_path / "a2d"
    assert main(["train", "--family", "ar", "--data", "task:arithmetic", "--max-steps", "2", "--out", str(ar),
                 "--quiet", *TINY]) == 0
    capsys.readouterr()
    assert main(["train", "--init", str(ar), "--family", "masked", "--max-steps", "1", "--out", str(masked),
                 "--quiet", "train.lr=1e-9", "train.ema_decay=0", "model.block_size=4"]) == 0
    done, total = re.search(r"initialised (\d+) of (\d+) tensors", capsys.readouterr().err).groups()
    source, adapted = run_model(ar).state_dict(), run_model(masked).state_dict()
    assert int(total) - int(done) == 2 and {k for k in adapted if k not in source} == {"prompt_proj.weight",
                                                                                      "prompt_proj.bias"}
    d_inner = source["backbone.blocks.0.mixer.out_proj.weight"].shape[1]
    for k, v in ((k, v) for k, v in source.items() if k != "latent_scale"):  # calibrated anew for the new run
        ours, theirs = (adapted[k][:2 * d_inner], v[:2 * d_inner]) if k.endswith("in_proj.weight") else (adapted[k], v)
        assert ours.shape != theirs.shape or torch.allclose(ours, theirs, atol=1e-6), k


def test_a_block_diffusion_model_is_refused_in_one_line(tmp_path, capsys):
    base, run = tmp_path / "block", tmp_path / "sft"  # its whole-sequence NLL would see the future
    assert main(["train", "--family", "masked", "--data", "task:arithmetic", "--max-steps", "1", "--out",
                 str(base), "--quiet", *TINY, "model.block_size=8"]) == 0
    capsys.readouterr()
    assert main(["finetune", "sft", "--init", str(base), "--data", "task:arithmetic", "--out", str(run),
                 "--quiet", *FT]) == 2
    err = capsys.readouterr().err.strip()
    assert "is a block-diffusion model" in err and len(err.splitlines()) == 1 and not run.exists()


@pytest.mark.parametrize("family, overrides, message", [
    ("masked", ["finetune.preference_t0=0.5"], "the masked family's has no t_0"),
    ("continuous", ["finetune.preference_t0=0.5", "finetune.preference_likelihood=one_pass"], "drop one of the two")])
def test_a_bound_t0_the_likelihood_cannot_take_is_refused_in_one_line(bases, tmp_path, capsys, family, overrides,
                                                                       message):
    run = tmp_path / "dpo"
    assert main(["finetune", "dpo", "--init", str(bases[family]), "--data", "task:arithmetic", "--out", str(run),
                 "--quiet", *FT, *overrides]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and not run.exists()


@pytest.mark.parametrize("method", ["ipo", "simpo"])
def test_ipo_and_simpo_runs(bases, tmp_path, metrics, method):
    run = tmp_path / method
    assert main(["finetune", method, "--init", str(bases["ar"]), "--data", "task:arithmetic", "--out", str(run),
                 "--max-steps", "2", "--beta", "0.5", "--quiet", *FT]) == 0
    first = metrics(run, "val_loss")[0]
    if method == "ipo":  # policy == reference: h = 0, so the loss is (0 - 1 / (2 beta))^2 = 1
        assert first == pytest.approx(1.0, abs=1e-6)
    else:  # no reference: the margin is the model's own length-normalised preference, not 0
        assert metrics(run, "val_margin")[0] != 0.0 and first > 0
    assert len(metrics(run, "val_loss")) == 2


def test_one_pass_preference_scores_the_whole_response_noised_at_once(bases):
    """Masked, one pass: every response token is masked, so the score has no randomness (the NELBO samples do),
    and it is the chosen answers' summed per-token NLL of that single pass."""
    from dimba.training.objectives import Preference

    model, tok = load_for_inference(bases["masked"])
    prompts = [tok.encode(p) for p in ("1+2=", "12+34=")] * 2
    rows = build_rows(prompts, [tok.encode(a) for a in ("3", "46", "4", "47")], model.family, 24)
    ce = {}
    with torch.no_grad():
        full = model.family.response_noise(rows, None, full=True)
        by_hand = model.family.response_nll(model, rows, full)[:2].sum() / rows.scored[:2].sum()
        for one_pass in (True, False):
            objective = Preference(torch.device("cpu"), "dpo", 0.1, 0.5, 2, model, one_pass=one_pass)
            ce[one_pass] = [float(objective.loss(model, rows, torch.Generator().manual_seed(s))[1]["ce"])
                            for s in (0, 1)]
    assert ce[True][0] == ce[True][1] == pytest.approx(float(by_hand), rel=1e-6)
    assert ce[False][0] != ce[False][1]


def test_dpo_nll_weight_adds_the_chosen_nll_per_token(bases, tmp_path, metrics):
    run = tmp_path / "rpo"
    assert main(["finetune", "dpo", "--init", str(bases["masked"]), "--data", "task:arithmetic", "--out", str(run),
                 "--max-steps", "2", "--quiet", *FT, "finetune.nll_weight=0.5"]) == 0
    # policy == reference at step 0: the DPO term is log 2, and the chosen NLL is added at half weight
    assert metrics(run, "val_loss")[0] == pytest.approx(math.log(2) + 0.5 * metrics(run, "val_ce")[0], rel=1e-5)


def test_grpo_draws_its_groups_in_float32_inside_the_training_autocast(bases, monkeypatch):
    from dimba.config import FinetuneConfig
    from dimba.training import grpo as grpo_module

    model, tok = load_for_inference(bases["ar"])
    seen = []

    def groups(*args):
        seen.append(torch.is_autocast_enabled("cpu"))
        return [[tok.encode("3")] * 2]

    monkeypatch.setattr(grpo_module, "generate_groups", groups)
    grpo = grpo_module.GRPO(torch.device("cpu"), model, model, tok, SampleConfig(), 24, FinetuneConfig(group_size=2),
                            exact_reward)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = grpo.loss(model, [{"prompt": tok.encode("1+2="), "answer": "3"}])
        assert torch.is_autocast_enabled("cpu")
    assert seen == [False] and torch.isfinite(loss)


@pytest.mark.parametrize("scale", [True, False])
def test_grpo_advantages_are_zero_mean_within_a_group_and_unit_std_when_scaled(bases, scale):
    from dimba.config import FinetuneConfig
    from dimba.training.grpo import GRPO

    model, tok = load_for_inference(bases["ar"])
    rewards = iter([1.0, 0.0, 0.0, 1.0, 1.0, 1.0])
    fc = FinetuneConfig(group_size=6, scale_rewards=scale)
    grpo = GRPO(torch.device("cpu"), model, model, tok, SampleConfig(), 24, fc, lambda text, answer: next(rewards))
    rows, advantages, got = grpo._group({"prompt": tok.encode("1+2="), "answer": "3"}, [tok.encode("3")] * 6)
    assert got.tolist() == [1.0, 0.0, 0.0, 1.0, 1.0, 1.0] and len(rows) == 6
    assert float(advantages.sum()) == pytest.approx(0.0, abs=1e-6) and advantages[0] > 0 > advantages[1]
    assert float(advantages.std()) == pytest.approx(1.0 if scale else float(got.std()), rel=1e-3)
