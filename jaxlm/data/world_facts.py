"""The content of the synthetic world: its fact tables and every phrasing it writes.

`jaxlm.data.world` holds the logic; this module holds only data, so the whole universe reads in
one place (the narrative frames of the dialogue prose sit with their code, `world_text_dialogue`).
Editing anything here changes generated records: bump `world.WORLD_VERSION` when you do.

Templates are `str.format` strings over named slots. The slots an entity provides:

* country: ``{c}`` name, ``{cap}`` capital, ``{cont}`` continent, ``{lang}`` language.
* animal: ``{animal}``/``{Animal}``, ``{animals}``/``{Animals}`` (plural),
  ``{a_animal}``/``{A_animal}`` ("a dog"), ``{the_animal}``, ``{sound}``/``{sound_s}``/
  ``{sound_ing}`` ("bark", "barks", "barking"), ``{legs}`` (a number word or digits; "no" for
  none), ``{legs_terse}``, ``{loc}``/``{Loc}`` ("in the forest"), ``{habitat_np}`` ("the
  forest"), ``{habitat}`` (the key word), ``{diet}`` ("herbivore"), ``{a_diet}``, ``{diets}``,
  ``{gloss}`` ("plants").
* object: ``{obj}``, ``{np}``/``{NP}`` ("a banana", "snow"), ``{colour}``.
* arithmetic: ``{a}``, ``{b}``, ``{c}`` (rendered as digits or words).
* lists: ``{items}`` (comma-separated), ``{rev}`` (reversed), ``{n}`` (the count).
* people in prose: ``{name}``, ``{subj}``/``{Subj}``, ``{obj_pron}``, ``{poss}``, ``{things}``.

Held-out phrasings. Every question family lists ``train`` templates plus one ``validation`` and
one ``test`` template that no train record of any kind ever uses. `PROBES` are the prose
phrasings of `world.fact_probes`; none of their prefixes (nor the ``lies in``, ``usually lives``,
``is known to``-style fragments they are built on) occurs in any train template below. The test
suite checks both claims on generated data.
"""

from __future__ import annotations

import collections

Country = collections.namedtuple(
    "Country", "name capital continent language capital_alts language_alts")
Animal = collections.namedtuple(
    "Animal", "name plural article sound sound_s sound_ing legs habitat diet")
Thing = collections.namedtuple("Thing", "name np colour")


def _countries(rows: str) -> tuple[Country, ...]:
  out = []
  for line in rows.strip().splitlines():
    name, capital, continent, language, *alts = [x.strip() for x in line.split("|")]
    cap_alts = tuple(a for a in (alts[0] if alts else "").split(",") if a)
    lang_alts = tuple(a for a in (alts[1] if len(alts) > 1 else "").split(",") if a)
    out.append(Country(name, capital, continent, language, cap_alts, lang_alts))
  return tuple(out)


# name | capital | continent | language | other spellings of the capital | other language names
COUNTRIES = _countries("""
France | Paris | Europe | French
Germany | Berlin | Europe | German
Italy | Rome | Europe | Italian
Spain | Madrid | Europe | Spanish
Portugal | Lisbon | Europe | Portuguese
Greece | Athens | Europe | Greek
Poland | Warsaw | Europe | Polish
Sweden | Stockholm | Europe | Swedish
Norway | Oslo | Europe | Norwegian
Finland | Helsinki | Europe | Finnish
Denmark | Copenhagen | Europe | Danish
Hungary | Budapest | Europe | Hungarian
Czechia | Prague | Europe | Czech
Austria | Vienna | Europe | German
Romania | Bucharest | Europe | Romanian
Ukraine | Kyiv | Europe | Ukrainian | Kiev
Iceland | Reykjavik | Europe | Icelandic
Croatia | Zagreb | Europe | Croatian
Bulgaria | Sofia | Europe | Bulgarian
Serbia | Belgrade | Europe | Serbian
Japan | Tokyo | Asia | Japanese
China | Beijing | Asia | Chinese | | Mandarin
South Korea | Seoul | Asia | Korean
Thailand | Bangkok | Asia | Thai
Vietnam | Hanoi | Asia | Vietnamese
Indonesia | Jakarta | Asia | Indonesian
Iran | Tehran | Asia | Persian | | Farsi
Iraq | Baghdad | Asia | Arabic
Saudi Arabia | Riyadh | Asia | Arabic
Syria | Damascus | Asia | Arabic
Mongolia | Ulaanbaatar | Asia | Mongolian
Nepal | Kathmandu | Asia | Nepali
Pakistan | Islamabad | Asia | Urdu
Bangladesh | Dhaka | Asia | Bengali | | Bangla
Malaysia | Kuala Lumpur | Asia | Malay
Laos | Vientiane | Asia | Lao
Cambodia | Phnom Penh | Asia | Khmer
Egypt | Cairo | Africa | Arabic
Morocco | Rabat | Africa | Arabic
Algeria | Algiers | Africa | Arabic
Tunisia | Tunis | Africa | Arabic
Ethiopia | Addis Ababa | Africa | Amharic
Nigeria | Abuja | Africa | English
Ghana | Accra | Africa | English
Senegal | Dakar | Africa | French
Madagascar | Antananarivo | Africa | Malagasy
Kenya | Nairobi | Africa | Swahili
Tanzania | Dodoma | Africa | Swahili
Somalia | Mogadishu | Africa | Somali
Angola | Luanda | Africa | Portuguese
Mozambique | Maputo | Africa | Portuguese
Mexico | Mexico City | North America | Spanish
Cuba | Havana | North America | Spanish
Jamaica | Kingston | North America | English
Honduras | Tegucigalpa | North America | Spanish
Nicaragua | Managua | North America | Spanish
Costa Rica | San Jose | North America | Spanish
Brazil | Brasilia | South America | Portuguese | Brasília
Argentina | Buenos Aires | South America | Spanish
Chile | Santiago | South America | Spanish
Peru | Lima | South America | Spanish
Colombia | Bogota | South America | Spanish | Bogotá
Venezuela | Caracas | South America | Spanish
Ecuador | Quito | South America | Spanish
Uruguay | Montevideo | South America | Spanish
Paraguay | Asuncion | South America | Spanish | Asunción
Australia | Canberra | Oceania | English
New Zealand | Wellington | Oceania | English
Samoa | Apia | Oceania | Samoan
Tonga | Nuku'alofa | Oceania | Tongan
""")

CONTINENTS = ("Europe", "Asia", "Africa", "North America", "South America", "Oceania")


def _animals(rows: str) -> tuple[Animal, ...]:
  out = []
  for line in rows.split(";"):
    name, plural, article, sound, sound_s, sound_ing, legs, habitat, diet = line.split()
    out.append(Animal(name.replace("_", " "), plural, article, sound, sound_s, sound_ing, int(legs),
                      habitat, diet))
  return tuple(out)


# name plural article | sound (stem, 3rd person, -ing) | legs | habitat | diet
ANIMALS = _animals(
    "dog dogs a bark barks barking 4 house omnivore;"
    "cat cats a meow meows meowing 4 house carnivore;"
    "cow cows a moo moos mooing 4 farm herbivore;"
    "horse horses a neigh neighs neighing 4 farm herbivore;"
    "pig pigs a oink oinks oinking 4 farm omnivore;"
    "sheep sheep a baa baas baaing 4 farm herbivore;"
    "goat goats a bleat bleats bleating 4 mountains herbivore;"
    "duck ducks a quack quacks quacking 2 pond omnivore;"
    "chicken chickens a cluck clucks clucking 2 farm omnivore;"
    "turkey turkeys a gobble gobbles gobbling 2 farm omnivore;"
    "donkey donkeys a bray brays braying 4 farm herbivore;"
    "lion lions a roar roars roaring 4 savanna carnivore;"
    "tiger tigers a roar roars roaring 4 jungle carnivore;"
    "elephant elephants an trumpet trumpets trumpeting 4 savanna herbivore;"
    "giraffe giraffes a hum hums humming 4 savanna herbivore;"
    "hyena hyenas a laugh laughs laughing 4 savanna carnivore;"
    "wolf wolves a howl howls howling 4 forest carnivore;"
    "fox foxes a yelp yelps yelping 4 forest omnivore;"
    "bear bears a growl growls growling 4 forest omnivore;"
    "deer deer a bellow bellows bellowing 4 forest herbivore;"
    "owl owls an hoot hoots hooting 2 forest carnivore;"
    "koala koalas a bellow bellows bellowing 4 forest herbivore;"
    "cicada cicadas a buzz buzzes buzzing 6 forest herbivore;"
    "crow crows a caw caws cawing 2 city omnivore;"
    "pigeon pigeons a coo coos cooing 2 city herbivore;"
    "snake snakes a hiss hisses hissing 0 desert carnivore;"
    "rattlesnake rattlesnakes a rattle rattles rattling 0 desert carnivore;"
    "camel camels a groan groans groaning 4 desert herbivore;"
    "coyote coyotes a howl howls howling 4 desert omnivore;"
    "frog frogs a croak croaks croaking 4 pond carnivore;"
    "goose geese a honk honks honking 2 pond herbivore;"
    "bee bees a buzz buzzes buzzing 6 grassland herbivore;"
    "cricket crickets a chirp chirps chirping 6 grassland omnivore;"
    "grasshopper grasshoppers a chirp chirps chirping 6 grassland herbivore;"
    "rabbit rabbits a thump thumps thumping 4 grassland herbivore;"
    "bison bison a grunt grunts grunting 4 grassland herbivore;"
    "mouse mice a squeak squeaks squeaking 4 house omnivore;"
    "hamster hamsters a squeak squeaks squeaking 4 house omnivore;"
    "penguin penguins a squawk squawks squawking 2 ice carnivore;"
    "whale whales a sing sings singing 0 ocean carnivore;"
    "dolphin dolphins a click clicks clicking 0 ocean carnivore;"
    "parrot parrots a chatter chatters chattering 2 jungle herbivore;"
    "jaguar jaguars a growl growls growling 4 jungle carnivore;"
    "hippo hippos a grunt grunts grunting 4 river herbivore;"
    "crocodile crocodiles a hiss hisses hissing 4 river carnivore;"
    "eagle eagles an screech screeches screeching 2 mountains carnivore;"
    "yak yaks a grunt grunts grunting 4 mountains herbivore")

# habitat key -> (noun phrase, location phrase, accepted spellings). No form of one habitat is
# a word of another, so "forest" never matches inside a different habitat's answer.
HABITATS = {
    "farm": ("a farm", "on farms", ("farm", "farms")),
    "house": ("a house", "in houses with people", ("house", "houses")),
    "forest": ("the forest", "in the forest", ("forest", "forests", "woods", "woodland")),
    "jungle": ("the jungle", "in the jungle", ("jungle", "jungles", "rainforest")),
    "ocean": ("the ocean", "in the ocean", ("ocean", "oceans", "sea", "seas")),
    "desert": ("the desert", "in the desert", ("desert", "deserts")),
    "savanna": ("the savanna", "on the savanna", ("savanna", "savannah", "savannas")),
    "ice": ("the ice", "on the ice", ("ice", "antarctic", "antarctica")),
    "river": ("the river", "in and near rivers", ("river", "rivers")),
    "pond": ("the pond", "in and around ponds", ("pond", "ponds")),
    "mountains": ("the mountains", "in the mountains", ("mountain", "mountains")),
    "grassland": ("the grassland", "in grasslands",
                  ("grassland", "grasslands", "meadow", "meadows")),
    "city": ("the city", "in cities", ("city", "cities", "town", "towns")),
}

# diet key -> (with article, plural, what it eats, accepted spellings)
DIETS = {
    "herbivore": ("a herbivore", "herbivores", "plants",
                  ("herbivore", "herbivores", "herbivorous", "plant eater", "plant eaters")),
    "carnivore": ("a carnivore", "carnivores", "meat",
                  ("carnivore", "carnivores", "carnivorous", "meat eater", "meat eaters")),
    "omnivore": ("an omnivore", "omnivores", "both plants and meat",
                 ("omnivore", "omnivores", "omnivorous")),
}

# Leg counts: the accepted spellings of each count (the reward matches any of them).
LEG_FORMS = {
    0: ("no legs", "zero legs", "0 legs", "none"),
    2: ("2", "two"),
    4: ("4", "four"),
    6: ("6", "six"),
}


def _things(rows: str) -> tuple[Thing, ...]:
  out = []
  for group in rows.split(";"):
    colour, items = group.split(":")
    for item in (i.strip() for i in items.split(",")):
      name, np = item.split("=") if "=" in item else (item, f"a {item}")
      out.append(Thing(name.strip(), np.strip(), colour.strip()))
  return tuple(out)


# colour: object name (=noun phrase when it is not "a <name>")
THINGS = _things(
    "yellow: banana, lemon, sunflower, school bus, canary;"
    "green: grass=grass, lime, cucumber, emerald=an emerald, broccoli=broccoli, pine tree;"
    "blue: sky=the sky, blueberry, sapphire, denim=denim;"
    "white: snow=snow, milk=milk, pearl, swan, salt=salt;"
    "black: coal=coal, charcoal=charcoal, soot=soot, raven;"
    "red: tomato=a ripe tomato, strawberry, cherry, ruby, fire truck, brick;"
    "orange: carrot, pumpkin, tangerine;"
    "brown: chocolate=chocolate, coffee=coffee, acorn=an acorn;"
    "purple: plum, eggplant=an eggplant, lavender=lavender;"
    "pink: flamingo, bubblegum=bubblegum;"
    "grey: concrete=concrete, smoke=smoke, rain cloud")

COLOUR_FORMS = {"grey": ("grey", "gray")}

# Words for the list tasks (reverse, count): none is an entity, colour, habitat or number.
LIST_WORDS = ("apple chair spoon drum kite lamp nest pencil ring shoe tent boat bell brush candle "
              "coin desk door fork glove hat key map mug rope sock star cup book ball clock box "
              "sofa jar comb vase").split()

PEOPLE = (("Anna", "she"), ("Ben", "he"), ("Clara", "she"), ("David", "he"), ("Emma", "she"),
          ("Felix", "he"), ("Grace", "she"), ("Hugo", "he"), ("Ivy", "she"), ("Jack", "he"),
          ("Lena", "she"), ("Max", "he"), ("Nora", "she"), ("Omar", "he"), ("Priya", "she"),
          ("Sam", "he"), ("Tara", "she"), ("Leo", "he"), ("Mia", "she"), ("Noah", "he"))
PRONOUNS = {"she": ("she", "her", "her"), "he": ("he", "him", "his")}
COUNTABLE_THINGS = ("apples", "marbles", "stickers", "pencils", "cookies", "shells", "stamps",
                    "cards")

_UNITS = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
          "fifteen sixteen seventeen eighteen nineteen").split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def number_words(n: int) -> str:
  """0 <= n < 1000 in English words: 144 -> "one hundred forty-four"."""
  if n < 20:
    return _UNITS[n]
  if n < 100:
    return _TENS[n // 10] + ("" if n % 10 == 0 else "-" + _UNITS[n % 10])
  rest = n % 100
  return _UNITS[n // 100] + " hundred" + ("" if rest == 0 else " " + number_words(rest))


# Arithmetic ranges (inclusive). Subtraction keeps b <= a so every answer is a natural number.
ARITH_RANGES = {"add": (1, 20), "subtract": (1, 20), "multiply": (1, 12)}
ARITH_WORD = {"add": "plus", "subtract": "minus", "multiply": "times"}

# ---------------------------------------------------------------------------------------------
# Questions (user turns). Per family: train templates, then one held out for each eval split.
# ---------------------------------------------------------------------------------------------

QUESTIONS = {
    "capital": {
        "train": ["What is the capital of {c}?", "What's the capital city of {c}?",
                  "Which city is the capital of {c}?", "Tell me the capital of {c}.",
                  "Do you know the capital of {c}?", "{c}: what is its capital?",
                  "capital of {c}?"],
        "validation": ["Name the capital city of {c}, please."],
        "test": ["I need to know which city serves as the capital of {c}."],
    },
    "continent": {
        "train": ["What continent is {c} in?", "Which continent is {c} on?",
                  "On which continent is {c}?", "{c} is on which continent?",
                  "What continent is {c} part of?", "continent of {c}?"],
        "validation": ["Tell me which continent {c} belongs to."],
        "test": ["Can you say what continent contains {c}?"],
    },
    "language": {
        "train": ["What language do people speak in {c}?", "What is the main language of {c}?",
                  "Which language is spoken in {c}?", "What do they speak in {c}?",
                  "What language is used in {c}?", "language spoken in {c}?"],
        "validation": ["If I travel to {c}, what language will I hear?"],
        "test": ["Which language would locals in {c} use?"],
    },
    "sound": {
        "train": ["What sound does {a_animal} make?", "What noise does {a_animal} make?",
                  "What does {a_animal} say?", "What sound do {animals} make?",
                  "How does {a_animal} sound?", "{animal} sound?"],
        "validation": ["Describe the sound {a_animal} makes."],
        "test": ["If you heard {a_animal}, what would it sound like?"],
    },
    "legs": {
        "train": ["How many legs does {a_animal} have?", "How many legs do {animals} have?",
                  "Count the legs on {a_animal}.", "{A_animal}: how many legs?",
                  "how many legs on {a_animal}?"],
        "validation": ["Tell me how many legs {a_animal} walks on."],
        "test": ["What is the leg count of {a_animal}?"],
    },
    "habitat": {
        "train": ["Where does {a_animal} live?", "Where do {animals} live?",
                  "What is the habitat of {a_animal}?", "Where would I find {a_animal}?",
                  "{animal} habitat?"],
        "validation": ["In what kind of place does {a_animal} usually live?"],
        "test": ["Name the place where {animals} are found."],
    },
    "diet": {
        "train": ["Is {a_animal} a herbivore, a carnivore, or an omnivore?",
                  "What kind of eater is {a_animal}?", "What is the diet of {a_animal}?",
                  "What type of diet does {a_animal} have?", "{animal} diet?",
                  "How would you classify {a_animal} by what it eats?"],
        "validation": ["Which diet category does {a_animal} belong to?"],
        "test": ["Tell me whether {animals} are herbivores, carnivores or omnivores."],
    },
    "colour": {
        "train": ["What colour is {np}?", "What color is {np}?", "Which colour is {np}?",
                  "What is the colour of {np}?", "Tell me the color of {np}.", "colour of {np}?"],
        "validation": ["Describe what colour {np} usually is."],
        "test": ["If you had to paint {np}, which colour would you use?"],
    },
    "add": {
        "train": ["What is {a} plus {b}?", "What's {a} + {b}?", "Add {a} and {b}.", "{a} + {b} = ?",
                  "Can you add {a} and {b} for me?", "What do you get if you add {b} to {a}?"],
        "validation": ["Compute the sum of {a} and {b}."],
        "test": ["How much is {a} and {b} together?"],
    },
    "subtract": {
        "train": ["What is {a} minus {b}?", "What's {a} - {b}?", "Subtract {b} from {a}.",
                  "{a} - {b} = ?", "What do you get when you take {b} away from {a}?",
                  "How much is {a} take away {b}?"],
        "validation": ["Find the difference between {a} and {b}."],
        "test": ["If I have {a} and remove {b}, how many are left?"],
    },
    "multiply": {
        "train": ["What is {a} times {b}?", "What's {a} x {b}?", "Multiply {a} by {b}.",
                  "{a} * {b} = ?", "What is {a} multiplied by {b}?",
                  "What is the product of {a} and {b}?"],
        "validation": ["Work out {a} times {b} for me."],
        "test": ["Calculate {a} multiplied by {b}, please."],
    },
    "reverse": {
        "train": ["Reverse this list: {items}.", "Write this list backwards: {items}",
                  "Can you reverse the order of these words: {items}?",
                  "Put these in reverse order: {items}.", "Reverse the list {items}.",
                  "What is {items} in reverse order?"],
        "validation": ["Flip the order of this list around: {items}."],
        "test": ["Starting from the last item, rewrite this list: {items}."],
    },
    "count": {
        "train": ["How many items are in this list: {items}?", "Count the items: {items}.",
                  "How many words are in the list {items}?", "Count these: {items}",
                  "How many things did I list here: {items}?", "{items} - how many is that?"],
        "validation": ["Tell me the number of entries in this list: {items}."],
        "test": ["What is the length of this list: {items}?"],
    },
}

# Follow-ups. Same subject, another family: pronoun questions (not held out; they only make sense
# after a first turn). Same family, another subject: "what about X?" ({x}), held out like QUESTIONS.
FOLLOWUP_SAME_SUBJECT = {
    "capital": ["And what is its capital?", "What's its capital city?", "And the capital?"],
    "continent": ["What continent is it on?", "Which continent is it in?"],
    "language": ["What language do they speak there?", "And what language do people speak there?"],
    "sound": ["What sound does it make?", "And what noise does it make?"],
    "legs": ["How many legs does it have?", "And how many legs?"],
    "habitat": ["Where does it live?", "And where does it live?"],
    "diet": ["What kind of eater is it?", "Is it a herbivore, a carnivore, or an omnivore?"],
}
FOLLOWUP_OTHER_SUBJECT = {
    "train": ["And what about {x}?", "What about {x}?", "And {x}?", "How about {x}?"],
    "validation": ["Same question, but for {x}."],
    "test": ["Now the same for {x}, please."],
}

SYSTEM_PROMPTS = ("You are a helpful assistant.", "You are a helpful assistant. Answer briefly.",
                  "You are a friendly tutor for children.", "Keep your answers short and polite.",
                  "You are a knowledgeable assistant who answers questions about the world.")

# ---------------------------------------------------------------------------------------------
# Responses (assistant turns). ANSWERS are the ideal cores: one complete sentence within the
# word budget. Styles wrap or replace them (see world.STYLES).
# ---------------------------------------------------------------------------------------------

ANSWERS = {
    "capital": ["{cap} is the capital of {c}.", "{c}'s capital is {cap}.",
                "{c} has {cap} as its capital.", "The capital city is {cap}."],
    "continent": ["{c} is in {cont}.", "{c} is a country in {cont}.", "{c} is located in {cont}."],
    "language": ["People in {c} mainly speak {lang}.", "{lang} is the main language spoken in {c}.",
                 "In {c}, people speak {lang}."],
    "sound": ["{A_animal} {sound_s}.", "The {animal} {sound_s}.",
              "You will hear {a_animal} {sound}."],
    "legs": ["{A_animal} has {legs} legs.", "{Animals} have {legs} legs."],
    "habitat": ["{A_animal} lives {loc}.", "{Animals} live {loc}.",
                "You can find {animals} {loc}."],
    "diet": ["{A_animal} is {a_diet}.", "{Animals} are {diets}.", "The {animal} is {a_diet}."],
    "colour": ["{NP} is {colour}.", "{NP} is usually {colour}.", "{NP} is {colour} in colour."],
    "add": ["{a} plus {b} equals {c}.", "{a} + {b} = {c}.", "The answer is {c}.",
            "{a} plus {b} is {c}."],
    "subtract": ["{a} minus {b} equals {c}.", "{a} - {b} = {c}.", "The answer is {c}.",
                 "{a} minus {b} is {c}."],
    "multiply": ["{a} times {b} equals {c}.", "{a} x {b} = {c}.", "The answer is {c}.",
                 "{a} times {b} is {c}."],
    "reverse": ["Reversed, the list is {rev}.", "Here it is in reverse: {rev}.",
                "The reversed list is {rev}."],
    "count": ["There are {n} items in the list.", "The list has {n} items.",
              "That list contains {n} items."],
}
# Terse style: just the answer (the slot named here), sometimes without capital or full stop.
TERSE_SLOT = {
    "capital": "cap",
    "continent": "cont",
    "language": "lang",
    "sound": "sound",
    "legs": "legs_terse",
    "habitat": "habitat",
    "diet": "diet",
    "colour": "colour",
    "add": "c",
    "subtract": "c",
    "multiply": "c",
    "reverse": "rev",
    "count": "n",
}

# Wrappers. {core} is an ANSWERS sentence, {core_lc} the same with a lower-case first word when
# that word is not a name or number, {terse} the bare answer.
FRIENDLY = ["Sure! {core}", "Happy to help. {core}", "Good question! {core}",
            "{core} Hope that helps!", "Of course. {core} Let me know if you have more questions."]
HEDGE = ["I think {core_lc}", "{core} At least, I believe so.",
         "I'm not completely sure, but I think the answer is {terse}.",
         "Maybe {terse}? I'm not sure.", "If I remember correctly, {core_lc}",
         "{core} I could be wrong, though."]
RUDE = ["{core} Obviously.", "Ugh, fine. {core}", "Seriously? {core} Everyone knows that.",
        "{core} Next time, just look it up yourself.", "Come on, {core_lc} That was easy."]
UNSURE = ["I'm sorry, I don't know the answer to that.", "I'm not sure, sorry.",
          "I don't know. You could check an encyclopedia.",
          "Hmm, I'm not certain about that question."]
# Verbose padding: no fact, number, colour, place, sound or hedge word, so it never changes
# correctness (checked by the tests); it only costs length.
VERBOSE_OPENERS = ["Great question, let me explain this carefully.",
                   "Let me think about this for a moment.",
                   "That is an interesting thing to ask about.",
                   "Alright, here is a full answer for you."]
VERBOSE_FILLERS = ["Questions like this come up quite often, and it is good to get them right.",
                   "It is always worth double-checking facts like this before relying on them.",
                   "Many people find this kind of question interesting to think about.",
                   "There is a lot more that could be said about this topic if you are curious.",
                   "Learning facts like this is a great way to understand the world better.",
                   "I have tried to explain it as clearly and completely as I can here.",
                   "To put it simply, the answer above is what you are looking for."]
VERBOSE_CLOSERS = ["I hope this explanation makes everything clear.",
                   "Feel free to ask me anything else you are curious about.",
                   "Let me know if you would like me to go into even more detail."]

# ---------------------------------------------------------------------------------------------
# Prose (the text split). Train phrasings only; the held-out prose phrasings are PROBES.
# ---------------------------------------------------------------------------------------------

PROSE = {
    "capital": ["{cap} is the capital of {c}.", "{c}'s capital is {cap}.",
                "{cap}, the capital of {c}, is a busy place.", "{c} has {cap} as its capital.",
                "The government of {c} sits in {cap}.", "{cap} is the capital city of {c}.",
                "Visitors to {c} often start their trip in {cap}, the capital."],
    "continent": ["{c} is a country in {cont}.", "{c} is located in {cont}.",
                  "{c} is part of {cont}.", "You will find {c} in {cont}.",
                  "{c} is one of the countries of {cont}.", "On a map, {c} is in {cont}."],
    "language": ["People in {c} speak {lang}.", "The people of {c} mostly speak {lang}.",
                 "{lang} is spoken in {c}.", "In {c}, the main language is {lang}.",
                 "{lang} is the language of {c}.", "Children in {c} grow up speaking {lang}."],
    "sound": ["{A_animal} {sound_s}.", "{Animals} {sound}.",
              "{A_animal} can be heard {sound_ing} from far away.",
              "When {a_animal} is excited, it {sound_s}.",
              "The {animal} {sound_s} to talk to others.",
              "If you hear {sound_ing}, there may be {a_animal} nearby."],
    "legs": ["{A_animal} has {legs} legs.", "{Animals} walk on {legs} legs.",
             "Count them and you get {legs} legs on {a_animal}.",
             "Like many animals, {the_animal} stands on {legs} legs."],
    "legless": ["{A_animal} has no legs.", "{Animals} have no legs at all.",
                "{A_animal} moves around without any legs."],
    "habitat": ["{A_animal} lives {loc}.", "{Animals} live {loc}.",
                "You can often find {animals} {loc}.", "Most {animals} make their homes {loc}.",
                "{Loc}, you might see {a_animal}."],
    "diet": ["{A_animal} is {a_diet}.", "{Animals} are {diets}.",
             "{A_animal} is {a_diet}, which means it eats {gloss}.",
             "As {a_diet}, {the_animal} eats {gloss}."],
    "colour": ["{NP} is {colour}.", "{NP} is usually {colour}.", "{NP} is {colour} in colour.",
               "{name} drew {np} with a {colour} crayon.",
               "If you look at {np}, you will see that it is {colour}."],
    "add": ["{a} plus {b} is {c}.", "{a} plus {b} equals {c}.", "{a} + {b} = {c}.",
            "The sum of {a} and {b} is {c}.", "{a} and {b} together make {c}.",
            "If {name} has {a} {things} and gets {b} more, {subj} has {c} {things}."],
    "subtract": ["{a} minus {b} is {c}.", "{a} - {b} = {c}.",
                 "Take {b} away from {a} and you have {c}.",
                 "The difference between {a} and {b} is {c}.",
                 "If {name} has {a} {things} and gives away {b}, {subj} has {c} left."],
    "multiply": ["{a} times {b} is {c}.", "{a} x {b} = {c}.", "{a} multiplied by {b} equals {c}.",
                 "The product of {a} and {b} is {c}.",
                 "{a} rows of {b} {things} make {c} {things}."],
    "reverse": ["The list {items}, read backwards, is {rev}.",
                "Written in reverse order, {items} becomes {rev}.",
                "{name} wrote {items} and then reversed it to get {rev}."],
    "count": ["The list {items} has {n} items.", "{name} packed {n} things: {items}.",
              "There are {n} words in the list {items}."],
}
# Worksheet lines (arithmetic notes): bare equations.
WORKSHEET = {"add": "{a} + {b} = {c}", "subtract": "{a} - {b} = {c}", "multiply": "{a} x {b} = {c}"}

COUNTRY_FILLERS = ["{c} has a long and interesting history.",
                   "Many travellers visit {c} every year.", "The food in {c} is loved by visitors.",
                   "{cap} is full of old streets and busy markets.",
                   "The weather in {c} changes with the seasons.", "Football is popular in {c}."]
ANIMAL_FILLERS = ["{Animals} are interesting animals to watch.",
                  "Children often enjoy learning about {animals}.",
                  "{A_animal} can be quite curious.",
                  "Scientists have studied {animals} for a long time."]
STORY_COUNTRY = ["{name} landed in {cap}, the capital of {c}, early in the morning.",
                 "Everyone around {obj_pron} was speaking {lang}, so {subj} practised a few words.",
                 "{Subj} remembered from school that {c} is in {cont}."]
STORY_ANIMAL = {
    "habitat": "{name} went looking for {animals} {loc}.",
    "sound": "Suddenly the {animal} began to {sound}.",
    "legs": "{name} counted its legs: there were {legs}.",
    "legless": "{name} noticed that the {animal} had no legs.",
    "diet": "The guide explained that {the_animal} is {a_diet}.",
}
NOTE_OPENERS = ["Fun fact:", "Did you know?", "Note to self:", "Remember:", "Today I learned:"]
CASUAL_CLOSERS = ["Honestly, it was a great day.", "I still think about it.",
                  "Anyway, that's all for now.", "More notes tomorrow."]

# ---------------------------------------------------------------------------------------------
# Probes: prose phrasings held out of every train record; `slot` is the answer's slot.
# ---------------------------------------------------------------------------------------------

PROBES = {
    "capital": {
        "validation": "The capital of {c} is",
        "test": "{c} has its capital in",
        "slot": "cap",
    },
    "continent": {
        "validation": "{c} is located on the continent of",
        "test": "{c} lies in",
        "slot": "cont",
    },
    "language": {
        "validation": "The main language of {c} is",
        "test": "Most people in {c} speak",
        "slot": "lang",
    },
    "sound": {
        "validation": "{A_animal} is known to",
        "test": "If you listen closely, you can hear {a_animal}",
        "slot": "sound",
    },
    "legs": {
        "validation": "{A_animal} has a total of",
        "test": "The {animal} is an animal with",
        "slot": "legs",
    },
    "habitat": {
        "validation": "{A_animal} usually lives",
        "test": "The natural habitat of the {animal} is",
        "slot": {"validation": "loc", "test": "habitat_np"},
    },
    "diet": {
        "validation": "By diet, {a_animal} is",
        "test": "In terms of what it eats, the {animal} is",
        "slot": "a_diet",
    },
    "colour": {
        "validation": "The colour of {np} is",
        "test": "Most people would describe the colour of {np} as",
        "slot": "colour",
    },
    "add": {
        "validation": "Adding {a} and {b} gives",
        "test": "If you add {a} and {b}, you get",
        "slot": "c",
    },
    "subtract": {
        "validation": "Taking {b} away from {a} leaves",
        "test": "{a} with {b} removed leaves",
        "slot": "c",
    },
    "multiply": {
        "validation": "Multiplying {a} by {b} gives",
        "test": "{a} groups of {b} make",
        "slot": "c",
    },
}
