"""Paper B's benchmark study: the tasks' losses and metrics, the random search and the tables' rows, early stopping,
COMET+'s local search over the gates of a multi-gate block, the runner's resume log, the t-test, and tiny runs of
recipes/moesart_benchmarks.py (in process and with two worker processes)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy import stats

from hf_condroute.block.routed_block import RoutingInputs
from hf_condroute.integrations.local_search import local_search, permutable_routers
from hf_condroute.studies.moesart_bench import runner as runner_module
from hf_condroute.studies.moesart_bench.benchmark import build_benchmark
from hf_condroute.studies.moesart_bench.experiments import (
    SEARCHED,
    TABLES,
    Trial,
    best_trial,
    lasso,
    routers_to_search,
    search_trials,
    table_rows,
)
from hf_condroute.studies.moesart_bench.model import MultiGateMoE, routing_config_for
from hf_condroute.studies.moesart_bench.report import summarize, ttest
from hf_condroute.studies.moesart_bench.runner import Job, Runner
from hf_condroute.studies.moesart_bench.tasks import Split, Task, total_loss
from hf_condroute.studies.moesart_bench.train import RunSpec, evaluate, train

from .recipe_loader import load_recipe


@pytest.fixture(scope="module")
def bench():
    return build_benchmark("multi_digits", quick=True)


def test_task_metrics_match_their_definitions():
    torch.manual_seed(0)
    logits, labels = torch.randn(50, 4), torch.randint(0, 4, (50,))
    acc = Task("a", "multiclass").score(logits, labels.float())
    assert acc == pytest.approx(100.0 * (logits.argmax(1) == labels).float().mean().item())
    scores, y = torch.randn(40), torch.randint(0, 2, (40,)).float()
    pos, neg = scores[y == 1], scores[y == 0]
    pairs = (pos[:, None] > neg[None, :]).float().mean().item()  # AUC: P(score of a positive > of a negative)
    assert Task("w", "binary").score(scores, y) == pytest.approx(100.0 * pairs)
    pred, target = torch.randn(30), torch.randn(30)
    assert Task("r", "regression").score(pred, target) == pytest.approx(((pred - target) ** 2).mean().item(), rel=1e-5)
    assert math.isnan(Task("w", "binary").score(scores, torch.ones(40)))  # one class: no AUC


def test_task_losses_and_the_masked_weighted_total():
    torch.manual_seed(1)
    tasks = (Task("watched", "binary", 0.1), Task("rating", "regression", 0.9))
    outs = {"watched": torch.randn(6), "rating": torch.randn(6)}
    labels = torch.tensor([[1, 4.0], [0, 0], [1, 2], [0, 0], [1, 5], [1, 3]])
    mask = torch.tensor([[True, True], [True, False], [True, True], [True, False], [True, True], [True, True]])
    batch = Split({"user": torch.arange(6), "item": torch.arange(6)}, labels, mask)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(outs["watched"], labels[:, 0])
    mse = ((outs["rating"] - labels[:, 1])[mask[:, 1]] ** 2).mean()  # only the 4 rated rows
    assert total_loss(tasks, outs, batch).item() == pytest.approx((0.1 * bce + 0.9 * mse).item(), rel=1e-6)
    ce = Task("d", "multiclass").losses(torch.zeros(2, 10), torch.tensor([3.0, 7.0]))
    assert torch.allclose(ce, torch.full((2,), math.log(10)))


def test_split_checks_and_takes_rows():
    split = Split({"user": torch.arange(5), "item": torch.arange(5) * 2}, torch.zeros(5, 2))
    part = split.take(torch.tensor([4, 1]))
    assert part.inputs["item"].tolist() == [8, 2] and len(part) == 2
    with pytest.raises(ValueError, match="same n rows"):
        Split(torch.zeros(4, 3), torch.zeros(5, 2))
    with pytest.raises(ValueError, match="mask"):
        Split(torch.zeros(5, 3), torch.zeros(5, 2), torch.ones(5, 1, dtype=torch.bool))


def test_random_search_draws_are_seeded_in_range_and_alternate_the_lasso(bench):
    a, b = search_trials(bench, "moesart", 6), search_trials(bench, "moesart", 6)
    assert a == b and len({t.seed for t in a}) == 6 and min(t.seed for t in a) >= 1000
    lo, hi = bench.lr_range
    assert all(lo * 0.99 <= t.spec.lr <= hi * 1.01 for t in a)
    assert [lasso(t.spec) == 0 for t in a] == [True, False] * 3
    assert search_trials(bench, "top_k", 3) != search_trials(bench, "v_moe", 3)  # each router its own draws
    results = {t: float(i) for i, t in enumerate(reversed(a))}  # the last trial has the lowest loss
    assert best_trial(results, "moesart") == a[-1].spec
    assert best_trial(results, "moesart", lambda s: lasso(s) == 0) == a[-2].spec
    with pytest.raises(ValueError, match="No search trial"):
        best_trial(results, "top_k")


def test_tables_rows_share_identical_setups_and_change_one_thing(bench):
    tuned = {r: RunSpec(r, lr=1e-3 * (i + 1)) for i, r in enumerate(SEARCHED)}
    trials = {Trial("moesart", 0, tuned["moesart"]): 1.0}
    rows = table_rows(bench, tuned, trials)
    by = {(r.table, r.label): r.spec for r in rows}
    assert {r.table for r in rows} == {t for t, (_, kinds) in TABLES.items() if "image" in kinds}
    assert by[("table1", "Top-k")] == by[("s1", "Top-k")] == by[("fig4", "Top-k, k = 2")]
    assert dict(by[("fig4", "MOESART, k = 6")].overrides) == {"top_k": 6}
    assert dict(by[("fig3", "MOESART with replacement")].overrides) == {"moesart_replacement": True}
    assert dict(by[("s1", "MOESART with (i),(ii)")].overrides) == {"moesart_adjustment": "i"}
    assert by[("s4", "COMET+ (local search)")].local_search and not by[("s4", "COMET")].local_search
    assert by[("fig4", "MOESART, k = 6")].config(bench).top_k == 6
    assert by[("s4", "COMET+ (local search)")].config(bench).expert_permutation
    assert routers_to_search(bench, ("s1",)) == ["top_k", "moesart"]


def test_training_keeps_the_best_validation_parameters(bench):
    model, result = train(bench, RunSpec("top_k", lr=3e-3), seed=0)
    losses = [v for _, v in result.curve]
    assert [s for s, _ in result.curve] == list(range(bench.eval_every, bench.steps + 1, bench.eval_every))
    assert result.scores["val_loss"] == min(losses)
    assert result.curve[[v for _, v in result.curve].index(min(losses))][0] == result.scores["best_step"]
    assert evaluate(model, bench, bench.splits["val"])["loss"] == pytest.approx(min(losses), rel=1e-6)
    assert result.scores["k_per_gate"] == 2.0 and 2.0 <= result.scores["experts_run"] <= 4.0


def test_local_search_searches_each_gate_of_a_multi_gate_block(bench):
    torch.manual_seed(0)
    model = MultiGateMoE(routing_config_for("top_k", 4, 2, expert_permutation=True))
    assert set(permutable_routers(model)) == {"moe[task1]", "moe[task2]"}
    model.eval()
    x = bench.splits["train"].inputs[:32]
    gate = model.moe.router["task1"]
    gate.expert_map.copy_(torch.tensor([1, 0, 2, 3]))
    with torch.no_grad():
        target = model.moe(x.flatten(1), RoutingInputs())["task1"]
    gate.expert_map.copy_(torch.arange(4))

    def loss_fn(m, batch):
        return ((m.moe(batch.flatten(1), RoutingInputs())["task1"] - target) ** 2).mean()

    result = local_search(model, [x], loss_fn=loss_fn)
    assert result.initial_loss > 0 and result.final_loss == pytest.approx(0.0, abs=1e-10)
    assert gate.expert_map.tolist() == [1, 0, 2, 3]
    assert model.moe.router["task2"].expert_map.tolist() == [0, 1, 2, 3]  # the other gate gains nothing


def test_ttest_takes_the_best_candidate_and_matches_students_t():
    def rows(*losses):
        return summarize([{"loss": v, "k_per_gate": 2.0} for v in losses])

    target, good, bad = rows(0.5, 0.6, 0.55, 0.52), rows(1.0, 1.2, 1.1), rows(2.0, 2.2, 2.1)
    test = ttest(target, {"good": good, "bad": bad})
    a, b = np.array(target["losses"]), np.array(good["losses"])
    pooled = ((len(a) - 1) * a.var(ddof=1) + (len(b) - 1) * b.var(ddof=1)) / (len(a) + len(b) - 2)
    t = (a.mean() - b.mean()) / math.sqrt(pooled * (1 / len(a) + 1 / len(b)))
    assert test["against"] == "good" and test["significant"]
    assert test["p_value"] == pytest.approx(stats.t.cdf(t, len(a) + len(b) - 2))
    assert test["p_value"] + test["p_value_reverse"] == pytest.approx(1.0)
    assert ttest(rows(0.5), {"good": good})["p_value"] is None
    assert target["loss_sem"] == pytest.approx(a.std(ddof=1) / 2)


def test_runner_resumes_from_its_log_and_redoes_jobs_whose_data_changed(bench, tmp_path, monkeypatch):
    calls = []

    def fake(job):
        calls.append(job)
        return {"scores": {"loss": float(job.seed)}, "curve": [], "seconds": 0.0}

    monkeypatch.setattr(runner_module, "_run_job", fake)
    log = str(tmp_path / "runs.jsonl")
    jobs = [Job("multi_digits", RunSpec("top_k"), s) for s in range(3)]
    first = Runner({"multi_digits": bench}, None, True, 1, 1, log).run(jobs + jobs[:1])
    assert len(calls) == 3 and [first[j]["scores"]["loss"] for j in jobs] == [0.0, 1.0, 2.0]
    resumed = Runner({"multi_digits": bench}, None, True, 1, 1, log)
    again = resumed.run(jobs)
    assert len(calls) == 3 and again == first and (resumed.reused, resumed.ran) == (3, 0)
    bench.steps += 1  # another step budget: the logged results no longer apply
    try:
        Runner({"multi_digits": bench}, None, True, 1, 1, log).run(jobs)
    finally:
        bench.steps -= 1
    assert len(calls) == 6


def test_tiny_recipe_run_writes_tables_figures_and_p_values(tmp_path, capsys):
    recipe = load_recipe("moesart_benchmarks")
    args = ["--quick", "--table", "s1", "--table", "fig3", "--workers", "1", "--output-dir", str(tmp_path)]
    result = recipe.main(args)
    assert result["resumed"] is None and "resumed" not in capsys.readouterr().out
    again = recipe.main(args)  # the same command again: every run is in the log, and it says so
    log = str(tmp_path / "moesart_benchmarks_quick.runs.jsonl")
    assert again["resumed"] == {"log": log, "reused_runs": again["resumed"]["reused_runs"], "new_runs": 0}
    out = capsys.readouterr().out
    assert f"resumed from {log}: {again['resumed']['reused_runs']} runs taken from an earlier invocation" in out
    assert "this invocation's wall time" in out
    payload = json.loads((tmp_path / "moesart_benchmarks_quick.json").read_text())
    md = (tmp_path / "moesart_benchmarks_quick.md").read_text()
    tables = payload["benchmarks"]["multi_digits"]["tables"]
    assert set(tables) == {"s1", "fig3"} and result["seeds"] == 2
    assert set(tables["s1"]["rows"]) == {"Top-k", "MOESART with (i),(ii)", "MOESART with (3)"}
    assert tables["s1"]["ttest"]["against"] in ("Top-k", "MOESART with (i),(ii)")
    assert 0.0 <= tables["s1"]["ttest"]["p_value"] <= 1.0
    assert len(tables["fig3"]["curves"]["MOESART with replacement"]) == 2
    assert (tmp_path / "moesart_benchmarks_quick_multi_digits_fig3.png").stat().st_size > 1000
    assert set(payload["benchmarks"]["multi_digits"]["search"]) == {"top_k", "moesart"}
    assert "Table S1" in md and "p = " in md and "stand-in" in md and "resumed from" in md
    for row in tables["s1"]["rows"].values():
        assert row["seeds"] == 2 and row["k_per_gate"] == 2.0


def test_two_worker_processes_give_the_in_process_results(tmp_path):
    """Also with another step budget (--steps), which the worker processes must apply as the parent does."""
    recipe = load_recipe("moesart_benchmarks")
    common = ["--quick", "--table", "fig3", "--seeds", "1", "--trials", "2", "--steps", "12"]
    one = recipe.main([*common, "--workers", "1", "--output-dir", str(tmp_path / "one")])
    two = recipe.main([*common, "--workers", "2", "--output-dir", str(tmp_path / "two")])
    rows = [r["benchmarks"]["multi_digits"]["tables"]["fig3"]["rows"] for r in (one, two)]
    assert {k: v["loss"] for k, v in rows[0].items()} == {k: v["loss"] for k, v in rows[1].items()}
    payload = json.loads((tmp_path / "two" / "moesart_benchmarks_quick_steps12.json").read_text())
    settings = payload["benchmarks"]["multi_digits"]["settings"]
    assert settings["steps"] == 12 and settings["eval_every"] == 10
    assert [
        s for s, _ in payload["benchmarks"]["multi_digits"]["tables"]["fig3"]["curves"]["MOESART with replacement"][0]
    ] == [10, 12]
    md = (tmp_path / "two" / "moesart_benchmarks_quick_steps12.md").read_text()
    assert "`python recipes/moesart_benchmarks.py --quick --table fig3" in md and "--steps 12 --workers 2" in md
    assert "12 steps of batch" in md


def test_recipe_refuses_bad_flags(tmp_path):
    recipe = load_recipe("moesart_benchmarks")
    with pytest.raises(ValueError, match="Unknown data set"):
        recipe.main(["--dataset", "nope", "--output-dir", str(tmp_path)])
    with pytest.raises(ValueError, match="Unknown table"):
        recipe.main(["--table", "s9", "--output-dir", str(tmp_path)])
    with pytest.raises(ValueError, match="trials >= 2"):
        recipe.main(["--quick", "--trials", "1", "--output-dir", str(tmp_path)])
    with pytest.raises(ValueError, match="--steps must be >= 1"):
        recipe.main(["--quick", "--steps", "0", "--output-dir", str(tmp_path)])
