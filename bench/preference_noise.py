"""How noisy a preference loss's log-ratio margin is: for 16 arithmetic pairs (the correct answer against a
corrupted one), h = (log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l)) estimated ``--draws`` times, each
with the objective's own noise (`response_noises`, ``--mc-samples`` per row, shared by policy and reference).
Prints one JSON object: per pair the mean and std of h, their mean ratio |E h| / std, the share of draws with
h > 0, and the per-draw std of log pi for the chosen and the rejected answers.

    python bench/preference_noise.py POLICY_RUN REFERENCE_RUN [--draws 20] [--mc-samples 2] [--one-pass | --t0 T]

``--one-pass`` scores with the one-pass surrogate (``finetune.preference_likelihood=one_pass``) instead; ``--t0``
with the bound stopped at t_0 (``finetune.preference_t0``). The mean log pi of the chosen and the rejected answers
(per answer, over the draws) shows how loose a bound is.
"""

from __future__ import annotations

import argparse
import json

import torch

from dimba.data.finetune import build_rows
from dimba.data.tasks import preference_rows, task_of
from dimba.loading import load_for_inference
from dimba.training.objectives import response_noises, sequence_logp


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("policy")
    ap.add_argument("reference")
    ap.add_argument("--draws", type=int, default=20)
    ap.add_argument("--mc-samples", type=int, default=2)
    ap.add_argument("--pairs", type=int, default=16)
    ap.add_argument("--one-pass", action="store_true", help="the one-pass (d1) surrogate instead of NELBO samples")
    ap.add_argument("--t0", type=float, help="the bound's last time (continuous families; default 1e-4)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    policy, tok = load_for_inference(args.policy)
    reference, _ = load_for_inference(args.reference)
    pairs = preference_rows(task_of("task:arithmetic"), args.pairs, 7)
    prompts = [tok.encode(p["prompt"]) for p in pairs] * 2
    answers = [tok.encode(p["chosen"]) for p in pairs] + [tok.encode(p["rejected"]) for p in pairs]
    rows = build_rows(prompts, answers, policy.family, policy.config.context_length)
    generator, n = torch.Generator().manual_seed(0), args.pairs
    margins, logps = [], []
    with torch.no_grad():
        for _ in range(args.draws):
            noises = response_noises(policy.family, rows, args.mc_samples, generator, args.one_pass, args.t0)
            logp = sequence_logp(policy, rows, noises)  # (2n,)
            ratio = logp - sequence_logp(reference, rows, noises)  # (2n,)
            margins.append(ratio[:n] - ratio[n:])
            logps.append(logp)
    h, lp = torch.stack(margins).double(), torch.stack(logps).double()  # (draws, n), (draws, 2n)
    print(json.dumps({"policy": args.policy, "reference": args.reference, "draws": args.draws,
                      "mc_samples": args.mc_samples, "one_pass": args.one_pass, "t0": args.t0,
                      "h_mean": h.mean(0).tolist(), "h_std": h.std(0).tolist(),
                      "snr": float((h.mean(0).abs() / h.std(0)).mean()),
                      "share_positive": float((h > 0).double().mean()),
                      "logp_std_chosen": float(lp[:, :n].std(0).mean()),
                      "logp_std_rejected": float(lp[:, n:].std(0).mean()),
                      "logp_mean_chosen": float(lp[:, :n].mean()), "logp_mean_rejected": float(lp[:, n:].mean())}))


if __name__ == "__main__":
    main()
