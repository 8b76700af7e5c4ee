"""A small multilingual corpus and held-out strings for tokenizer tests (written here, no downloads)."""

TRAIN = [
    "The quick brown fox jumps over the lazy dog. It's 2024, and we're testing tokenizers!",
    "Shall I compare thee to a summer's day? Thou art more lovely and more temperate.",
    "Le renard brun rapide saute par-dessus le chien paresseux. C'était l'été à Montréal.",
    "Der schnelle braune Fuchs springt über den faulen Hund. Größe, Straße, Übermut.",
    "El rápido zorro marrón salta sobre el perro perezoso. ¿Dónde está la biblioteca?",
    "Быстрая коричневая лиса перепрыгивает через ленивую собаку.",
    "敏捷的棕色狐狸跳过了懒狗。我们正在测试分词器。",
    "素早い茶色の狐がのろまな犬を飛び越える。トークナイザーのテスト。",
    "def tokenize(text: str) -> list[int]:\n    return [ord(c) for c in text]  # 12345 67890\n",
    "Numbers like 3.14159, 1,000,000 and 2^10 = 1024 appear in text; emails a@b.com too.",
    "Emoji 🙂🙃🎉 and flags 🇫🇷🇯🇵 and families 👨‍👩‍👧 are byte sequences too.",
    "Tabs\tand  double  spaces   and\nnewlines\r\nshould survive.",
]

HELD_OUT = [
    "Hello, world! I'M here; you'RE there, they'll see.",
    "naïve café résumé — coöperate; e\u0301 (combining acute) vs é",
    "中文分词测试：你好，世界！",
    "日本語のテキストとカタカナ、ひらがな。",
    "Ελληνικά και עברית و العربية",
    "👩🏽‍💻 🧑‍🤝‍🧑 ❤️‍🔥 🏳️‍🌈",
    "control\x00chars\x07and\x1bescape\u200bzero-width",
    "   leading spaces and trailing   ",
    "\n\n\nmany\n\n\nnewlines\r\n\r\n",
    "numbers 1234567890 12 345 6789",
    "mixed<|endoftext|>special<|endoftext|>",
    "",
    "x" * 300,
]
