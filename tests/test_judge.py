"""The judge's rules and arithmetic, exactly: FastChat's verdict formats, which prompt grades
what, and known judgments in, known tables out. Whole jobs run `--local` against a deterministic
OpenAI-compatible server over real HTTP (`judge_fake.py`); nothing here needs NATS or a model."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from chatfabric.deploy.cli import build_parser
from chatfabric.judge import results
from chatfabric.judge.bench import BenchError, Question, load_bench, packaged_data, parse_questions
from chatfabric.judge.cli import run_job
from chatfabric.judge.scoring import combine_games, game_winner, parse_rating, parse_verdict, prompt_name
from chatfabric.judge.store import token
from chatfabric.proto.events import JudgeJob
from chatfabric.proto.messages import MessageError, decode, encode
from judge_fake import FakeOpenAI, dump
from shared_data import shared_file

CHATFABRIC = str(Path(sys.executable).parent / "chatfabric")
WRITING, MATH, REASONING = 81, 111, 101  # MT-bench questions of three categories, two turns each


@pytest.mark.parametrize("name", ["mt_bench/question.jsonl", "mt_bench/judge_prompts.jsonl",
                                  "mt_bench/reference_answer/gpt-4.jsonl", "LICENSE-FastChat-Apache-2.0"])
def test_packaged_data_is_fastchats_unmodified(name):
    """The judge ships MT-bench inside the package; it is FastChat's, byte for byte."""
    assert (packaged_data() / name).read_bytes() == shared_file(name).read_bytes()


# -- verdicts -------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, score", [
    ("Good answer. Rating: [[8]]", 8.0), ("[[7.5]]", 7.5), ("Rating: [6]", 6.0),  # the fallback
    ("[[9]] then [3]", 9.0), ("no rating here", None), ("[[ 8 ]]", None), ("[[07]]", 7.0), ("[[ten]]", None),
])
def test_ratings_are_read_as_fastchat_reads_them(text, score):
    assert parse_rating(text) == score


@pytest.mark.parametrize("text, verdict", [
    ("A is better. [[A]]", "A"), ("[[B]]", "B"), ("[[C]]", "tie"), ("[A]", None), ("", None),
    ("[[B]] no wait [[A]]", "A"),  # FastChat looks for [[A]] first
])
def test_pairwise_verdicts(text, verdict):
    assert parse_verdict(text) == verdict


def test_two_rating_format_ties_within_a_tenth():
    assert parse_verdict("[[8, 7.95]]", "[[rating_a,rating_b]]") == "tie"
    assert parse_verdict("[7, 9]", "[[rating_a,rating_b]]") == "B"
    assert parse_verdict("nothing", "[[rating_a,rating_b]]") is None


def test_swapped_games_that_disagree_are_inconsistent():
    g1 = game_winner("A", swapped=False)  # model_1 shown first, judged better
    g2 = game_winner("A", swapped=True)  # model_2 shown first, judged better: position bias
    assert (g1, g2, combine_games(g1, g2)) == ("model_1", "model_2", "inconsistent")
    assert combine_games(game_winner("B", swapped=True), "model_1") == "model_1"


@pytest.mark.parametrize("category, reference", [("math", True), ("reasoning", True), ("coding", True),
                                                 ("writing", False), ("stem", False), ("extraction", False)])
def test_reference_guided_prompts_for_math_reasoning_and_coding(category, reference):
    q = Question(question_id=1, category=category, turns=("a", "b"))
    names = [prompt_name(kind, q, turn) for kind in ("single", "pairwise") for turn in (1, 2)]
    wanted = (["single-math-v1", "single-math-v1-multi-turn", "pair-math-v1", "pair-math-v1-multi-turn"]
              if reference else ["single-v1", "single-v1-multi-turn", "pair-v2", "pair-v2-multi-turn"])
    assert names == wanted


# -- tables -----------------------------------------------------------------------------------------


def _pair(qid, turn, g1, g2, m1="m-a", m2="base", category=None):
    return {"question_id": qid, "model_1": m1, "model_2": m2, "g1_winner": g1, "g2_winner": g2,
            "judge": ["gpt-4", "pair-v2"], "g1_judgment": "", "g2_judgment": "", "turn": turn, "category": category}


def test_pairwise_table_from_known_judgments():
    records = [_pair(1, 1, "model_1", "model_1"), _pair(1, 2, "model_1", "model_2"), _pair(2, 1, "tie", "tie"),
               _pair(2, 2, "model_2", "model_2"), _pair(3, 1, "error", "model_1"),
               _pair(3, 2, "model_2", "model_1", m1="m-b", m2="m-c")]  # no baseline: not in pairwise-baseline
    summary = results.summarize(records, "pairwise-baseline", "base")
    [a] = summary["models"]
    assert {k: a[k] for k in ("model", "win", "loss", "tie", "inconsistent", "failed", "total")} == \
        {"model": "m-a", "win": 1, "loss": 1, "tie": 2, "inconsistent": 1, "failed": 1, "total": 4}
    assert (a["win_rate"], a["loss_rate"], a["win_rate_adjusted"]) == (0.25, 0.25, 0.5)
    everyone = results.summarize(records, "pairwise-all")
    assert [(e["model"], e["win"], e["loss"], e["tie"]) for e in everyone["models"]] == \
        [("base", 1, 1, 2), ("m-a", 1, 1, 2), ("m-b", 0, 0, 1), ("m-c", 0, 0, 1)]


def test_single_table_excludes_failures_and_counts_them():
    rows = [{"question_id": q, "model": "m", "score": s, "turn": t, "category": c} for q, t, s, c in
            [(1, 1, 8, "math"), (1, 2, -1, "math"), (2, 1, 6, "writing"), (2, 2, None, "writing"), (3, 1, 4, "math")]]
    [m] = results.summarize(rows, "single")["models"]
    assert m["turn_1"]["mean"] == 6.0 and m["turn_2"]["mean"] is None and m["overall"]["failed"] == 2
    assert m["categories"] == {"math": 6.0, "writing": 6.0}
    low, high = m["overall"]["ci"]
    assert 4.0 <= low <= 6.0 <= high <= 8.0


def test_show_prints_the_table_of_a_fastchat_judgment_file(tmp_path):
    file = tmp_path / "gpt-4_pair.jsonl"
    file.write_text(dump([_pair(1, 1, "model_1", "model_1"), _pair(1, 2, "model_1", "model_2"),
                          _pair(2, 1, "tie", "tie"), _pair(2, 2, "model_2", "model_2")]))
    out = subprocess.run([CHATFABRIC, "judge", "show", str(file), "--mode", "pairwise-baseline", "--baseline", "base"],
                         capture_output=True, text=True, check=True).stdout
    assert out.splitlines()[:3] == [
        "Mode: pairwise-baseline (baseline base)",
        "model  win  loss  tie  (inconsistent)  failed  win_rate  loss_rate  win_rate_adjusted        95% CI",
        "-----  ---  ----  ---  --------------  ------  --------  ---------  -----------------  ------------",
    ]
    assert re.match(r"m-a\s+1\s+1\s+2\s+1\s+0\s+0\.250\s+0\.250\s+0\.500\s+\[0\.\d\d, 0\.\d\d\]$", out.splitlines()[3])


# -- whole jobs, --local, against the deterministic judge -------------------------------------------


def _shown_first(prompt: str) -> str:
    """The model whose answer the judge sees as assistant A."""
    return re.search(r"Assistant A.*?ANSWER\[([^|]+)\|", prompt, re.S).group(1)


def _question_of(prompt: str, bench) -> int:
    return next(q.question_id for q in bench.questions if q.turns[0][:24] in prompt)


def _turn_of(prompt: str) -> int:
    return 2 if "### User:" in prompt else 1


async def _run_cli(*argv: str) -> None:
    args = build_parser().parse_args(["judge", "run", "--local", *argv])
    await run_job(args, asyncio.Event())


@pytest.fixture(scope="module")
def mt_bench():
    return load_bench("mt_bench")


async def test_pairwise_job_known_verdicts_known_table(tmp_path, mt_bench):
    canned = {  # (question, turn, model shown as A) -> the judge's output
        (WRITING, 1, "m-a"): "[[A]]", (WRITING, 1, "base"): "[[A]]",  # position bias: inconsistent
        (WRITING, 2, "m-a"): "[[A]]", (WRITING, 2, "base"): "[[B]]",  # m-a wins both games
        (MATH, 1, "m-a"): "[[C]]", (MATH, 1, "base"): "[[C]]",  # a tie
        (MATH, 2, "m-a"): "I cannot decide.", (MATH, 2, "base"): "I cannot decide.",  # unreadable
        (REASONING, 1, "m-a"): "[[B]]", (REASONING, 1, "base"): "[[A]]",  # base wins
        (REASONING, 2, "m-a"): "[[B]] no, [[A]]", (REASONING, 2, "base"): "[[B]]",  # m-a wins
    }
    judge = lambda p: canned[(_question_of(p, mt_bench), _turn_of(p), _shown_first(p))]
    async with FakeOpenAI(judge=judge) as fake:
        await _run_cli("--questions", f"{WRITING},{MATH},{REASONING}", "--models", "m-a", "--judge-model", "j",
                       "--mode", "pairwise-baseline", "--baseline", "base", "--gateway-url", fake.url,
                       "--judge-retries", "1", "--judge-max-tokens", "77", "--output", str(tmp_path), "--no-progress")
        summary = json.loads((tmp_path / "summary.json").read_text())
        [a] = summary["models"]
        assert {k: a[k] for k in ("model", "win", "loss", "tie", "inconsistent", "failed", "total")} == \
            {"model": "m-a", "win": 2, "loss": 1, "tie": 2, "inconsistent": 1, "failed": 1, "total": 5}
        assert (a["win_rate"], a["loss_rate"], a["win_rate_adjusted"]) == (0.4, 0.2, 0.6)
        assert a["categories"] == {"math": 0.5, "reasoning": 0.5, "writing": 0.75}

        judged = fake.judge_requests()
        assert len(judged) == 10 + 4  # 12 games, the 2 unreadable ones asked twice
        assert {(r["temperature"], r["max_tokens"]) for r in judged} == {(0.0, 77)}
        for r in judged:
            question, prompt = _question_of(r["messages"][1]["content"], mt_bench), r["messages"][1]["content"]
            guided = "Reference" in prompt
            assert guided == (question in (MATH, REASONING)), prompt[:200]
            assert ("correctness and helpfulness" in r["messages"][0]["content"]) == guided

        answered = {(r["model"], _question_of(r["messages"][0]["content"], mt_bench),
                     sum(m["role"] == "user" for m in r["messages"])): r for r in fake.answer_requests()}
        assert len(answered) == len(fake.answer_requests()) == 2 * 3 * 2  # each turn of each model once
        assert answered[("m-a", WRITING, 1)]["temperature"] == 0.7 and "seed" in answered[("m-a", WRITING, 1)]
        assert answered[("m-a", MATH, 1)]["temperature"] == 0.0 and "seed" not in answered[("m-a", MATH, 1)]
        second = answered[("base", REASONING, 2)]["messages"]
        assert [m["role"] for m in second] == ["user", "assistant", "user"]
        assert second[1]["content"].startswith("ANSWER[base|")  # its own first answer

        rows = [json.loads(line) for line in (tmp_path / "judgments.jsonl").read_text().splitlines()]
        [failed] = [r for r in rows if r["failure"]]
        assert (failed["question_id"], failed["turn"], failed["g1_winner"], failed["g2_winner"]) == (MATH, 2, "error", "error")
        assert failed["g1_attempts"] == ["I cannot decide.", "I cannot decide."]
        for name in ("answers.jsonl", "table.txt", "categories.png", "report.html"):
            assert (tmp_path / name).stat().st_size > 0

        before = len(fake.requests)
        await _run_cli("--questions", f"{WRITING},{MATH},{REASONING}", "--models", "m-a", "--judge-model", "j",
                       "--mode", "pairwise-baseline", "--baseline", "base", "--gateway-url", fake.url,
                       "--judge-retries", "1", "--judge-max-tokens", "77", "--output", str(tmp_path), "--no-progress")
        assert len(fake.requests) == before  # everything was stored: the re-run redoes nothing
        assert json.loads((tmp_path / "summary.json").read_text()) == summary


async def test_single_job_scores_with_fallbacks_and_failures(tmp_path, mt_bench):
    canned = {(WRITING, 1): "[[8]]", (WRITING, 2): "Rating: [7]", (MATH, 1): "[[3.5]]", (MATH, 2): "hmm",
              (REASONING, 1): "[[10]]", (REASONING, 2): "[[6]]"}
    judge = lambda p: canned[(_question_of(p, mt_bench), _turn_of(p))]
    async with FakeOpenAI(judge=judge, statuses=[429, 503]) as fake:  # retried with backoff by the SDK
        await _run_cli("--questions", f"{WRITING},{MATH},{REASONING}", "--models", "m-a", "--judge-model", "j",
                       "--gateway-url", fake.url, "--judge-retries", "2", "--output", str(tmp_path), "--no-progress")
    [m] = json.loads((tmp_path / "summary.json").read_text())["models"]
    assert m["turn_1"]["mean"] == pytest.approx((8 + 3.5 + 10) / 3)
    assert (m["turn_2"]["mean"], m["turn_2"]["failed"]) == (6.5, 1)
    assert (m["overall"]["mean"], m["overall"]["n"], m["overall"]["failed"]) == (6.9, 5, 1)
    table = (tmp_path / "table.txt").read_text().splitlines()
    assert re.match(r"m-a\s+7\.17\s+6\.50\s+6\.90\s+\[[\d.]+, [\d.]+\]\s+5\s+1$", table[3])


async def test_an_endpoint_that_keeps_failing_fails_the_job_saying_why(tmp_path, capsys):
    async with FakeOpenAI(statuses=[500] * 50) as fake:
        with pytest.raises(SystemExit):
            await _run_cli("--questions", str(WRITING), "--models", "m-a", "--judge-model", "j",
                           "--gateway-url", fake.url, "--output", str(tmp_path), "--no-progress")
    message = capsys.readouterr().err
    assert "answering with m-a" in message and "HTTP 500: canned 500" in message
    assert len(fake.requests) == 1 + 5  # the SDK's bounded retries


# -- boundaries -------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(max_size=300))
def test_reading_verdicts_never_raises(text):
    score = parse_rating(text)
    assert score is None or score >= 0
    assert parse_verdict(text) in (None, "A", "B", "tie")


_question_line = st.fixed_dictionaries(
    {"question_id": st.one_of(st.integers(-5, 10**6), st.text(max_size=8)), "category": st.text(max_size=12),
     "turns": st.lists(st.text(max_size=20), max_size=3)})


@settings(max_examples=60, deadline=None)
@given(st.lists(st.one_of(_question_line, st.just("not json"), st.integers()), max_size=5))
def test_a_question_file_is_read_or_refused_with_its_line(lines):
    text = "\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines)
    try:
        questions = parse_questions(text, "q.jsonl")
    except BenchError as err:
        assert str(err).startswith("q.jsonl")
    else:
        assert len({q.question_id for q in questions}) == len(questions) >= 1
        assert all(1 <= len(q.turns) <= 2 and q.category for q in questions)


@settings(max_examples=60, deadline=None)
@given(models=st.lists(st.text(min_size=1, max_size=12), min_size=1, max_size=3),
       mode=st.sampled_from(["single", "pairwise-baseline", "pairwise-all"]),
       baseline=st.one_of(st.none(), st.text(min_size=1, max_size=12)),
       questions=st.lists(st.one_of(st.integers(0, 200), st.text(min_size=1, max_size=10)), max_size=4),
       parallel=st.integers(-1, 300))
def test_judge_jobs_round_trip_or_are_refused_by_name(models, mode, baseline, questions, parallel):
    raw = json.dumps({"models": models, "judge_model": "j", "mode": mode, "baseline": baseline,
                      "questions": questions, "parallel": parallel}).encode()
    try:
        job = decode(JudgeJob, raw)
    except MessageError as err:
        assert str(err).startswith("invalid JudgeJob: ")
    else:
        assert decode(JudgeJob, encode(job)) == job
        assert (job.baseline is not None) == (job.mode == "pairwise-baseline")


@settings(max_examples=80, deadline=None)
@given(st.lists(st.one_of(st.integers(), st.text(min_size=1, max_size=20)), max_size=20, unique=True))
def test_record_keys_of_distinct_question_ids_are_distinct(ids):
    assert len({token(i) for i in ids}) == len(ids)
    assert all(re.fullmatch(r"[A-Za-z0-9_=-]+", token(i)) for i in ids)


async def test_a_judge_job_runs_from_outside_the_checkout_on_packaged_data(tmp_path):
    """The command as a user types it, in a folder of their own, with no shared data folder: the
    questions and prompts come from the package; --prompts-file replaces a prompt by name."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"name": "single-v1", "type": "single", "output_format": "[[rating]]",
                                   "system_prompt": "You are a strict grader.",
                                   "prompt_template": "[Question]\n{question}\n[Answer]\n{answer}\nRate it."}) + "\n")
    env = {k: v for k, v in os.environ.items() if k != "CHATFABRIC_SHARED_DATA"}
    async with FakeOpenAI(judge=lambda p: "Rating: [[6]]") as fake:
        proc = await asyncio.create_subprocess_exec(
            CHATFABRIC, "judge", "run", "--local", "--questions", str(WRITING), "--models", "m-a", "--judge-model", "j",
            "--gateway-url", fake.url, "--prompts-file", str(prompts), "--no-progress", "--output", "out",
            cwd=tmp_path, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 120)
        assert proc.returncode == 0, err.decode()
        judged = fake.judge_requests()
    assert "m-a" in out.decode() and "HTTP Request" not in err.decode()
    [m] = json.loads((tmp_path / "out" / "summary.json").read_text())["models"]
    assert m["turn_1"]["mean"] == 6.0 and m["turn_2"]["mean"] == 6.0
    turn_1 = [r for r in judged if "### User" not in r["messages"][1]["content"]]
    assert turn_1 and all(r["messages"][0]["content"] == "You are a strict grader." for r in turn_1)
    assert all(r["messages"][1]["content"].endswith("Rate it.") for r in turn_1)
    turn_2 = [r for r in judged if r not in turn_1]
    assert turn_2 and all(r["messages"][0]["content"] != "You are a strict grader." for r in turn_2)  # packaged


def test_a_prompts_file_naming_no_judge_prompt_is_refused(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"name": "single-v9", "type": "single", "output_format": "[[rating]]",
                                   "system_prompt": "s", "prompt_template": "t"}) + "\n")
    out = subprocess.run([CHATFABRIC, "judge", "run", "--local", "--models", "a", "--judge-model", "j",
                          "--prompts-file", str(prompts)], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert out.returncode == 2 and "no judge prompt is called 'single-v9'" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr
