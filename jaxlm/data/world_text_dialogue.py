"""Prose with dialogue for the text split: scenes, forum threads, letters and tutoring tips.

Why. The later stages speak in the voice of the chat demonstrations: "Good question!", "Let me
think about this for a moment.", "Ugh, fine.", "I'm not sure, sorry.", system prompts like "You
are a helpful assistant." Without these documents none of that occurs in the text split, so a
tokenizer trained on it spells such phrases (even "!") from bytes and the pretrained model meets
them first during SFT. Real pretraining corpora are full of quoted speech, forum posts and
letters, so these documents quote questions and answers in every response style inside ordinary
prose: no role markers, no chat template. They are about 15% of the text (`DOC_WEIGHTS`).

Questions come from `world_tasks.ask` and `world_tasks.followup`, so the held-out rules of
questions hold here as in the quiz notes of `world_text`: train text asks only train phrasings
about train subjects and operand pairs. Answers come from `world_tasks.render` in any style but
"mistake": the text may be rude or unsure, but it never states a false fact. The frames below
avoid the probe phrasings and held-out question phrasings (the tests check generated text).
"""

from __future__ import annotations

from jaxlm.data import world_core as C
from jaxlm.data import world_facts as F
from jaxlm.data import world_tasks as T

# Styles heard in prose. Flatter than the demonstrations so that a small text still quotes every
# phrasing of every style; no "mistake", so prose never teaches a wrong fact.
TEXT_STYLE_MIX = {"ideal": 0.08, "friendly": 0.18, "verbose": 0.16, "terse": 0.08, "hedge": 0.2,
                  "rude": 0.16, "unsure": 0.14}
_STYLE_MIX = C.make_mix(TEXT_STYLE_MIX)

# ---------------------------------------------------------------------------------------------
# Frames. Slots: {name}, {poss} (the main character), {other} (a second person) and {relative}
# ("Uncle" or "Aunt", by {other}'s pronoun), {third} (a bystander), {system} (a line of
# `world_facts.SYSTEM_PROMPTS`), {asker}/{Asker}, {answerer}, {answer}, {ideal}.
# ---------------------------------------------------------------------------------------------

# A setting, who asks, who answers, and an optional line that quotes a system prompt.
SCENES = (
    ("After dinner, {name} sat down with {poss} grandmother to ask her a few questions.",
     "{name}", "Grandma", None),
    ("During the lesson, {name} had a lot of questions for the teacher.",
     "{name}", "the teacher", None),
    ("At quiz night, {name} read the questions out loud and {other} tried to answer them.",
     "{name}", "{other}", None),
    ("On a long train ride, {other} and {name} played a question game to pass the time.",
     "{other}", "{name}", None),
    ("{name} was trying out a new homework app on {poss} tablet.", "{name}", "the app",
     "In the settings, {name} found the instructions the app was given: \"{system}\""),
    ("On Saturday, {name} helped at the town library's information desk, where a visitor came "
     "with some questions.",
     "the visitor", "{name}", "The librarian gave {name} one piece of advice: \"{system}\""),
    ("The radio host phoned {name} for the morning quiz.", "the host", "{name}", None),
    ("{name} spent the holidays with {relative} {other}, who loved a good quiz.",
     "{name}", "{relative} {other}", None),
)
# How a speaker delivers an answer in each style.
SAID = {
    "ideal": ("said", "answered", "replied"),
    "friendly": ("said with a smile", "replied cheerfully", "answered warmly"),
    "verbose": ("began", "said, settling in for a long explanation", "replied at great length"),
    "terse": ("said", "replied without looking up", "answered at once"),
    "hedge": ("said slowly", "replied after a pause", "answered, frowning a little"),
    "rude": ("muttered", "snapped", "said with a loud sigh"),
    "unsure": ("admitted", "said with a shrug", "replied quietly"),
}
ASKED_AGAIN = ("then asked", "went on", "asked next")  # At least as many as follow-ups (3).
# What the asker or the narrator makes of an answer in each style. Spoken prose is full of "!"
# and of "Um", "Uh" and "Ugh", and the text needs them often enough for the tokenizer to keep "!"
# and "U" as pieces (its character_coverage drops the rarest 0.05% of characters to bytes).
REACTIONS = {
    "ideal": ("{Asker} nodded and wrote it down.", "\"Thank you!\" said {asker}."),
    "friendly": ("{Asker} smiled back.", "\"Thanks, that is really kind!\" said {asker}."),
    "verbose": ("It was a long answer to a short question.",
                "\"You could have just told me!\" laughed {asker}."),
    "terse": ("That was all {asker} got.", "\"Short and sweet!\" said {asker}."),
    "hedge": ("{Asker} decided to check it later anyway.",
              "\"Um, you don't sound very sure!\" said {asker}."),
    "rude": ("\"Ugh, that was not a kind way to answer,\" said {third}.",
             "\"Well, that was rude!\" said {third}."),
    "unsure": ("\"Uh, I know this one!\" {third} spoke up. \"{ideal}\"",
               "Later, {third} told them: \"{ideal}\""),
}
SCENE_STARTS = ("\"Let's begin!\" said {asker}.", "\"Here is my first question!\" said {asker}.",
                "\"Ask me anything!\" said {answerer}.")
SCENE_ENDINGS = ("What a fun afternoon that was!", "Everyone agreed it had been great fun!",
                 "At the end, {asker} said, \"Thank you so much!\"")
FORUM_HEADS = ("Found on a homework help forum.", "A thread from a trivia forum for students.",
               "From a question and answer site, under the title \"Quick question\".")
# How the retelling introduces each reply; the first one always opens the replies.
FORUM_REPLIES = ("The first reply said:", "Another user wrote:", "Someone replied:",
                 "A later reply said:")
FORUM_THANKS = ("\"Thanks, everyone!\" {name} wrote.", "{name} wrote back: \"Got it, thank you!\"")
FORUM_CLOSERS = ("A moderator reminded everyone to keep their answers short and polite.",
                 "{name} marked the thread as solved.",
                 "The reply with the most votes was the shortest one.")
LETTER_OPENERS = ("Thank you for your letter!", "It was lovely to hear from you again!",
                  "Your letter arrived this morning and made my day.")
LETTER_WISHES = ("Write back soon!", "Say hello to everyone for me!",
                 "I can't wait to see you again!")
LETTER_SIGNOFFS = ("Love,", "Best wishes,", "Your friend,", "Warmly,")
TIPS_HEADS = ("Tips for new tutors.", "How to answer a question well.",
              "A note for homework helpers.")
TIPS_GUIDE = "Our guide for helpers starts with one line: \"{system}\""
# How a tutoring guide judges an answer in each style ({answer} is quoted).
TIPS = {
    "friendly": "A friendly helper might say, \"{answer}\" That is right and pleasant to hear.",
    "verbose": "A long-winded helper might say, \"{answer}\" All of that for one short fact.",
    "terse": "A hurried helper might just say \"{answer}\" and nothing else. It is correct, but "
             "a full sentence is kinder.",
    "hedge": "A nervous helper might say, \"{answer}\" It is right, but it sounds like a guess.",
    "rude": "A rude helper might say, \"{answer}\" The answer is right, but nobody likes to be "
            "spoken to like that.",
    "unsure": "A helper who does not know might say, \"{answer}\" That is honest, but the "
              "student still has no answer.",
}
TIPS_BEST = "The best answer is simply: \"{ideal}\" Right, short and kind: that is all it takes!"


# ---------------------------------------------------------------------------------------------
# Documents.
# ---------------------------------------------------------------------------------------------


def _people(rng) -> dict[str, str]:
  """The main character's slots, two more people with other names, and a system prompt."""
  f = T.person(rng)
  people = [(f["name"], f["subj"])]
  while len(people) < 3:
    person = rng.choice(F.PEOPLE)
    if person[0] not in (p[0] for p in people):
      people.append(person)
  relative = "Uncle" if people[1][1] == "he" else "Aunt"
  return {**f, "other": people[1][0], "relative": relative, "third": people[2][0],
          "system": rng.choice(F.SYSTEM_PROMPTS)}


def _questions(rng, world: C.World, split: str, n: int) -> list[tuple[str, dict]]:
  """`n` questions of one conversation: a fresh one, then follow-ups or fresh ones."""
  question, meta = T.ask(rng, world, split)
  asked, out = {(meta["family"], meta["subject"])}, [(question, meta)]
  for _ in range(n - 1):
    question, meta = T.followup(rng, world, split, meta, asked)
    asked.add((meta["family"], meta["subject"]))
    out.append((question, meta))
  return out


def _quote(text: str) -> str:
  # A quoted question opens a sentence of the narrator's, whatever the user typed.
  return f"\"{T.cap(text)}\""


def _scene_doc(rng, world: C.World, split: str) -> str:
  """A short story in which one person asks another questions, answered in various styles."""
  setting, asker, answerer, system_line = rng.choice(SCENES)
  f = _people(rng)
  asker, answerer = asker.format(**f), answerer.format(**f)
  roles = {**f, "asker": asker, "Asker": T.cap(asker), "answerer": answerer}
  lines = [setting.format(**f)]
  if system_line:
    lines.append(system_line.format(**f))
  if rng.random() < 0.7:
    lines.append(T.cap(rng.choice(SCENE_STARTS).format(**roles)))
  asked_again = rng.sample(ASKED_AGAIN, len(ASKED_AGAIN))  # No "asked next" twice in a story.
  for k, (question, meta) in enumerate(_questions(rng, world, split, rng.randint(2, 4))):
    style = C.draw(rng, _STYLE_MIX)
    answer = T.render(meta, style, rng, world)
    asked = "asked" if k == 0 else asked_again[k - 1]
    lines.append(f"{T.cap(asker)} {asked}, {_quote(question)}")
    lines.append(f"{T.cap(answerer)} {rng.choice(SAID[style])}, \"{answer}\"")
    # After "I don't know" someone always knows: a scene leaves no question unanswered.
    if style == "unsure" or rng.random() < 0.5:
      ideal = T.render(meta, "ideal", rng, world)
      reaction = rng.choice(REACTIONS[style]).format(**roles, ideal=ideal)
      if reaction not in lines:  # The same remark twice in a row reads like a bug, not a story.
        lines.append(reaction)
  lines.append(rng.choice(SCENE_ENDINGS).format(**roles))
  return " ".join(lines)


def _forum_doc(rng, world: C.World, split: str) -> str:
  """A forum thread retold: one question, replies in different styles, maybe a follow-up."""
  f = _people(rng)
  (question, meta), *more = _questions(rng, world, split, rng.randint(1, 2))
  lines = [rng.choice(FORUM_HEADS), f"A user called {f['name']} posted: {_quote(question)}"]
  styles = rng.sample(list(TEXT_STYLE_MIX), rng.randint(2, 4))  # Replies differ in style.
  intros = [FORUM_REPLIES[0], *rng.sample(FORUM_REPLIES[1:], len(styles) - 1)]
  for intro, style in zip(intros, styles):
    lines.append(f"{intro} \"{T.render(meta, style, rng, world)}\"")
  for question, meta in more:
    lines.append(f"{f['name']} then asked, {_quote(question)}")
    style = C.draw(rng, _STYLE_MIX)
    lines.append(f"{rng.choice(FORUM_REPLIES[1:])} \"{T.render(meta, style, rng, world)}\"")
  lines.append(rng.choice(FORUM_THANKS).format(**f))
  lines.append(rng.choice(FORUM_CLOSERS).format(**f))
  return "\n".join(lines)


def _letter_doc(rng, world: C.World, split: str) -> str:
  """A letter that answers the questions of an earlier one, in a warm or wordy voice."""
  f = _people(rng)
  to = f"{f['relative']} " if rng.random() < 0.4 else ""  # Family letters and friends' letters.
  paragraphs = [f"Dear {to}{f['other']},", rng.choice(LETTER_OPENERS)]
  for k, (question, meta) in enumerate(_questions(rng, world, split, rng.randint(1, 3))):
    style = rng.choice(("friendly", "verbose", "hedge", "ideal"))
    asked = "You asked," if k == 0 else "You also asked,"
    paragraphs.append(f"{asked} {_quote(question)} {T.render(meta, style, rng, world)}")
  # A closing line the verbose replies have not used yet (they may have used all of them).
  closers = [c for c in F.VERBOSE_CLOSERS if c not in " ".join(paragraphs)]
  paragraphs.append(" ".join([*rng.sample(closers, min(1, len(closers))),
                              rng.choice(LETTER_WISHES)]))
  paragraphs.append(f"{rng.choice(LETTER_SIGNOFFS)}\n{f['name']}")
  return "\n\n".join(paragraphs)


def _tips_doc(rng, world: C.World, split: str) -> str:
  """A tutoring guide that compares answers to one question in several styles."""
  f = _people(rng)
  question, meta = T.ask(rng, world, split)
  lines = [rng.choice(TIPS_HEADS)]
  lines.append(TIPS_GUIDE.format(**f))
  lines.append(f"Suppose a student asks, {_quote(question)}")
  for style in rng.sample(list(TIPS), rng.randint(3, len(TIPS))):
    lines.append(TIPS[style].format(answer=T.render(meta, style, rng, world)))
  lines.append(TIPS_BEST.format(ideal=T.render(meta, "ideal", rng, world)))
  return " ".join(lines)


# Weights in `world_text`'s document mix (whose other weights sum to 1): these documents are
# two to three times as long as the others, so they make about 15% of the text's bytes.
DOC_WEIGHTS = {_scene_doc: 0.028, _forum_doc: 0.013, _letter_doc: 0.009, _tips_doc: 0.009}
