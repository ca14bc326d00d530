"""The demo's answer metric scores the fact, not the template, and its eval questions are phrasings
training never shows: the two things a claim "the finetuned model learned the domain" rests on."""

import json

import pandas as pd
from hypothesis import given, settings
from hypothesis import strategies as st

from tailorlm.config import load_config
from tailorlm.demo_data import ANSWERS, CLIMATES, COLORS, EXPORTS, QUESTIONS, planets
from tailorlm.pipeline import run_stage
from tailorlm.train.evaluate import answer_fact, answer_metrics, answer_table, fact_correct

Q, REF = "What is the capital of Daleglen?", "The capital of Daleglen is Burydalemere."


def test_fact_is_what_the_answer_adds_to_the_question():
    assert answer_fact(Q, REF) == ("burydalemere",)
    assert answer_fact("How many moons orbit Ashbury?", "Ashbury has 6 moons.") == ("6",)
    assert answer_fact("Describe the color of Ashbury's sky.", "The sky on Ashbury is blue.") == ("blue",)
    assert answer_fact("Which climate does Ashbury have?", "Ashbury has a stormy climate.") == ("stormy",)


def test_template_alone_scores_nothing():
    """The issue's finetuned answers: the template with a wrong or missing fact."""
    assert fact_correct(Q, REF, REF)
    assert fact_correct(Q, "the capital of daleglen is burydalemere", REF)  # case, punctuation
    assert not fact_correct(Q, "The capital of is blue.", REF)
    assert not fact_correct(Q, "The capital of Daleglen is Ashfordwood.", REF)
    assert not fact_correct(Q, "The sky on is blue.", REF)
    assert not fact_correct(Q, "", REF)
    assert not fact_correct(Q, "Burydalemere or Ashfordwood.", REF)  # hedging over two facts
    assert fact_correct(Q, "Q?", "What is the capital?") is None  # nothing to score


def test_fact_beyond_ascii():
    """Unicode punctuation, possessives and CJK text (no spaces between words) score the fact too."""
    assert fact_correct("火星有几颗卫星？", "火星有3颗卫星", "火星有3颗卫星。")
    assert not fact_correct("火星有几颗卫星？", "火星有4颗卫星", "火星有3颗卫星。")
    assert fact_correct(
        "What color is Ashbury\u2019s sky?", "Ashbury\u2019s sky is blue.", "The sky on Ashbury is blue."
    )
    assert fact_correct("What is X's main export?", "X's main export is glass.", "The main export of X is glass.")


def test_answer_table_fills_its_rows():
    refs = [(f"What is the capital of P{i}?", f"The capital of P{i} is C{i}.") for i in range(12)]
    base = {"samples": [{"prompt": q, "reference": r, "answer": ""} for q, r in refs]}
    tuned = {
        "samples": [{"prompt": q, "reference": r, "answer": r if i < 2 else "no"} for i, (q, r) in enumerate(refs)]
    }
    rows = answer_table(base, tuned, n=8)
    assert len(rows) == 8 and sum(r["finetuned_correct"] for r in rows) == 2
    unscorable = {"samples": [{"prompt": "Is X blue?", "reference": "X blue", "answer": "X blue"}]}
    assert answer_table(unscorable, unscorable) == []


def test_metrics_count_only_scorable_questions():
    m = answer_metrics([Q, Q, "x y?"], [REF, "The capital of Daleglen is Wick.", "x y"], [REF, REF, "x y."])
    assert m["fact_exact_match"] == 0.5 and m["fact_scored"] == 2 and m["answered"] == 3
    assert abs(m["exact_match"] - 2 / 3) < 1e-9


VALUES = {
    "moons": [str(i) for i in range(10)],
    "color": COLORS,
    "climate": CLIMATES,
    "export": EXPORTS,
    "capital": [p["capital"] for p in planets(40)],
}


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_fact_match_property(data):
    """For every demo phrasing: the reference is right, the same sentence with another value of that
    attribute is wrong, the scores do not depend on case or trailing punctuation."""
    f = data.draw(st.sampled_from(planets(40)))
    attr = data.draw(st.sampled_from(sorted(QUESTIONS)))
    q = data.draw(st.sampled_from(QUESTIONS[attr])).format(p=f["planet"])
    fill = {**f, "p": f["planet"]}
    ref = ANSWERS[attr].format(**fill)
    other = data.draw(st.sampled_from([v for v in VALUES[attr] if str(v) != str(f[attr])]))
    wrong = ANSWERS[attr].format(**{**fill, attr: other})
    assert fact_correct(q, ref, ref) is True
    assert fact_correct(q, wrong, ref) is False
    assert fact_correct(q, ref.upper().rstrip("."), ref) is True
    assert len(answer_fact(q, ref)) == (2 if f[attr] == "water ice" else 1)  # the value, nothing of the template


def test_answer_table_pairs_base_and_finetuned():
    base = {"samples": [{"prompt": Q, "reference": REF, "answer": "The sky on is blue."}]}
    tuned = {"samples": [{"prompt": Q, "reference": REF, "answer": REF}]}
    (row,) = answer_table(base, tuned)
    assert row["fact"] == "burydalemere" and row["base_correct"] is False and row["finetuned_correct"] is True
    assert row["base"] == "The sky on is blue." and row["finetuned"] == REF


def test_demo_eval_questions_are_held_out_phrasings(tmp_path):
    """The data stage's eval split of the demo: no eval question's text in any training row, yet
    every eval fact reachable from training (other phrasings of the question, or the documents)."""
    cfg = load_config("jobs/configs/tiny_cpu.yaml", [f"run.storage={tmp_path}", "run.name=d"])
    run_stage(cfg, "data", echo=lambda s: None)
    kept = pd.read_parquet(tmp_path / "d" / "data" / "kept")
    train_text = "\n".join(kept[kept["split"] == "train"]["text"])
    pairs = [json.loads(m) for m in kept[(kept["split"] == "eval") & kept["messages"].notna()]["messages"]]
    scored = [(m[0]["content"], m[1]["content"]) for m in pairs if answer_fact(m[0]["content"], m[1]["content"])]
    assert len(scored) >= 60, len(scored)
    for q, ref in scored:
        assert q not in train_text, q
        fact = " ".join(answer_fact(q, ref))
        planet = next(p["planet"] for p in planets(40) if p["planet"] in q)
        rows = [t for t in kept[kept["split"] == "train"]["text"] if planet in t]
        assert any(fact in t.lower() for t in rows), (q, fact)
    # the serve stage's sample question is one of them: held out, with its reference
    from tailorlm.runs import RunDir
    from tailorlm.serving.stage import SAMPLE, sample_question

    asked, ref = sample_question(RunDir(str(tmp_path), "d"))
    assert (asked, ref) in scored
    assert sample_question(RunDir(str(tmp_path), "no-such-run")) == (SAMPLE, None)


def test_the_split_does_not_depend_on_the_run_folder(tmp_path):
    """Rows without an id of their own are split by file name and line, not by path: the demo's
    sources are written into each run folder, and two run names split them differently (found
    when the tune benchmark's eval token counts changed from run to run)."""
    splits = []
    for name in ("one", "two"):
        cfg = load_config("jobs/configs/tiny_cpu.yaml", [f"run.storage={tmp_path / name}", f"run.name={name}"])
        run_stage(cfg, "data", echo=lambda s: None)
        kept = pd.read_parquet(tmp_path / name / name / "data" / "kept")
        splits.append(sorted(zip(kept["text"], kept["split"])))
    assert splits[0] == splits[1]
