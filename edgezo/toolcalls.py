"""Tool calls: a built-in generative task. Map a phone user's request to one call of a small assistant API,
answered as one compact JSON object, e.g.

    "Hey, wake me up at half past seven in the morning"  ->  {"name": "set_alarm", "arguments": {"time": "07:30"}}

The data is synthetic: every request is assembled here from phrasing templates and small vocabularies (numpy and
the standard library only, nothing downloaded), so it is exactly reproducible from a seed. Argument values take
canonical forms the model has to learn from the data (times "HH:MM" on a 24-hour clock, durations in whole
minutes, lowercase day names, "NYC" -> "New York"), not forms it could copy from the request.

Records are chat records, {"messages": [system, user, assistant, ...], "unseen_template": bool}; a quarter of
each split is two-turn (a second request and call follow the first), so the task is also a small multi-turn chat
dataset. make_splits' default sizes: train 2000, valid 200, test 400 records.

Split rule: each function has seven phrasing templates, two of them held out. Train and valid use only the five
seen templates; half of test is phrased by seen templates, half by held-out ones only (unseen_template true).
Argument values come from the same vocabularies in every split, so the unseen half measures generalisation to new
phrasings, not to new values. No record (its full messages) occurs twice, within a split or across splits.

score_call compares a generated call with the reference field by field; call_reward grades it in [0, 1] for
training on the reward instead of the token loss.
"""

from __future__ import annotations

import functools
import json
import re
import string
from dataclasses import dataclass

import numpy as np

NAME = "tool-calls"
# The cached files (edgezo.store) are rewritten when this changes: bump it with any change to the generated records
# (tests/test_toolcalls.py pins their sha256 per version).
VERSION = 1
TWO_TURN_FRACTION = 0.25
# Rejection sampling keeps records unique. The tables make ~180,000 distinct one-turn requests from seen templates
# (the fewest, 2,400, for call_contact) and ~72,000 from held-out ones, so a long run of repeats means the asked
# sizes exceed what they can make.
MAX_DRAWS_PER_RECORD = 1000


@dataclass(frozen=True)
class Function:
    name: str
    arguments: tuple[str, ...]  # declared order: the order of the completion's "arguments" object


FUNCTIONS = (
    Function("set_alarm", ("time",)),
    Function("set_timer", ("minutes",)),
    Function("send_message", ("contact", "text")),
    Function("get_weather", ("city", "day")),
    Function("play_music", ("query",)),
    Function("call_contact", ("contact",)),
    Function("add_reminder", ("task", "day")),
)
FUNCTION_BY_NAME = {f.name: f for f in FUNCTIONS}

# One line, carried by every example: ~50 tokens. The JSON shape itself is learnt from the completions.
SYSTEM_PROMPT = ("Tools: " + ", ".join(f"{f.name}({', '.join(f.arguments)})" for f in FUNCTIONS)
                 + ". Answer with one JSON call only.")


@dataclass(frozen=True)
class Template:
    function: str
    pattern: str  # phrasing with one {argument} slot per argument; capitalised when used
    held_out: bool  # True: used in the test split only


# Per function: (seen phrasings, held-out phrasings). No terminal punctuation: requests read like speech
# transcripts, and the polite suffixes below attach to any of them.
_PHRASINGS = {
    "set_alarm": (("set an alarm for {time}", "wake me up at {time}", "alarm at {time}",
                   "set my alarm clock to {time}", "can you get me up at {time}"),
                  ("make sure I'm up by {time}", "my alarm should go off at {time}")),
    "set_timer": (("set a timer for {minutes}", "start a timer for {minutes}", "count down {minutes}",
                   "time {minutes} for me", "let me know in {minutes}"),
                  ("ping me after {minutes}", "give me {minutes} on the clock")),
    "send_message": (("send a message to {contact} saying {text}", "text {contact}: {text}",
                      "tell {contact} {text}", "send {contact} a text: {text}", "write to {contact}: {text}"),
                     ("let {contact} know: {text}", "shoot {contact} a message that says {text}")),
    "get_weather": (("what's the weather in {city} {day}", "weather for {city} {day}",
                     "will it rain in {city} {day}", "how hot will it be in {city} {day}",
                     "give me the forecast for {city} {day}"),
                    ("do I need an umbrella in {city} {day}", "{day}, how's the weather looking in {city}")),
    "play_music": (("play {query}", "put on {query}", "start playing {query}", "queue up {query}",
                    "can you play {query}"),
                   ("I'm in the mood for {query}", "throw on {query}")),
    "call_contact": (("call {contact}", "phone {contact}", "give {contact} a call", "dial {contact}",
                      "ring {contact}"),
                     ("get {contact} on the phone", "start a call with {contact}")),
    "add_reminder": (("remind me to {task} {day}", "add a reminder to {task} {day}", "{day}, remind me to {task}",
                      "set a reminder {day} to {task}", "don't let me forget to {task} {day}"),
                     ("I need to {task} {day}, remind me", "make a note to {task} {day}")),
}
TEMPLATES = tuple(Template(function, pattern, held_out)
                  for function, (seen, held) in _PHRASINGS.items()
                  for held_out, patterns in ((False, seen), (True, held))
                  for pattern in patterns)

# Wrappers around every template: they multiply the distinct requests (so records stay unique) without
# changing the phrasing a template stands for. The canonical arguments never include them.
PREFIXES = ("", "hey, ", "okay, ", "hi, ")
SUFFIXES = ("", " please", ", thanks")


# --- argument vocabularies: canonical value -> the surface forms a request may use for it ---------------------

_HOUR_WORDS = ("twelve", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven")
ALARM_HOURS = range(5, 24)  # no alarms between midnight and 5 am: "twelve at night" would be ambiguous
ALARM_MINUTES = (0, 5, 10, 15, 20, 30, 40, 45, 50)


def _period(hour: int) -> str:
    if hour < 12:
        return "in the morning"
    return "in the afternoon" if hour < 18 else "in the evening" if hour < 22 else "at night"


def _time_surfaces(hour: int, minute: int) -> tuple[str, ...]:
    """Ways to say hour:minute (24 h clock): 12-hour digits, 24-hour digits, and words at the quarter hours."""
    h12, am_pm, word = hour % 12 or 12, "am" if hour < 12 else "pm", _HOUR_WORDS[hour % 12]
    forms = [f"{h12}:{minute:02d} {am_pm}", f"{hour:02d}:{minute:02d}"]
    if minute == 0:
        forms += [f"{h12} {am_pm}", f"{word} o'clock {_period(hour)}"]
    elif minute == 15:
        forms.append(f"a quarter past {word} {_period(hour)}")
    elif minute == 30:
        forms.append(f"half past {word} {_period(hour)}")
    elif minute == 45:  # the period of the hour named: 17:45 is "a quarter to six in the evening"; 11:45 is morning
        forms.append(f"a quarter to {_HOUR_WORDS[(hour + 1) % 12]} {_period(hour if hour == 11 else hour + 1)}")
    if (hour, minute) == (12, 0):
        forms += ["noon", "midday"]
    return tuple(forms)


TIMES = {f"{h:02d}:{m:02d}": _time_surfaces(h, m) for h in ALARM_HOURS for m in ALARM_MINUTES}

MINUTES = {
    1: ("1 minute", "one minute", "a minute"),
    2: ("2 minutes", "two minutes", "a couple of minutes"),
    3: ("3 minutes", "three minutes"),
    5: ("5 minutes", "five minutes"),
    8: ("8 minutes", "eight minutes"),
    10: ("10 minutes", "ten minutes"),
    12: ("12 minutes", "twelve minutes"),
    15: ("15 minutes", "fifteen minutes", "a quarter of an hour"),
    20: ("20 minutes", "twenty minutes"),
    25: ("25 minutes", "twenty-five minutes"),
    30: ("30 minutes", "thirty minutes", "half an hour"),
    40: ("40 minutes", "forty minutes"),
    45: ("45 minutes", "forty-five minutes", "three quarters of an hour"),
    60: ("60 minutes", "an hour", "one hour"),
    90: ("90 minutes", "an hour and a half", "one and a half hours"),
    120: ("120 minutes", "two hours", "2 hours"),
}

_WEEKDAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
DAYS = {"today": ("today", "later today"), "tomorrow": ("tomorrow", "tomorrow morning"),
        **{d: (f"on {d.title()}", f"this {d.title()}") for d in _WEEKDAYS}}


def _as_is(*values: str, **variants: tuple[str, ...]) -> dict[str, tuple[str, ...]]:
    """A vocabulary whose values are said as written, plus `variants`: canonical -> extra surface forms."""
    table = {v: (v,) for v in values}
    for canonical, extra in variants.items():
        table[canonical.replace("_", " ")] = (canonical.replace("_", " "), *extra)
    return table


CONTACTS = {
    **_as_is("Grandma", "Anna", "Ben", "Carlos", "Dana", "Elif", "Fatima", "George", "Hana", "Ivan", "Julia",
             "Kenji", "Lena", "Marco", "Nadia", "Omar", "Priya", "Quinn", "Rosa", "Sam", "Tariq", "Uma", "Victor",
             "Wei", "Ximena", "Yusuf", "Zoe", "Sofia", "Lucas", "Amara", "Aunt Maria", "Uncle Joe", "Coach Rivera",
             Mom=("my mom", "Mum"), Dad=("my dad",)),
    "Dr. Patel": ("Dr. Patel", "Doctor Patel"),
}
CITIES = _as_is("Paris", "London", "Berlin", "Madrid", "Rome", "Lisbon", "Dublin", "Oslo", "Vienna", "Prague",
                "Warsaw", "Athens", "Istanbul", "Cairo", "Nairobi", "Lagos", "Mumbai", "Delhi", "Bangkok", "Singapore",
                "Tokyo", "Seoul", "Beijing", "Sydney", "Auckland", "Toronto", "Chicago", "Boston", "Mexico City",
                "Lima", "Buenos Aires",
                New_York=("NYC", "New York City"), Los_Angeles=("LA",), San_Francisco=("SF",),
                Rio_de_Janeiro=("Rio",))
QUERIES = _as_is("Bohemian Rhapsody", "the Beatles", "jazz for studying", "lo-fi beats", "Taylor Swift",
                 "classical piano", "Daft Punk", "Hotel California", "workout mix", "Billie Eilish", "Miles Davis",
                 "Beethoven's fifth", "rainy day songs", "Bad Bunny", "Fleetwood Mac", "Dancing Queen",
                 "the Rolling Stones", "summer hits", "Bob Marley", "Adele", "Nina Simone", "road trip songs",
                 "Kendrick Lamar", "Clair de Lune", "BTS", "Queen", "focus music", "Radiohead",
                 jazz=("some jazz",), reggae=("some reggae",), country=("some country music",))
TEXTS = _as_is("I'm running late", "see you at dinner", "on my way", "call me when you land", "happy birthday",
               "don't forget the keys", "can you pick up the kids", "dinner is ready", "I'll be home by six",
               "good luck today", "thanks for the gift", "love you", "where are you", "the train is delayed",
               "let's meet at the station", "I left my charger at yours", "bring an umbrella", "the package arrived",
               "I'm outside", "call me back", "save me a seat", "the meeting moved to Monday", "we're out of milk",
               "can we talk later", "I got the job", "the door is unlocked", "feed the dog", "lunch is on me",
               "I'm at the gym", "see you tomorrow")
TASKS = _as_is("buy milk", "call the dentist", "water the plants", "pay the rent", "take out the trash",
               "book a haircut", "renew my passport", "pick up the dry cleaning", "feed the cat", "charge my phone",
               "send the report", "return the library books", "book the flights", "clean the fridge",
               "buy a birthday card", "check the tyres", "pay the electricity bill", "email the landlord",
               "pick up the parcel", "bake a cake", "call the bank", "cancel the gym membership", "wash the car",
               "defrost the chicken", "pack for the trip", "refill the prescription", "walk the dog",
               "fix the bike", "buy stamps", "back up my laptop")

# Argument name -> vocabulary. Each surface form belongs to one canonical value (tested), so a request has one
# correct call.
SLOTS: dict[str, dict] = {"time": TIMES, "minutes": MINUTES, "contact": CONTACTS, "text": TEXTS, "city": CITIES,
                          "day": DAYS, "query": QUERIES, "task": TASKS}


# --- records --------------------------------------------------------------------------------------------------

def format_call(name: str, arguments: dict) -> str:
    """The canonical completion: compact JSON, arguments in the order given (the function's declared order)."""
    return json.dumps({"name": name, "arguments": arguments}, separators=(", ", ": "))


@dataclass(frozen=True)
class Turn:
    template: Template
    request: str
    call: str  # format_call(...) of the canonical arguments


def _pick(rng: np.random.Generator, options):
    options = list(options)
    return options[int(rng.integers(len(options)))]


def _capitalise(text: str) -> str:
    return text[:1].upper() + text[1:]


def draw_turn(rng: np.random.Generator, held_out: bool) -> Turn:
    """One request and its call: a random function, one of its seen (or held-out) templates, random values."""
    function = _pick(rng, FUNCTIONS)
    template = _pick(rng, [t for t in TEMPLATES if t.function == function.name and t.held_out == held_out])
    arguments, surfaces = {}, {}
    for argument in function.arguments:
        canonical = _pick(rng, SLOTS[argument])
        arguments[argument] = canonical
        surfaces[argument] = _pick(rng, SLOTS[argument][canonical])
    request = _capitalise(_pick(rng, PREFIXES) + template.pattern.format(**surfaces) + _pick(rng, SUFFIXES))
    return Turn(template, request, format_call(function.name, arguments))


def to_record(turns: list[Turn]) -> dict:
    messages = [{"role": "system", "content": SYSTEM_PROMPT}]
    for turn in turns:
        messages += [{"role": "user", "content": turn.request}, {"role": "assistant", "content": turn.call}]
    return {"messages": messages, "unseen_template": any(t.template.held_out for t in turns)}


def _record_kinds(n_records: int, n_unseen: int) -> list[tuple[bool, int]]:
    """(unseen, n_turns) of each record: exactly TWO_TURN_FRACTION two-turn records among seen and unseen alike."""
    kinds = []
    for unseen, n in ((False, n_records - n_unseen), (True, n_unseen)):
        n_two = round(n * TWO_TURN_FRACTION)
        kinds += [(unseen, 2)] * n_two + [(unseen, 1)] * (n - n_two)
    return kinds


def _draw_split(rng: np.random.Generator, n_records: int, n_unseen: int, taken: set[str]) -> list[dict]:
    """n_records records, n_unseen of them phrased by held-out templates only, none whose messages are in `taken`
    (which gains the new ones)."""
    kinds = _record_kinds(n_records, n_unseen)
    records = []
    for i in rng.permutation(len(kinds)):
        unseen, n_turns = kinds[i]
        for _ in range(MAX_DRAWS_PER_RECORD):
            record = to_record([draw_turn(rng, held_out=unseen) for _ in range(n_turns)])
            key = json.dumps(record["messages"])
            if key not in taken:
                taken.add(key)
                records.append(record)
                break
        else:
            raise ValueError(f"{MAX_DRAWS_PER_RECORD} draws in a row repeated earlier records: the {NAME} vocabularies "
                             f"cannot make this many distinct records")
    return records


def make_splits(seed: int = 0, n_train: int = 2000, n_valid: int = 200, n_test: int = 400) -> dict[str, list[dict]]:
    """{"train", "valid", "test"} record lists, a pure function of the arguments (one generator per split, spawned
    from `seed`). Train and valid use seen templates only; n_test // 2 test records use held-out templates only."""
    train_rng, valid_rng, test_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(3))
    taken: set[str] = set()  # shared, so no record occurs in two splits
    return {"train": _draw_split(train_rng, n_train, 0, taken),
            "valid": _draw_split(valid_rng, n_valid, 0, taken),
            "test": _draw_split(test_rng, n_test, n_test // 2, taken)}


# --- reading a request back (for tests and analysis) -----------------------------------------------------------

@functools.cache
def _template_regexes() -> tuple[tuple[Template, re.Pattern], ...]:
    """Each template as a regex over whole requests: wrappers, the literal phrasing, and for each slot the
    alternation of its vocabulary's surface forms (longest first)."""
    def alternation(options) -> str:
        return "|".join(re.escape(o) for o in sorted(options, key=len, reverse=True))

    compiled = []
    for template in TEMPLATES:
        body = ""
        for literal, slot, _, _ in string.Formatter().parse(template.pattern):
            body += re.escape(literal)
            if slot is not None:
                surfaces = [s for forms in SLOTS[slot].values() for s in forms]
                body += f"(?P<{slot}>{alternation(surfaces)})"
        regex = f"(?:{alternation(PREFIXES)}){body}(?:{alternation(SUFFIXES)})"
        compiled.append((template, re.compile(regex)))
    return tuple(compiled)


@functools.cache
def _canonical_of(slot: str) -> dict[str, object]:
    return {surface: canonical for canonical, forms in SLOTS[slot].items() for surface in forms}


def parse_request(request: str) -> tuple[Template, dict]:
    """The template and canonical arguments (declared order) behind a request this module made.
    ValueError when no template, or more than one, fits."""
    found = {}
    for text in {request, request[:1].lower() + request[1:]}:  # undo _capitalise (some templates start with "I")
        for template, regex in _template_regexes():
            match = regex.fullmatch(text)
            if match:
                names = FUNCTION_BY_NAME[template.function].arguments
                found[template] = {a: _canonical_of(a)[match.group(a)] for a in names}
    if len(found) != 1:
        raise ValueError(f"{len(found)} templates fit {request!r}")
    return next(iter(found.items()))


# --- scoring ------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class CallScore:
    valid_json: bool  # a JSON object with a str "name" and an object "arguments"
    name_correct: bool
    argument_accuracy: float  # matching values / len(union of generated and reference argument names)
    exact_match: bool  # identical text after stripping surrounding whitespace


def _parse_call(text: str) -> dict | None:
    try:
        call = json.loads(text)
    except json.JSONDecodeError:
        return None
    ok = isinstance(call, dict) and isinstance(call.get("name"), str) and isinstance(call.get("arguments"), dict)
    return call if ok else None


def _same_value(a, b) -> bool:
    # Type-strict: the API takes minutes as an int, so "15" is wrong; and Python's True == 1 must not count.
    return type(a) is type(b) and a == b


def score_call(generated: str, reference: str) -> CallScore:
    """Field-by-field comparison of a generated call with the reference (a format_call string)."""
    ref = _parse_call(reference)
    if ref is None:
        raise ValueError(f"reference is not a call: {reference!r}")
    exact = generated.strip() == reference.strip()
    gen = _parse_call(generated)
    if gen is None:
        return CallScore(False, False, 0.0, exact)
    if gen["name"] != ref["name"]:
        return CallScore(True, False, 0.0, exact)
    keys = gen["arguments"].keys() | ref["arguments"].keys()  # an extra argument counts against, like a missing one
    matching = sum(k in gen["arguments"] and _same_value(gen["arguments"][k], v) for k, v in ref["arguments"].items())
    return CallScore(True, True, matching / len(keys) if keys else 1.0, exact)


def call_reward(generated: str, reference: str) -> float:
    """A graded reward in [0, 1]: 1 on exact match, else 0.2 valid JSON + 0.3 right name + 0.5 argument accuracy.

    Graded because MeZO's gradient estimate is the difference of the objective between two perturbations: with an
    all-or-nothing reward, a batch of 16 mostly scores the same on both sides, the difference and so the projected
    gradient are zero, and the step is wasted. Partial credit makes small improvements visible."""
    score = score_call(generated, reference)
    if score.exact_match:  # the formula gives 1.0 as well; said outright so the maximum does not hang on the weights
        return 1.0
    return 0.2 * score.valid_json + 0.3 * score.name_correct + 0.5 * score.argument_accuracy
