"""FastChat's own rating functions on a clean-battle file, for `arena_ratings` to compare with.

Runs in a separate interpreter that has fschat 0.2.36, pandas, scipy and scikit-learn (never
chatfabric's environment):

    python bench/arena_fastchat.py BATTLES.jsonl OUT.json [--fastchat-main DIR] [--rounds 100]

0.2.36 is the latest fschat release; its `elo_analysis` gives `compute_elo` and the
scikit-learn `compute_elo_mle_with_tie`. FastChat's current method (`compute_bt`, the
multinomial `compute_bootstrap_bt`, `compute_style_control`) lives in `rating_systems.py` on
its main branch, in no release: pass the folder holding that file as --fastchat-main."""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
import types
from unittest import mock

import numpy as np
import pandas as pd


def load_v0236_elo_analysis():
    # elo_analysis imports fastchat.model only for model descriptions in a Markdown table;
    # that package pulls torch and transformers, which the rating functions never touch.
    registry = types.ModuleType("fastchat.model.model_registry")
    registry.get_model_info = None
    sys.modules["fastchat.model"] = types.ModuleType("fastchat.model")
    sys.modules["fastchat.model.model_registry"] = registry
    from fastchat.serve.monitor import elo_analysis

    return elo_analysis


def timed(times: dict, name: str, fn, *args, **kwargs):
    start = time.perf_counter()
    value = fn(*args, **kwargs)
    times[f"{name}_s"] = round(time.perf_counter() - start, 3)
    return value


def as_floats(series_or_dict) -> dict:
    return {str(k): float(v) for k, v in dict(series_or_dict).items()}


def converged_fits(battles, main_branch) -> dict:
    """FastChat's own losses and gradients, minimized until they stop improving (its published
    calls stop at L-BFGS-B's default ftol on an unnormalized loss, or sklearn's tol=1e-4)."""
    from scipy.optimize import minimize
    from sklearn.linear_model import LogisticRegression

    tight = {"maxiter": 2000, "gtol": 1e-9, "ftol": 1e-15}
    matchups, outcomes, models, weights = main_branch.preprocess_for_bt(battles)
    fit = minimize(main_branch.bt_loss_and_grad, np.zeros(len(models)), jac=True, method="L-BFGS-B",
                   args=(matchups, outcomes, weights, np.log(10)), options=tight)
    results = {"main_bt_converged": dict(zip(models, (1000 + 400 * fit.x).tolist()))}
    matchups, features, outcomes, models = main_branch.preprocess_for_style(battles)
    start = np.zeros(len(models) + features.shape[1])
    fit = minimize(main_branch.contextual_bt_loss_and_grad, start, jac=True, method="L-BFGS-B",
                   args=(len(models), matchups, features, outcomes, np.log(10), 0.5, 0.25), options=tight)
    results["main_style_bt_converged"] = dict(zip(models, (1000 + 400 * fit.x[: len(models)]).tolist()))

    class Unpenalized(LogisticRegression):
        def __init__(self, fit_intercept=False):
            super().__init__(fit_intercept=fit_intercept, C=np.inf, tol=1e-10, max_iter=10_000)

    # 0.2.36's own design (each battle twice, a tie as one win each way), without its L2
    # penalty and run to convergence: it imports LogisticRegression when called.
    with mock.patch("sklearn.linear_model.LogisticRegression", Unpenalized):
        results["v0236_bt_unpenalized"] = as_floats(load_v0236_elo_analysis().compute_elo_mle_with_tie(battles))
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("battles")
    parser.add_argument("out")
    parser.add_argument("--fastchat-main")
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--elo-resample-battles", type=int, default=20_000)
    args = parser.parse_args()

    times: dict = {}
    battles = timed(times, "read", pd.read_json, args.battles, lines=True)
    # As report_elo_analysis_results prepares them: time order, anonymous votes only.
    battles = battles.sort_values(ascending=True, by=["tstamp"])
    battles = battles[battles["anony"]].reset_index(drop=True)
    results: dict = {}

    v0236 = load_v0236_elo_analysis()
    results["v0236_elo"] = as_floats(timed(times, "v0236_elo", v0236.compute_elo, battles))
    results["v0236_bt"] = as_floats(timed(times, "v0236_bt", v0236.compute_elo_mle_with_tie, battles))

    if args.fastchat_main:
        sys.path.insert(0, args.fastchat_main)
        import rating_systems as main_branch

        results["main_elo"] = as_floats(timed(times, "main_elo", main_branch.compute_elo, battles))
        results["main_bt"] = as_floats(timed(times, "main_bt", main_branch.compute_bt, battles))
        boot = timed(
            times, "main_bootstrap_bt", main_branch.compute_bootstrap_bt, battles, args.rounds, num_cpu=2
        )
        results["main_bootstrap_lower"] = as_floats(boot.quantile(0.025))
        results["main_bootstrap_upper"] = as_floats(boot.quantile(0.975))
        results["main_bootstrap_median"] = as_floats(boot.quantile(0.5))
        style, _ = timed(times, "main_style_bt", main_branch.compute_style_control, battles)
        results["main_style_bt"] = as_floats(style)
        head = battles.head(args.elo_resample_battles)
        matchups, outcomes, models = main_branch.preprocess_for_elo(head)
        rows = np.random.RandomState(0).randint(0, len(head), size=(len(head), args.rounds))
        resampled = main_branch.fit_vectorized_elo(matchups, outcomes, rows, len(models))
        results["main_elo_resampled_median"] = dict(zip(models, np.median(resampled, axis=0).tolist()))
        results |= timed(times, "converged_fits", converged_fits, battles, main_branch)

    times["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    with open(args.out, "w") as out:
        json.dump({"times": times, **results}, out)


if __name__ == "__main__":
    main()
