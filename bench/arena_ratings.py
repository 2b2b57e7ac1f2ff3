"""Arena ratings on a synthetic vote log: times online Elo, Bradley-Terry, 100 bootstrap rounds
and style control on 1,000,000 battles among 50 models with known strengths, and peak RSS.

    python -m chatfabric.bench.arena_ratings [--battles 1000000] [--models 50] [--rounds 100]
    python -m chatfabric.bench.arena_ratings --fastchat-python /tmp/fschat-venv/bin/python \\
        --fastchat-main /tmp/fastchat-main     # FastChat's functions on the same file, beside ours

Outcomes follow Bradley-Terry on the true ratings plus a length effect (longer answers win more
often), with ties taken evenly from both sides so the expected score stays the model's; style
control should recover the true ratings where the plain fit is pulled by answer length."""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy.special import expit

from chatfabric.arena import ratings
from chatfabric.arena.battles import anonymous_only, read_battles, sort_by_time
from chatfabric.arena.table import WINNERS, Battles

LENGTH_EFFECT = 1.0  # log-odds per unit of (len_a - len_b) / (len_a + len_b + 1)
TIE_SHARE = 0.4  # ties take this share of the less likely side's probability, half from each side
HERE = Path(__file__).parent


def synthetic_battles(n: int, n_models: int, seed: int) -> tuple[Battles, np.ndarray]:
    """A time-ordered log and the true ratings (mean 1000); 5% of the votes are not anonymous."""
    rng = np.random.default_rng(seed)
    true = rng.normal(0.0, 120.0, n_models)
    true -= true.mean()
    model_a = rng.integers(0, n_models, n)
    model_b = (model_a + rng.integers(1, n_models, n)) % n_models
    means = np.column_stack([rng.uniform(300, 1500, n_models), rng.uniform(0, 4, (n_models, 3))])
    style_a, style_b = _answer_styles(rng, means, model_a), _answer_styles(rng, means, model_b)
    length_diff = ratings.style_differences(style_a[:, 0], style_b[:, 0])
    p_a = expit(math.log(10) / 400 * (true[model_a] - true[model_b]) + LENGTH_EFFECT * length_diff)
    tie = TIE_SHARE * np.minimum(p_a, 1 - p_a)
    draw = rng.random(n)
    bothbad = rng.random(n) < 0.4
    winner = np.select([draw < p_a - tie / 2, draw < p_a + tie / 2], [0, 2], default=1)
    winner = np.where((winner == 2) & bothbad, 3, winner).astype(np.int8)
    table = Battles(
        models=tuple(f"model-{i:02d}" for i in range(n_models)),
        model_a=model_a.astype(np.int32),
        model_b=model_b.astype(np.int32),
        winner=winner,
        tstamp=1.7e9 + np.cumsum(rng.exponential(1.0, n)),
        anony=rng.random(n) < 0.95,
        style_a=style_a.astype(float),
        style_b=style_b.astype(float),
    )
    return table, 1000.0 + true


def _answer_styles(rng, means: np.ndarray, models: np.ndarray) -> np.ndarray:
    # Lengths vary by model and more by prompt, so length is not a stand-in for the model.
    length = rng.poisson(means[models, 0] * rng.lognormal(0.0, 0.6, len(models)))
    return np.column_stack([length, rng.poisson(means[models, 1:])])


def write_clean_battles(table: Battles, path: Path) -> None:
    """FastChat's clean-battle format, one JSON object per line, with conv_metadata counts."""
    with open(path, "w", encoding="utf-8") as out:
        for i in range(len(table)):
            record = {
                "model_a": table.models[table.model_a[i]],
                "model_b": table.models[table.model_b[i]],
                "winner": WINNERS[table.winner[i]],
                "tstamp": float(table.tstamp[i]),
                "anony": bool(table.anony[i]),
                "conv_metadata": _metadata(table.style_a[i], "a") | _metadata(table.style_b[i], "b"),
            }
            out.write(json.dumps(record) + "\n")


def _metadata(counts: np.ndarray, side: str) -> dict:
    length, headers, lists, bold = (int(c) for c in counts)
    return {
        f"sum_assistant_{side}_tokens": length,
        f"header_count_{side}": {"h1": headers // 2, "h2": headers - headers // 2},
        f"list_count_{side}": {"ordered": lists // 3, "unordered": lists - lists // 3},
        f"bold_count_{side}": {"**": bold, "__": 0},
    }


def timed(results: dict, name: str, fn, *args, **kwargs):
    start = time.perf_counter()
    value = fn(*args, **kwargs)
    results[f"{name}_s"] = round(time.perf_counter() - start, 3)
    return value


def peak_rss_mib() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def elo_resample_rows(n: int, rounds: int, seed: int) -> np.ndarray:
    """The resamples FastChat's `compute_bootstrap_elo` draws after np.random.seed(seed)."""
    return np.random.RandomState(seed).randint(0, n, size=(n, rounds))


def run_ours(path: Path, true: np.ndarray, args) -> tuple[dict, dict]:
    """Timings and the ratings by model name, for the comparison."""
    times: dict = {}
    table = timed(times, "read", read_battles, path)
    table = anonymous_only(sort_by_time(table))
    order = [int(name.split("-")[1]) for name in table.models]
    elo = timed(times, "elo", ratings.elo_ratings, table)
    bt = timed(times, "bt", ratings.bt_ratings, table)
    boot = timed(times, "bootstrap_bt", ratings.bootstrap_bt, table, args.rounds, seed=0)
    style = timed(times, "style_bt", ratings.style_bt_ratings, table)
    if args.elo_bootstrap:
        timed(times, "bootstrap_elo", ratings.bootstrap_elo, table, args.rounds, seed=0)
    head = table.take(np.arange(min(args.elo_resample_battles, len(table))))
    resampled = ratings.elo_on_resamples(head, elo_resample_rows(len(head), args.rounds, 0))
    truth = true[order]
    summary = {
        "battles_used": len(table),
        **times,
        "peak_rss_mib": peak_rss_mib(),
        "bt_max_error_vs_true": round(float(np.abs(bt - truth).max()), 2),
        "style_bt_max_error_vs_true": round(float(np.abs(style.ratings - truth).max()), 2),
        "style_coefficients": [round(float(c), 4) for c in style.coefficients],
        "bootstrap_mean_ci_width": round(float((boot.upper - boot.lower).mean()), 2),
    }
    named = {
        "elo": _by_name(table.models, elo),
        "bt": _by_name(table.models, bt),
        "bootstrap_lower": _by_name(table.models, boot.lower),
        "bootstrap_upper": _by_name(table.models, boot.upper),
        "bootstrap_median": _by_name(table.models, boot.median),
        "style_bt": _by_name(table.models, style.ratings),
        "elo_resampled_median": _by_name(head.models, np.median(resampled, axis=0)),
    }
    return summary, named


def _by_name(models, values) -> dict:
    return {model: float(value) for model, value in zip(models, values)}


def run_fastchat(path: Path, args) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        command = [
            args.fastchat_python, str(HERE / "arena_fastchat.py"), str(path), out.name,
            "--rounds", str(args.rounds), "--elo-resample-battles", str(args.elo_resample_battles),
        ]
        if args.fastchat_main:
            command += ["--fastchat-main", args.fastchat_main]
        subprocess.run(command, check=True)
        return json.loads(Path(out.name).read_text())


def max_differences(ours: dict, theirs: dict) -> dict:
    """Largest absolute difference per result that both sides computed, in rating points."""
    pairs = {
        "elo (0.2.36 compute_elo)": ("elo", "v0236_elo"),
        "elo (main compute_elo)": ("elo", "main_elo"),
        "bt (0.2.36 compute_elo_mle_with_tie, L2 C=1)": ("bt", "v0236_bt"),
        "bt (main compute_bt)": ("bt", "main_bt"),
        "bootstrap 2.5% (main compute_bootstrap_bt)": ("bootstrap_lower", "main_bootstrap_lower"),
        "bootstrap 97.5% (main compute_bootstrap_bt)": ("bootstrap_upper", "main_bootstrap_upper"),
        "bootstrap median (main compute_bootstrap_bt)": ("bootstrap_median", "main_bootstrap_median"),
        "style control (main compute_style_control)": ("style_bt", "main_style_bt"),
        "bt (main's loss, converged)": ("bt", "main_bt_converged"),
        "style control (main's loss, converged)": ("style_bt", "main_style_bt_converged"),
        "bt (0.2.36's design, no penalty, converged)": ("bt", "v0236_bt_unpenalized"),
        "elo resampled median (main fit_vectorized_elo)": ("elo_resampled_median", "main_elo_resampled_median"),
    }
    return {
        label: float(max(abs(ours[mine][m] - theirs[other][m]) for m in ours[mine]))
        for label, (mine, other) in pairs.items()
        if other in theirs
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--battles", type=int, default=1_000_000)
    parser.add_argument("--models", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--file", type=Path, help="where to write the battles (default: a temp file)")
    parser.add_argument("--no-elo-bootstrap", dest="elo_bootstrap", action="store_false",
                        help="skip the (slowest) bootstrap of online Elo")
    parser.add_argument("--elo-resample-battles", type=int, default=20_000,
                        help="battles in the Elo-on-resamples comparison (its index matrix is n x rounds)")
    parser.add_argument("--fastchat-python", help="an interpreter with fschat, pandas, scipy, scikit-learn")
    parser.add_argument("--fastchat-main", help="a folder holding FastChat main's rating_systems.py")
    args = parser.parse_args()

    table, true = synthetic_battles(args.battles, args.models, args.seed)
    with tempfile.TemporaryDirectory() as scratch:
        path = args.file or Path(scratch) / "clean_battle.jsonl"
        write_clean_battles(table, path)
        del table
        summary, ours = run_ours(path, true, args)
        report = {"ours": summary}
        if args.fastchat_python:
            theirs = run_fastchat(path, args)
            report["fastchat"] = theirs["times"]
            report["max_abs_difference"] = max_differences(ours, theirs)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
