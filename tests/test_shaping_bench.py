"""The shaping benchmark's smallest preset end to end, and the schema of its results."""

import gzip
import json
import sys
from argparse import Namespace
from dataclasses import replace
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

ARGS = Namespace(teacher=None, compass=None, distill_steps=None)


def _rows(result, **match):
    return [r for r in result["rows"] if all(r.get(k) == v for k, v in match.items())]


def _check_samples(result, out, p, headline_arms):
    """Every headline arm has a small samples file whose lines decode and carry their seeds."""
    import shaping

    folder = Path(f"{out}-samples")
    files = {f["arm"]: f for f in result["samples"]["files"]}
    assert set(headline_arms) <= set(files)
    index = json.loads((folder / "index.json").read_text())
    assert [f["file"] for f in index["files"]] == [f["file"] for f in files.values()]
    for arm, f in files.items():
        path = folder / f["file"]
        assert path.stat().st_size == f["bytes"] <= shaping.SAMPLES_MAX_BYTES
        lines = [json.loads(x) for x in gzip.decompress(path.read_bytes()).splitlines()]
        row = next(r for r in result["rows"] if r["arm"] == arm)
        assert len(lines) == f["records"] == min(shaping.SAMPLES_KEPT, row["samples"])
        base = f["seeds"].get("eval", f["seeds"].get("dataset"))
        for i, line in enumerate(lines):
            assert line["i"] == i and line["seed"] == base * 2**32 + i
            assert len(line["ids"]) > 1 and isinstance(line["text"], str)


@pytest.mark.parametrize("cut_at", [0.2, 0.5])
def test_split_documents_gives_the_evaluator_a_disjoint_tail_of_every_document(tmp_path, cut_at):
    from corpora import split_documents

    src = tmp_path / "corpus"
    src.mkdir()
    docs = {
        "a.txt": "".join(f"Line {i} of the first document.\n" for i in range(40)),
        "b.txt": "one long paragraph without line breaks " * 30,
    }
    for name, text in docs.items():
        (src / name).write_text(text)
    split = split_documents(src, tmp_path / "t", tmp_path / "e", cut_at)
    assert split["documents"] == 2
    assert abs(split["evaluator_share"] - cut_at) < 0.05
    for name, text in docs.items():
        head, tail = ((tmp_path / part / name).read_text() for part in ("t", "e"))
        assert head.strip() and tail.strip()
        assert text.startswith(head.rstrip()) and text.rstrip().endswith(tail.strip())
        # one cut: together they are the document, no character in both
        assert len(head.rstrip()) + len(tail.strip()) <= len(text)
    # a rerun finds the record and rewrites nothing
    stamp = (tmp_path / "t" / "a.txt").stat().st_mtime_ns
    assert split_documents(src, tmp_path / "t", tmp_path / "e", cut_at) == split
    assert (tmp_path / "t" / "a.txt").stat().st_mtime_ns == stamp


def test_presets_keep_dataset_and_evaluation_seeds_apart(monkeypatch):
    import shaping

    from tsdfm.models.errors import ConfigError

    p = shaping.PRESETS["synthetic"]["default"]
    assert len(p.dataset_seeds) >= 2 and max(p.dataset_seeds) < shaping.EVAL_SEED_BASE
    with pytest.raises(ConfigError, match="evaluation seeds start at 1000"):
        replace(p, dataset_seeds=(0, shaping.EVAL_SEED_BASE))
    with pytest.raises(ConfigError, match=r"must hold 1\.0"):
        replace(p, frontier_temperatures=(0.9, 0.8))
    with pytest.raises(ConfigError, match="come from the preset"):
        shaping.DataArm("bad", 8, navigator={"candidates": 4})
    arm = shaping.DataArm("soft", 8, navigator={"selection": "softmax"}, group="headline")
    arms = shaping.data_arms(replace(p, extra_arms=(arm,)))
    assert arms[-1] == arm and [a.name for a in arms[:3]] == [
        "blind",
        "shaped K=8",
        "blind (teacher T=0.8)",
    ]
    # default preset: 2 dataset seeds x 2 training seeds per headline arm
    assert shaping.student_units(p, arms[1]) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    plan = shaping.seed_plan(p, arms)
    assert plan["disjoint"] and plan["dataset_seeds"] == [0, 1]
    assert plan["eval_seeds"] == [1000, 1001, 1002, 1003]  # one per student of an arm
    # the dilated-order arms: a shaped one needs the dilated blind arm (its frontier)
    names = [a.name for a in arms]
    assert "blind (dilated)" in names and names.index("blind (dilated)") < len(names) - 1
    assert {a.name: (a.order, a.compass, a.group) for a in arms if a.order == "dilated"} == {
        "blind (dilated)": ("dilated", None, "headline"),
        "shaped K=8 exact-ratio (dilated, shared, softmax)": ("dilated", "exact-ratio", "headline"),
        "shaped K=8 exact argmin (dilated, shared)": ("dilated", "exact", "control"),
        "shaped K=8 compass (dilated, shared, softmax)": (
            "dilated",
            shaping.DILATED_COMPASS,
            "headline",
        ),
    }
    soft = next(a for a in arms if "compass (dilated" in a.name).navigator
    assert soft == {
        "reveal_order": "dilated",
        "shared_reveals": True,
        "selection": "softmax",
        "temperature": 1.0,
    }
    with pytest.raises(ConfigError, match="needs the arm 'blind \\(dilated\\)'"):
        shaping.data_arms(replace(p, dilated_arms=("exact-ratio",)))
    with pytest.raises(ConfigError, match="dilated_compass_steps"):
        replace(p, dilated_compass_steps=0)
    with pytest.raises(ConfigError, match="repeat a temperature"):
        replace(p, dilated_frontier_temperatures=(1.1, 0.9))
    with pytest.raises(ConfigError, match="at most once"):
        replace(p, dilated_arms=("blind", "oracle"))
    with pytest.raises(ConfigError, match="share a file name"):
        shaping.data_arms(replace(p, extra_arms=(shaping.DataArm("shaped-K=8", 8),)))
    assert not any(
        a.order == "dilated" for a in shaping.data_arms(shaping.PRESETS["text"]["quick"])
    )
    # were the evaluation seeds to start at 1, seed 1 would be both: refused before any work
    monkeypatch.setattr(shaping, "EVAL_SEED_BASE", 1)
    with pytest.raises(SystemExit, match=r"dataset seed\(s\) \[1\] are also evaluation seeds"):
        shaping.seed_plan(p, arms)


def test_dilated_compass_command(tmp_path, monkeypatch):
    """The compass arm's setup step: one ``compass train`` in the dilated order, untempered, at
    the build's S and N, that the CLI accepts; skipped once its final checkpoint exists."""
    import shaping
    from typer.main import get_command

    from tsdfm.pipeline.cli import app

    p = shaping.PRESETS["synthetic"]["quick"]
    calls = []

    def fake_cli(args, log):
        calls.append(args)
        final = Path(args[args.index("--out") + 1]) / "final"
        final.mkdir(parents=True)
        (final / "config.json").write_text("{}")

    monkeypatch.setattr(shaping, "_cli", fake_cli)
    final = shaping.prepare_dilated_compass(tmp_path, p, "T", None, "cpu", print)
    assert final == shaping.DILATED_COMPASS.replace("{work}", str(tmp_path))
    assert final == str(tmp_path / "models" / "compass-dilated" / "final")
    (args,) = calls
    opts = dict(zip(args[2::2], args[3::2], strict=True))
    assert args[:2] == ["compass", "train"] and opts == {
        "--teacher": "T",
        "--out": str(tmp_path / "models" / "compass-dilated"),
        "--reveal-order": "dilated",
        "--student-steps": str(p.student_steps),
        "--teacher-steps": str(p.teacher_steps),
        "--negative-temperature": "1",
        "--steps": str(p.dilated_compass_steps),
    }
    # every option is one the CLI takes, with a value of its type (parsed, not run)
    train = get_command(app).commands["compass"].commands["train"]
    params = train.make_context("train", args[2:]).params
    assert params["reveal_order"] == "dilated" and params["negative_temperature"] == 1.0
    assert params["steps"] == p.dilated_compass_steps
    with pytest.raises(Exception, match="No such option: --no-such-option"):  # typer's click
        train.make_context("train", ["--out", "x", "--no-such-option", "1"])
    # a rerun finds the checkpoint and trains nothing
    assert shaping.prepare_dilated_compass(tmp_path, p, "T", None, "cpu", print) == final
    assert len(calls) == 1


@pytest.mark.slow
@pytest.mark.usefixtures("ray_cluster")
def test_ci_preset_runs_end_to_end_and_writes_the_documented_schema(tmp_path):
    import shaping

    from tsdfm.models.eval.evaluate import FrontierPoint, gen_ppl_at_entropy

    out = tmp_path / "results" / "shaping-synthetic"
    result = shaping.run("synthetic", "ci", tmp_path / "work", str(out), "cpu", ARGS)

    saved = json.loads(Path(f"{out}.json").read_text())
    assert saved["schema"] == shaping.SCHEMA and saved["preset"] == "ci"
    for key in (
        *("rows", "datasets", "targets", "device", "command", "real_data", "config", "seeds"),
        *("frontiers", "matched_entropy", "samples", "sampler"),
    ):
        assert key in saved
    p = shaping.PRESETS["synthetic"]["ci"]
    S, K, top = p.student_steps, p.candidates, max(p.teacher_eval_steps)
    students = len(p.dataset_seeds) * p.student_seeds
    arms = {r["arm"] for r in saved["rows"]}
    for steps in p.teacher_eval_steps:
        assert f"teacher, {steps} steps" in arms
    for steps in p.student_eval_steps:
        assert f"student from blind, {steps} steps" in arms
        assert f"student from shaped K={K}, {steps} steps" in arms
    assert f"student from blind (teacher T={p.control_temperature:g}), {S} steps" in arms
    assert f"student from shaped K=2, {S} steps" in arms
    assert not any("x2 data" in a or "x8 data" in a for a in arms)  # the dropped control
    oracle = f"shaped K={K} exact-ratio (dilated, shared, softmax)"
    assert p.dilated_arms == ("blind", "exact-ratio")  # the compass arm: see its own test
    for name in ("blind (dilated)", oracle):  # the dilated arms of the ci preset
        for steps in p.student_eval_steps:
            assert f"student from {name}, {steps} steps" in arms
        assert f"dataset finals, {name}" in arms

    # every row records its temperature and its sampler's reveal order; the five frontiers
    # hold every preset temperature, each in one order
    assert all(isinstance(r["temperature"], float) for r in saved["rows"])
    for r in saved["rows"]:
        dilated = "dilated" in r["arm"] or "dilated" in r.get("dataset", "")
        assert r["order"] == ("dilated" if dilated else "random"), r["arm"]
    names = [f"teacher@{S}", f"teacher@{top}", f"blind student@{S}"]
    names += [f"teacher@{S} (dilated)", f"blind (dilated) student@{S}"]
    assert [f["name"] for f in saved["frontiers"]] == names
    assert [f["order"] for f in saved["frontiers"]] == ["random"] * 3 + ["dilated"] * 2
    for f in saved["frontiers"]:
        temps = {r["temperature"] for r in _rows(saved, frontier=f["name"])}
        want = set(p.frontier_temperatures)
        if f["order"] == "dilated":  # and T > 1, for arms at or above the T = 1 entropy
            want |= set(p.dilated_frontier_temperatures)
            assert max(want) > 1.0
        assert temps == want == set(f["temperatures"])
        assert len(f["points"]["exact"]) == len(want)
        assert {r["order"] for r in _rows(saved, frontier=f["name"])} == {f["order"]}
    assert "student from blind, 4 steps, T=0.8" in arms
    assert f"teacher (dilated), {S} steps, T=0.8" in arms
    assert f"student from blind (dilated), {S} steps, T=0.8" in arms
    # the dilated order is the better sampler of the same teacher at S steps (issue 13)
    teacher_at = {
        o: _rows(saved, arm=n)[0]["gen_ppl"]["mean"]
        for o, n in (
            ("random", f"teacher, {S} steps"),
            ("dilated", f"teacher (dilated), {S} steps"),
        )
    }
    assert teacher_at["dilated"] < teacher_at["random"]

    # ± over dataset seeds x training seeds, each student sampled with its own seed
    shaped = next(r for r in saved["rows"] if r["arm"] == f"student from shaped K={K}, {S} steps")
    assert len(shaped["gen_ppl"]["per_seed"]) == students == len(shaped["seeds"])
    assert {s["dataset"] for s in shaped["seeds"]} == set(p.dataset_seeds)
    assert "2 dataset seeds" in shaped["spread"]
    for r in saved["rows"]:
        assert 1.0 < r["gen_ppl"]["mean"] < 1e6  # 1-step samples are near-random
        assert r["scores"]["exact"]["gen_ppl"] == r["gen_ppl"]
        assert set(r["distinct"]) == {"1", "2", "3", "4"}
        assert 0.0 < r["distinct"]["1"] <= 1.0

    # evaluation seeds are disjoint from every dataset seed, and the run says so
    seeds = saved["seeds"]
    assert seeds["disjoint"] and not set(seeds["eval_seeds"]) & set(seeds["dataset_seeds"])
    assert min(seeds["eval_seeds"]) >= shaping.EVAL_SEED_BASE
    used = {s["eval"] for r in saved["rows"] for s in r["seeds"] if "eval" in s}
    assert used <= set(seeds["eval_seeds"]) and not used & set(seeds["dataset_seeds"])
    assert "do not overlap" in Path(f"{out}.md").read_text()

    # the datasets' own finals are arms, scored like any sampler, one unit per dataset seed
    for name in ("blind", f"shaped K={K}", "blind (dilated)", oracle):
        finals = _rows(saved, arm=f"dataset finals, {name}")[0]
        assert finals["kind"] == "dataset finals" and finals["samples"] == p.trajectories
        assert [s["dataset"] for s in finals["seeds"]] == list(p.dataset_seeds)
        assert len(finals["scores"]["exact"]["gen_ppl"]["per_seed"]) == len(p.dataset_seeds)
    # the oracle's finals: every shaped segment scored K candidates by the exact ratio
    finals = _rows(saved, arm=f"dataset finals, {oracle}")[0]
    assert finals["compass_rows_per_sample"]["mean"] == K * S and finals["order"] == "dilated"
    assert finals["nfe"]["mean"] == K * p.teacher_steps
    assert "compass_dilated" not in result["models"] and saved["compass_dilated"] is None
    data_of = {d["name"]: d for d in saved["datasets"]}
    assert data_of[oracle]["compass"] == "exact-ratio"
    assert data_of[oracle]["navigator"]["selection"] == "softmax"
    assert data_of[oracle]["navigator"]["shared_reveals"] is True
    assert {data_of[n]["order"] for n in ("blind (dilated)", oracle)} == {"dilated"}
    assert data_of["blind"]["order"] == "random"
    # the search control rolls every candidate with the build's N/S sub-steps
    search = _rows(saved, kind="search control")[0]
    assert search["nfe"]["mean"] == K * p.teacher_steps  # τ = 0: every segment shaped
    assert search["samples"] == p.search_samples
    assert search["forwards_per_sample"]["mean"] > K * S
    assert search["compass_rows_per_sample"]["mean"] == K * S

    # matched entropy: the blind student at S lies on its own frontier
    on_own = next(
        m for m in saved["matched_entropy"] if m["arm"] == f"student from blind, {S} steps"
    )
    assert on_own["vs"][f"blind student@{S}"]["ratio"] == pytest.approx(1.0)
    own = next(
        m
        for m in saved["matched_entropy"]
        if m["arm"] == f"student from blind (dilated), {S} steps"
    )
    assert own["vs"][f"blind (dilated) student@{S}"]["ratio"] == pytest.approx(1.0)
    assert set(own["vs"]) == set(names)  # every marker is read against every frontier
    matched = [t for t in saved["targets"] if t["reading"] == "matched entropy"]
    assert {t["frontier"] for t in matched} == set(names)
    # a dilated shaped arm: ≤ 0.9 against both blind-student and teacher@S frontiers, of its
    # own order and of the random one (labelled), and the top teacher's
    mine = [t for t in matched if t["arm"] == f"student from {oracle}, {S} steps"]
    assert [t["frontier"] for t in mine] == [names[4], names[3], names[2], names[0], names[1]]
    assert [t["goal"] for t in mine[:4]] == ["≤ 0.9"] * 4
    assert [t["frontier_order"] for t in mine] == ["dilated"] * 2 + ["random"] * 3
    assert all(t["order"] == "dilated" for t in mine)
    assert sum("(random order)" in t["target"] for t in mine) == 3
    random_arm = [t for t in matched if t["arm"] == f"student from shaped K={K}, {S} steps"]
    assert [t["frontier"] for t in random_arm] == [names[2], names[0], names[1]]
    assert not any("order)" in t["target"] for t in random_arm)
    for t in matched:  # a number, or an explicit marker saying why there is none
        f = next(f for f in saved["frontiers"] if f["name"] == t["frontier"])
        pts = [
            FrontierPoint(q["temperature"], q["gen_ppl"], q["entropy_mean"])
            for q in f["points"]["exact"]
        ]
        at = gen_ppl_at_entropy(pts, t["entropy"])
        if t["measured"] is None:
            assert at is None and t["status"] == shaping.OUTSIDE and t["met"] is None
            lo, hi = t["frontier_range"]
            assert not lo <= t["entropy"] <= hi
        else:
            assert t["status"] == "matched" and isinstance(t["met"], bool)
            ppl = _rows(saved, arm=t["arm"])[0]["gen_ppl"]["mean"]
            assert t["measured"] == pytest.approx(ppl / at)
    raw = [t for t in saved["targets"] if t["reading"] == "raw, not entropy-matched"]
    assert len(raw) == 2 * 3 and all(t["goal"] is None for t in raw)  # 2 shaped headline arms
    assert {t["target"] for t in raw if t["arm"] == f"student from {oracle}, {S} steps"} == {
        f"{oracle} / blind (dilated), {S} steps (T = 1)",
        f"{oracle} / teacher (dilated), {S} steps (T = 1)",
        f"{oracle} / teacher, {top} steps (T = 1)",
    }
    assert all(t["measured"] is not None for t in raw)
    assert {t["goal"] for t in matched} >= {"≤ 0.9", "≤ 0.68 at entropy ≥ 0.98 × real"}
    assert {t["evaluator"] for t in saved["targets"]} == {"exact"}

    sizes = {(d["name"], d["dataset_seed"]): d["trajectories"] for d in saved["datasets"]}
    assert sizes[("blind", 0)] == sizes[("blind", 1)] == p.trajectories
    tempered = next(d for d in saved["datasets"] if d["group"] == "control")
    assert tempered["navigator"]["teacher_temperature"] == p.control_temperature
    shaped_data = [d for d in saved["datasets"] if d["name"] == f"shaped K={K}"]
    assert len(shaped_data) == 2 and all(d["energy_gain"] > 0 for d in shaped_data)
    assert shaped_data[0]["fingerprint"] != shaped_data[1]["fingerprint"]
    # the exact evaluator's real-data perplexity is the language's, near its true value
    assert 1.0 < saved["real_data"]["gen_ppl"] < 1e3
    assert Path(f"{out}-steps.png").stat().st_size > 1000
    assert Path(f"{out}-frontier.png").stat().st_size > 1000
    text = Path(f"{out}.md").read_text()
    assert "## Targets" in text and "## At matched entropy" in text and "± over" in text
    assert "| arm | T | order |" in text and f"/ teacher@{S} (dilated)" in text
    assert f"| teacher (dilated), {S} steps | 1 | dilated |" in text
    headline = [
        f"teacher, {S} steps",
        f"teacher, {top} steps",
        search["arm"],
        f"student from shaped K={K}, {S} steps",
        f"student from blind, {S} steps",
        "dataset finals, blind",
        f"dataset finals, shaped K={K}",
        f"teacher (dilated), {S} steps",
        f"student from blind (dilated), {S} steps",
        f"student from {oracle}, {S} steps",
        f"dataset finals, {oracle}",
    ]
    _check_samples(saved, out, p, headline)

    # rerun: everything is cached or resumed, and the numbers are identical
    again = shaping.run("synthetic", "ci", tmp_path / "work", str(out), "cpu", ARGS)
    assert again["rows"] == result["rows"]
    assert [i["seconds"] for i in again["invocations"]] == [result["seconds"], again["seconds"]]
    assert again["seconds_total"] == result["seconds"] + again["seconds"]


@pytest.mark.slow
@pytest.mark.usefixtures("ray_cluster")
def test_text_ci_preset_trains_its_models_and_scores_with_the_in_project_lm(tmp_path):
    import shaping

    out = tmp_path / "results" / "shaping-text"
    result = shaping.run("text", "ci", tmp_path / "work", str(out), "cpu", ARGS)

    work = tmp_path / "work"
    for part in ("teacher", "lm", "compass"):
        assert (work / part / "final" / "config.json").is_file(), part
    assert result["models"]["lm"] == str(work / "lm" / "final")
    # the evaluator LM trained on its own split; teacher and compass on the other
    split = result["corpus_split"]
    assert split["teacher_corpus"] == str(work / "corpus-teacher") == result["models"]["corpus"]
    assert split["evaluator_corpus"] == str(work / "corpus-evaluator")
    assert 0.15 < split["evaluator_share"] < 0.3
    lm_meta = json.loads((work / "lm" / "final" / "tsdfm_lm.json").read_text())
    assert lm_meta["corpus"]["source"] == split["evaluator_corpus"]
    teacher_cfg = json.loads((work / "teacher" / "final" / "config.json").read_text())
    assert teacher_cfg["data"]["source"] == split["teacher_corpus"]
    for name in (p.name for p in (work / "corpus-evaluator").glob("*.txt")):
        tail = (work / "corpus-evaluator" / name).read_text().strip()
        assert tail not in (work / "corpus-teacher" / name).read_text()

    assert [e["name"] for e in result["evaluators"]] == ["lm"]  # SmolLM2 is off in ci
    p = shaping.PRESETS["text"]["ci"]
    S = p.student_steps
    arms = {r["arm"] for r in result["rows"]}
    assert f"student from shaped K={p.candidates}, {S} steps" in arms
    assert f"dataset finals, shaped K={p.candidates}" in arms
    for r in result["rows"]:
        assert len(r["scores"]["lm"]["gen_ppl"]["per_seed"]) == len(r["seeds"])
        # a 30-step LM is weak but far better than uniform over the 300-token vocabulary
        assert 1.0 < r["gen_ppl"]["mean"] < 1e5
    assert {t["evaluator"] for t in result["targets"]} == {"lm"}
    below = [t for t in result["targets"] if t["goal"] == "< 1 (below the blind frontier)"]
    assert len(below) == 1 and below[0]["frontier"] == f"blind student@{S}"
    assert "gen-PPL (lm)" in Path(f"{out}.md").read_text()
    assert "Corpus split" in Path(f"{out}.md").read_text()
    _check_samples(result, out, p, [f"student from shaped K={p.candidates}, {S} steps"])

    # rerun: models are not retrained, samples and scores come from the cache
    stamp = (work / "teacher" / "final" / "model.safetensors").stat().st_mtime_ns
    again = shaping.run("text", "ci", tmp_path / "work", str(out), "cpu", ARGS)
    assert again["rows"] == result["rows"]
    assert (work / "teacher" / "final" / "model.safetensors").stat().st_mtime_ns == stamp


def _lab_run(seed, student, top=True):
    """A shaping_lab result with one arm: what lab_summary reads."""
    fronts = {"teacher 8 steps, dilated": [
        {"temperature": 1.0, "gen_ppl": 40.0, "entropy": 3.54},
        {"temperature": 0.9, "gen_ppl": 25.0, "entropy": 3.49}]}  # fmt: skip
    if top:
        fronts["teacher 1024 steps, random"] = [
            {"temperature": 1.0, "gen_ppl": 30.0, "entropy": 3.53},
            {"temperature": 0.9, "gen_ppl": 20.0, "entropy": 3.49}]  # fmt: skip
    own = [{"temperature": 1.0, "gen_ppl": student, "entropy": 3.51}]
    arm = {"arm": "token-ratio", "dataset_finals": [14.0, 3.52], "student": own}
    return {"teacher": {"identity": "sha256:t"}, "real_data": {"entropy": 3.52},
            "config": {"dataset_seed": seed}, "frontiers": fronts, "arms": [arm]}  # fmt: skip


def test_lab_summary_reads_every_seed_against_the_teacher_frontier_of_any_run():
    import lab_summary

    r = lab_summary.summarize([_lab_run(0, 18.0), _lab_run(1, 20.0, top=False)], ["a", "b"])
    s = r["summary"]["token-ratio"]
    assert s["student gen-PPL"]["mean"] == pytest.approx(19.0)
    assert s["student gen-PPL"]["std"] == pytest.approx(2**0.5)
    # the seed-1 run has no teacher@1024 frontier: it is read against the seed-0 run's
    assert s["÷ teacher@1024 T=1"]["n"] == 2
    assert s["÷ teacher@1024 T=1"]["mean"] == pytest.approx((18 / 30 + 20 / 30) / 2)
    # at entropy 3.51, halfway in log gen-PPL between 20 @ 3.49 and 30 @ 3.53
    at = (20.0 * 30.0) ** 0.5
    assert r["rows"][1]["matched"]["teacher 1024 steps, random"] == pytest.approx(20 / at)
    with pytest.raises(SystemExit, match="2 teachers"):
        other = _lab_run(1, 20.0)
        other["teacher"] = {"identity": "sha256:u"}
        lab_summary.summarize([_lab_run(0, 18.0), other], ["a", "b"])


def _text_lab_run(seed, lm, smol):
    """A text-track shaping_lab result: the blind student's frontier scored by both evaluators
    at T = 1 and 0.9, by the LM alone at T = 0.8; one tilt arm scored by both at T = 1."""

    def pt(t, e, ppl_lm, ppl_smol=None):
        by = {"lm": ppl_lm} | ({} if ppl_smol is None else {"smollm2": ppl_smol})
        return {"temperature": t, "gen_ppl": ppl_lm, "gen_ppl_by": by, "entropy": e}

    blind = [pt(1.0, 3.89, 1000.0, 1100.0), pt(0.9, 3.85, 600.0, 800.0), pt(0.8, 3.80, 400.0)]
    fronts = {"blind student 8 steps, dilated": blind}
    arm = {"arm": "tilt", "dataset_finals": [600.0, 3.89], "student": [pt(1.0, 3.87, lm, smol)]}
    return {"teacher": {"identity": "sha256:t"}, "evaluators": ["lm", "smollm2"],
            "real_data": {"entropy": 3.85}, "config": {"dataset_seed": seed},
            "frontiers": fronts, "arms": [arm]}  # fmt: skip


def test_lab_summary_reads_a_text_run_under_each_evaluator_on_the_points_it_scored(tmp_path):
    import lab_summary

    r = lab_summary.summarize([_text_lab_run(0, 700.0, 900.0), _text_lab_run(1, 760.0, 930.0)],
                              ["a", "b"])  # fmt: skip
    # at entropy 3.87, halfway in log gen-PPL between 600 @ 3.85 and 1000 @ 3.89, per evaluator
    lm_at, smol_at = (600.0 * 1000.0) ** 0.5, (800.0 * 1100.0) ** 0.5
    key = "blind student 8 steps, dilated"
    assert r["rows"][0]["matched"][key] == pytest.approx(700 / lm_at)
    assert r["rows"][0]["matched"][f"{key} [smollm2]"] == pytest.approx(900 / smol_at)
    s = r["summary"]["tilt"]
    assert s["student gen-PPL [smollm2]"]["mean"] == pytest.approx(915.0)
    assert s[f"vs {key} [smollm2]"]["mean"] == pytest.approx((900 + 930) / 2 / smol_at)
    assert s[f"vs {key}"]["n"] == 2
    # an arm point the second evaluator did not score reads as missing, not as the LM's number
    unscored = _text_lab_run(0, 700.0, None)
    r = lab_summary.summarize([unscored], ["a"])
    assert r["rows"][0]["matched"][f"{key} [smollm2]"] is None
    assert r["summary"]["tilt"][f"vs {key} [smollm2]"] == {"n": 0}
    md = lab_summary.markdown(r, "cmd")
    assert f"vs {key} [smollm2]" in md and "under evaluator e" in md


def test_lab_judge_pools_tokens_per_evaluator_and_reads_frontiers_by_evaluator():
    import shaping_lab
    import torch

    from tsdfm.models.checkpoint import bundled_path, load_checkpoint
    from tsdfm.models.data.sources import load_language

    teacher = load_checkpoint(str(bundled_path("teacher")), role="teacher")
    language = load_language(teacher.directory, teacher.config.data)
    x = language.sample(6, torch.Generator().manual_seed(3))
    exact = shaping_lab.exact_judge(language)(x)
    want = torch.exp(-language.log_likelihood(x).sum() / x.numel())
    assert exact["gen_ppl"] == pytest.approx(float(want)) == exact["gen_ppl_by"]["exact"]

    # a second evaluator counting one token per sample: gen-PPL = exp(Σ NLL / B)
    def flat(z):
        return torch.full((z.shape[0],), 2.0), torch.ones(z.shape[0])

    judge = shaping_lab.Judge({"a": flat, "b": lambda z: (torch.zeros(z.shape[0]), flat(z)[1])},
                              teacher.config.vocab_size + 1)  # fmt: skip
    point = judge(x)
    assert point["gen_ppl"] == point["gen_ppl_by"]["a"] == pytest.approx(torch.e**2)
    assert point["gen_ppl_by"]["b"] == pytest.approx(1.0)
    assert point["entropy"] == pytest.approx(exact["entropy"])
    front = [
        {"temperature": 1.0, "gen_ppl": 30.0, "gen_ppl_by": {"a": 30.0, "b": 300.0},
         "entropy": 3.5},
        {"temperature": 0.9, "gen_ppl": 20.0, "gen_ppl_by": {"a": 20.0, "b": 100.0},
         "entropy": 3.4},
    ]  # fmt: skip
    assert shaping_lab.at(front, 3.45) == pytest.approx((30 * 20) ** 0.5)
    assert shaping_lab.at(front, 3.45, "b") == pytest.approx((300 * 100) ** 0.5)
    assert shaping_lab.at(front, 3.6, "b") is None  # outside the frontier
    primary = judge(x, full=False)
    assert primary["gen_ppl_by"] == {"a": pytest.approx(torch.e**2)}
    assert shaping_lab.at([primary, point], 3.45, "b") is None  # "b" did not score them all


def test_lab_markdown_of_a_text_run_has_a_table_per_evaluator():
    import shaping_lab

    def pt(T, lm, smol, ent):
        return {"temperature": T, "gen_ppl": lm, "entropy": ent,
                "gen_ppl_by": {"lm": lm, **({"smollm2": smol} if smol else {})}}  # fmt: skip

    blind = [pt(1.0, 300.0, 1300.0, 3.89), pt(0.9, 200.0, 900.0, 3.80)]
    tilt = [pt(1.0, 150.0, 700.0, 3.85), pt(0.9, 120.0, None, 3.75)]
    row = {"arm": "tilt", "dataset_finals": [140.0, 3.86], "dataset_finals_by": {"lm": 140.0},
           "student": tilt, "vs_teacher_top_at_one": {"gen_ppl_ratio": None,
                                                      "entropy_ratio_to_real": 0.99}}  # fmt: skip
    fronts = {"blind student 8 steps, dilated": blind}
    own = {"lm": 150.0, "smollm2": 700.0}
    row["matched_by"] = {
        ev: {f: own[ev] / shaping_lab.at(p, 3.85, ev) for f, p in fronts.items()} for ev in own
    }
    row["matched"] = row["matched_by"]["lm"]
    r = {"track": "text", "evaluators": ["lm", "smollm2"], "config": {
            "trajectories": 8, "student_steps": 8, "teacher_steps": 8, "order": "dilated",
            "candidates": 8, "distill_steps": 5, "lr": 1e-3, "samples": 2, "top_steps": 0,
            "temperatures": [1.0, 0.9]},
         "teacher": {"identity": "sha256:" + "0" * 64, "spec": "t"},
         "real_data": {"gen_ppl": 40.0, "gen_ppl_by": {"lm": 40.0, "smollm2": 90.0},
                       "entropy": 3.86, "samples": 2},
         "eval_seed_base": 1000, "frontiers": fronts, "arms": [row], "seconds": 60.0,
         "device": {"cpu": "x", "threads": 2}, "versions": {"torch": "2"}}  # fmt: skip
    md = shaping_lab.markdown(r, "python benchmarks/shaping_lab.py --track text")
    assert "### Evaluator `lm`" in md and "### Evaluator `smollm2`" in md
    lm_part, smol_part = md.split("### Evaluator `smollm2`")
    assert "| tilt | 140.000 @ 3.860 | 150.000 @ 3.850 |" in lm_part
    assert "| tilt | – | 700.000 @ 3.850 |" in smol_part  # SmolLM2 left the finals out
    assert "| blind student 8 steps, dilated | 1300.000 @ 3.890 | 900.000 @ 3.800 |" in smol_part
    # lm: 150 against the blind frontier at 3.85, log-linear between 200 @ 3.80 and 300 @ 3.89
    at = 200 * (300 / 200) ** (5 / 9)
    assert (
        f"| {150 / at:.3f} |" in lm_part
        and f"| {700 / (900 * (1300 / 900) ** (5 / 9)):.3f} |" in smol_part
    )


def test_lab_refuses_exact_arms_on_the_text_track(monkeypatch, capsys):
    import shaping_lab

    # the text track stops before any model is made when an arm needs the exact likelihood
    monkeypatch.setattr(sys, "argv", ["shaping_lab.py", "--track", "text", "--arms", "ratio"])
    with pytest.raises(SystemExit, match="exact likelihood"):
        shaping_lab.main()
