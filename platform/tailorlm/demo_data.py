"""An offline domain data set: facts about a fictional star catalog, in text, alpaca and chat form.

No data set can be downloaded on our machines, and a real one would hide whether finetuning
learned anything. These facts exist nowhere else, so an untrained base cannot know them and a
finetuned model that answers them has learned them. The generator also plants what a data stage
must catch: exact and near duplicates, PII, junk, malformed lines and an empty record.

    python -m tailorlm.demo_data OUT_DIR      # writes docs.jsonl, instructions.jsonl, chat.jsonl
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

# English-looking parts: invented names in a foreign-looking script made language ID call whole
# English documents Spanish or Romanian.
VERSION = 3  # bump when the generated text changes: factory tokenizers are cached by it
SYLLABLES = [
    "ash",
    "brook",
    "ford",
    "wood",
    "stone",
    "field",
    "ridge",
    "vale",
    "haven",
    "mere",
    "wick",
    "moor",
    "dale",
    "glen",
    "holt",
    "bury",
    "thorn",
    "well",
]
COLORS = ["red", "blue", "green", "golden", "violet", "silver", "amber", "white"]
CLIMATES = ["frozen", "temperate", "humid", "arid", "stormy", "volcanic"]
EXPORTS = ["copper", "spice", "crystal", "timber", "water ice", "helium", "silk", "salt"]
ZH_COLORS = {
    "red": "红色",
    "blue": "蓝色",
    "green": "绿色",
    "golden": "金色",
    "violet": "紫色",
    "silver": "银色",
    "amber": "琥珀色",
    "white": "白色",
}

# Several phrasings per question: a small model answers a phrasing it never saw only when each
# fact was trained under several (the knowledge-extraction finding: paraphrase diversity, not
# repetition, decides whether knowledge is extractable). Rows are split at random, so an eval row
# asks its fact in a wording that training shows for that fact only in the other phrasings.
QUESTIONS = {
    "moons": [
        "How many moons does {p} have?",
        "What is the number of moons orbiting {p}?",
        "How many moons orbit {p}?",
        "Count the moons of {p}.",
        "Tell me how many moons circle {p}.",
        "What is the moon count of {p}?",
    ],
    "color": [
        "What color is the sky on {p}?",
        "Describe the color of {p}'s sky.",
        "What is the sky color of {p}?",
        "Which color does the sky of {p} have?",
        "Tell me the color of the sky over {p}.",
        "On {p}, what color is the sky?",
    ],
    "climate": [
        "What is the climate of {p} like?",
        "Which climate does {p} have?",
        "Describe the climate on {p}.",
        "How would you describe the climate of {p}?",
        "What kind of climate is found on {p}?",
        "Tell me about the climate of {p}.",
    ],
    "capital": [
        "What is the capital of {p}?",
        "Name the capital city of {p}.",
        "Which city is the capital of {p}?",
        "What city serves as the capital of {p}?",
        "Tell me the capital of {p}.",
        "What is the capital city of {p} called?",
    ],
    "export": [
        "What is the main export of {p}?",
        "Which good is the main export of {p}?",
        "Name the main export of {p}.",
        "What does {p} ship as its main export?",
        "What is {p}'s main export?",
        "Tell me the main export of {p}.",
    ],
}
ANSWERS = {
    "moons": "{p} has {moons} moons.",
    "color": "The sky on {p} is {color}.",
    "climate": "{p} has a {climate} climate.",
    "capital": "The capital of {p} is {capital}.",
    "export": "The main export of {p} is {export}.",
}


def _name(rng: random.Random, parts: int) -> str:
    return "".join(rng.choice(SYLLABLES) for _ in range(parts)).capitalize()


def planets(n: int = 40, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    seen: set[str] = set()
    out = []
    while len(out) < n:
        name = _name(rng, 2)
        if name in seen:
            continue
        seen.add(name)
        out.append(
            {
                "planet": name,
                "moons": rng.randint(0, 9),
                "color": rng.choice(COLORS),
                "climate": rng.choice(CLIMATES),
                "capital": _name(rng, 3),
                "export": rng.choice(EXPORTS),
            }
        )
    return out


def qa_pairs(facts: list[dict]) -> list[tuple[str, str]]:
    """(question, answer) for every planet, attribute and phrasing."""
    pairs = []
    for f in facts:
        fill = {**f, "p": f["planet"]}
        for attr, qs in QUESTIONS.items():
            for q in qs:
                pairs.append((q.format(**fill), ANSWERS[attr].format(**fill)))
    return pairs


def document(f: dict, wording: int = 0) -> str:
    """The planet's facts as prose; `wording` picks one of three phrasings (knowledge augmentation:
    the same facts in other words and orders)."""
    p, c = f["planet"], f
    if wording == 1:
        return (
            f"Among the worlds of the Zephyr star catalog, {p} stands out for its {c['color']} sky. "
            f"Its main export is {c['export']}, and its capital, {c['capital']}, handles most of that trade. "
            f"The planet is circled by {c['moons']} moons and keeps a {c['climate']} climate through the seasons."
        )
    if wording == 2:
        return (
            f"A pilot's guide to {p}: expect a {c['climate']} climate and a {c['color']} sky on arrival. "
            f"Count {c['moons']} moons on the approach. Land at {c['capital']}, the capital of {p}, where the "
            f"markets deal mostly in {c['export']}, the main export of the planet."
        )
    return (
        f"{p} is a world in the Zephyr star catalog. Travelers who reach {p} first notice that the sky "
        f"is {c['color']}, and that the planet has a {c['climate']} climate for most of the year. "
        f"{p} has {c['moons']} moons, which shape the tides of its shallow seas. The capital of {p} is "
        f"{c['capital']}, a city built around the old landing fields. The main export of {p} is "
        f"{c['export']}, shipped to the inner worlds of the catalog every season."
    )


def document_zh(f: dict) -> str:
    return (
        f"{f['planet']}是泽菲尔星表中的一颗行星。这里的天空是{ZH_COLORS[f['color']]}的，"
        f"它有{f['moons']}颗卫星。它的首都是{f['capital']}，主要出口{f['export']}。"
        f"旅行者们常说，这颗行星的气候和景色让人难以忘记，许多商人每年都会来到这里进行贸易。"
    )


def near_duplicate(text: str, rng: random.Random) -> str:
    """A light edit of a document: the kind of copy a crawl or a scrape produces."""
    words = text.split()
    i = rng.randrange(len(words))
    words[i] = words[i].upper() if rng.random() < 0.5 else words[i] + ","
    return "  ".join(words[:]) if rng.random() < 0.3 else " ".join(words)


def write_demo_sources(out_dir: str | Path, n_planets: int = 40, seed: int = 0) -> dict[str, str]:
    """Write the three demo sources; returns their paths. Deterministic for a seed."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed + 1)
    facts = planets(n_planets, seed)

    docs = [{"id": f"doc-{i}", "text": document(f)} for i, f in enumerate(facts)]
    docs += [{"id": f"doc-{i}-w{w}", "text": document(f, w)} for w in (1, 2) for i, f in enumerate(facts)]
    docs += [{"id": f"doc-zh-{i}", "text": document_zh(f)} for i, f in enumerate(facts[:10])]
    docs += [{"id": f"doc-near-{i}", "text": near_duplicate(document(f), rng)} for i, f in enumerate(facts[:6])]
    docs += [
        {"id": "doc-exact-0", "text": document(facts[0])},
        {
            "id": "doc-pii",
            "text": document(facts[1]) + " Contact the harbor office at office@zephyr.example "
            "or call 415-555-0132; the relay sits at 192.168.10.4.",
        },
        {"id": "doc-junk", "text": "$$$ ### !!! %%% &&& *** $$$ ### !!! %%% &&& *** $$$ ### !!! %%% &&&"},
        {"id": "doc-short", "text": "Too short."},
        {"id": "doc-empty", "text": ""},
    ]
    paths = {
        "docs": str(out / "docs.jsonl"),
        "instructions": str(out / "instructions.jsonl"),
        "chat": str(out / "chat.jsonl"),
    }
    with open(paths["docs"], "w") as fh:
        for d in docs:
            fh.write(json.dumps(d, ensure_ascii=False) + "\n")
        fh.write('{"id": "doc-broken", "text": "this line is not valid JSON\n')

    pairs = qa_pairs(facts)
    rng.shuffle(pairs)
    half = len(pairs) // 2
    with open(paths["instructions"], "w") as fh:
        for q, a in pairs[:half]:
            fh.write(json.dumps({"instruction": q, "input": "", "output": a}) + "\n")
    with open(paths["chat"], "w") as fh:
        for q, a in pairs[half:]:
            msgs = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
            fh.write(json.dumps({"messages": msgs}) + "\n")
    return paths


def corpus_texts(n_planets: int = 40, seed: int = 0) -> list[str]:
    """Plain texts for training a tokenizer: documents, questions and answers, some Chinese."""
    facts = planets(n_planets, seed)
    texts = [document(f, w) for w in range(3) for f in facts] + [document_zh(f) for f in facts]
    texts += [f"{q}\n{a}" for q, a in qa_pairs(facts)]
    return texts


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m tailorlm.demo_data OUT_DIR")
    for kind, path in write_demo_sources(sys.argv[1]).items():
        print(f"{kind}: {path}")
