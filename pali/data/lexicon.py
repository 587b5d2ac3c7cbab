"""Grammar of the synthetic corpus: noun phrases, captions, questions and answers in ten languages.

A scene is 1-2 groups of (shape, colour, count) with count 1-3 and distinct shapes and colours, e.g.
"a red circle and two blue stars" (groups always in `SHAPES` order). Every language implements the same
small grammar with its own agreement rules (French/Spanish gender, German case endings, Russian numeral
government, Arabic dual and non-human plural agreement, Hindi adjective inflection, CJK
classifiers/counters, Korean particles).
Answers are short: a colour, a shape or an ASCII digit.
"""

from __future__ import annotations

from dataclasses import dataclass

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "heart", "diamond")
COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "orange")
SCRIPTS: dict[str, str] = {"en": "Latin", "fr": "Latin", "de": "Latin", "es": "Latin", "ru": "Cyrillic",
                           "ar": "Arabic", "hi": "Devanagari", "zh": "Han", "ja": "Han+Kana", "ko": "Hangul"}


@dataclass(frozen=True)
class Group:
    """`count` objects of one shape and colour."""

    shape: str
    colour: str
    count: int


class Grammar:
    """One language's phrases; subclasses fill the tables and the agreement rules."""

    code = ""
    conj = " and "
    ocr_words: tuple[str, ...] = ()

    def np(self, g: Group) -> str:  # noun phrase "two red circles"
        raise NotImplementedError

    def caption(self, groups: list[Group]) -> str:
        """Alt-text of the scene. Groups are named in the fixed order of `SHAPES`, whatever order they come
        in, so the caption is a function of the image: a scene drawn with the groups in any order reads
        the same, and a model is not asked to guess an order it cannot see."""
        return self.conj.join(self.np(g) for g in sorted(groups, key=lambda g: SHAPES.index(g.shape)))

    def q_count(self, shape: str) -> str:
        """'How many circles are there?'"""
        raise NotImplementedError

    def q_colour(self, shape: str, count: int) -> str:
        """'What colour is the circle?' (plural verb and noun when count > 1)."""
        raise NotImplementedError

    def q_shape(self, colour: str) -> str:
        """'Which shape is red?'"""
        raise NotImplementedError

    def a_colour(self, colour: str) -> str:
        """Colour word as a one-word answer."""
        raise NotImplementedError

    def a_shape(self, shape: str) -> str:
        """Shape word as a one-word answer."""
        raise NotImplementedError


class En(Grammar):
    code = "en"
    ocr_words = ("stop", "open", "exit", "taxi", "hotel", "cafe")
    sg = dict(zip(SHAPES, ("circle", "square", "triangle", "star", "heart", "diamond"), strict=True))
    pl = {k: v + "s" for k, v in sg.items()}
    col = dict(zip(COLOURS, ("red", "green", "blue", "yellow", "purple", "orange"), strict=True))
    num = {2: "two", 3: "three"}

    def np(self, g):
        if g.count == 1:
            c = self.col[g.colour]
            return f"{'an' if c[0] in 'aeiou' else 'a'} {c} {self.sg[g.shape]}"
        return f"{self.num[g.count]} {self.col[g.colour]} {self.pl[g.shape]}"

    def q_count(self, shape):
        return f"how many {self.pl[shape]} are there?"

    def q_colour(self, shape, count):
        return f"what colour is the {self.sg[shape]}?" if count == 1 else \
            f"what colour are the {self.pl[shape]}?"

    def q_shape(self, colour):
        return f"which shape is {self.col[colour]}?"

    def a_colour(self, colour):
        return self.col[colour]

    def a_shape(self, shape):
        return self.sg[shape]


class Fr(Grammar):
    code = "fr"
    conj = " et "
    ocr_words = ("sortie", "ouvert", "arrêt", "café", "hôtel", "taxi")
    # (singular, plural, gender)
    nouns = dict(zip(SHAPES, (("cercle", "cercles", "m"), ("carré", "carrés", "m"),
                              ("triangle", "triangles", "m"), ("étoile", "étoiles", "f"),
                              ("cœur", "cœurs", "m"), ("losange", "losanges", "m")), strict=True))
    # (m sg, f sg, m pl, f pl); "orange" is invariable
    adj = dict(zip(COLOURS, (("rouge", "rouge", "rouges", "rouges"), ("vert", "verte", "verts", "vertes"),
                             ("bleu", "bleue", "bleus", "bleues"), ("jaune", "jaune", "jaunes", "jaunes"),
                             ("violet", "violette", "violets", "violettes"),
                             ("orange", "orange", "orange", "orange")), strict=True))

    def np(self, g):
        sg, pl, gen = self.nouns[g.shape]
        a = self.adj[g.colour]
        if g.count == 1:
            return f"{'un' if gen == 'm' else 'une'} {sg} {a[0] if gen == 'm' else a[1]}"
        return f"{'deux' if g.count == 2 else 'trois'} {pl} {a[2] if gen == 'm' else a[3]}"

    def q_count(self, shape):
        return f"combien de {self.nouns[shape][1]} y a-t-il ?"

    def q_colour(self, shape, count):
        sg, pl, gen = self.nouns[shape]
        if count > 1:
            return f"de quelle couleur sont les {pl} ?"
        art = "l'" if sg[0] in "aeiouéœ" else ("le " if gen == "m" else "la ")
        return f"de quelle couleur est {art}{sg} ?"

    def q_shape(self, colour):
        return f"quelle forme est {self.adj[colour][1]} ?"  # "forme" is feminine

    def a_colour(self, colour):
        return self.adj[colour][0]

    def a_shape(self, shape):
        return self.nouns[shape][0]


class De(Grammar):
    code = "de"
    conj = " und "
    ocr_words = ("Ausgang", "offen", "Halt", "Café", "Hotel", "Taxi")
    nouns = dict(zip(SHAPES, (("Kreis", "Kreise", "m"), ("Quadrat", "Quadrate", "n"),
                              ("Dreieck", "Dreiecke", "n"), ("Stern", "Sterne", "m"),
                              ("Herz", "Herzen", "n"), ("Raute", "Rauten", "f")), strict=True))
    # (attributive stem, predicative form)
    adj = dict(zip(COLOURS, (("rot", "rot"), ("grün", "grün"), ("blau", "blau"), ("gelb", "gelb"),
                             ("violett", "violett"), ("orangefarben", "orange")), strict=True))
    art = {"m": ("ein", "er", "der"), "n": ("ein", "es", "das"), "f": ("eine", "e", "die")}

    def np(self, g):
        sg, pl, gen = self.nouns[g.shape]
        stem = self.adj[g.colour][0]
        if g.count == 1:  # nominative after the indefinite article: mixed declension
            article, ending, _ = self.art[gen]
            return f"{article} {stem}{ending} {sg}"
        return f"{'zwei' if g.count == 2 else 'drei'} {stem}e {pl}"  # strong declension, plural

    def q_count(self, shape):
        return f"wie viele {self.nouns[shape][1]} gibt es?"

    def q_colour(self, shape, count):
        sg, pl, gen = self.nouns[shape]
        if count > 1:
            return f"welche Farbe haben die {pl}?"
        return f"welche Farbe hat {self.art[gen][2]} {sg}?"

    def q_shape(self, colour):
        return f"welche Form ist {self.adj[colour][1]}?"

    def a_colour(self, colour):
        return self.adj[colour][1]

    def a_shape(self, shape):
        return self.nouns[shape][0]


class Es(Grammar):
    code = "es"
    conj = " y "
    ocr_words = ("salida", "abierto", "alto", "café", "hotel", "taxi")
    nouns = dict(zip(SHAPES, (("círculo", "círculos", "m"), ("cuadrado", "cuadrados", "m"),
                              ("triángulo", "triángulos", "m"), ("estrella", "estrellas", "f"),
                              ("corazón", "corazones", "m"), ("rombo", "rombos", "m")), strict=True))
    adj = dict(zip(COLOURS, (("rojo", "roja", "rojos", "rojas"), ("verde", "verde", "verdes", "verdes"),
                             ("azul", "azul", "azules", "azules"),
                             ("amarillo", "amarilla", "amarillos", "amarillas"),
                             ("morado", "morada", "morados", "moradas"),
                             ("naranja", "naranja", "naranja", "naranja")), strict=True))

    def np(self, g):
        sg, pl, gen = self.nouns[g.shape]
        a = self.adj[g.colour]
        if g.count == 1:
            return f"{'un' if gen == 'm' else 'una'} {sg} {a[0] if gen == 'm' else a[1]}"
        return f"{'dos' if g.count == 2 else 'tres'} {pl} {a[2] if gen == 'm' else a[3]}"

    def q_count(self, shape):
        _, pl, gen = self.nouns[shape]
        return f"¿cuánt{'os' if gen == 'm' else 'as'} {pl} hay?"

    def q_colour(self, shape, count):
        sg, pl, gen = self.nouns[shape]
        if count > 1:
            return f"¿de qué color son {'los' if gen == 'm' else 'las'} {pl}?"
        return f"¿de qué color es {'el' if gen == 'm' else 'la'} {sg}?"

    def q_shape(self, colour):
        return f"¿qué figura es de color {self.adj[colour][0]}?"

    def a_colour(self, colour):
        return self.adj[colour][0]

    def a_shape(self, shape):
        return self.nouns[shape][0]


class Ru(Grammar):
    code = "ru"
    conj = " и "
    ocr_words = ("выход", "открыто", "стоп", "кафе", "отель", "такси")
    # (nom sg, gen sg, nom pl, gen pl, gender)
    nouns = dict(zip(SHAPES, (("круг", "круга", "круги", "кругов", "m"),
                              ("квадрат", "квадрата", "квадраты", "квадратов", "m"),
                              ("треугольник", "треугольника", "треугольники", "треугольников", "m"),
                              ("звезда", "звезды", "звёзды", "звёзд", "f"),
                              ("сердце", "сердца", "сердца", "сердец", "n"),
                              ("ромб", "ромба", "ромбы", "ромбов", "m")), strict=True))
    # (m sg, f sg, n sg, nom pl, gen pl)
    adj = dict(zip(COLOURS, (
        ("красный", "красная", "красное", "красные", "красных"),
        ("зелёный", "зелёная", "зелёное", "зелёные", "зелёных"),
        ("синий", "синяя", "синее", "синие", "синих"),
        ("жёлтый", "жёлтая", "жёлтое", "жёлтые", "жёлтых"),
        ("фиолетовый", "фиолетовая", "фиолетовое", "фиолетовые", "фиолетовых"),
        ("оранжевый", "оранжевая", "оранжевое", "оранжевые", "оранжевых")), strict=True))

    def np(self, g):
        nom, gen_sg, _, _, gender = self.nouns[g.shape]
        a = self.adj[g.colour]
        if g.count == 1:
            return f"{a['mfn'.index(gender)]} {nom}"
        num = {2: "две" if gender == "f" else "два", 3: "три"}[g.count]
        # 2-4 govern the genitive singular noun; the adjective is genitive plural for masculine/neuter
        # nouns and (preferably) nominative plural for feminine ones.
        return f"{num} {a[3] if gender == 'f' else a[4]} {gen_sg}"

    def q_count(self, shape):
        return f"сколько на картинке {self.nouns[shape][3]}?"

    def q_colour(self, shape, count):
        return f"какого цвета {self.nouns[shape][0] if count == 1 else self.nouns[shape][2]}?"

    def q_shape(self, colour):
        return f"какая фигура {self.adj[colour][1]}?"  # "фигура" is feminine

    def a_colour(self, colour):
        return self.adj[colour][0]

    def a_shape(self, shape):
        return self.nouns[shape][0]


class Ar(Grammar):
    code = "ar"
    conj = " و"  # the conjunction is written attached to the next word
    ocr_words = ("خروج", "مفتوح", "قف", "مقهى", "فندق", "تاكسي")
    # (singular, dual nominative, plural, gender, dual genitive)
    nouns = dict(zip(SHAPES, (("دائرة", "دائرتان", "دوائر", "f", "دائرتين"),
                              ("مربع", "مربعان", "مربعات", "m", "مربعين"),
                              ("مثلث", "مثلثان", "مثلثات", "m", "مثلثين"),
                              ("نجمة", "نجمتان", "نجوم", "f", "نجمتين"),
                              ("قلب", "قلبان", "قلوب", "m", "قلبين"),
                              ("معين", "معينان", "معينات", "m", "معينين")), strict=True))
    # (m sg, f sg, m dual, f dual); non-human plurals take the feminine singular
    adj = dict(zip(COLOURS, (("أحمر", "حمراء", "أحمران", "حمراوان"), ("أخضر", "خضراء", "أخضران", "خضراوان"),
                             ("أزرق", "زرقاء", "أزرقان", "زرقاوان"), ("أصفر", "صفراء", "أصفران", "صفراوان"),
                             ("بنفسجي", "بنفسجية", "بنفسجيان", "بنفسجيتان"),
                             ("برتقالي", "برتقالية", "برتقاليان", "برتقاليتان")), strict=True))

    def np(self, g):
        sg, dual, pl, gen, _ = self.nouns[g.shape]
        a = self.adj[g.colour]
        f = gen == "f"
        if g.count == 1:
            return f"{sg} {a[1] if f else a[0]}"
        if g.count == 2:
            return f"{dual} {a[3] if f else a[2]}"
        # 3-10 take the opposite gender of the singular noun, then a genitive plural noun
        return f"{'ثلاث' if f else 'ثلاثة'} {pl} {a[1]}"

    def q_count(self, shape):
        return f"ما عدد ال{self.nouns[shape][2]} في الصورة؟"

    def q_colour(self, shape, count):
        n = self.nouns[shape]  # the noun is the genitive of an idafa: singular, dual or plural
        return f"ما لون ال{n[0] if count == 1 else n[4] if count == 2 else n[2]}؟"

    def q_shape(self, colour):
        return f"ما الشكل ال{self.adj[colour][0]}؟"

    def a_colour(self, colour):
        return self.adj[colour][0]

    def a_shape(self, shape):
        return self.nouns[shape][0]


class Hi(Grammar):
    code = "hi"
    conj = " और "
    ocr_words = ("निकास", "खुला", "रुको", "होटल", "टैक्सी", "चाय")
    # (singular, plural); all masculine
    nouns = dict(zip(SHAPES, (("वृत्त", "वृत्त"), ("वर्ग", "वर्ग"), ("त्रिभुज", "त्रिभुज"),
                              ("तारा", "तारे"), ("दिल", "दिल"), ("हीरा", "हीरे")), strict=True))
    # (m sg, m pl, f); -ā adjectives inflect, the others are invariable
    adj = dict(zip(COLOURS, (("लाल", "लाल", "लाल"), ("हरा", "हरे", "हरी"), ("नीला", "नीले", "नीली"),
                             ("पीला", "पीले", "पीली"), ("बैंगनी", "बैंगनी", "बैंगनी"),
                             ("नारंगी", "नारंगी", "नारंगी")), strict=True))
    num = {1: "एक", 2: "दो", 3: "तीन"}

    def np(self, g):
        sg, pl = self.nouns[g.shape]
        a = self.adj[g.colour]
        if g.count == 1:
            return f"एक {a[0]} {sg}"
        return f"{self.num[g.count]} {a[1]} {pl}"

    def q_count(self, shape):
        return f"चित्र में कितने {self.nouns[shape][1]} हैं?"

    def q_colour(self, shape, count):
        sg, pl = self.nouns[shape]
        return f"{sg} किस रंग का है?" if count == 1 else f"{pl} किस रंग के हैं?"

    def q_shape(self, colour):
        return f"कौन सी आकृति {self.adj[colour][2]} है?"  # "आकृति" is feminine

    def a_colour(self, colour):
        return self.adj[colour][0]

    def a_shape(self, shape):
        return self.nouns[shape][0]


class Zh(Grammar):
    code = "zh"
    conj = "和"
    ocr_words = ("出口", "营业", "停", "咖啡", "酒店", "出租车")
    nouns = dict(zip(SHAPES, ("圆形", "正方形", "三角形", "星形", "心形", "菱形"), strict=True))
    col = dict(zip(COLOURS, ("红色", "绿色", "蓝色", "黄色", "紫色", "橙色"), strict=True))
    num = {1: "一", 2: "两", 3: "三"}

    def np(self, g):
        return f"{self.num[g.count]}个{self.col[g.colour]}的{self.nouns[g.shape]}"

    def q_count(self, shape):
        return f"图中有几个{self.nouns[shape]}？"

    def q_colour(self, shape, count):
        return f"{self.nouns[shape]}是什么颜色的？"

    def q_shape(self, colour):
        return f"哪个形状是{self.col[colour]}的？"

    def a_colour(self, colour):
        return self.col[colour]

    def a_shape(self, shape):
        return self.nouns[shape]


class Ja(Grammar):
    code = "ja"
    conj = "と"
    ocr_words = ("出口", "営業中", "止まれ", "カフェ", "ホテル", "タクシー")
    nouns = dict(zip(SHAPES, ("円", "四角形", "三角形", "星", "ハート", "ひし形"), strict=True))
    # (attributive form, noun form)
    col = dict(zip(COLOURS, (("赤い", "赤"), ("緑の", "緑"), ("青い", "青"), ("黄色い", "黄色"),
                             ("紫の", "紫"), ("オレンジ色の", "オレンジ")), strict=True))
    num = {1: "一つ", 2: "二つ", 3: "三つ"}

    def np(self, g):
        return f"{self.num[g.count]}の{self.col[g.colour][0]}{self.nouns[g.shape]}"

    def q_count(self, shape):
        return f"{self.nouns[shape]}はいくつありますか？"

    def q_colour(self, shape, count):
        return f"{self.nouns[shape]}は何色ですか？"

    def q_shape(self, colour):
        return f"{self.col[colour][0]}図形はどれですか？"

    def a_colour(self, colour):
        return self.col[colour][1]

    def a_shape(self, shape):
        return self.nouns[shape]


class Ko(Grammar):
    code = "ko"
    conj = "와 "  # every noun phrase ends in the counter 개 (open syllable), so always 와
    ocr_words = ("출구", "영업중", "정지", "카페", "호텔", "택시")
    # (noun, topic particle chosen by the final consonant)
    nouns = dict(zip(SHAPES, (("원", "은"), ("정사각형", "은"), ("삼각형", "은"), ("별", "은"),
                              ("하트", "는"), ("마름모", "는")), strict=True))
    # (attributive form, noun form)
    col = dict(zip(COLOURS, (("빨간", "빨간색"), ("초록색", "초록색"), ("파란", "파란색"),
                             ("노란", "노란색"), ("보라색", "보라색"), ("주황색", "주황색")), strict=True))
    num = {1: "한", 2: "두", 3: "세"}

    def np(self, g):
        return f"{self.col[g.colour][0]} {self.nouns[g.shape][0]} {self.num[g.count]} 개"

    def q_count(self, shape):
        n, p = self.nouns[shape]
        return f"{n}{p} 몇 개 있어요?"

    def q_colour(self, shape, count):
        n, p = self.nouns[shape]
        return f"{n}{p} 무슨 색이에요?"

    def q_shape(self, colour):
        return f"{self.col[colour][0]} 도형은 무엇이에요?"

    def a_colour(self, colour):
        return self.col[colour][1]

    def a_shape(self, shape):
        return self.nouns[shape][0]


GRAMMARS: dict[str, Grammar] = {g.code: g for g in (En(), Fr(), De(), Es(), Ru(), Ar(), Hi(), Zh(), Ja(), Ko())}
