"""mBART language codes, their ISO 639-1 aliases and English names.

The converter writes `languages.json` into every converted checkpoint from this table and
the tokenizer's own language tokens, so serving needs nothing but the checkpoint directory.
"""

from __future__ import annotations

import re

# ISO 639-1 -> (mBART code, English name). Covers mBART-50 (a superset of mBART-cc25).
MBART_LANGUAGES: dict[str, tuple[str, str]] = {
    "ar": ("ar_AR", "Arabic"), "cs": ("cs_CZ", "Czech"), "de": ("de_DE", "German"),
    "en": ("en_XX", "English"), "es": ("es_XX", "Spanish"), "et": ("et_EE", "Estonian"),
    "fi": ("fi_FI", "Finnish"), "fr": ("fr_XX", "French"), "gu": ("gu_IN", "Gujarati"),
    "hi": ("hi_IN", "Hindi"), "it": ("it_IT", "Italian"), "ja": ("ja_XX", "Japanese"),
    "kk": ("kk_KZ", "Kazakh"), "ko": ("ko_KR", "Korean"), "lt": ("lt_LT", "Lithuanian"),
    "lv": ("lv_LV", "Latvian"), "my": ("my_MM", "Burmese"), "ne": ("ne_NP", "Nepali"),
    "nl": ("nl_XX", "Dutch"), "ro": ("ro_RO", "Romanian"), "ru": ("ru_RU", "Russian"),
    "si": ("si_LK", "Sinhala"), "tr": ("tr_TR", "Turkish"), "vi": ("vi_VN", "Vietnamese"),
    "zh": ("zh_CN", "Chinese"), "af": ("af_ZA", "Afrikaans"), "az": ("az_AZ", "Azerbaijani"),
    "bn": ("bn_IN", "Bengali"), "fa": ("fa_IR", "Persian"), "he": ("he_IL", "Hebrew"),
    "hr": ("hr_HR", "Croatian"), "id": ("id_ID", "Indonesian"), "ka": ("ka_GE", "Georgian"),
    "km": ("km_KH", "Khmer"), "mk": ("mk_MK", "Macedonian"), "ml": ("ml_IN", "Malayalam"),
    "mn": ("mn_MN", "Mongolian"), "mr": ("mr_IN", "Marathi"), "pl": ("pl_PL", "Polish"),
    "ps": ("ps_AF", "Pashto"), "pt": ("pt_XX", "Portuguese"), "sv": ("sv_SE", "Swedish"),
    "sw": ("sw_KE", "Swahili"), "ta": ("ta_IN", "Tamil"), "te": ("te_IN", "Telugu"),
    "th": ("th_TH", "Thai"), "tl": ("tl_XX", "Tagalog"), "uk": ("uk_UA", "Ukrainian"),
    "ur": ("ur_PK", "Urdu"), "xh": ("xh_ZA", "Xhosa"), "gl": ("gl_ES", "Galician"),
    "sl": ("sl_SI", "Slovenian"),
}  # fmt: skip

LANG_CODE_RE = re.compile(r"^[a-z]{2}_[A-Z]{2}$")


def language_entries(vocab: dict[str, int]) -> list[dict]:
    """One entry per mBART language token present in `vocab` (token -> id), sorted by ISO code."""
    entries = []
    for iso, (code, name) in MBART_LANGUAGES.items():
        if code in vocab:
            entries.append({"code": iso, "mbart_code": code, "name": name, "token_id": vocab[code]})
    return sorted(entries, key=lambda e: e["code"])
